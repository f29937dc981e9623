"""Every config in examples/ runs end to end on small synthetic data of its kind."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cytofuse.config import load_config
from cytofuse.workflows.cv import run_cv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = ["train.max_epochs=1", "train.batch_size=32", "train.progress=false", "cv.probes=false"]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == [
        "auxiliary_channel.yaml", "livedead_labels.yaml", "organelle_fusion.yaml"]


def test_organelle_fusion_example(synthetic_set, tmp_path):
    cfg = load_config(EXAMPLES / "organelle_fusion.yaml", overrides=[
        f"data.manifest={synthetic_set / 'labels.csv'}", "patches.size=32", "cv.n_folds=2", *FAST])
    result = run_cv(cfg, tmp_path / "run", progress=False)
    assert set(result.summary["model"]) >= {"early", "intermediate", "late", "single:mitochondria", "handcrafted"}


def test_livedead_example_labels_from_pi_and_sees_bright_field_only(tmp_path):
    from cytofuse.training.cache import PatchCache
    from cytofuse.synthetic.cells import write_livedead_set

    write_livedead_set(tmp_path / "data", n_fields=4, seed=0)
    cfg = load_config(EXAMPLES / "livedead_labels.yaml", overrides=[f"data.images={tmp_path / 'data'}", "cv.n_folds=2", *FAST])
    result = run_cv(cfg, tmp_path / "run", progress=False)
    assert PatchCache.open(tmp_path / "run" / "cache").channels == ("BF",)
    rule = json.loads((tmp_path / "run" / "labels" / "label_rule.json").read_text())
    assert rule["classes"] == ["live", "dead"] and rule["low_threshold"] <= rule["high_threshold"]
    # the phantom's dead cells carry PI: the high class should come mostly from the treated fields
    patches = pd.read_parquet(tmp_path / "run" / "patches.parquet")
    dead_share = patches.groupby("condition")["label"].apply(lambda s: (s == "dead").mean())
    assert dead_share["treated"] > dead_share["untreated"]
    metrics = json.loads((tmp_path / "run" / "models" / "bright-field" / "metrics.json").read_text())
    assert metrics["positive_class"]["class"] == "dead" and "label_correlation" in metrics
    assert result.classes == ["dead", "live"]


def test_auxiliary_channel_example(tmp_path):
    from cytofuse.synthetic.cells import write_single_cell_set

    write_single_cell_set(tmp_path / "data", counts={"G1": 12, "G2": 10, "M": 6}, seed=0)
    cfg = load_config(EXAMPLES / "auxiliary_channel.yaml", overrides=[f"data.images={tmp_path / 'data'}", "cv.n_folds=2", *FAST])
    result = run_cv(cfg, tmp_path / "run", progress=False)
    inputs = {}
    for name in ("BF+DF, DNA dropout", "BF, DNA samples", "BF+DF", "BF+DF+DNA"):
        folder = tmp_path / "run" / "models" / "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        inputs[name] = json.loads((folder / "metrics.json").read_text())["model"]["input_channels"]
    assert inputs == {"BF+DF, DNA dropout": ["BF", "DF"], "BF, DNA samples": ["BF"], "BF+DF": ["BF", "DF"],
                      "BF+DF+DNA": ["BF", "DF", "DNA"]}
    hand = json.loads((tmp_path / "run" / "models" / "handcrafted" / "metrics.json").read_text())
    assert not any("DNA" in f for f in hand["model"]["features"])  # the baseline sees test-time channels only
    assert "positive_class" in json.loads((tmp_path / "run" / "models" / "BF_DF" / "metrics.json").read_text())
    assert len(result.summary)
