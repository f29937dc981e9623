"""Normalisation scope: per image, per data set from training-fold pixels only, or fixed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cytofuse.training.cache import NormalisedCache, build_patch_cache, dataset_normalisation
from cytofuse.preprocess.patches import PatchSettings


def _cache(tmp_path, raw: np.ndarray):
    """A cache of (N, 1, P, P) raw patches, one image each, normalised per image with lo=min, hi=max."""
    n = len(raw)
    ids = [f"img{i}" for i in range(n)]
    index = pd.DataFrame({"patch_id": np.arange(n, dtype=np.int64), "image_id": ids, "z": 0, "y": 0, "x": 0,
                          "size": raw.shape[-1]})
    images = pd.DataFrame({"image_id": ids, "lo_a": raw.reshape(n, -1).min(1).astype(float),
                           "hi_a": raw.reshape(n, -1).max(1).astype(float)})
    cache = build_patch_cache(index, images, load_image=lambda i: raw[int(i[3:])][:, None], channels=["a"],
                              out=tmp_path / "cache", progress=False, dtype=np.float32)
    return cache, ids, images


def test_dataset_percentiles_never_see_test_rows(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 100, size=(10, 1, 8, 8)).astype(np.float32)
    raw[6:] += 10_000  # the "test" rows are far brighter
    cache, ids, images = _cache(tmp_path, raw)
    train = np.arange(6)
    norm = dataset_normalisation(cache, train, [ids[i] for i in train], images, percentiles=(1.0, 99.8))
    expected = np.percentile(raw[:6], (1.0, 99.8))
    np.testing.assert_allclose([norm.low[0], norm.high[0]], expected, rtol=1e-4)
    assert norm.high[0] < 100  # nothing of the test rows
    view = NormalisedCache(cache, ids, images, norm)
    got = view[np.arange(10)]
    want = (raw - expected[0]) / (expected[1] - expected[0])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # one range for every patch, test rows included
    assert got[6:].min() > 50  # bright test patches stay bright instead of being stretched to [0, 1]


def test_scope_auto_is_dataset_for_single_tiles_and_image_for_fields():
    tiles = pd.DataFrame({"y": [40, 40], "x": [40, 40]})
    fields = pd.DataFrame({"y": [40, 768], "x": [40, 1024]})
    settings = PatchSettings(size=40)
    assert settings.normalise_scope(tiles) == "dataset" and settings.normalise_scope(fields) == "image"
    assert PatchSettings(size=40, normalise="image").normalise_scope(tiles) == "image"
    low, high = PatchSettings(normalise="fixed", fixed_range=[0, 4095]).fixed_bounds(3)
    assert low.tolist() == [0, 0, 0] and high.tolist() == [4095, 4095, 4095]
    with pytest.raises(ValueError, match="fixed_range"):
        PatchSettings(normalise="fixed")
    with pytest.raises(ValueError, match="low < high"):
        PatchSettings(fixed_range=[10, 5])


CHANNELS = ["mitochondria", "early_endosome", "recycling_endosome"]


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory):
    """A 2-fold CV run of single-tile images (dataset scope): (config, run folder)."""
    import torch

    from cytofuse.config import validate_config
    from cytofuse.workflows.cv import run_cv
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dataset_run")
    write_synthetic_dataset(root / "data", classes=2, images_per_class=4, shape=(1, 32, 32), seed=3, progress=False)
    cfg = validate_config({
        "data": {"manifest": str(root / "data" / "labels.csv")},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn", "name": "cnn"}],
        "train": {"max_epochs": 1, "batch_size": 8, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2, "baseline": False, "probes": False, "val_fraction": 0.34},
    })
    run_cv(cfg, root / "run", progress=False)
    return cfg, root / "run"


def test_cv_fold_statistics_come_from_training_images_only(dataset_run):
    """Recompute each fold's percentiles from the raw files of its training images: they match the run's
    fold recipes, which hold the model's input channels, the patch settings and that normalisation."""
    from cytofuse.preprocess.recipe import PatchRecipe
    from cytofuse.runs import RunFolder
    from cytofuse.workflows.patching import load_image_set

    cfg, run = dataset_run
    folds = pd.read_csv(run / "folds.csv")
    image_set = load_image_set(cfg.data)
    channels = CHANNELS
    every = []
    for k in (0, 1):
        fold = RunFolder(run).model("cnn").fold(k)
        assert fold.recipe == run / "models" / "cnn" / f"fold_{k}" / "recipe.json"
        assert not fold.normalisation.exists()  # the recipe is the one artifact of the fold's normalisation
        recipe = PatchRecipe.read(fold.recipe)
        assert recipe.channels == channels and recipe.settings == cfg.patches and recipe.scope == "dataset"
        norm = json.loads(fold.recipe.read_text())["normalisation"]
        assert norm["scope"] == "dataset" and norm["channels"] == channels
        assert norm["measured_on"].endswith(f"of fold {k}'s training split (test fold excluded)")
        train_images = sorted(folds.loc[folds["fold"] != k, "image_id"].unique())
        test_images = sorted(folds.loc[folds["fold"] == k, "image_id"].unique())
        assert train_images and test_images and not set(train_images) & set(test_images)
        stacks = [image_set.read(i) for i in train_images]
        pixels = np.stack([np.concatenate([s.data[s.channel_names.index(c)].ravel() for s in stacks]) for c in channels])
        low, high = np.percentile(pixels.astype(np.float64), (1.0, 99.8), axis=1)
        np.testing.assert_allclose(norm["low"], low, rtol=2e-3, atol=1e-2)
        np.testing.assert_allclose(norm["high"], high, rtol=2e-3, atol=1e-2)
        np.testing.assert_allclose(recipe.bounds()[1], high, rtol=2e-3, atol=1e-2)
        # with the test fold's images in, the percentiles differ: the test split took no part
        every_image = [image_set.read(i) for i in train_images + test_images]
        both = np.stack([np.concatenate([s.data[s.channel_names.index(c)].ravel() for s in every_image]) for c in channels])
        assert not np.allclose(norm["high"], np.percentile(both.astype(np.float64), 99.8, axis=1), rtol=2e-3, atol=1e-2)
        every.append(norm["high"])
    assert every[0] != every[1]  # two folds, two training splits, two ranges
    metrics = json.loads((run / "models" / "cnn" / "metrics.json").read_text())
    assert metrics["model"]["normalisation"] == "dataset"
    # explain and a CV-run ensemble in predict see the patches with the mean of the folds' ranges
    from cytofuse.training.cache import PatchCache
    from cytofuse.evaluation.explain import model_view
    from cytofuse.inference.modelfolder import load_models

    view = model_view(run, "cnn", PatchCache.open(run / "cache"))
    assert isinstance(view, NormalisedCache)
    np.testing.assert_allclose(view.norm.high, np.mean(every, axis=0))
    _, card = load_models(run, model_name="cnn")
    assert card.recipe.scope == "dataset" and card.tta
    np.testing.assert_allclose(card.recipe.bounds()[1], np.mean(every, axis=0))
    assert card.recipe.normalisation.measured_on == "mean over 2 folds of each fold's training-split percentiles"


