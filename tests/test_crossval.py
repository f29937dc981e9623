import json

import numpy as np
import pandas as pd
import pytest

from cytofuse.config import validate_config
from cytofuse.workflows.cv import check_fold_classes, inner_split, outer_folds, run_cv
from cytofuse.errors import InputError


def _design(n_groups_per_class=(6, 6, 5), patches_per_group=7):
    labels, groups = [], []
    for c, n in enumerate(n_groups_per_class):
        for g in range(n):
            labels += [c] * patches_per_group
            groups += [f"c{c}g{g}"] * patches_per_group
    return np.array(labels), np.array(groups)


def test_outer_folds_never_split_a_group_and_cover_every_patch_once():
    labels, groups = _design()
    folds = outer_folds(labels, groups, n_folds=5, seed=3)
    assert len(folds) == 5
    tests = np.concatenate([test for _, test in folds])
    assert sorted(tests.tolist()) == list(range(len(labels)))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert set(labels[test]) == {0, 1, 2}  # stratified: every class in every test fold


def test_leave_one_group_out():
    labels, groups = _design((2, 2), 3)
    folds = outer_folds(labels, groups, n_folds="loo")
    assert len(folds) == 4
    assert all(len(set(groups[test])) == 1 for _, test in folds)


def test_more_folds_than_groups_in_a_class_is_an_error():
    labels, groups = _design((6, 3))
    with pytest.raises(InputError, match=r"n_folds=5 but some classes have fewer groups with patches than folds \(1: 3\)"):
        outer_folds(labels, groups, n_folds=5)
    with pytest.raises(InputError, match=r"\('T47D': 3\)"):
        outer_folds(labels, groups, n_folds=5, classes=["MCF7", "T47D"])


def test_inner_split_is_grouped_and_holds_about_the_fraction():
    labels, groups = _design((10, 10), 4)
    rest, held = inner_split(labels, groups, fraction=0.2, seed=0)
    assert not set(groups[rest]) & set(groups[held])
    assert len(set(groups[held])) == 4  # 2 of 10 groups per class
    assert set(labels[held]) == {0, 1}


def test_inner_split_needs_two_groups_per_class():
    labels, groups = _design((3, 1))
    with pytest.raises(InputError, match=r"class\(es\) \[1\] have only \[1\] group"):
        inner_split(labels, groups, fraction=0.2)


def test_a_training_split_without_a_class_is_an_error():
    with pytest.raises(InputError, match=r"fold 2: the training split lacks class\(es\) \['b'\]"):
        check_fold_classes(np.array([0, 0, 1, 2]), np.array([0, 1, 3]), ["a", "b", "c"], fold=2)


@pytest.fixture
def tiny_set(synthetic_set):
    """The manifest of the session's shared synthetic set (conftest.py)."""
    return synthetic_set / "labels.csv"


