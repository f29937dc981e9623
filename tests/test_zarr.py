"""OME-Zarr: lazy reading (NGFF 0.4 and 0.5), the patch stage and prediction on it, and OME-Zarr heat maps."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr

from cytofuse.errors import InputError
from cytofuse.inference.modelfolder import card_for, write_model_folder
from cytofuse.inference.predict import predict_images
from cytofuse.io.imagesets import ImageSet
from cytofuse.io.readers import Image, probe_image, read_image, write_ome_tiff
from cytofuse.io.zarr import ZarrChannel, ZarrStack, downsample2, write_ome_zarr
from cytofuse.models import create_model
from cytofuse.preprocess.patches import PatchSettings, build_patch_index, cut_patches, extract_patches
from cytofuse.training.fit import recalibrate_batchnorm

CHANNELS = ["mito", "endo", "nucleus"]
SHAPE = (3, 8, 256, 256)


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    """(3, 8, 256, 256) uint16: blobs of different sizes per channel over a noisy background, one repeated tile."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    data = rng.integers(80, 120, SHAPE).astype(np.float64)
    for c in range(3):
        for z in range(8):
            for cy, cx in rng.uniform(20, 236, (3, 2)):
                data[c, z] += 3000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (6 + 4 * c) ** 2))
    data = data.astype(np.uint16)
    data[:, 5, 64:96, 0:32] = data[:, 5, 0:32, 0:32]  # a pixel-exact repeat: the duplicate check reads patches
    return data


def _write_ngff(path, data: np.ndarray, version: str) -> None:
    """A 1 x C x Z x Y x X (t, c, z, y, x) OME-Zarr written with zarr itself (not cytofuse's writer): two
    levels, 128 px chunks, micrometre scales, omero channel labels."""
    fmt = 2 if version == "0.4" else 3
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    levels = [data[None], data[None, :, :, ::2, ::2]]
    for i, level in enumerate(levels):
        extra = {"dimension_names": list("tczyx")} if fmt == 3 else {}
        group.create_array(str(i), data=level, chunks=(1, 1, 1, 128, 128), **extra)
    axes = [{"name": "t", "type": "time", "unit": "second"}, {"name": "c", "type": "channel"},
            *({"name": a, "type": "space", "unit": u} for a, u in zip("zyx", ("micrometer", "nanometer", "nanometer")))]
    datasets = [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 2.0, 250.0 * 2**i,
                                                                                            250.0 * 2**i]}]}
                for i in range(2)]
    multiscale = {"axes": axes, "datasets": datasets, "name": "stack"}
    omero = {"channels": [{"label": c} for c in CHANNELS]}
    if version == "0.4":
        group.attrs.update({"multiscales": [{"version": "0.4", **multiscale}], "omero": omero})
    else:
        group.attrs.update({"ome": {"version": "0.5", "multiscales": [multiscale], "omero": omero}})


@pytest.fixture(scope="module")
def images(tmp_path_factory, stack):
    """The stack as OME-Zarr 0.4, OME-Zarr 0.5 and OME-TIFF."""
    root = tmp_path_factory.mktemp("zarr_images")
    paths = {v: root / f"cells_{v}.ome.zarr" for v in ("0.4", "0.5")}
    for version, path in paths.items():
        _write_ngff(path, stack, version)
    paths["tiff"] = write_ome_tiff(root / "cells.ome.tif", Image(stack, tuple(CHANNELS), (2.0, 0.25, 0.25)))
    return paths