def test_a_run_made_before_fold_recipes_still_builds_a_model_folder_and_explanation(dataset_run, tmp_path):
    """An old run folder: each fold holds normalisation.json and no recipe.json. Its CV-run ensemble and
    explanation view are those of the same run with recipes."""
    import shutil

    from cytofuse.evaluation.explain import model_view
    from cytofuse.inference.modelfolder import load_models, read_model_folder, write_model_folder
    from cytofuse.preprocess.recipe import PatchRecipe
    from cytofuse.runs import RunFolder
    from cytofuse.training.cache import PatchCache

    _, run = dataset_run
    _, new_card = load_models(run, model_name="cnn")
    new_view = model_view(run, "cnn", PatchCache.open(run / "cache"))
    old = tmp_path / "old_run"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("*.ckpt"))
    for fold in RunFolder(old).model("cnn").folds():
        fold.normalisation.write_text(PatchRecipe.read(fold.recipe).normalisation.model_dump_json(indent=1))
        fold.recipe.unlink()
    models, card = load_models(old, model_name="cnn")
    assert card.recipe == new_card.recipe and card.channel_names == CHANNELS
    view = model_view(old, "cnn", PatchCache.open(old / "cache"))
    assert isinstance(view, NormalisedCache) and view.channels == new_view.channels
    np.testing.assert_allclose(view.norm.low, new_view.norm.low)
    np.testing.assert_allclose(view.norm.high, new_view.norm.high)
    rows = np.arange(len(view))
    np.testing.assert_allclose(view[rows], new_view[rows])
    write_model_folder(tmp_path / "model", models, card)
    _, written = read_model_folder(tmp_path / "model")
    np.testing.assert_allclose(written.recipe.bounds()[1], new_card.recipe.bounds()[1])
    # a fold with neither file (a run made before normalisation.json) has no range to take
    (RunFolder(old).model("cnn").fold(1).normalisation).unlink()
    assert load_models(old, model_name="cnn")[1].recipe.normalisation is None


def test_class_recall_table_pools_images_over_folds():
    from types import SimpleNamespace

    from cytofuse.workflows.demo import class_recall_table

    pred = pd.DataFrame({"patch_id": range(6), "image_id": ["a", "a", "b", "b", "c", "c"], "group": ["a", "a", "b", "b", "c", "c"],
                         "fold": [0, 0, 1, 1, 1, 1], "y_true": [0, 0, 1, 1, 1, 1],
                         "prob_x": [0.9, 0.8, 0.6, 0.7, 0.2, 0.1], "prob_y": [0.1, 0.2, 0.4, 0.3, 0.8, 0.9]})
    result = SimpleNamespace(predictions={"m": pred, "handcrafted": pred}, kinds={"m": "model", "handcrafted": "baseline"},
                             classes=["x", "y"])
    table = class_recall_table(result)
    assert list(table.columns) == ["m"]  # deep models only
    assert table.loc["x", "m"] == 1.0 and table.loc["y", "m"] == 0.5  # image b (mean 0.65 for x) is wrong
