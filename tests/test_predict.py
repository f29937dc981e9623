import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from cytofuse.errors import InputError, RunFolderError
from cytofuse.io.readers import Image, write_ome_tiff
from cytofuse.inference.modelfolder import card_for, write_model_folder
from cytofuse.models import create_model
from cytofuse.preprocess.patches import PatchSettings
from cytofuse.inference.heatmaps import stitch
from cytofuse.inference.predict import cut_patches, predict_images


def _hand_model():
    """Early fusion whose answer is known: class 0 where channel 0 is brighter, class 1 where channel 1 is.

    Every conv passes channel 0 and 1 through its centre tap (BN is the identity), so the
    pooled features are the channels' mean activations; the head compares them."""
    torch.manual_seed(0)
    model = create_model("early", in_channels=2, num_classes=2, encoder="smallcnn", dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in (b for stage in model.encoder.blocks for b in stage):  # conv-BN-ReLU blocks of every stage
            block[0].weight[0, 0, 1, 1] = 1
            block[0].weight[1, 1, 1, 1] = 1
            block[1].weight.fill_(1)
        model.head[1].weight[:, :2] = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    return model.eval()


def _halves(seed=0, z=3, y=64, x=96, swap=False):
    """Channel a bright on the left half, channel b on the right half (swapped: the other way)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 20, (2, z, y, x)).astype(np.uint16)
    data[0, :, :, : x // 2] += 1000
    data[1, :, :, x // 2 :] += 1000
    return data[::-1].copy() if swap else data


@pytest.fixture
def model_dir(tmp_path):
    model = _hand_model()
    card = card_for([model], class_names=["a_bright", "b_bright"], channel_names=["a", "b"],
                    patches=PatchSettings(size=16, min_ratio=0.0, drop_duplicates=False))
    return write_model_folder(tmp_path / "model", [model], card)


def test_heat_maps_match_patch_probabilities_and_the_known_answer(model_dir, tmp_path):
    left = Image(_halves(), ("a", "b"), source="set/left.tif")
    mostly_b = _halves(seed=1, x=128)
    mostly_b[1, :, :, 32:] = mostly_b[1, :, :, 96:97]  # channel b bright on 3/4 of the width
    mostly_b[0, :, :, 32:] = mostly_b[0, :, :, 100:101]
    right = Image(mostly_b, ("a", "b"), source="set/right.tif")
    summary = predict_images(model_dir, [left, right], out=tmp_path / "pred", progress=False, precision="fp32",
                             heatmap_resolution="full")
    assert summary["decision"].tolist() == ["a_bright", "b_bright"]
    assert summary["heatmap_cell_px"].tolist() == [1, 1]
    assert summary["patches"].tolist() == [3 * 4 * 6, 3 * 4 * 8]
    assert summary.loc[0, "prob_a_bright"] == pytest.approx(0.5, abs=1e-3)  # half the patches each way
    assert summary.loc[1, "prob_b_bright"] == pytest.approx(0.75, abs=1e-3)
    patches = pd.read_parquet(tmp_path / "pred" / "patches.parquet")
    first = patches[patches["image"] == "left"]
    assert (first.loc[first["x"] < 48, "prob_a_bright"] > 0.99).all()
    assert (first.loc[first["x"] >= 48, "prob_b_bright"] > 0.99).all()
    heat = tifffile.imread(tmp_path / "pred" / "images" / "left" / "heatmap.tif")
    assert heat.shape == (2, 3, 64, 96) and heat.dtype == np.float32
    for row in first.itertuples():
        tile = heat[:, row.z, row.y : row.y + 16, row.x : row.x + 16]
        assert np.allclose(tile[0], row.prob_a_bright) and np.allclose(tile[1], row.prob_b_bright)
    projection = tifffile.imread(tmp_path / "pred" / "images" / "left" / "heatmap_max.tif")
    assert projection.shape == (2, 64, 96) and np.allclose(projection, heat.max(axis=1))
    assert (tmp_path / "pred" / "images" / "right" / "overlay.png").stat().st_size > 1000
    csv = pd.read_csv(tmp_path / "pred" / "summary.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "pred" / "summary.parquet"), csv, check_dtype=False)


def test_channels_are_selected_by_name_from_files(model_dir, tmp_path):
    data = _halves()
    path = write_ome_tiff(tmp_path / "swapped.ome.tif", Image(data[::-1].copy(), ("b", "a")))
    summary = predict_images(model_dir, [path], out=tmp_path / "pred", progress=False, precision="fp32")
    reference = predict_images(model_dir, [Image(data, ("a", "b"))], out=tmp_path / "ref", progress=False,
                               precision="fp32")
    cols = ["prob_a_bright", "prob_b_bright"]
    assert np.allclose(summary[cols].to_numpy(), reference[cols].to_numpy())
    a = pd.read_parquet(tmp_path / "pred" / "patches.parquet")[cols].to_numpy()
    b = pd.read_parquet(tmp_path / "ref" / "patches.parquet")[cols].to_numpy()
    assert np.array_equal(a, b)


def test_channel_mismatch_lists_expected_and_found(model_dir, tmp_path):
    wrong_names = Image(_halves(), ("a", "c"), source="x.tif")
    with pytest.raises(InputError, match=r"x.tif: the model expects channels \['a', 'b'\] but the image has 2 channels \['a', 'c'\]; missing \['b'\]"):
        predict_images(model_dir, [wrong_names], out=tmp_path / "p1", progress=False)
    one = Image(_halves()[:1], ("a",), source="y.tif")
    with pytest.raises(InputError, match=r"has 1 channels \['a'\]; missing \['b'\]"):
        predict_images(model_dir, [one], out=tmp_path / "p2", progress=False)
    np.save(tmp_path / "plain.npy", _halves())
    with pytest.raises(InputError, match="stores no channel names: name them with channel_names"):
        predict_images(model_dir, [tmp_path / "plain.npy"], out=tmp_path / "p3", progress=False, axes="CZYX")
    summary = predict_images(model_dir, [tmp_path / "plain.npy"], out=tmp_path / "p4", progress=False, axes="CZYX",
                             channel_names=["a", "b"])
    assert summary.loc[0, "patches"] == 72
    assert not (tmp_path / "p1").exists() and not any(p.name.startswith(".p") for p in tmp_path.iterdir())


def test_output_folder_is_not_overwritten_without_the_flag(model_dir, tmp_path):
    image = Image(_halves(z=1), ("a", "b"))
    predict_images(model_dir, [image], out=tmp_path / "pred", progress=False)
    with pytest.raises(RunFolderError, match="--overwrite"):
        predict_images(model_dir, [image], out=tmp_path / "pred", progress=False)
    predict_images(model_dir, [image], out=tmp_path / "pred", progress=False, overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="other exists and is not a cytofuse prediction folder"):
        predict_images(model_dir, [image], out=tmp_path / "other", progress=False, overwrite=True)


def test_filtered_patches_leave_nan_and_an_empty_image_gets_no_decision(tmp_path):
    model = _hand_model()
    card = card_for([model], class_names=["a_bright", "b_bright"], channel_names=["a", "b"],
                    patches=PatchSettings(size=16, min_ratio=0.5, rule="any", z_step=2, drop_duplicates=False))
    folder = write_model_folder(tmp_path / "model", [model], card)
    data = np.zeros((2, 3, 64, 64), np.uint16)
    data[:, :, :16, :32] = 500  # foreground only in the top-left two patches
    blank = np.zeros((2, 1, 64, 64), np.uint16)
    summary = predict_images(folder, [Image(data, ("a", "b"), source="cells.tif"), Image(blank, ("a", "b"), source="blank.tif")],
                             out=tmp_path / "pred", progress=False)
    assert summary["patches"].tolist() == [4, 0]  # 2 patches x slices 0 and 2
    assert summary["decision"].tolist() == ["a_bright", ""]
    assert "no decision" in summary.loc[1, "notes"] and np.isnan(summary.loc[1, "prob_a_bright"])
    heat = tifffile.imread(tmp_path / "pred" / "images" / "cells" / "heatmap.tif")  # one pixel per 16 px cell
    assert heat.shape == (2, 3, 4, 4) and summary["heatmap_cell_px"].tolist() == [16, 16]
    covered = ~np.isnan(heat[0])
    assert covered[0, 0, :2].all() and covered[2, 0, :2].all()
    assert covered.sum() == 2 * 2  # slice 1 is skipped (z_step=2) and the rest was filtered out


def test_stitch_averages_overlapping_patches():
    origins = np.array([[0, 0, 0], [0, 0, 4]])
    probs = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    heat = stitch(origins, probs, shape=(1, 8, 12), size=8, stride=4).full()
    assert heat.shape == (2, 1, 8, 12)
    assert np.allclose(heat[0, 0, :, :4], 1.0) and np.allclose(heat[0, 0, :, 4:8], 0.5)
    assert np.allclose(heat[0, 0, :, 8:], 0.0) and np.allclose(heat.sum(axis=0), 1.0)


def test_cut_patches_normalises_with_the_image_percentiles():
    stack = np.arange(2 * 1 * 4 * 4, dtype=np.uint16).reshape(2, 1, 4, 4)
    out = cut_patches(stack, np.array([[0, 2, 2]]), np.array([0.0, 16.0]), np.array([10.0, 16.0]), size=2)
    assert out.shape == (1, 2, 2, 2)
    assert np.allclose(out[0, 0], [[1.0, 1.1], [1.4, 1.5]])
    assert np.allclose(out[0, 1], (stack[1, 0, 2:, 2:] - 16.0) / 1e-6)  # flat channel: divided by eps


def test_bf16_autocast_agrees_with_fp32(model_dir, tmp_path):
    image = Image(_halves(), ("a", "b"))
    fp32 = predict_images(model_dir, [image], out=tmp_path / "fp32", progress=False, precision="fp32")
    bf16 = predict_images(model_dir, [image], out=tmp_path / "bf16", progress=False, precision="bf16", workers=0)
    assert (fp32["decision"] == bf16["decision"]).all()
    assert np.abs(fp32["prob_a_bright"] - bf16["prob_a_bright"]).max() < 0.02
    with pytest.raises(InputError, match="precision must be 'fp32', 'bf16' or 'auto', got 'half'"):
        predict_images(model_dir, [image], out=tmp_path / "x", progress=False, precision="half")


def test_device_names_are_checked_and_a_missing_gpu_is_named(model_dir, tmp_path):
    from cytofuse.inference.predict import resolve_device

    image = Image(_halves(), ("a", "b"))
    with pytest.raises(InputError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        predict_images(model_dir, [image], out=tmp_path / "x", progress=False, device="gpu")
    assert not (tmp_path / "x").exists()
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:7", here=False) == "cuda:7"  # a cluster's workers resolve it themselves
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device 'cuda': this torch sees no CUDA device"):
            predict_images(model_dir, [image], out=tmp_path / "x", progress=False, device="cuda")
    else:
        with pytest.raises(InputError, match=f"device 'cuda:99': torch sees {torch.cuda.device_count()} CUDA device"):
            resolve_device("cuda:99")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prediction_on_the_gpu_agrees_with_the_cpu(model_dir, tmp_path):
    image = Image(_halves(), ("a", "b"))
    cpu = predict_images(model_dir, [image], out=tmp_path / "cpu", progress=False, precision="fp32", device="cpu")
    gpu = predict_images(model_dir, [image], out=tmp_path / "gpu", progress=False, precision="fp32", device="cuda")
    auto = predict_images(model_dir, [image], out=tmp_path / "auto", progress=False)  # cuda and bf16 by default
    assert (cpu["decision"] == gpu["decision"]).all() and (cpu["decision"] == auto["decision"]).all()
    assert np.abs(cpu["prob_a_bright"] - gpu["prob_a_bright"]).max() < 1e-3
    assert np.abs(cpu["prob_a_bright"] - auto["prob_a_bright"]).max() < 0.02
    patches = [pd.read_parquet(tmp_path / name / "patches.parquet") for name in ("cpu", "gpu")]
    assert np.abs(patches[0]["prob_a_bright"] - patches[1]["prob_a_bright"]).max() < 1e-3


# --------------------------------------------------------------------------- CV run and final model


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, synthetic_set):
    import shutil

    from cytofuse.config import validate_config
    from cytofuse.workflows.cv import run_cv

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cv")
    shutil.copytree(synthetic_set, root / "data")  # the tests write beside it (root / "pred", ...)
    cfg = validate_config({
        "data": {"manifest": str(root / "data" / "labels.csv")},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": 2, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2},
    })
    run_cv(cfg, root / "run", progress=False)
    return cfg, root


@pytest.mark.slow
def test_cv_run_predicts_as_a_fold_ensemble(cv_run):
    import json

    from cytofuse.inference.modelfolder import model_folder_from_cv

    cfg, root = cv_run
    models, card = model_folder_from_cv(root / "run")
    assert len(models) == 2 and card.weights == ["fold_0.safetensors", "fold_1.safetensors"]
    assert card.channel_names == ["mitochondria", "early_endosome", "recycling_endosome"]
    manifest = pd.read_csv(root / "data" / "labels.csv")
    paths = [root / "data" / p for p in manifest["path"].head(3)]
    summary = predict_images(root / "run", paths, out=root / "pred", progress=False, precision="fp32")
    assert len(summary) == 3 and set(summary["decision"]) <= set(card.class_names)
    # the ensemble is the mean of the fold models' probabilities on the same patches
    from cytofuse.io.readers import read_image
    from cytofuse.inference.predict import predict_patches, preprocess, select_model_channels

    stack = select_model_channels(read_image(paths[0]), card.channel_names)
    res = preprocess(stack, card)
    single = [predict_patches(stack, res, [m], size=32) for m in models]
    both = predict_patches(stack, res, models, size=32)
    assert np.allclose(both, np.mean(single, axis=0), atol=1e-6)
    assert summary.loc[0, "patches"] == len(res.origins)
    # the ensemble also writes as a model folder and predicts the same
    write_model_folder(root / "ens", models, card)
    again = predict_images(root / "ens", paths, out=root / "pred2", progress=False, precision="fp32")
    cols = [f"prob_{c}" for c in card.class_names]
    assert np.allclose(again[cols].to_numpy(), summary[cols].to_numpy())
    best = [json.loads((root / "run" / "models" / "early" / f"fold_{k}" / "fit.json").read_text())["best_epoch"] for k in (0, 1)]
    from cytofuse.workflows.final import epochs_from_cv

    assert epochs_from_cv(root / "run") == int(round(float(np.median(best)))) + 1


@pytest.mark.slow
def test_train_final_writes_a_folder_with_epochs_from_the_cv_run(cv_run, tmp_path):
    from cytofuse.workflows.final import epochs_from_cv, train_final
    from cytofuse.inference.modelfolder import read_model_folder

    cfg, root = cv_run
    out = train_final(cfg, tmp_path / "final", cv_run=root / "run", progress=False)
    models, card = read_model_folder(out)
    assert len(models) == 1 and card.trained_on["epochs"] == epochs_from_cv(root / "run")
    assert card.trained_on["images"] == 8 and card.trained_on["epochs_from"] == "run"
    assert card.class_names == sorted(pd.read_csv(root / "data" / "labels.csv")["label"].unique())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the work folder is removed
    with pytest.raises(RunFolderError, match="--overwrite"):
        train_final(cfg, out, epochs=1, progress=False)
    with pytest.raises(InputError, match="needs epochs or cv_run"):
        train_final(cfg, tmp_path / "other", progress=False)


# --------------------------------------------------------------------------- streaming heat-map writer


def _overlapping_patches(shape=(4, 40, 56), size=16, stride=8, seed=0):
    """Every patch of a stride-8 grid on slices 0, 2, 3 (slice 1 skipped), with random probabilities."""
    rng = np.random.default_rng(seed)
    origins = np.array([(z, y, x) for z in (0, 2, 3) for y in range(0, shape[1] - size + 1, stride)
                        for x in range(0, shape[2] - size + 1, stride) if rng.random() < 0.8])
    probs = rng.dirichlet([1.0, 1.0, 1.0], len(origins)).astype(np.float32)
    return origins, probs


def test_streamed_heat_map_equals_in_memory_stitching(tmp_path):
    from cytofuse.inference.writers import HeatMapWriter

    shape, size, stride = (4, 44, 60), 16, 8  # 44 and 60 leave a border no patch covers
    origins, probs = _overlapping_patches(shape, size, stride)
    reference = stitch(origins, probs, shape=shape, size=size, stride=stride)
    project = np.random.default_rng(1).integers(0, 1000, (2, *shape)).astype(np.uint16)
    with HeatMapWriter(tmp_path / "heatmap.tif", shape=shape, class_names=["a", "b", "c"], size=size,
                       stride=stride, pixel_size_um=(1.0, 0.2, 0.2), project=project, max_pending=2) as writer:
        for start in range(0, len(origins), 5):  # batches that end mid-slice
            writer.add(origins[start : start + 5], probs[start : start + 5])
    heat = tifffile.imread(tmp_path / "heatmap.tif")
    assert heat.shape == (3, 4, 44, 60) and heat.dtype == np.float32
    np.testing.assert_array_equal(heat, reference.full())
    assert np.isnan(heat[:, 1]).all() and np.isnan(heat[:, :, 40:, :]).all()  # skipped slice; bottom border
    y0, x0 = origins[:, 1], origins[:, 2]  # pixel (12, 20) of slice 2: the mean of every patch over it
    covering = (origins[:, 0] == 2) & (y0 <= 12) & (12 < y0 + 16) & (x0 <= 20) & (20 < x0 + 16)
    assert covering.sum() >= 2 and np.allclose(heat[:, 2, 12, 20], probs[covering].mean(axis=0))
    covered = ~np.isnan(heat[0])
    assert covered.sum() > 0 and np.allclose(heat.sum(axis=0)[covered], 1.0, atol=1e-6)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "heatmap_max.tif"), reference.max_projection())
    np.testing.assert_array_equal(writer.max_projection(), reference.max_projection())
    np.testing.assert_array_equal(writer.projection, project.max(axis=1))
    with tifffile.TiffFile(tmp_path / "heatmap.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "CZYX"
        assert 'PhysicalSizeX="0.2"' in tif.ome_metadata and 'Name="c"' in tif.ome_metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmap.tif", "heatmap_max.tif"]


def test_stride_resolution_stores_one_pixel_per_cell(tmp_path):
    from cytofuse.inference.writers import HeatMapWriter

    shape, size, stride = (4, 40, 56), 16, 8
    origins, probs = _overlapping_patches(shape, size, stride)
    reference = stitch(origins, probs, shape=shape, size=size, stride=stride)
    with HeatMapWriter(tmp_path / "h.tif", shape=shape, class_names=["a", "b", "c"], size=size, stride=stride,
                       pixel_size_um=(1.0, 0.2, 0.2), resolution="stride") as writer:
        writer.add(origins, probs)
    heat = tifffile.imread(tmp_path / "h.tif")
    assert heat.shape == (3, 4, 5, 7)  # 40 // 8, 56 // 8 cells
    np.testing.assert_array_equal(heat, reference.values)
    assert tifffile.imread(tmp_path / "h_max.tif").shape == (3, 5, 7)
    with tifffile.TiffFile(tmp_path / "h.tif") as tif:
        assert 'PhysicalSizeX="1.6"' in tif.ome_metadata  # 0.2 um x 8 px cells
    with pytest.raises(InputError, match=r"heatmap_resolution must be one of \['full', 'stride'\], got 'half'"):
        HeatMapWriter(tmp_path / "x.tif", shape=shape, class_names=["a"], size=16, stride=8, resolution="half")


def test_writer_errors_surface_and_leave_no_file(tmp_path, monkeypatch):
    from cytofuse.inference.writers import HeatMapWriter

    shape = (4, 40, 56)
    origins, probs = _overlapping_patches(shape)

    def broken(self, z, cells):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HeatMapWriter, "_write_slice", broken)
    writer = HeatMapWriter(tmp_path / "heatmap.tif", shape=shape, class_names=["a", "b", "c"], size=16, stride=8,
                           max_pending=1)
    with pytest.raises(OSError, match="No space left on device") as caught, writer:
        for start in range(0, len(origins), 5):
            writer.add(origins[start : start + 5], probs[start : start + 5])
    assert any("heatmap.tif" in note for note in caught.value.__notes__)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temporary one
    # patches out of z order are a bug in the caller, reported as an error too
    monkeypatch.undo()
    with pytest.raises(ValueError, match="patches must come in z order"):
        with HeatMapWriter(tmp_path / "h.tif", shape=shape, class_names=["a", "b", "c"], size=16, stride=8) as w:
            w.add(origins[::-1], probs[::-1])
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_prediction_leaves_no_output(model_dir, tmp_path, monkeypatch):
    import cytofuse.inference.predict as predict

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = predict.ensemble_proba
    monkeypatch.setattr(predict, "ensemble_proba", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_images(model_dir, [Image(_halves(z=3, y=64, x=96), ("a", "b"))], out=tmp_path / "pred",
                       progress=False, batch_size=8, precision="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_predict_images_writes_stride_resolution_heat_maps_by_default(model_dir, tmp_path):
    from cytofuse.inference.heatmaps import upsample_cells

    image = Image(_halves(), ("a", "b"), pixel_size_um=(1.0, 0.5, 0.5))
    summary = predict_images(model_dir, [image], out=tmp_path / "pred", progress=False, precision="fp32")
    heat = tifffile.imread(tmp_path / "pred" / "images" / "image" / "heatmap.tif")
    assert heat.shape == (2, 3, 4, 6) and summary.loc[0, "heatmap_cell_px"] == 16  # one pixel per 16 px patch
    assert (heat[0, :, :, :3] > 0.99).all() and (heat[1, :, :, 3:] > 0.99).all()
    with tifffile.TiffFile(tmp_path / "pred" / "images" / "image" / "heatmap.tif") as tif:
        assert 'PhysicalSizeX="8.0"' in tif.ome_metadata  # 0.5 um pixels x 16
    predict_images(model_dir, [image], out=tmp_path / "full", progress=False, precision="fp32",
                   heatmap_resolution="full")
    full = tifffile.imread(tmp_path / "full" / "images" / "image" / "heatmap.tif")
    np.testing.assert_array_equal(upsample_cells(heat, 16, (64, 96)), full)  # the same values, per pixel
    np.testing.assert_array_equal(upsample_cells(tifffile.imread(tmp_path / "pred" / "images" / "image" /
                                                                 "heatmap_max.tif"), 16, (64, 96)),
                                  tifffile.imread(tmp_path / "full" / "images" / "image" / "heatmap_max.tif"))
    assert (tmp_path / "pred" / "images" / "image" / "overlay.png").stat().st_size > 1000
    with pytest.raises(InputError, match="heatmap_resolution must be one of"):
        predict_images(model_dir, [image], out=tmp_path / "p2", progress=False, heatmap_resolution="coarse")


def test_read_ahead_gives_the_same_outputs_and_surfaces_a_bad_file(model_dir, tmp_path):
    paths = [write_ome_tiff(tmp_path / f"img{i}.ome.tif", Image(_halves(seed=i, swap=i == 1), ("a", "b")))
             for i in range(3)]
    plain = predict_images(model_dir, paths, out=tmp_path / "plain", progress=False, precision="fp32")
    ahead = predict_images(model_dir, paths, out=tmp_path / "ahead", progress=False, precision="fp32",
                           read_ahead=True)
    pd.testing.assert_frame_equal(plain, ahead)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "plain" / "patches.parquet"),
                                  pd.read_parquet(tmp_path / "ahead" / "patches.parquet"))
    for name in ("img0", "img1", "img2"):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "plain" / "images" / name / "heatmap.tif"),
                                      tifffile.imread(tmp_path / "ahead" / "images" / name / "heatmap.tif"))
        assert (tmp_path / "ahead" / "images" / name / "overlay.png").stat().st_size > 1000
    # a truncated third file is read in the background; its error reaches the caller and no folder is left
    bad = tmp_path / "bad.ome.tif"
    bad.write_bytes(paths[2].read_bytes()[:200])
    with pytest.raises(InputError, match="bad.ome.tif is truncated"):
        predict_images(model_dir, [paths[0], paths[1], bad], out=tmp_path / "broken", progress=False,
                       precision="fp32", read_ahead=True)
    assert not (tmp_path / "broken").exists()
    assert not list(tmp_path.glob(".broken*"))


def test_a_stride_heat_map_a_few_cells_wide_is_not_taken_for_rgb(tmp_path):
    """3 or 4 cells along x once made tifffile read the last axis as colour samples and refuse the shape."""
    from cytofuse.inference.writers import HeatMapWriter

    shape, size = (4, 64, 64), 16  # 4 x 4 cells
    origins, probs = _overlapping_patches(shape, size, size)
    with HeatMapWriter(tmp_path / "h.tif", shape=shape, class_names=["a", "b", "c"], size=size, stride=size,
                       resolution="stride") as writer:
        writer.add(origins, probs)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "h.tif"),
                                  stitch(origins, probs, shape=shape, size=size, stride=size).values)
    assert tifffile.imread(tmp_path / "h_max.tif").shape == (3, 4, 4)


def test_overlay_colours_the_heat_map_over_the_grey_image_and_leaves_nan_clear(tmp_path):
    from PIL import Image as PILImage

    from cytofuse.inference.heatmaps import sample_cells, upsample_cells
    from cytofuse.inference.writers import _inferno, overlay_step, write_overlay_png

    projection = np.zeros((1, 300, 400), np.uint16)
    projection[0, :, 200:] = 1000  # left half dark, right half bright
    heat = np.full((2, 300, 400), np.nan, np.float32)
    heat[0, :150] = 1.0  # class 0: probability 1 on the top half, no patch below
    heat[1, :150] = 0.0
    write_overlay_png(tmp_path / "o.png", projection, heat, ["a", "b"], title="t")
    png = np.asarray(PILImage.open(tmp_path / "o.png").convert("RGB")).astype(float) / 255
    pad, top, bar = 10, 48, 14  # the layout: three 400 px panels, then the colour bar
    assert png.shape == (top + 300 + pad, pad + 3 * (400 + pad) + bar + 48, 3)
    panel_a = png[top : top + 300, pad + 410 : pad + 810]
    np.testing.assert_allclose(panel_a[200, 100], [0, 0, 0], atol=1 / 255)  # NaN over dark: the image alone
    np.testing.assert_allclose(panel_a[200, 300], [1, 1, 1], atol=1 / 255)  # NaN over bright: the image alone
    np.testing.assert_allclose(panel_a[50, 100], 0.6 * _inferno()[255], atol=1 / 255)  # P = 1 over dark
    np.testing.assert_allclose(panel_a[50, 300], 0.4 + 0.6 * _inferno()[255], atol=1 / 255)
    panel_b = png[top : top + 300, pad + 820 : pad + 1220]
    np.testing.assert_allclose(panel_b[50, 100], 0.6 * _inferno()[0], atol=1 / 255)  # P = 0
    # the overlay's heat map is sampled from the cells exactly as the image-resolution plane would be
    cells = np.random.default_rng(0).random((21, 21)).astype(np.float32)
    step = overlay_step((1364, 1364))
    assert step == 3
    np.testing.assert_array_equal(sample_cells(cells, 64, (1364, 1364), step),
                                  upsample_cells(cells, 64, (1364, 1364))[::step, ::step])


def test_batches_run_side_by_side_give_the_same_probabilities_and_restore_torch_threads(model_dir, tmp_path):
    image = Image(_halves(), ("a", "b"))
    before = torch.get_num_threads()
    inline = predict_images(model_dir, [image], out=tmp_path / "w0", progress=False, precision="fp32", workers=0,
                            batch_size=4)
    side = predict_images(model_dir, [image], out=tmp_path / "w3", progress=False, precision="fp32", workers=3,
                          batch_size=4)
    assert torch.get_num_threads() == before
    a, b = (pd.read_parquet(tmp_path / w / "patches.parquet") for w in ("w0", "w3"))
    pd.testing.assert_frame_equal(a[["image", "z", "y", "x"]], b[["image", "z", "y", "x"]])  # same order
    np.testing.assert_allclose(a["prob_a_bright"], b["prob_a_bright"], atol=1e-6)
    np.testing.assert_allclose(inline["prob_a_bright"], side["prob_a_bright"], atol=1e-6)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "w0" / "images" / "image" / "heatmap.tif"),
                                  tifffile.imread(tmp_path / "w3" / "images" / "image" / "heatmap.tif"))
    with pytest.raises(InputError, match="workers >= 0, got batch_size=64, workers=-1"):
        predict_images(model_dir, [image], out=tmp_path / "bad", progress=False, workers=-1)


def test_in_order_keeps_the_order_and_raises_the_first_error():
    import threading
    import time

    from cytofuse.inference.threads import in_order

    def slow_first(i):
        time.sleep(0.02 if i % 3 == 0 else 0.0)  # later items finish first
        return i, threading.get_ident()

    results = list(in_order(slow_first, range(20), 3))
    assert [i for i, _ in results] == list(range(20))
    assert len({t for _, t in results}) > 1 and threading.get_ident() not in {t for _, t in results}
    assert [i for i, t in in_order(slow_first, range(5), 0)] == list(range(5))

    def fails_at_7(i):
        if i == 7:
            raise ValueError("item 7")
        return i

    seen = []
    with pytest.raises(ValueError, match="item 7"):
        for i in in_order(fails_at_7, range(100), 2):
            seen.append(i)
    assert seen == list(range(7))


def test_an_in_memory_image_with_nan_pixels_is_refused_by_name(model_dir, tmp_path):
    from cytofuse.io.readers import Image

    data = _halves().astype(np.float32)
    data[1, 0, :2, :3] = np.nan
    image = Image(data, ("a", "b"), None, "nan-field", {})
    with pytest.raises(InputError, match=r"nan-field has 6 NaN or infinite pixel\(s\).*b: 6"):
        predict_images(model_dir, [image], out=tmp_path / "pred", progress=False)
    assert not (tmp_path / "pred").exists()
