"""The commands chained as a user would: synth -> cv -> train -> predict -> export."""

import shutil

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cytofuse.cli import app


def _tiny_project(runner, tmp_path):
    """Two phantom classes of four images and a 2-fold, 1-epoch config beside them."""
    data = tmp_path / "data"
    assert runner.invoke(app, ["synth", str(data), "--classes", "2", "--images-per-class", "4", "--shape", "2,96,96"]).exit_code == 0
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"manifest": "data/labels.csv"},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "intermediate", "encoder": "smallcnn"}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2, "probes": False, "baseline": False},
    }))
    return data, config


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``cytofuse synth`` and ``cytofuse cv`` of the tiny project, once for the module: (data, config, run, cv result).
    Tests that write into the run folder take a copy."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pipeline")
    runner = CliRunner()
    data, config = _tiny_project(runner, root)
    result = runner.invoke(app, ["cv", str(config), "--out", str(root / "run")])
    return data, config, root / "run", result


# torch's own deprecation notices for its legacy ONNX exporter and torch.jit (the export path we use)
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
def test_synth_cv_train_predict_export(cli_run, tmp_path):
    import torch

    torch.set_num_threads(1)
    runner = CliRunner()
    data, config, run, result = cli_run
    assert result.exit_code == 0, result.output
    assert "balanced" in result.output.lower() and "2-fold CV grouped by" in result.output
    said = " ".join(result.output.split())  # auto on whole fields, and how to compare the other scope
    assert "normalisation: per image (each image's own percentiles)" in said
    assert "patches.normalise: {choices: [image, dataset]}" in said
    shutil.copytree(run, tmp_path / "run")

    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "model"), "--cv-run", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    card = yaml.safe_load((tmp_path / "model" / "model.yaml").read_text())
    assert card["channel_names"] == ["mitochondria", "early_endosome", "recycling_endosome"]

    images = sorted(str(p) for p in (data / "images").glob("*_0.ome.tif"))
    for source in (tmp_path / "model", tmp_path / "run"):  # a model folder, or the CV folds as an ensemble
        out = tmp_path / f"pred_{source.name}"
        result = runner.invoke(app, ["predict", str(source), *images, "--out", str(out)])
        assert result.exit_code == 0, result.output
        summary = pd.read_csv(out / "summary.csv")
        assert len(summary) == 2 and summary[["prob_control", "prob_fragmented"]].sum(axis=1).round(5).eq(1).all()

    result = runner.invoke(app, ["export", str(tmp_path / "model"), str(tmp_path / "exported"), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported" / "model.onnx").is_file() and (tmp_path / "exported" / "rdf.yaml").is_file()

    again = runner.invoke(app, ["predict", str(tmp_path / "model"), *images, "--out", str(tmp_path / "pred_model")])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_explain_command_on_a_finished_run(cli_run, tmp_path):
    import torch

    torch.set_num_threads(1)
    runner = CliRunner()
    data, config, run, result = cli_run
    assert result.exit_code == 0
    shutil.copytree(run, tmp_path / "run")  # explain writes into the run folder
    result = runner.invoke(app, ["explain", str(tmp_path / "run"), "--no-umap", "--n-examples", "1"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "run" / "explain" / "intermediate"
    ablation = pd.read_csv(folder / "ablation.csv")
    assert set(ablation["channel"]) == {"mitochondria", "early_endosome", "recycling_endosome"}
    assert (folder / "gradcam_control.png").is_file() and (folder / "embedding_tsne.png").is_file()
    missing = runner.invoke(app, ["explain", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "nothing" in missing.output