@pytest.fixture
def no_whole_reads(monkeypatch):
    """Fail when anything turns a lazy OME-Zarr stack into one array (the whole image in memory)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a whole image or channel was read into memory: {self!r}")

    monkeypatch.setattr(ZarrStack, "__array__", refuse)
    monkeypatch.setattr(ZarrChannel, "__array__", refuse)  # nor one whole channel


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_reads_back_lazily_equal_to_the_source(images, stack, version):
    image = read_image(images[version])
    assert isinstance(image.data, ZarrStack) and image.shape == SHAPE and image.data.dtype == np.uint16
    assert image.channel_names == tuple(CHANNELS)
    assert image.pixel_size_um == (2.0, 0.25, 0.25)  # nanometre scales converted
    assert image.metadata["ngff_version"] == version and image.metadata["levels"] == 2
    np.testing.assert_array_equal(np.asarray(image.data), stack)
    np.testing.assert_array_equal(image.data[2, 7], stack[2, 7])
    np.testing.assert_array_equal(image.data[:, 1:4, 100:140, ::3], stack[:, 1:4, 100:140, ::3])
    np.testing.assert_array_equal(image.data[[2, 0]][1, 3], stack[0, 3])
    zs, off = np.array([0, 5, 7]), np.arange(0, 32, 4)
    key = (slice(None), zs[:, None, None], (np.array([0, 64, 200])[:, None] + off)[:, :, None],
           (np.array([3, 0, 220])[:, None] + off)[:, None, :])
    np.testing.assert_array_equal(image.data[key], stack[key])
    info = probe_image(images[version])
    assert (info.shape, info.channel_names) == (SHAPE, tuple(CHANNELS))
    copy = pickle.loads(pickle.dumps(image.data[[1, 2]]))  # as sent to a worker process: without its cache
    np.testing.assert_array_equal(copy[1, 6], stack[2, 6])


def test_cytofuse_writer_round_trips_both_versions_with_halved_levels(tmp_path, stack):
    for version in ("0.4", "0.5"):
        path = write_ome_zarr(tmp_path / f"w{version}.ome.zarr", stack, channel_names=CHANNELS, version=version,
                              pixel_size_um=(2.0, 0.25, 0.25), min_side=64)
        image = read_image(path)
        np.testing.assert_array_equal(np.asarray(image.data), stack)
        assert image.pixel_size_um == (2.0, 0.25, 0.25) and image.metadata["levels"] == 3
        group = zarr.open_group(str(path), mode="r")
        assert [group[str(i)].shape for i in range(3)] == [SHAPE, (3, 8, 128, 128), (3, 8, 64, 64)]
        np.testing.assert_array_equal(group["1"][1, 2], downsample2(stack[1, 2]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w0.4.ome.zarr", "w0.5.ome.zarr"]  # nothing left over


def test_image_folders_and_manifests_take_ome_zarr_folders(tmp_path, stack):
    for label in ("a", "b"):
        write_ome_zarr(tmp_path / "data" / label / "cells.ome.zarr", stack[:, :2], channel_names=CHANNELS)
    image_set = ImageSet.from_folder(tmp_path / "data")
    assert [(r.image_id, r.label) for r in image_set] == [("a/cells", "a"), ("b/cells", "b")]
    report = image_set.validate(min_classes=2, patch_size=32)
    assert report.n_images == 2
    assert image_set.read("b/cells").shape == (3, 2, 256, 256)


def test_bad_ome_zarr_folders_are_refused_by_name(tmp_path):
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("0", shape=(4, 4), dtype="u1")
    with pytest.raises(InputError, match=rf"{plain} is not an OME-Zarr image: its attributes have no 'multiscales'"):
        read_image(plain)
    (tmp_path / "file.zarr").write_bytes(b"x")
    with pytest.raises(InputError, match=r"file.zarr is not a folder; \.zarr images are folders"):
        read_image(tmp_path / "file.zarr")
    with pytest.raises(InputError, match="axes applies only to"):
        read_image(plain, axes="YX")


def test_patch_stage_on_ome_zarr_equals_ome_tiff_without_loading_the_image(tmp_path, images, no_whole_reads):
    settings = PatchSettings(size=32, stride=32, min_ratio=0.02, hist_samples=100_000, drop_duplicates=True)
    tables = {}
    for kind in ("0.5", "tiff"):
        csv = tmp_path / f"{kind}.csv"
        csv.write_text(f"path,label\n{images[kind]},a\n")
        index = build_patch_index(ImageSet.from_manifest(csv), settings, tmp_path / f"run_{kind}", progress=False)
        tables[kind] = (index.patches.drop(columns=["image_id", "group"]),
                        index.images.drop(columns=["image_id", "group", "source"]))
    pd.testing.assert_frame_equal(tables["0.5"][0], tables["tiff"][0])
    pd.testing.assert_frame_equal(tables["0.5"][1], tables["tiff"][1])
    assert 20 < len(tables["tiff"][0]) < 8 * 64 and "dropped 1 patches" in tables["tiff"][1]["notes"][0]


def test_cut_patches_of_a_lazy_stack_equal_those_of_the_array(images, stack, no_whole_reads):
    lazy = read_image(images["0.4"]).data
    res = extract_patches(lazy, channel_names=CHANNELS, settings=PatchSettings(size=32, stride=16, min_ratio=0.05))
    want = extract_patches(stack, channel_names=CHANNELS, settings=PatchSettings(size=32, stride=16, min_ratio=0.05))
    np.testing.assert_array_equal(res.origins, want.origins)
    origins = res.origins[::-3]  # z out of order
    for channels_last in (False, True):
        got = cut_patches(lazy, origins, res.low, res.high, size=32, channels_last=channels_last)
        np.testing.assert_array_equal(got, cut_patches(stack, origins, res.low, res.high, size=32,
                                                       channels_last=channels_last))


def _model_folder(path):
    torch.manual_seed(0)
    model = create_model("early", in_channels=3, num_classes=2, encoder="smallcnn")
    recalibrate_batchnorm(model, [(torch.rand(8, 3, 32, 32), None)])
    with torch.no_grad():
        for layer in model.head.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(50)
    card = card_for([model.eval()], class_names=["control", "treated"], channel_names=CHANNELS,
                    patches=PatchSettings(size=32, stride=32, min_ratio=0.02))
    return write_model_folder(path, [model], card)


def test_predict_ome_zarr_heat_maps_equal_the_tiff_ones(tmp_path, images, no_whole_reads):
    from typer.testing import CliRunner

    from cytofuse.cli import app

    model = _model_folder(tmp_path / "model")
    result = CliRunner().invoke(app, ["predict", str(model), str(images["0.4"]), "--out", str(tmp_path / "zarr"),
                                      "--format", "ome-zarr", "--heatmap-resolution", "full", "--workers", "0"])
    assert result.exit_code == 0, result.output
    tiff = predict_images(model, [images["tiff"]], out=tmp_path / "tiff", heatmap_resolution="full", workers=0,
                          progress=False)
    zsum = pd.read_csv(tmp_path / "zarr" / "summary.csv")
    np.testing.assert_allclose(zsum[["prob_control", "prob_treated"]], tiff[["prob_control", "prob_treated"]],
                               atol=1e-6)
    patches = [pd.read_parquet(tmp_path / k / "patches.parquet").drop(columns="image") for k in ("zarr", "tiff")]
    pd.testing.assert_frame_equal(*patches)
    folder = tmp_path / "zarr" / "images" / "cells_0"
    assert sorted(p.name for p in folder.iterdir()) == ["heatmap.ome.zarr", "heatmap_max.ome.zarr", "overlay.png"]
    want = tifffile.imread(tmp_path / "tiff" / "images" / "cells" / "heatmap.tif")
    group = zarr.open_group(str(folder / "heatmap.ome.zarr"), mode="r")
    (multiscale,) = group.attrs["multiscales"]
    assert multiscale["version"] == "0.4" and [a["name"] for a in multiscale["axes"]] == list("czyx")
    assert [d["path"] for d in multiscale["datasets"]] == ["0", "1", "2"]
    assert [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]] == [
        [1.0, 2.0, 0.25 * f, 0.25 * f] for f in (1, 2, 4)]
    assert [c["label"] for c in group.attrs["omero"]["channels"]] == ["control", "treated"]
    assert [group[str(i)].shape for i in range(3)] == [(2, 8, 256, 256), (2, 8, 128, 128), (2, 8, 64, 64)]
    np.testing.assert_array_equal(group["0"][:], want)  # NaN where no patch, equal everywhere else
    np.testing.assert_array_equal(group["1"][1, 4], downsample2(want[1, 4]))
    assert np.isfinite(want).mean() > 0.1 and np.isnan(want).any()
    mx = zarr.open_group(str(folder / "heatmap_max.ome.zarr"), mode="r")
    np.testing.assert_array_equal(mx["0"][:, 0], tifffile.imread(tmp_path / "tiff" / "images" / "cells" / "heatmap_max.tif"))
    assert json.loads(json.dumps(dict(mx.attrs)))["multiscales"][0]["axes"][1]["name"] == "z"
    assert not [p for p in folder.rglob(".*") if "partial" in p.name]  # written through hidden folders, renamed


def test_predict_refuses_an_unknown_heat_map_format(tmp_path, images):
    with pytest.raises(InputError, match=r"heatmap_format must be one of \['tiff', 'ome-zarr'\], got 'zarr'"):
        predict_images(tmp_path / "nowhere", [images["tiff"]], out=tmp_path / "out", heatmap_format="zarr")
    assert not (tmp_path / "out").exists()
