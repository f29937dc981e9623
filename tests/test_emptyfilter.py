"""Learned empty-patch filter: synthetic known answers, persistence, errors; real fields (slow)."""

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from cytofuse.io.voc import read_voc_boxes
from cytofuse.preprocess.emptyfilter import (
    EmptyFilter,
    evaluate_filter,
    label_grid,
    patches_from_voc_fields,
    read_labelled_patches,
)
from cytofuse.preprocess.patchfeatures import intensity_features, normalise_patches, patch_features
from cytofuse.errors import InputError, RunFolderError


def synthetic_patches(n_per_class: int = 60, *, size: int = 32, channels: int = 1, seed: int = 0, signs=(-1, 1)):
    """Blank noise (label False) vs 1-3 dark or bright blobs (True) on fields of varying
    brightness and contrast; 10 groups ("fields"), both classes in every group."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    n = 2 * n_per_class
    labels = np.arange(n) >= n_per_class
    groups = np.arange(n) % 10
    base = rng.uniform(80, 160, size=10)[groups]
    noise = rng.uniform(2, 6, size=10)[groups]
    out = base[:, None, None, None] + noise[:, None, None, None] * rng.normal(size=(n, channels, size, size))
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(6, size - 6, 2)
            r, amp = rng.uniform(2.5, 4.5), rng.choice(signs) * rng.uniform(30, 60)
            out[i] += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    return out.astype(np.float32), labels, groups


@pytest.fixture(scope="module")
def synth():
    return synthetic_patches()


# --------------------------------------------------------------------------- normalisation


def test_normalise_patch_rule_maps_each_patch_to_unit_range_and_ignores_affine_rescaling(synth):
    x, _, _ = synth
    a = normalise_patches(x, rule="patch", percentiles=(0, 100))
    assert a.dtype == np.float32 and a.shape == x.shape
    np.testing.assert_allclose(a.min(axis=(1, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(a.max(axis=(1, 2, 3)), 1.0, atol=1e-6)
    b = normalise_patches(3.0 * x + 100.0, rule="patch")
    np.testing.assert_allclose(b, normalise_patches(x, rule="patch"), atol=1e-5)


def test_normalise_image_rule_uses_the_percentiles_of_each_group():
    a = np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4)  # values 0..31 over two patches
    x = np.concatenate([a, 100 * a + 5])
    out = normalise_patches(x, rule="image", groups=["f1", "f1", "f2", "f2"], percentiles=(0, 100))
    np.testing.assert_allclose(out[:2], out[2:], atol=1e-6)  # each image is stretched on its own
    assert out[0, 0, 2, 2] == pytest.approx(10 / 31) and out[1].max() == pytest.approx(1.0)
    set_rule = normalise_patches(x, rule="set", percentiles=(0, 100))
    assert set_rule[1].max() == pytest.approx(31 / 3105, abs=1e-6) and set_rule[3].max() == pytest.approx(1.0)
    np.testing.assert_array_equal(normalise_patches(x, rule="none"), x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "zscore"}, "rule must be one of"),
        ({"percentiles": (50, 10)}, "percentiles must satisfy"),
        ({"rule": "image", "groups": [0, 1]}, "groups must have one entry per patch"),
    ],
)
def test_normalise_rejects_bad_options(kwargs, message):
    with pytest.raises(InputError, match=message):
        normalise_patches(np.zeros((3, 1, 8, 8), np.float32), **kwargs)


def test_patches_must_be_finite_4d():
    with pytest.raises(InputError, match=r"\(N, C, H, W\) array, got shape \(8, 8\)"):
        normalise_patches(np.zeros((8, 8)))
    bad = np.zeros((2, 1, 8, 8), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        patch_features(bad)


# --------------------------------------------------------------------------- features


def test_intensity_features_of_a_constant_patch_are_known():
    x = np.full((2, 2, 5, 5), 7.0, np.float32)
    x[:, 1] = 3.0
    f = intensity_features(x)
    assert f.shape == (2, 18)
    np.testing.assert_allclose(f[0, :9], [7, 0, 7, 7, 7, 7, 7, 7, 7])
    np.testing.assert_allclose(f[1, 9:], [3, 0, 3, 3, 3, 3, 3, 3, 3])


def test_patch_features_encode_each_channel_separately_with_a_seeded_encoder():
    x = normalise_patches(synthetic_patches(4, size=32, channels=2)[0])
    f = patch_features(x, encoder="resnet18", seed=0)
    assert f.shape == (8, 1024) and f.dtype == np.float32 and np.isfinite(f).all()
    # channel 1 alone gives the second half: one 1-channel encoder, features concatenated
    np.testing.assert_allclose(patch_features(x[:, 1:], seed=0), f[:, 512:], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(patch_features(x, seed=0), f)
    assert not np.allclose(patch_features(x, seed=1), f)


def test_pretrained_weights_replace_the_random_encoder(tmp_path):
    import torch

    from cytofuse.preprocess.patchfeatures import build_encoder

    x = normalise_patches(synthetic_patches(3, size=64)[0])
    weights = tmp_path / "other.pth"
    state = build_encoder("resnet18", None, 5).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)
    loaded = patch_features(x, pretrained=weights, seed=0)
    np.testing.assert_allclose(loaded, patch_features(x, seed=5), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the filter


def _split(n_groups_train: int = 6, signs=(-1, 1)):
    x, y, g = synthetic_patches(80, seed=1, signs=signs)
    train = g < n_groups_train
    return x[train], y[train], g[train], x[~train], y[~train], g[~train]


def test_two_class_filter_separates_blank_from_blobs_on_held_out_fields():
    from sklearn.metrics import f1_score

    xtr, ytr, _, xte, yte, _ = _split()
    filt = EmptyFilter().fit(xtr, ytr)
    keep = filt.predict(xte)
    assert keep.dtype == bool and keep.shape == yte.shape
    assert f1_score(~yte, ~keep) >= 0.95 and f1_score(yte, keep) >= 0.95
    assert filt.card_["mode"] == "two_class" and filt.card_["feature_dim"] == 512
    assert filt.card_["class_counts"] == {"empty": int((~ytr).sum()), "cells": int(ytr.sum())}


def test_one_class_filter_learns_from_non_empty_patches_only():
    # bright blobs only: with dark and bright cells, blank patches lie between the two cell
    # clusters and a one-class model keeps them (a two-class filter is the reliable mode)
    xtr, ytr, _, xte, yte, _ = _split(signs=(1,))
    with pytest.warns(UserWarning, match="one-class empty filter"):
        filt = EmptyFilter(encoder="intensity", nu=0.1).fit(xtr[ytr])  # labels None: all have cells
    assert filt.card_["mode"] == "one_class"
    keep = filt.predict(xte)
    assert (~keep[~yte]).mean() >= 0.95  # blanks dropped
    assert keep[yte].mean() >= 0.55  # most cells of unseen fields kept
    with pytest.warns(UserWarning, match="one-class empty filter"):
        same = EmptyFilter(encoder="intensity").fit(xtr[ytr], np.ones(ytr.sum(), bool))
    np.testing.assert_array_equal(same.decision_function(xte), filt.decision_function(xte))


def test_fit_refuses_only_empty_examples_and_bad_labels():
    x, y, _ = synthetic_patches(5)
    with pytest.raises(InputError, match="labels: all 5 patches are labelled empty"):
        EmptyFilter(encoder="intensity").fit(x[~y], y[~y])
    with pytest.raises(InputError, match=r"labels must have one entry per patch \(10\)"):
        EmptyFilter(encoder="intensity").fit(x, y[:4])
    with pytest.raises(InputError, match="labels must be booleans"):
        EmptyFilter(encoder="intensity").fit(x, np.arange(10))
    with pytest.raises(InputError, match="normalise must be one of"):
        EmptyFilter(normalise="zscore")
    with pytest.raises(InputError, match="not fitted"):
        EmptyFilter().predict(x)


def test_save_load_round_trip_gives_identical_decisions(tmp_path):
    xtr, ytr, _, xte, _, _ = _split()
    filt = EmptyFilter(encoder="resnet18", seed=3).fit(xtr, ytr)
    folder = filt.save(tmp_path / "filter")
    assert sorted(p.name for p in folder.iterdir()) == [".cytofuse-run", "card.json", "encoder.safetensors", "svm.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["filter"]  # no temporary folder left
    card = json.loads((folder / "card.json").read_text())
    assert card["encoder"] == "resnet18" and card["n_channels"] == 1 and card["patch_size"] == [32, 32]
    assert card["normalise"] == "patch" and card["params"]["seed"] == 3
    back = EmptyFilter.load(folder)
    np.testing.assert_array_equal(back.decision_function(xte), filt.decision_function(xte))
    with pytest.raises(RunFolderError, match="filter folder .*filter exists; pass --overwrite"):
        filt.save(folder)
    with pytest.raises(InputError, match="patches have 2 channels but the filter was fitted on 1"):
        back.predict(np.repeat(xte, 2, axis=1))


def test_load_checks_the_card(tmp_path):
    xtr, ytr, _, _, _, _ = _split()
    folder = EmptyFilter(encoder="intensity").fit(xtr, ytr).save(tmp_path / "f")
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, "card_version": 99}))
    with pytest.raises(InputError, match="card_version 99 is not supported"):
        EmptyFilter.load(folder)
    (folder / "card.json").unlink()
    with pytest.raises(InputError, match="not an empty-filter folder"):
        EmptyFilter.load(folder)


def test_other_patch_size_at_predict_time_warns():
    xtr, ytr, _, _, _, _ = _split()
    filt = EmptyFilter(encoder="intensity").fit(xtr, ytr)
    with pytest.warns(UserWarning, match=r"patches are \(16, 16\) px but the filter was fitted on \(32, 32\)"):
        filt.predict(xtr[:, :, :16, :16])


# --------------------------------------------------------------------------- evaluation


def test_evaluate_filter_reports_grouped_held_out_scores(synth):
    x, y, g = synth
    res = evaluate_filter(x, y, g, n_splits=5)
    assert res["n_empty"] == 60 and res["n_cells"] == 60 and res["n_groups"] == 10
    assert res["trivial_f1_empty"] == pytest.approx(2 * 60 / 180)
    assert res["f1_empty"] >= 0.95 and res["f1_cells"] >= 0.95 and res["balanced_accuracy"] >= 0.95
    assert len(res["f1_empty_folds"]) == 5 and res["feature_dim"] == 512
    xb, yb, gb = synthetic_patches(60, signs=(1,))
    one = evaluate_filter(xb, yb, gb, encoder="intensity", one_class=True)
    assert one["mode"] == "one_class" and one["recall_empty"] >= 0.95 and one["f1_empty"] >= 0.75


def test_evaluate_filter_folds_never_share_a_group(monkeypatch):
    import cytofuse.preprocess.emptyfilter as ef

    x, y, g = synthetic_patches(30)
    seen = []
    real = ef._fit_svm

    def spy(features, labels, **kw):
        seen.append(len(features))
        return real(features, labels, **kw)

    monkeypatch.setattr(ef, "_fit_svm", spy)
    evaluate_filter(x, y, g, encoder="intensity", n_splits=5)
    assert seen == [48] * 5  # 10 groups of 6 patches: 8 groups train each fold


def test_evaluate_filter_needs_enough_groups_and_both_classes(synth):
    x, y, g = synth
    with pytest.raises(InputError, match="n_splits=5 needs at least 5 groups with empty patches, got 3"):
        evaluate_filter(x, y, g % 3, encoder="intensity")
    with pytest.raises(InputError, match="both empty"):
        evaluate_filter(x[y], y[y], g[y], encoder="intensity")


# --------------------------------------------------------------------------- patches on disk


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)


def test_read_labelled_patches_with_groups_csv(tmp_path, synth):
    x, y, _ = synth
    for i in range(3):
        _write_png(tmp_path / "empty" / f"e{i}.png", x[i, 0])
        _write_png(tmp_path / "cells" / f"c{i}.png", x[60 + i, 0])
    rows = "file,group\nempty/e0.png,E\ne1.png,E\ne2.png,E\ncells/c0.png,A\nc1.png,B\n"
    (tmp_path / "groups.csv").write_text(rows)
    with pytest.raises(InputError, match="groups.csv: no group for file cells/c2.png"):
        read_labelled_patches(tmp_path)
    (tmp_path / "groups.csv").write_text(rows + "c2.png,C\n")
    assert list(read_labelled_patches(tmp_path)[2]) == ["E", "E", "E", "A", "B", "C"]
    (tmp_path / "groups.csv").unlink()
    patches, labels, groups, paths = read_labelled_patches(tmp_path)
    assert patches.shape == (6, 1, 32, 32) and patches.dtype == np.float32
    np.testing.assert_array_equal(labels, [False] * 3 + [True] * 3)
    assert list(groups) == ["e0", "e1", "e2", "c0", "c1", "c2"] and paths[3].name == "c0.png"
    np.testing.assert_array_equal(patches[0, 0], np.clip(x[0, 0], 0, 255).astype(np.uint8))
    assert read_labelled_patches(tmp_path, size=20)[0].shape == (6, 1, 20, 20)


def test_read_labelled_patches_errors_name_the_folder(tmp_path):
    _write_png(tmp_path / "empty" / "a.png", np.zeros((8, 8)))
    with pytest.raises(InputError, match=r"sub-folder cells/ is missing"):
        read_labelled_patches(tmp_path)
    (tmp_path / "cells").mkdir()
    with pytest.raises(InputError, match=r"cells: no patch image files"):
        read_labelled_patches(tmp_path)
    _write_png(tmp_path / "cells" / "b.png", np.zeros((9, 9)))
    with pytest.raises(InputError, match=r"patches differ in shape"):
        read_labelled_patches(tmp_path)


VOC = """<annotation><size><width>100</width><height>100</height></size>{}</annotation>"""
OBJ = "<object><name>{}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"


def test_label_grid_marks_centres_empty_and_ambiguous_patches(tmp_path):
    xml = tmp_path / "f.xml"
    xml.write_text(VOC.format(OBJ.format("Living Cell", 10, 10, 20, 20) + OBJ.format("Dead Cell", 45, 60, 60, 70)))
    boxes = read_voc_boxes(xml)
    assert boxes == [("Living Cell", 10, 10, 20, 20), ("Dead Cell", 45, 60, 60, 70)]
    ys, xs, label = label_grid(boxes, (100, 100), size=50, stride=50)
    assert list(zip(ys, xs, label)) == [(0, 0, 1), (0, 50, 0), (50, 0, -1), (50, 50, 1)]


def test_patches_from_voc_fields_cuts_labels_and_groups(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        _write_png(tmp_path / f"{name}.png", 100 + 10 * rng.normal(size=(100, 100)))
    (tmp_path / "a.xml").write_text(VOC.format(OBJ.format("Living Cell", 10, 10, 20, 20)))
    (tmp_path / "b.xml").write_text(VOC.format(""))
    _write_png(tmp_path / "c.png", np.zeros((100, 100)))  # no xml: ignored
    patches, labels, groups, meta = patches_from_voc_fields(tmp_path, size=50)
    assert patches.shape == (8, 1, 50, 50) and 0.0 <= patches.min() and patches.max() <= 1.0
    np.testing.assert_array_equal(labels, [True, False, False, False] + [False] * 4)
    assert list(groups) == ["a"] * 4 + ["b"] * 4 and list(meta.columns)[:4] == ["field", "y", "x", "label"]
    (tmp_path / "bare").mkdir()
    _write_png(tmp_path / "bare" / "d.png", np.zeros((100, 100)))
    with pytest.raises(InputError, match="bare: no image files with a Pascal-VOC .xml"):
        patches_from_voc_fields(tmp_path / "bare", size=50)
    with pytest.raises(InputError, match="normalise must be one of"):
        patches_from_voc_fields(tmp_path, size=50, normalise="zscore")


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.realdata
def test_real_brightfield_fields_filter_beats_trivial_and_brightness_shortcut(real_data):
    folder = real_data / "livedead-brightfield" / "fields"
    patches, labels, groups, meta = patches_from_voc_fields(folder, size=64, stride=52, max_fields=200, seed=0)
    assert 0.2 < labels.mean() < 0.4  # about 30 % of patches hold a cell centre
    cnn = evaluate_filter(patches, labels, groups, encoder="resnet18")
    stats = evaluate_filter(patches, labels, groups, encoder="intensity")
    field = evaluate_filter(patches, labels, groups, features=meta[["field_mean"]].to_numpy(np.float32))
    print({"cnn": cnn, "intensity": stats, "field_mean": field})
    trivial = cnn["trivial_f1_empty"]
    assert cnn["f1_empty"] > trivial + 0.06 and cnn["balanced_accuracy"] > 0.85
    assert stats["f1_empty"] > trivial + 0.06 and stats["balanced_accuracy"] > 0.85
    assert field["balanced_accuracy"] < 0.6  # field brightness does not explain it