def test_run_cv_end_to_end_on_tiny_synthetic_data(tiny_set, tmp_path):
    import torch

    torch.set_num_threads(1)
    cfg = validate_config({
        "data": {"manifest": str(tiny_set)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}, {"fusion": "single", "channel": "mitochondria", "encoder": "smallcnn"},
                   {"fusion": "late", "encoder": "smallcnn", "late_weights": "validation"}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 4},
    })
    result = run_cv(cfg, tmp_path / "run", progress=False)
    patches = pd.read_parquet(tmp_path / "run" / "patches.parquet")
    for name in ("early", "single:mitochondria", "late"):
        pred = result.predictions[name]
        # every patch predicted exactly once, by the fold that held its image out
        assert sorted(pred["patch_id"]) == sorted(patches["patch_id"])
        assert pred.groupby("image_id")["fold"].nunique().max() == 1
        probs = pred[[f"prob_{c}" for c in result.classes]].to_numpy()
        assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    folder = tmp_path / "run" / "models" / "single_mitochondria"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["cv"]["patch"]["n_folds"] == 4
    assert 0.0 <= metrics["cv"]["image"]["summary"]["balanced_accuracy"]["mean"] <= 1.0
    assert "4-fold CV" in metrics["measured_on"]
    assert (folder / "fold_3" / "best.safetensors").is_file()
    assert (folder / "training_curves.png").stat().st_size > 0 and (folder / "training_curves.svg").is_file()
    deep = result.summary[result.summary["kind"] == "model"]
    assert set(deep["model"]) == {"early", "single:mitochondria", "late"}
    assert set(result.summary.loc[result.summary["kind"] != "model", "model"]) == {
        "handcrafted", "probe:background", "probe:intensity", "probe:acquisition"}  # cv.baseline / cv.probes default on
    params = result.summary.drop_duplicates("model").set_index("model")["parameters"]
    assert params["late"] > 2.5 * params["single:mitochondria"]  # three encoders and classifiers vs one
    from safetensors.numpy import load_file

    from cytofuse.models import load_model

    rebuilt = load_model(tmp_path / "run" / "models" / "late" / "fold_0" / "best.safetensors")
    assert rebuilt.fusion == "late" and rebuilt.num_classes == 2 and rebuilt.in_channels == 3
    late = load_file(tmp_path / "run" / "models" / "late" / "fold_0" / "best.safetensors")
    weights = np.exp(late["head.weight_logits"])
    assert weights.shape == (3,) and weights.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_cv(cfg, tmp_path / "run", progress=False)


