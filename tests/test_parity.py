"""One preprocessing path: `cytofuse predict` with a CV run's fold model reproduces that fold's out-of-fold
predictions on the same images (same patches, same normalisation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cytofuse.config import validate_config

# Measured: <= 1.6e-6 (float summation order, and the CV cache's float16 storage, against predict's float32
# patches). Bounds of the normalisation moved by 2 % move the same probabilities by 1.6e-4 to 1.2e-3.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    out = tmp_path_factory.mktemp("parity") / "data"
    write_synthetic_dataset(out, classes=2, images_per_class=4, shape=(3, 96, 96), seed=5, progress=False)
    return out / "labels.csv"


@pytest.mark.filterwarnings("ignore::cytofuse.training.fit.ChanceLevelWarning")  # 3 epochs on 8 images
@pytest.mark.parametrize("scope", ["dataset", "image"])
def test_predict_with_a_fold_model_reproduces_its_out_of_fold_predictions(tiny_set, tmp_path, scope):
    from cytofuse.inference.modelfolder import card_for, cv_fold_dirs, fold_recipe
    from cytofuse.inference.predict import predict_image
    from cytofuse.io.readers import read_image
    from cytofuse.models import load_model
    from cytofuse.workflows.cv import run_cv

    torch.set_num_threads(1)
    cfg = validate_config({
        "data": {"manifest": str(tiny_set)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.02, "normalise": scope},
        "models": [{"fusion": "early", "name": "m"}],
        "train": {"max_epochs": 3, "batch_size": 8, "progress": False, "accelerator": "cpu", "precision": "32-true"},
        "cv": {"n_folds": 2, "baseline": False, "probes": False},
    })
    run = tmp_path / "run"
    result = run_cv(cfg, run, progress=False)
    patches = pd.read_parquet(run / "patches.parquet")
    images = pd.read_parquet(run / "images.parquet").set_index("image_id")
    oof = pd.read_parquet(run / "models" / "m" / "predictions.parquet").merge(
        patches[["patch_id", "z", "y", "x"]], on="patch_id")
    prob_cols = [f"prob_{c}" for c in result.classes]
    assert oof[prob_cols[0]].std() > 0.1  # the fold models respond to their input: a mismatch would show
    _, folds = cv_fold_dirs(run, "m")

    def predicted(image_id, model, card, where):
        folder = tmp_path / "pred" / where / image_id.replace("/", "_")
        folder.mkdir(parents=True)
        return predict_image(read_image(images.loc[image_id, "source"]), [model], card, name="x", folder=folder,
                             workers=0).patches

    compared = 0
    for k, fold in enumerate(folds):
        model = load_model(fold.weights)
        recipe = fold_recipe(fold)
        card = card_for([model], class_names=result.classes, recipe=recipe, tta=True)
        for image_id, rows in oof[oof["fold"] == k].groupby("image_id"):
            both = rows.merge(predicted(image_id, model, card, str(k)), on=["z", "y", "x"], suffixes=("_cv", "_predict"),
                              validate="one_to_one")
            assert len(both) == len(rows), f"{image_id}: patches of the CV run missing from predict's grid"
            for c in prob_cols:
                diff = np.abs(both[f"{c}_cv"].to_numpy() - both[f"{c}_predict"].to_numpy())
                assert diff.max() <= TOLERANCE, f"{image_id} {c}: max |cv - predict| = {diff.max():.2e}"
            compared += len(both)
    if scope == "dataset":  # the check sees a normalisation that is slightly off: bounds moved by 2 %
        norm = recipe.normalisation
        moved = recipe.model_copy(update={"normalisation": norm.model_copy(update={"high": [h * 1.02 for h in norm.high]})})
        card = card_for([model], class_names=result.classes, recipe=moved, tta=True)
        image_id, rows = next(iter(oof[oof["fold"] == k].groupby("image_id")))
        both = rows.merge(predicted(image_id, model, card, "moved"), on=["z", "y", "x"], suffixes=("_cv", "_predict"))
        assert max(np.abs(both[f"{c}_cv"] - both[f"{c}_predict"]).max() for c in prob_cols) > 10 * TOLERANCE
    assert compared == len(oof)  # every out-of-fold prediction was reproduced
