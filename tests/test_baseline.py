import csv
import json

import numpy as np
import pandas as pd
import pytest

from cytofuse.evaluation.baseline import (
    acquisition_features,
    background_features,
    colocalisation,
    cross_validate_features,
    feature_tables,
    glcm_features,
    handcrafted_features,
    intensity_features,
    lbp_histograms,
    object_features,
    raw_patches,
    shortcut_warnings,
)
from cytofuse.errors import InputError

P = 64


def _disk(cy, cx, r, shape=(P, P)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_one_bright_disk_is_one_object_of_its_area_and_round():
    mask = _disk(20, 40, 10)
    feats = object_features(mask[None])
    assert feats["obj_count"][0] == 1
    assert feats["obj_area_total"][0] == pytest.approx(np.pi * 10**2, rel=0.03)
    assert feats["obj_eccentricity_mean"][0] == pytest.approx(0.0, abs=1e-3)
    # centroid (20, 40) lies hypot(11.5, 8.5) px from the centre (31.5, 31.5), in units of half the side
    assert feats["obj_centre_distance_min"][0] == pytest.approx(np.hypot(11.5, 8.5) / 32, rel=1e-6)


def test_object_morphology_matches_regionprops_and_keeps_patches_apart():
    from skimage.measure import label, regionprops

    yy, xx = np.mgrid[:P, :P]
    ellipse = ((yy - 32) / 20) ** 2 + ((xx - 30) / 7) ** 2 <= 1
    two = _disk(10, 10, 4) | _disk(50, 50, 6)
    # the ellipse touches the patch's lower edge only if objects leak across patches: they must not
    feats = object_features(np.stack([ellipse, two, np.zeros((P, P), bool)]))
    assert feats["obj_eccentricity_mean"][0] == pytest.approx(regionprops(label(ellipse))[0].eccentricity, rel=1e-6)
    assert feats["obj_count"].tolist() == [1, 2, 0]
    assert feats["obj_area_max"][1] == _disk(50, 50, 6).sum()
    assert np.isnan(feats["obj_area_mean"][2]) and feats["obj_area_total"][2] == 0


def test_colocalisation_of_identical_and_disjoint_channels():
    a = _disk(20, 20, 8) * 900.0 + 100
    b = _disk(45, 45, 8) * 900.0 + 100
    ma, mb = a > 500, b > 500
    same = colocalisation(a[None], a[None], ma[None], ma[None])
    apart = colocalisation(a[None], b[None], ma[None], mb[None])
    assert same["pearson"][0] == pytest.approx(1.0) and same["manders_m1"][0] == pytest.approx(1.0)
    assert same["jaccard"][0] == 1.0
    assert apart["manders_m1"][0] == 0.0 and apart["manders_m2"][0] == 0.0 and apart["jaccard"][0] == 0.0
    flat = colocalisation(np.ones((1, P, P)), a[None], np.zeros((1, P, P), bool), ma[None])
    assert flat["pearson"][0] == 0.0 and flat["manders_m1"][0] == 0.0  # defined, not NaN


def test_texture_of_a_constant_and_a_striped_patch():
    const = np.full((1, P, P), 7.0)
    g = glcm_features(const)
    assert g["glcm_contrast"][0] == 0 and g["glcm_energy"][0] == pytest.approx(1.0)
    assert lbp_histograms(const)[0, 8] == pytest.approx(1.0)  # every neighbour >= centre: code P = 8
    stripes = np.tile((np.arange(P) % 2) * 1.0, (P, 1))[None]  # columns alternate 0, 1
    g = glcm_features(stripes)
    # horizontal and both diagonal pairs differ by 15 levels, vertical pairs not: 3 of 4 directions
    n_h, n_v, n_d = P * (P - 1), (P - 1) * P, (P - 1) ** 2
    assert g["glcm_contrast"][0] == pytest.approx(225 * (n_h + 2 * n_d) / (n_h + n_v + 2 * n_d))
    hist = lbp_histograms(np.random.default_rng(0).normal(size=(3, P, P)))
    assert hist.shape == (3, 10) and np.allclose(hist.sum(1), 1)


def test_feature_tables_have_named_columns_and_known_values():
    x = np.stack([_disk(20, 40, 8) * 1000.0 + 100, _disk(20, 40, 8) * 1000.0 + 100, _disk(50, 10, 5) * 500.0 + 50])[None]
    thr = np.array([[500.0, 500.0, 300.0]])
    feats = handcrafted_features(x, thr, channel_names=["a", "b", "c"])
    assert feats.shape[0] == 1 and feats.shape[1] == 3 * 30 + 3 * 4
    assert feats["a_obj_count"][0] == 1 and feats["a~b_pearson"][0] == pytest.approx(1.0)
    assert feats["a~c_manders_m1"][0] == 0.0
    assert feats["a_fg_fraction"][0] == pytest.approx(_disk(20, 40, 8).mean())
    assert feats["a_fg_mean"][0] == pytest.approx(1100.0)
    bg = background_features(x, thr, channel_names=["a", "b", "c"])
    assert bg["a_bg_mean"][0] == pytest.approx(100.0) and bg["a_bg_sd"][0] == pytest.approx(0.0, abs=1e-3)
    assert bg["c_bg_p50"][0] == 50.0
    none = background_features(x, np.zeros((1, 3)))  # every pixel is foreground: no background to describe
    assert np.isnan(none["ch0_bg_mean"][0]) and np.isnan(none["ch0_bg_p5"][0]) and none["ch0_bg_fraction"][0] == 0
    inten = intensity_features(np.arange(2 * 4 * 4, dtype=float).reshape(1, 2, 4, 4))
    assert inten["ch1_mean"][0] == pytest.approx(23.5) and inten["ch0_max"][0] == 15 and inten["ch0_p50"][0] == 7.5


def test_bad_shapes_name_the_argument():
    with pytest.raises(InputError, match=r"patches must be an \(N, C, P, P\) batch.*got shape \(3, 8, 8\)"):
        intensity_features(np.zeros((3, 8, 8)))
    with pytest.raises(InputError, match=r"thresholds must have shape \(N, C\) = \(1, 2\), got \(2,\)"):
        background_features(np.zeros((1, 2, 8, 8)), np.zeros(2))
    with pytest.raises(InputError, match=r"channel_names must name the 2 channels"):
        intensity_features(np.zeros((1, 2, 8, 8)), channel_names=["a"])


def _images_table():
    return pd.DataFrame({"image_id": ["i0", "i1"], "z": [1, 1], "y": [16, 16], "x": [16, 24], "dtype": ["uint16", "uint8"],
                         "lo_a": [100.0, 10.0], "hi_a": [4100.0, 210.0], "thr_a": [900.0, 60.0]})


def test_acquisition_facts_per_patch():
    feats = acquisition_features(_images_table(), ["i1", "i0", "i1"], channel_names=["a"])
    assert feats["bit_depth"].tolist() == [8, 16, 8] and feats["x"].tolist() == [24, 16, 24]
    assert feats["a_range"].tolist() == [200.0, 4000.0, 200.0]
    with pytest.raises(InputError, match=r"no row for image_id \['nope'\]"):
        acquisition_features(_images_table(), ["nope"], channel_names=["a"])


def test_raw_patches_undo_the_cache_normalisation(tmp_path):
    from cytofuse.training.cache import build_patch_cache

    rng = np.random.default_rng(0)
    raw = {"i0": rng.integers(100, 4100, (1, 1, 16, 16)).astype(np.uint16), "i1": rng.integers(10, 210, (1, 1, 16, 24)).astype(np.uint16)}
    index = pd.DataFrame({"patch_id": [0, 1, 2], "image_id": ["i0", "i1", "i1"], "z": 0, "y": 0, "x": [0, 0, 8], "size": 16})
    cache = build_patch_cache(index, _images_table(), load_image=raw.__getitem__, channels=["a"], out=tmp_path / "c", progress=False)
    x, thr = raw_patches(cache, np.array([2, 0]), _images_table(), ["i1", "i0"])
    assert np.allclose(x[0, 0], raw["i1"][0, 0, :, 8:24], rtol=2e-3, atol=0.5)  # float16 cache: ~3 significant digits
    assert np.allclose(x[1, 0], raw["i0"][0, 0], rtol=2e-3, atol=0.5)
    assert thr[:, 0].tolist() == [60.0, 900.0]
    tables = feature_tables(cache, _images_table(), np.array([2, 0]), ["i1", "i0"], which=["intensity", "acquisition"])
    assert tables["intensity"]["a_max"].to_numpy() == pytest.approx([raw["i1"][0, 0, :, 8:].max(), raw["i0"].max()], rel=2e-3)
    assert tables["acquisition"]["bit_depth"].tolist() == [8, 16]
    with pytest.raises(InputError, match=r"unknown feature set\(s\) \['texture'\]"):
        feature_tables(cache, _images_table(), np.array([0]), ["i0"], which=["texture"])


class _Spy:
    """An estimator that records the rows (by their id in column 0) it is fitted on and predicts."""

    log: list = []

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        _Spy.log.append(("fit", set(X[:, 0].astype(int))))
        return self

    def predict_proba(self, X):
        _Spy.log.append(("predict", set(X[:, 0].astype(int))))
        return np.full((len(X), len(self.classes_)), 1.0 / len(self.classes_))


def test_each_fold_model_is_fitted_on_its_training_folds_only():
    folds = pd.DataFrame({"patch_id": range(12), "image_id": [f"im{i // 2}" for i in range(12)],
                          "group": [f"im{i // 2}" for i in range(12)], "y_true": [0, 0, 1, 1] * 3,
                          "fold": [0, 0, 0, 0, 1, 1, 1, 1, -1, -1, 2, 2]})
    folds.loc[10:11, "y_true"] = [0, 1]
    _Spy.log = []
    pred, held = cross_validate_features(np.arange(12)[:, None], folds, ["a", "b"], make_estimator=_Spy)
    fits = [rows for what, rows in _Spy.log if what == "fit"]
    assert fits == [{4, 5, 6, 7, 10, 11}, {0, 1, 2, 3, 10, 11}, {0, 1, 2, 3, 4, 5, 6, 7}]  # never its test fold nor fold -1
    assert sorted(pred["patch_id"]) == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11] and sorted(held["patch_id"]) == [8, 9]
    assert list(pred.columns) == ["patch_id", "image_id", "group", "fold", "y_true", "prob_a", "prob_b"]
    assert pred.set_index("patch_id").loc[10, "fold"] == 2 and (held["fold"] == -1).all()
    with pytest.raises(InputError, match=r"features has 3 rows but folds has 12"):
        cross_validate_features(np.zeros((3, 1)), folds, ["a", "b"])


