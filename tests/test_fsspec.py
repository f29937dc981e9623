"""Images addressed by fsspec URLs: memory:// (in this process) and file:// read as their local files do."""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cytofuse.cli import app
from cytofuse.errors import DataSetError, InputError
from cytofuse.io.imagesets import ImageSet
from cytofuse.io.readers import Image, ImageURL, probe_image, read_image, write_ome_tiff
from cytofuse.io.zarr import ZarrStack, write_ome_zarr

fsspec = pytest.importorskip("fsspec")


@pytest.fixture()
def memory():
    """A fresh folder of fsspec's in-process memory filesystem, as (filesystem, URL of the folder)."""
    fs = fsspec.filesystem("memory")
    folder = f"/cytofuse-test-{uuid.uuid4().hex[:8]}"
    yield fs, f"memory://{folder}"
    fs.rm(folder, recursive=True)


@pytest.fixture(scope="module")
def local_files(tmp_path_factory) -> dict[str, Path]:
    """A small OME-TIFF, PNG and OME-Zarr written locally."""
    from PIL import Image as PILImage

    out = tmp_path_factory.mktemp("fsspec_local")
    data = (np.arange(2 * 3 * 24 * 20) % 997).astype(np.uint16).reshape(2, 3, 24, 20)
    write_ome_tiff(out / "a.ome.tif", Image(data, ("DNA", "BF"), (2.0, 0.5, 0.5)))
    PILImage.fromarray((data[0, 0] % 256).astype(np.uint8)).save(out / "b.png")
    write_ome_zarr(out / "c.ome.zarr", data, channel_names=["DNA", "BF"], pixel_size_um=(2.0, 0.5, 0.5))
    return {"tif": out / "a.ome.tif", "png": out / "b.png", "zarr": out / "c.ome.zarr"}


def _same(a: Image, b: Image) -> None:
    assert np.array_equal(np.asarray(a.data), np.asarray(b.data))
    assert np.asarray(a.data).dtype == np.asarray(b.data).dtype
    assert a.channel_names == b.channel_names and a.pixel_size_um == b.pixel_size_um


@pytest.mark.parametrize("kind", ["tif", "png", "zarr"])
def test_a_memory_url_reads_as_the_local_file(memory, local_files, kind):
    fs, folder = memory
    local = local_files[kind]
    url = f"{folder}/{local.name}"
    fs.put(str(local), url.removeprefix("memory://"), recursive=kind == "zarr")
    image = read_image(url, mmap=True)  # mmap does not apply to a URL: read whole
    _same(image, read_image(local))
    assert image.source == url
    assert probe_image(url).shape == read_image(local).shape
    if kind == "zarr":
        assert isinstance(image.data, ZarrStack)  # lazy through zarr's fsspec store
        assert np.array_equal(image.data[1, 2, 3:7, :5], read_image(local).data[1, 2, 3:7, :5])


def test_a_file_url_reads_as_the_local_file(local_files):
    for local in local_files.values():
        _same(read_image(local.absolute().as_uri()), read_image(local))


def test_url_errors_name_the_url(memory, local_files):
    fs, folder = memory
    with pytest.raises(InputError, match=f"{folder}/missing.tif does not exist"):
        read_image(f"{folder}/missing.tif")
    fs.pipe(f"{folder}/x.czi".removeprefix("memory://"), b"CZI")
    with pytest.raises(InputError, match=r"x\.czi.*local paths only.*copy the file locally"):
        read_image(f"{folder}/x.czi")
    with pytest.raises(InputError, match=r"nosuchscheme://"):
        read_image("nosuchscheme://bucket/a.tif")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_an_s3_url_without_s3fs_names_the_package():
    with pytest.raises(InputError, match=r"s3://bucket/a\.ome\.tif.*pip install s3fs"):
        read_image("s3://bucket/a.ome.tif")


def test_an_image_url_passes_through_absolute_and_pickling_unchanged():
    import pickle

    url = ImageURL("s3://bucket/dir/a.ome.tif", origin="manifest m.csv, line 2")
    assert url.absolute() == url.resolve() == "s3://bucket/dir/a.ome.tif"
    assert (url.name, url.suffix, str(url.parent)) == ("a.ome.tif", ".tif", "s3://bucket/dir")
    copy = pickle.loads(pickle.dumps(url))  # noqa: S301 - the way processes and Dask send it
    assert copy == url and isinstance(copy, ImageURL) and copy.origin == url.origin


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    out = tmp_path_factory.mktemp("fsspec_synthetic") / "data"
    write_synthetic_dataset(out, classes=2, images_per_class=2, shape=(2, 48, 48), seed=5, progress=False)
    return out


