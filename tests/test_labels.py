"""Patch labels from a fluorescence channel: values, the mixture rule, and the run that uses them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cytofuse.config import validate_config
from cytofuse.errors import ConfigError, InputError
from cytofuse.preprocess.labels import LabelRule, fit_label_rule, patch_values


def test_patch_values_mean_and_integrated_are_exact():
    stack = np.arange(2 * 6 * 6, dtype=np.uint16).reshape(2, 6, 6)
    origins = np.array([[0, 0, 0], [1, 2, 3], [0, 4, 4]])
    mean = patch_values(stack, origins, size=2, statistic="mean")
    expect = [stack[z, y:y + 2, x:x + 2].mean() for z, y, x in origins]
    assert np.allclose(mean, expect)
    assert np.allclose(patch_values(stack, origins, size=2, statistic="integrated"), np.array(expect) * 4)
    with pytest.raises(InputError, match="statistic must be 'mean' or 'integrated', got 'max'"):
        patch_values(stack, origins, size=2, statistic="max")


def test_mixture_rule_recovers_the_papers_thresholds():
    """Values drawn from the paper's two components give thresholds near 224.5+34.5 and 550.4-153.6."""
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(224.51, 34.46, 6000), rng.normal(550.44, 153.55, 4000)]
    rule = fit_label_rule(values, channel="PI", classes=("live", "dead"))
    assert rule.mixture["means"][0] == pytest.approx(224.5, abs=5)
    assert rule.mixture["sds"][1] == pytest.approx(153.5, rel=0.1)
    assert rule.low_threshold == pytest.approx(258.97, abs=6)
    assert rule.high_threshold == pytest.approx(396.89, abs=20)
    labels = rule.apply(np.array([100.0, 300.0, 900.0]))
    assert labels.tolist() == ["live", None, "dead"]  # the band between is discarded


def test_hand_set_thresholds_and_overlapping_components():
    rule = fit_label_rule(np.zeros(3), channel="PI", low_threshold=10, high_threshold=20)
    assert rule.source == "manual" and rule.mixture is None
    assert rule.apply(np.array([5, 15, 25])).tolist() == ["low", None, "high"]
    rng = np.random.default_rng(1)
    wide = fit_label_rule(np.r_[rng.normal(0, 1, 500), rng.normal(1, 1, 500)], channel="x", k_sd=1.0)
    assert wide.low_threshold == wide.high_threshold  # crossed thresholds: split at the midpoint, nothing discarded
    assert "crossed" in wide.notes[0]
    assert not any(v is None for v in wide.apply(np.linspace(-3, 4, 50)))
    with pytest.raises(InputError, match="at least 10 distinct patch values"):
        fit_label_rule(np.ones(50), channel="PI")


def test_label_channel_is_excluded_from_every_input():
    cfg = validate_config({"data": {"images": "x"}, "labels": {"channel": "PI", "classes": ["live", "dead"]}})
    assert cfg.patches.exclude_channels == ["PI"]
    with pytest.raises(ConfigError, match="label source and cannot be one of patches.channels"):
        validate_config({"data": {"images": "x"}, "patches": {"channels": ["BF", "PI"]}, "labels": {"channel": "PI"}})
    with pytest.raises(ConfigError, match="cannot be a model's input or auxiliary channel"):
        validate_config({"data": {"images": "x"}, "labels": {"channel": "PI"},
                         "models": [{"fusion": "intermediate", "auxiliary": ["PI"]}]})
    with pytest.raises(ConfigError, match="two different names"):
        validate_config({"data": {"images": "x"}, "labels": {"channel": "PI", "classes": ["a", "a"]}})


def test_rule_round_trips_through_json():
    rule = LabelRule("PI", "mean", ("live", "dead"), 1.0, 2.0, {"means": [0, 3], "sds": [1, 1], "weights": [.5, .5]})
    assert json.loads(json.dumps(rule.to_json()))["classes"] == ["live", "dead"]


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    out = tmp_path_factory.mktemp("labels") / "data"
    write_synthetic_dataset(out, classes=2, images_per_class=6, shape=(1, 96, 96), seed=5, progress=False)
    return out / "labels.csv"


def test_cv_with_labels_from_a_channel(phantom_set, tmp_path):
    import torch

    from cytofuse.workflows.cv import run_cv
    from cytofuse.training.cache import PatchCache

    torch.set_num_threads(1)
    cfg = validate_config({
        "data": {"manifest": str(phantom_set)},
        "patches": {"size": 32, "stride": 16, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "labels": {"channel": "recycling_endosome", "classes": ["dim", "bright"], "fit_on": ["control"]},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2, "positive_class": "bright", "probes": False},
    })
    result = run_cv(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert PatchCache.open(run / "cache").channels == ("mitochondria", "early_endosome")  # no label channel
    rule = json.loads((run / "labels" / "label_rule.json").read_text())
    values = pd.read_parquet(run / "labels" / "patch_values.parquet")
    assert values["used_for_fit"].sum() == (values["condition"] == "control").sum()
    patches = pd.read_parquet(run / "patches.parquet")
    assert set(patches["label"]) == {"dim", "bright"} and set(patches["condition"]) == {"control", "fragmented"}
    assert (patches.loc[patches["label"] == "dim", "label_value"] < rule["low_threshold"]).all()
    assert (patches.loc[patches["label"] == "bright", "label_value"] > rule["high_threshold"] - 1e-9).all()
    assert rule["counts"].get("discarded", 0) == len(values) - len(patches)
    assert (run / "labels" / "histogram.png").is_file()
    pred = result.predictions["early"]
    assert pred["image_id"].nunique() == len(pred)  # each patch is its own evaluation unit
    assert pred.groupby("source_image")["fold"].nunique().max() == 1  # an image's patches stay in one fold
    metrics = json.loads((run / "models" / "early" / "metrics.json").read_text())
    corr = metrics["label_correlation"]
    assert corr["n"] == len(pred) and -1 <= corr["r"] <= 1 and corr["score"] == "prob_bright"
    assert metrics["positive_class"]["class"] == "bright" and len(metrics["positive_class"]["folds"]) == 2
    assert "labels from the mean of channel recycling_endosome" in metrics["measured_on"]
    from cytofuse.evaluation.report import labels_context, extras_table, run_entries

    section = labels_context(run)
    assert section["channel"] == "recycling_endosome" and section["figure"] is not None
    assert [r[0] for r in section["table"]["rows"]] == ["dim", "bright", "discarded (band between)"]
    extras = extras_table(run_entries(run))
    assert extras["rows"][0][0] == "early" and extras["rows"][0][3].startswith("bright: ")


def test_fit_on_an_unknown_condition_is_an_error(phantom_set, tmp_path):
    from cytofuse.workflows.cv import run_cv

    cfg = validate_config({
        "data": {"manifest": str(phantom_set)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "labels": {"channel": "mitochondria", "fit_on": ["untreated"]},
        "train": {"max_epochs": 1, "progress": False}, "cv": {"n_folds": 2},
    })
    with pytest.raises(InputError, match=r"labels.fit_on names image labels \['untreated'\]"):
        run_cv(cfg, tmp_path / "run", progress=False)