def _metrics(ba, low):
    return {"cv": {"image": {"summary": {"balanced_accuracy": {"mean": ba}}, "pooled_ci": {"low": low}}}}


def test_warning_rule_margin_far_and_significance():
    kinds = {"early": "model", "handcrafted": "baseline", "probe:a": "probe", "probe:b": "probe", "probe:c": "probe"}
    metrics = {"early": _metrics(0.90, 0.85), "handcrafted": _metrics(0.99, 0.95), "probe:a": _metrics(0.87, 0.80),
               "probe:b": _metrics(0.60, 0.52), "probe:c": _metrics(0.80, 0.45)}
    found = shortcut_warnings(metrics, kinds, n_classes=2, margin=0.05, far=0.15)
    assert len(found) == 1 and "'probe:a'" in found[0] and "within 0.05 of the best deep model (0.900)" in found[0]
    # with four classes (chance 0.25) probe b is far above chance; probe c's interval still reaches chance
    found = shortcut_warnings(metrics, kinds, n_classes=4, margin=0.05, far=0.15)
    assert [w.split("'")[1] for w in found] == ["probe:a", "probe:b", "probe:c"]
    found = shortcut_warnings(metrics, kinds, n_classes=2, margin=0.01, far=0.5)
    assert found == []  # the baseline never warns; a probe 0.03 below the model is outside a 0.01 margin


