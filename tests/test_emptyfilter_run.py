"""The learned empty-patch filter inside a run, and the ``cytofuse emptyfilter`` command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage
from typer.testing import CliRunner

from cytofuse.cli import app
from cytofuse.errors import InputError


def _labelled_folder(root, *, n=24, size=32, seed=0):
    """empty/: flat noise; cells/: noise plus a bright disc (8-bit PNGs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for label in ("empty", "cells"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            img = rng.normal(60, 6, (size, size))
            if label == "cells":
                cy, cx = rng.integers(8, size - 8, 2)
                img += 120 * ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(12, 40))
            PILImage.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / label / f"p{i}.png")
    return root


def test_emptyfilter_command_prints_held_out_f1_and_writes_the_filter(tmp_path):
    folder = _labelled_folder(tmp_path / "examples")
    result = CliRunner().invoke(app, ["emptyfilter", str(folder), "--out", str(tmp_path / "flt"), "--encoder", "intensity",
                                      "--folds", "3"])
    assert result.exit_code == 0, result.output
    f1 = float(result.output.split("F1 empty ")[1].split()[0])
    assert f1 > 0.9  # discs vs flat noise: an easy, known answer
    assert (tmp_path / "flt" / "card.json").is_file()
    again = CliRunner().invoke(app, ["emptyfilter", str(folder), "--out", str(tmp_path / "flt"), "--encoder", "intensity"])
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output


def _truth_patches(root, *, size):
    """Grid patches of the BF channel of other synthetic fields: True with a cell centre, False touching no cell."""
    from cytofuse.io.readers import read_image
    from cytofuse.synthetic.cells import write_livedead_set

    truth = write_livedead_set(root, n_fields=2, seed=7)
    patches, labels = [], []
    for path, cells in truth.groupby("path"):
        bf = read_image(root / path).data[0, 0].astype(np.float32)
        for y in range(0, bf.shape[0] - size + 1, size):
            for x in range(0, bf.shape[1] - size + 1, size):
                inside = cells["y"].between(y, y + size - 1) & cells["x"].between(x, x + size - 1)
                near = ((cells["y"] + cells["radius"] >= y) & (cells["y"] - cells["radius"] < y + size)
                        & (cells["x"] + cells["radius"] >= x) & (cells["x"] - cells["radius"] < x + size))
                if inside.any() or not near.any():
                    patches.append(bf[None, y:y + size, x:x + size])
                    labels.append(bool(inside.any()))
    return np.stack(patches), np.array(labels)


def test_run_drops_the_patches_the_filter_calls_empty(tmp_path):
    import torch

    from cytofuse.config import validate_config
    from cytofuse.workflows.cv import run_cv
    from cytofuse.preprocess.emptyfilter import EmptyFilter
    from cytofuse.synthetic.cells import write_livedead_set

    torch.set_num_threads(1)
    write_livedead_set(tmp_path / "data", n_fields=4, seed=1)
    EmptyFilter(encoder="intensity").fit(*_truth_patches(tmp_path / "train", size=32)).save(tmp_path / "flt")
    base = {"data": {"images": str(tmp_path / "data")}, "labels": {"channel": "PI", "classes": ["live", "dead"]},
            "models": [{"fusion": "early", "encoder": "smallcnn"}],
            "train": {"max_epochs": 1, "batch_size": 32, "progress": False}, "cv": {"n_folds": 2, "probes": False}}
    cfg = validate_config(base | {"patches": {"size": 32, "min_ratio": 0.0, "empty_filter": str(tmp_path / "flt")}})
    run_cv(cfg, tmp_path / "run", progress=False)
    images = pd.read_parquet(tmp_path / "run" / "images.parquet")
    values = pd.read_parquet(tmp_path / "run" / "labels" / "patch_values.parquet")
    assert images["n_learned_empty"].sum() > 0
    assert len(values) == images["n_candidates"].sum() - images["n_learned_empty"].sum()  # labels after the filter
    with pytest.raises(Exception, match="empty_filter"):
        validate_config(base | {"patches": {"size": 32, "empty_filter": 3}})


