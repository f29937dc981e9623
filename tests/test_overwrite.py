"""--overwrite replaces only folders cytofuse made, and only once the new folder is complete."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cytofuse.cli import app
from cytofuse.errors import RunFolderError
from cytofuse.runs import MARKER, check_replaceable, mark_finished, prepare_run_dir, replacing_folder


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def _users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.docx").write_text("years of work")
    return path


@pytest.fixture
def data(small_synthetic_set) -> Path:
    """The session's shared set (conftest.py): read-only, so config and model folder live beside it in ``work``."""
    return small_synthetic_set


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ow")


@pytest.fixture(scope="module")
def config(small_synthetic_set, work) -> Path:
    data = small_synthetic_set
    file = work / "run.yaml"
    file.write_text(yaml.safe_dump({"data": {"manifest": str(data / "labels.csv")}, "patches": {"size": 32},
                                    "models": [{"fusion": "early", "encoder": "smallcnn"}],
                                    "cv": {"n_folds": 2, "probes": False, "baseline": False},
                                    "train": {"max_epochs": 1, "progress": False}}))
    return file


@pytest.fixture(scope="module")
def model_dir(work) -> Path:
    from cytofuse.inference.modelfolder import card_for, write_model_folder
    from cytofuse.models import create_model
    from cytofuse.preprocess.patches import PatchSettings

    model = create_model("early", in_channels=4, num_classes=2, encoder="smallcnn").eval()
    card = card_for([model], class_names=["a", "b"], channel_names=["c0", "c1", "c2", "c3"],
                    patches=PatchSettings(size=32))
    return write_model_folder(work / "model", [model], card)


def _commands(target: Path, data: Path, config: Path, model_dir: Path) -> dict[str, list]:
    return {
        "synth": ["synth", target, "--classes", "1", "--images-per-class", "1", "--shape", "1,32,32"],
        "synth livedead": ["synth", target, "--kind", "livedead"],
        "synth singlecell": ["synth", target, "--kind", "singlecell"],
        "emptyfilter": ["emptyfilter", data, "--out", target, "--encoder", "intensity"],
        "patches": ["patches", "--manifest", data / "labels.csv", "--out", target, "--size", "32"],
        # leave-one-out: two images per class are too few for 2-fold CV with a validation split (refused first)
        "cv": ["cv", config, "--out", target, "--set", "cv.n_folds=loo"],
        "train": ["train", config, "--out", target, "--epochs", "1"],
        "predict": ["predict", model_dir, data / "images" / "control_0.ome.tif", "--out", target],
        "export": ["export", model_dir, target, "--format", "onnx", "--no-verify"],
    }


COMMANDS = ["synth", "synth livedead", "synth singlecell", "emptyfilter", "patches", "cv", "train", "predict", "export"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_to_replace_a_users_folder(command, tmp_path, data, config, model_dir):
    target = _users_folder(tmp_path / "results")
    code, output = _invoke(*_commands(target, data, config, model_dir)[command], "--overwrite")
    assert code == 2, output
    assert f"{target} exists and is not a cytofuse" in output and "never replaces or deletes" in output
    assert sorted(p.name for p in target.iterdir()) == ["thesis.docx"]
    assert (target / "thesis.docx").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # nothing left beside it


def test_synth_overwrite_replaces_its_own_folder(tmp_path):
    args = ["synth", tmp_path / "syn", "--classes", "1", "--images-per-class", "1", "--shape", "1,32,32"]
    assert _invoke(*args)[0] == 0
    assert (tmp_path / "syn" / MARKER).read_text() == "finished\n"
    code, output = _invoke(*args)
    assert code == 2 and "exists; pass --overwrite" in output
    (tmp_path / "syn" / "stale.txt").write_text("from the old set")
    assert _invoke(*args, "--overwrite")[0] == 0
    assert sorted(p.name for p in (tmp_path / "syn").iterdir()) == [MARKER, "images", "labels.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


def test_cv_overwrite_with_an_invalid_config_leaves_the_finished_run(tmp_path, data, config):
    run = prepare_run_dir(tmp_path / "run")
    (run / "summary.csv").write_text("model,balanced_accuracy\nearly,0.91\n")
    mark_finished(run)
    code, output = _invoke("cv", config, "--out", run, "--overwrite", "--set", "cv.n_folds=1")
    assert code == 2 and "n_folds must be >= 2 or 'loo', got 1" in output
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace(str(data), str(tmp_path / "nowhere")))
    code, output = _invoke("cv", bad, "--out", run, "--overwrite")
    assert code == 2 and "nowhere" in output
    assert (run / "summary.csv").read_text() == "model,balanced_accuracy\nearly,0.91\n"
    assert (run / MARKER).read_text() == "finished\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "run"]


def test_a_failed_rebuild_leaves_the_old_folder(tmp_path):
    with replacing_folder(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing_folder(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "a.txt").write_text("second, half written")
            raise RuntimeError("disk full")
    assert (tmp_path / "out" / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with replacing_folder(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_replaceable_states(tmp_path):
    assert check_replaceable(tmp_path / "absent", overwrite=False) is False
    (tmp_path / "empty").mkdir()
    assert check_replaceable(tmp_path / "empty", overwrite=False) is False
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match=f"model folder {tmp_path / 'file'} exists and is not a folder"):
        check_replaceable(tmp_path / "file", overwrite=True, what="model folder")
    mine = _users_folder(tmp_path / "mine")
    for overwrite in (False, True):  # the user is not told to pass --overwrite for a folder that would be refused
        with pytest.raises(RunFolderError, match=f"{mine} exists and is not a cytofuse model folder"):
            check_replaceable(mine, overwrite=overwrite, what="model folder")
    ours = tmp_path / "ours"
    ours.mkdir()
    mark_finished(ours)
    with pytest.raises(RunFolderError, match="exists; pass --overwrite"):
        check_replaceable(ours, overwrite=False)
    assert check_replaceable(ours, overwrite=True) is True


def test_prepare_run_dir_overwrite_swaps_in_a_fresh_run(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    (run / "old.parquet").write_text("old")
    mark_finished(run)
    assert prepare_run_dir(run, overwrite=True) == run
    assert sorted(p.name for p in run.iterdir()) == [MARKER]
    assert (run / MARKER).read_text() == "running\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_tables_are_written_whole_or_not_at_all(tmp_path):
    """A table whose writer fails leaves the old file as it was and no temporary file behind."""
    import pandas as pd

    from cytofuse.runs import write_table_atomic

    for name in ("folds.csv", "predictions.parquet"):
        path = tmp_path / name
        write_table_atomic(path, pd.DataFrame({"a": [1, 2]}))
        before = path.read_bytes()

        class Broken(pd.DataFrame):
            def to_csv(self, *a, **k):
                raise OSError("disk full")

            to_parquet = to_csv

        with pytest.raises(OSError, match="disk full"):
            write_table_atomic(path, Broken({"a": [3]}))
        assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert pd.read_parquet(tmp_path / "predictions.parquet")["a"].tolist() == [1, 2]
    assert pd.read_csv(tmp_path / "folds.csv")["a"].tolist() == [1, 2]