# --------------------------------------------------------------------------- through run_cv


def _write_set(out, *, shortcut=None, classes=(0, 1), n=5):
    from cytofuse.io.readers import write_ome_tiff
    from cytofuse.synthetic.phantoms import CLASS_NAMES, image_seed, make_phantom

    (out / "images").mkdir(parents=True)
    rows = []
    for label in classes:
        for i in range(n):
            name = f"{CLASS_NAMES[label]}_{i}"
            image = make_phantom(label, shape=(2, 96, 96), seed=image_seed(0, label, i), shortcut=shortcut)
            write_ome_tiff(out / "images" / f"{name}.ome.tif", image)
            rows.append({"path": f"images/{name}.ome.tif", "label": CLASS_NAMES[label], "group": name})
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return out / "labels.csv"


def _cv(manifest, out):
    import torch

    from cytofuse.config import validate_config
    from cytofuse.workflows.cv import run_cv

    torch.set_num_threads(1)
    cfg = validate_config({
        "data": {"manifest": str(manifest)},
        "patches": {"size": 48, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": 1, "batch_size": 32, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 3},
    })
    return run_cv(cfg, out, progress=False)


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shortcut")
    # the planted cue: class 1 imaged with a 1.6x higher camera offset and autofluorescence
    return _cv(_write_set(root / "data", shortcut={"background": {1: 1.6}}), root / "run")


def test_probes_find_a_planted_background_shortcut_and_warn(shortcut_run, capsys):
    from cytofuse.workflows.console import print_cv_summary

    ba = {k: m["cv"]["image"]["summary"]["balanced_accuracy"]["mean"] for k, m in shortcut_run.metrics.items()}
    assert ba["probe:background"] > 0.95 and ba["probe:acquisition"] > 0.95
    assert any("'probe:background'" in w for w in shortcut_run.shortcut_warnings)
    run = shortcut_run.run_dir
    assert json.loads((run / "shortcut_warnings.json").read_text())["warnings"] == shortcut_run.shortcut_warnings
    pred = pd.read_parquet(run / "probes" / "background" / "predictions.parquet")
    assert sorted(pred["patch_id"]) == sorted(shortcut_run.predictions["early"]["patch_id"])
    assert (run / "models" / "handcrafted" / "metrics.json").is_file()
    summary = pd.read_csv(run / "summary.csv")
    assert summary.drop_duplicates("model").set_index("model")["kind"].to_dict() == {
        "early": "model", "handcrafted": "baseline", "probe:background": "probe", "probe:intensity": "probe",
        "probe:acquisition": "probe"}
    print_cv_summary(shortcut_run)
    out = capsys.readouterr().out
    assert "WARNING:" in out and "probe:background" in out


def test_a_finished_probe_is_read_back_not_refitted(shortcut_run, monkeypatch):
    import cytofuse.evaluation.baseline as baseline
    from cytofuse.workflows.cv import _cv_feature_sets
    from cytofuse.training.cache import PatchCache
    from cytofuse.preprocess.patches import read_patch_index

    def refuse(*args, **kwargs):
        raise AssertionError("a finished probe was recomputed")

    monkeypatch.setattr(baseline, "feature_tables", refuse)
    monkeypatch.setattr(baseline, "cross_validate_features", refuse)
    from cytofuse.config import load_config

    run = shortcut_run.run_dir
    cfg = load_config(run / "config.yaml")
    folds = pd.read_csv(run / "folds.csv")
    sets = _cv_feature_sets(cfg, PatchCache.open(run / "cache"), read_patch_index(run), folds, shortcut_run.classes, run, progress=False)
    assert sets["probe:background"][2] == shortcut_run.metrics["probe:background"]


def test_the_warning_stays_silent_on_the_clean_synthetic_set(tmp_path, capsys):
    from cytofuse.workflows.console import print_cv_summary

    result = _cv(_write_set(tmp_path / "data"), tmp_path / "run")
    assert result.shortcut_warnings == []
    ba = result.metrics["probe:background"]["cv"]["image"]["summary"]["balanced_accuracy"]["mean"]
    assert ba < 0.75
    print_cv_summary(result)
    assert "WARNING" not in capsys.readouterr().out