def _manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(path, index=False)
    return path


def _patches(manifest: Path, out: Path) -> pd.DataFrame:
    result = CliRunner().invoke(app, ["patches", "--manifest", str(manifest), "--out", str(out),
                                      "--size", "32", "--stride", "16"])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out / "patches.parquet")


def test_a_manifest_of_urls_gives_the_patches_of_local_paths(memory, synthetic, tmp_path):
    fs, folder = memory
    table = pd.read_csv(synthetic / "labels.csv")
    local, urls = [], []
    for i, (rel, label) in enumerate(zip(table["path"], table["label"])):
        path = (synthetic / rel).absolute()
        local.append((str(path), label))
        if i % 2:  # half through file://, half copied into memory://
            urls.append((path.as_uri(), label))
        else:
            fs.put(str(path), f"{folder}/{path.name}".removeprefix("memory://"))
            urls.append((f"{folder}/{path.name}", label))
    a = _patches(_manifest(tmp_path / "local.csv", local), tmp_path / "local")
    b = _patches(_manifest(tmp_path / "urls.csv", urls), tmp_path / "urls")
    pd.testing.assert_frame_equal(a, b)
    images_a, images_b = (pd.read_parquet(tmp_path / run / "images.parquet") for run in ("local", "urls"))
    assert list(images_b["source"]) == [u for u, _ in urls]  # the source column keeps the URL
    pd.testing.assert_frame_equal(images_a.drop(columns="source"), images_b.drop(columns="source"))
    assert (tmp_path / "local" / "attrition.csv").read_bytes() == (tmp_path / "urls" / "attrition.csv").read_bytes()


def test_a_missing_url_in_a_manifest_names_the_manifest_row_and_url(memory, synthetic, tmp_path):
    fs, folder = memory
    first = sorted((synthetic / "images").glob("*.ome.tif"))[0]
    fs.put(str(first), f"{folder}/{first.name}".removeprefix("memory://"))
    manifest = _manifest(tmp_path / "m.csv", [(f"{folder}/{first.name}", "a"), (f"{folder}/gone.ome.tif", "b")])
    image_set = ImageSet.from_manifest(manifest)
    with pytest.raises(DataSetError) as err:
        image_set.validate()
    assert f"{folder}/gone.ome.tif" in str(err.value) and "does not exist" in str(err.value)
    assert f"manifest {manifest}, line 3" in str(err.value)
    with pytest.raises(InputError, match=rf"{folder}/gone\.ome\.tif \(manifest .*m\.csv, line 3"):
        image_set.read(image_set.records[1])


def test_a_folder_url_is_listed_per_class(memory, synthetic):
    fs, folder = memory
    table = pd.read_csv(synthetic / "labels.csv")
    for rel, label in zip(table["path"], table["label"]):
        fs.put(str(synthetic / rel), f"{folder}/set/{label}/{Path(rel).name}".removeprefix("memory://"))
    image_set = ImageSet.from_folder(f"{folder}/set")
    assert len(image_set) == len(table)
    assert all(isinstance(r.path, ImageURL) and r.path.startswith(f"{folder}/set/") for r in image_set)
    assert {r.label for r in image_set} == set(table["label"])
    report = image_set.validate()
    assert report.n_images == len(table)


def test_a_folder_url_made_a_local_path_is_named(tmp_path):
    with pytest.raises(DataSetError, match=r"s3:/bucket/set looks like a s3:// URL read as a local path"):
        ImageSet.from_folder(Path("s3://bucket/set"))


def test_file_urls_through_a_local_cluster_give_the_local_patches(synthetic, tmp_path):
    pytest.importorskip("distributed")
    table = pd.read_csv(synthetic / "labels.csv")
    rows = [((synthetic / rel).absolute(), label) for rel, label in zip(table["path"], table["label"])]
    a = _patches(_manifest(tmp_path / "local.csv", [(str(p), label) for p, label in rows]), tmp_path / "local")
    manifest = _manifest(tmp_path / "urls.csv", [(p.as_uri(), label) for p, label in rows])
    result = CliRunner().invoke(app, ["patches", "--manifest", str(manifest), "--out", str(tmp_path / "urls"),
                                      "--size", "32", "--stride", "16", "--scheduler", "local:2"])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(a, pd.read_parquet(tmp_path / "urls" / "patches.parquet"))
    sources = pd.read_parquet(tmp_path / "urls" / "images.parquet")["source"]
    assert list(sources) == [p.as_uri() for p, _ in rows]