def test_sweep_over_patch_size_runs_one_cv_per_value(tiny_set, tmp_path):
    import torch

    from cytofuse.workflows.cv import run_sweep, sweep_configs

    torch.set_num_threads(1)
    cfg = validate_config({
        "data": {"manifest": str(tiny_set)},
        "patches": {"exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2},
        "sweep": {"parameter": "patches.size", "values": [32, 48]},
    })
    configs = sweep_configs(cfg)
    assert [label for label, _ in configs] == ["size=32", "size=48"]
    assert [c.patches.size for _, c in configs] == [32, 48] and all(c.sweep is None for _, c in configs)
    table = run_sweep(cfg, tmp_path / "run", progress=False)
    deep = table[table["kind"] == "model"]
    assert deep["patches.size"].tolist() == ["32", "32", "48", "48"]  # patch and image level per value
    assert (table["kind"] == "probe").sum() == 2 * 2 * 3  # three probes per value, at patch and image level
    sizes = [pd.read_parquet(tmp_path / "run" / "sweep" / f"size_{s}" / "patches.parquet")["size"].unique().tolist() for s in (32, 48)]
    assert sizes == [[32], [48]]


def test_an_interrupted_cv_resumes_without_refitting_finished_folds(tiny_set, tmp_path, monkeypatch):
    import torch

    import cytofuse.training.fit as train_mod

    torch.set_num_threads(1)
    cfg = validate_config({
        "data": {"manifest": str(tiny_set)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2},
    })
    real_fit, trained = train_mod.fit, []

    def fit_then_stop(model, train_ds, val_ds, **kw):
        if trained:
            raise KeyboardInterrupt  # the user stops the run during the second fold
        trained.append(kw["out_dir"])
        return real_fit(model, train_ds, val_ds, **kw)

    monkeypatch.setattr(train_mod, "fit", fit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_cv(cfg, tmp_path / "run", progress=False)
    first = (tmp_path / "run" / "models" / "early" / "fold_0" / "best.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(train_mod, "fit", real_fit)
    result = run_cv(cfg, tmp_path / "run", progress=False)  # resumes: the folder is unfinished
    assert (tmp_path / "run" / "models" / "early" / "fold_0" / "best.safetensors").stat().st_mtime_ns == first
    assert result.predictions["early"]["fold"].nunique() == 2


def test_held_out_test_set_is_grouped_and_predicted_by_the_fold_ensemble(tmp_path):
    import torch

    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", classes=2, images_per_class=6, shape=(2, 96, 96), seed=1, progress=False)

    torch.set_num_threads(1)
    cfg = validate_config({
        "data": {"manifest": str(data / "labels.csv")},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2, "test_fraction": 0.25},
    })
    result = run_cv(cfg, tmp_path / "run", progress=False)
    folds = pd.read_csv(tmp_path / "run" / "folds.csv")
    held = folds[folds["fold"] == -1]
    assert 2 <= held["group"].nunique() <= 4 and held["y_true"].nunique() == 2  # about a quarter, both classes
    assert not set(held["group"]) & set(folds.loc[folds["fold"] >= 0, "group"])
    test_pred = pd.read_parquet(tmp_path / "run" / "models" / "early" / "test_predictions.parquet")
    assert sorted(test_pred["patch_id"]) == sorted(held["patch_id"])
    assert "test" in result.metrics["early"] and "held-out test set" in result.metrics["early"]["measured_on"]


@pytest.mark.parametrize("train_bars", [True, False])
def test_progress_display_works_with_and_without_training_bars(tiny_set, tmp_path, capsys, train_bars):
    import torch

    torch.set_num_threads(1)
    cfg = validate_config({
        "data": {"manifest": str(tiny_set)},
        "patches": {"size": 48, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": train_bars, "accelerator": "cpu"},
        "cv": {"n_folds": 2},
    })
    run_cv(cfg, tmp_path / "run", progress=True)  # rich allows one live display: nesting used to crash
    err = capsys.readouterr().err
    assert ("early: fold 2/2 done" in err) == train_bars


def test_fits_side_by_side_in_processes_give_the_numbers_of_the_serial_run(tiny_set, tmp_path):
    """cv.jobs 2: every (model, fold) fit runs in one of two spawned processes with an equal share of the
    threads (here one each, as the serial run); predictions, metrics and saved weights equal the serial
    run's to the last digit, and the positive-class thresholds (from validation predictions) come through too."""
    import torch
    from safetensors.numpy import load_file

    torch.set_num_threads(1)
    raw = {
        "data": {"manifest": str(tiny_set)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}, {"fusion": "intermediate", "encoder": "smallcnn"}],
        "train": {"max_epochs": 2, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2, "baseline": False, "probes": False, "positive_class": "fragmented"},
    }
    serial = run_cv(validate_config(raw), tmp_path / "serial", progress=False)
    parallel = run_cv(validate_config({**raw, "cv": {**raw["cv"], "jobs": 2}}), tmp_path / "parallel", progress=False)
    for name in ("early", "intermediate"):
        pd.testing.assert_frame_equal(serial.predictions[name], parallel.predictions[name], check_exact=True)
        a, b = serial.metrics[name], parallel.metrics[name]
        assert a["cv"] == b["cv"] and a["positive_class"] == b["positive_class"]
        assert a["model"]["parameters"] == b["model"]["parameters"] > 0
        folder = name.replace(":", "_")
        for k in (0, 1):
            w1 = load_file(tmp_path / "serial" / "models" / folder / f"fold_{k}" / "best.safetensors")
            w2 = load_file(tmp_path / "parallel" / "models" / folder / f"fold_{k}" / "best.safetensors")
            assert w1.keys() == w2.keys() and all(np.array_equal(w1[t], w2[t]) for t in w1)
    with pytest.raises(Exception, match="jobs"):
        validate_config({**raw, "cv": {**raw["cv"], "jobs": 0}})


def test_fits_side_by_side_cannot_be_distributed_fits(tiny_set):
    base = {"data": {"manifest": str(tiny_set)}, "cv": {"jobs": 2}}
    validate_config(base | {"train": {"strategy": "auto", "devices": 1}})  # one device per fit: fine
    for train, named in (({"strategy": "ddp"}, "train.strategy: ddp"), ({"devices": 2}, "train.devices: 2"),
                         ({"num_nodes": 2}, "train.num_nodes: 2")):
        with pytest.raises(Exception, match=rf"cv\.jobs 2 runs fits side by side .* \({named}\)"):
            validate_config(base | {"train": train})
    validate_config({"data": {"manifest": str(tiny_set)}, "train": {"strategy": "ddp", "devices": 2}})  # jobs 1