def test_predict_applies_the_models_empty_filter(tmp_path):
    """A model trained with a learned filter predicts only the patches that filter keeps."""
    from cytofuse.preprocess.emptyfilter import EmptyFilter
    from cytofuse.io.readers import Image
    from cytofuse.preprocess.patches import PatchSettings, extract_patches
    from cytofuse.inference.predict import apply_empty_filter

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :128]
    stack = rng.normal(100, 3, (1, 1, 64, 128)).astype(np.float32)
    for cy, cx in ((16, 16), (16, 48), (48, 16), (48, 48)):  # discs in the left half only
        stack[0, 0] += 400 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 49)
    py, px = np.mgrid[:32, :32]
    flat = rng.normal(100, 3, (40, 1, 32, 32))
    centres = rng.integers(8, 24, (40, 2))
    blobs = rng.normal(100, 3, (40, 1, 32, 32)) + 400 * (((py - centres[:, :1, None]) ** 2
                                                           + (px - centres[:, 1:, None]) ** 2) < 49)[:, None]
    EmptyFilter(encoder="intensity").fit(np.r_[flat, blobs].astype(np.float32), np.r_[np.zeros(40, bool), np.ones(40, bool)]
                                        ).save(tmp_path / "flt")
    res = extract_patches(stack, channel_names=("BF",), settings=PatchSettings(size=32, stride=16, min_ratio=0.0))
    kept = apply_empty_filter(stack, res, tmp_path / "flt", size=32, name="img")
    assert 0 < len(kept.origins) < len(res.origins)
    assert kept.origins[:, 2].max() <= 48  # no patch of the empty right half survives
    assert "dropped" in kept.notes[-1]
    with pytest.raises(Exception, match="which is missing here"):
        apply_empty_filter(stack, res, tmp_path / "nowhere", size=32, name="img")
    del Image


def test_a_model_folder_carries_its_empty_filter(tmp_path):
    """The folder holds a copy of the filter: moving the original away changes nothing."""
    import shutil

    import yaml

    from cytofuse.preprocess.emptyfilter import EmptyFilter
    from cytofuse.io.readers import Image
    from cytofuse.inference.modelfolder import card_for, read_model_folder, write_model_folder
    from cytofuse.models import create_model
    from cytofuse.preprocess.patches import PatchSettings
    from cytofuse.inference.predict import predict_images

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :128]
    stack = rng.normal(100, 3, (1, 1, 64, 128)).astype(np.float32)
    for cy, cx in ((16, 16), (16, 48), (48, 16), (48, 48)):
        stack[0, 0] += 400 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 49)
    py, px = np.mgrid[:32, :32]
    centres = rng.integers(8, 24, (40, 2))
    blobs = rng.normal(100, 3, (40, 1, 32, 32)) + 400 * (((py - centres[:, :1, None]) ** 2
                                                           + (px - centres[:, 1:, None]) ** 2) < 49)[:, None]
    flat = rng.normal(100, 3, (40, 1, 32, 32))
    EmptyFilter(encoder="intensity").fit(np.r_[flat, blobs].astype(np.float32),
                                         np.r_[np.zeros(40, bool), np.ones(40, bool)]).save(tmp_path / "flt")
    model = create_model("early", in_channels=1, num_classes=2, encoder="smallcnn").eval()
    settings = PatchSettings(size=32, stride=16, min_ratio=0.0, empty_filter=tmp_path / "flt")
    card = card_for([model], class_names=["a", "b"], channel_names=["BF"], patches=settings)
    folder = write_model_folder(tmp_path / "model", [model], card)
    assert yaml.safe_load((folder / "model.yaml").read_text())["recipe"]["settings"]["empty_filter"] == "empty_filter"
    shutil.move(tmp_path / "flt", tmp_path / "moved")
    _, read = read_model_folder(folder)
    assert read.recipe.prediction_settings().empty_filter == folder / "empty_filter"
    image = Image(stack, ("BF",), source="field.tif")
    summary = predict_images(folder, [image], out=tmp_path / "pred", progress=False, precision="fp32")
    assert 0 < summary.loc[0, "patches"] < 7 * 3  # the filter dropped the empty right half's patches
    assert "empty-patch filter dropped" in summary.loc[0, "notes"]
    # a copy of a model folder is rewritten with its own filter; a card naming a missing filter is refused
    models, read = read_model_folder(folder)
    again = write_model_folder(tmp_path / "again", models, read)
    assert (again / "empty_filter").is_dir()
    with pytest.raises(InputError, match="does not exist; a model folder carries a copy"):
        write_model_folder(tmp_path / "bad", models, read.model_copy(
            update={"recipe": read.recipe.with_empty_filter(tmp_path / "nowhere")}))
