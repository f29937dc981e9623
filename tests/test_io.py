"""Readers, probes, one-file-per-channel grouping and montage tiling in cytofuse.io.readers."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

from cytofuse.errors import InputError
from cytofuse.io.readers import (
    Image,
    group_channel_files,
    montage_tiles,
    probe_image,
    read_channel_files,
    read_image,
    split_montage,
    write_ome_tiff,
)


@pytest.fixture
def stack() -> np.ndarray:
    """A (C, Z, Y, X) uint16 stack whose every value is distinct, so any axis mix-up shows."""
    return np.arange(2 * 3 * 20 * 30, dtype=np.uint16).reshape(2, 3, 20, 30)


# --------------------------------------------------------------------------- round trips


def test_ome_tiff_round_trip_is_bit_exact(tmp_path, stack):
    image = Image(stack, ("DNA", "Mito"), (0.5, 0.2, 0.1), "memory")
    path = write_ome_tiff(tmp_path / "a.ome.tif", image)
    back = read_image(path)
    assert back.data.dtype == np.uint16
    np.testing.assert_array_equal(back.data, stack)
    assert back.channel_names == ("DNA", "Mito")
    assert back.pixel_size_um == pytest.approx((0.5, 0.2, 0.1))
    info = probe_image(path)
    assert (info.shape, info.dtype, info.channel_names) == ((2, 3, 20, 30), np.uint16, ("DNA", "Mito"))
    assert info.nbytes == stack.nbytes


def test_czi_written_by_pylibczirw_round_trips_bit_exactly(tmp_path, stack):
    from pylibCZIrw import czi as pyczi

    path = tmp_path / "a.czi"
    with pyczi.create_czi(str(path)) as writer:
        for c in range(2):
            for z in range(3):
                writer.write(stack[c, z][..., None], plane={"C": c, "Z": z, "T": 0})
        # CZI stores Scaling/Distance in metres (pylibCZIrw writes the value as given)
        writer.write_metadata(channel_names={0: "DNA", 1: "Mito"}, scale_x=0.1e-6, scale_y=0.2e-6, scale_z=0.5e-6)
    image = read_image(path)
    np.testing.assert_array_equal(image.data, stack)
    assert image.data.dtype == np.uint16
    assert image.channel_names == ("DNA", "Mito")
    assert image.pixel_size_um == pytest.approx((0.5, 0.2, 0.1))
    info = probe_image(path)
    assert (info.shape, info.channel_names) == ((2, 3, 20, 30), ("DNA", "Mito"))


def test_rgb_czi_becomes_red_green_blue_and_first_scene_is_read(tmp_path):
    from pylibCZIrw import czi as pyczi

    bgr = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    path = tmp_path / "rgb.czi"
    with pyczi.create_czi(str(path)) as writer:
        writer.write(bgr, plane={"C": 0, "Z": 0, "T": 0}, scene=0)  # CZI colour planes are BGR
        writer.write(bgr[::-1].copy(), location=(100, 0), plane={"C": 0, "Z": 0, "T": 0}, scene=1)
        writer.write_metadata()
    with pytest.warns(UserWarning, match=r"rgb\.czi has 2 scenes; reading the first"):
        image = read_image(path)
    assert image.shape == (3, 1, 12, 16)
    assert image.channel_names == ("red", "green", "blue")
    np.testing.assert_array_equal(image.data[:, 0], bgr[..., ::-1].transpose(2, 0, 1))


def test_imagej_hyperstack_reads_in_czyx_order(tmp_path, stack):
    path = tmp_path / "hyper.tif"
    labels = ["DNA", "Mito"] * 3  # ImageJ slice labels, channel fastest
    tifffile.imwrite(
        path,
        stack.transpose(1, 0, 2, 3),
        imagej=True,
        resolution=(1 / 0.2, 1 / 0.2),
        metadata={"axes": "ZCYX", "Labels": labels, "unit": "um", "spacing": 0.5},
    )
    image = read_image(path)
    np.testing.assert_array_equal(image.data, stack)
    assert image.channel_names == ("DNA", "Mito")
    assert image.pixel_size_um == pytest.approx((0.5, 0.2, 0.2))
    assert probe_image(path).shape == (2, 3, 20, 30)


def test_tiff_time_series_becomes_z_and_axes_override(tmp_path, stack):
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, stack[0], photometric="minisblack")  # 3 pages, no axis names
    image = read_image(path)
    assert image.shape == (1, 3, 20, 30)
    as_channels = read_image(path, axes="CYX", channel_names=["a", "b", "c"])
    assert as_channels.shape == (3, 1, 20, 30)
    assert as_channels.channel_names == ("a", "b", "c")
    np.testing.assert_array_equal(as_channels.data[:, 0], stack[0])


def test_two_long_stack_axes_are_refused(tmp_path, stack):
    path = tmp_path / "tz.npy"
    np.save(path, stack)
    with pytest.raises(InputError, match=r"tz\.npy.*2 stack axes.*T=2, Z=3"):
        read_image(path, axes="TZYX")


def test_png_grey_stored_as_rgb_is_one_channel(tmp_path):
    grey = np.arange(16 * 24, dtype=np.uint8).reshape(16, 24)
    path = tmp_path / "grey.png"
    PILImage.fromarray(np.stack([grey] * 3, axis=-1)).save(path)
    image = read_image(path)
    assert image.shape == (1, 1, 16, 24)
    assert image.channel_names == ("ch0",)
    np.testing.assert_array_equal(image.data[0, 0], grey)


def test_colour_png_is_three_named_channels(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 4), dtype=np.uint8)
    path = tmp_path / "colour.png"
    PILImage.fromarray(rgb, mode="RGBA").save(path)
    image = read_image(path)
    assert image.shape == (3, 1, 16, 24)
    assert image.channel_names == ("red", "green", "blue")
    np.testing.assert_array_equal(image.data[:, 0], rgb[..., :3].transpose(2, 0, 1))


def test_16_bit_grey_png_keeps_its_values(tmp_path):
    grey = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    PILImage.fromarray(grey).save(path)
    image = read_image(path)
    assert image.data.dtype == np.uint16
    np.testing.assert_array_equal(image.data[0, 0], grey)


@pytest.mark.parametrize(
    ("axes", "transpose"),
    [("CZYX", (0, 1, 2, 3)), ("ZCYX", (1, 0, 2, 3)), ("yxzc", (3, 2, 0, 1))],
)
def test_npy_with_axes_is_memory_mapped(tmp_path, stack, axes, transpose):
    on_disk = stack.transpose(np.argsort(transpose))  # the layout the file holds
    path = tmp_path / "a.npy"
    np.save(path, on_disk)
    image = read_image(path, axes=axes)
    np.testing.assert_array_equal(image.data, stack)
    assert isinstance(image.data.base, np.memmap) or isinstance(image.data, np.memmap)
    assert probe_image(path, axes=axes).shape == stack.shape


def test_npy_2d_yxc_crop(tmp_path):
    crop = np.arange(5 * 4 * 3, dtype=np.uint16).reshape(5, 4, 3)
    path = tmp_path / "crop.npy"
    np.save(path, crop)
    image = read_image(path, axes="YXC")
    assert image.shape == (3, 1, 5, 4)
    np.testing.assert_array_equal(image.data[1, 0], crop[..., 1])


# --------------------------------------------------------------------------- errors


def test_npy_without_axes_is_refused(tmp_path, stack):
    path = tmp_path / "noaxes.npy"
    np.save(path, stack)
    with pytest.raises(InputError, match=r"noaxes\.npy.*axes="):
        read_image(path)


def test_npy_axes_of_wrong_length_is_refused(tmp_path, stack):
    path = tmp_path / "a.npy"
    np.save(path, stack)
    with pytest.raises(InputError, match=r"4 dimensions of .*a\.npy.*axes='YX'"):
        read_image(path, axes="YX")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.tif does not exist"):
        read_image(tmp_path / "nothere.tif")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.tif"
    path.touch()
    with pytest.raises(InputError, match=r"empty\.tif is empty"):
        read_image(path)
    with pytest.raises(InputError, match=r"empty\.tif is empty"):
        probe_image(path)


@pytest.mark.parametrize(
    "write",
    [
        lambda p, a: tifffile.imwrite(p, a, photometric="minisblack"),
        lambda p, a: tifffile.imwrite(p, a, photometric="minisblack", compression="zlib"),
        lambda p, a: tifffile.imwrite(p, a.transpose(1, 0, 2, 3), imagej=True, metadata={"axes": "ZCYX"}),
        lambda p, a: write_ome_tiff(p, Image(a, ("a", "b"))),
    ],
    ids=["plain", "zlib", "imagej", "ome"],
)
def test_truncated_tiff_is_refused(tmp_path, stack, write):
    whole = tmp_path / "whole.tif"
    write(whole, stack)
    path = tmp_path / "cut.tif"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(InputError, match=r"cut\.tif"):
        read_image(path)


def test_truncated_tiff_is_found_by_probe(tmp_path, stack):
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, stack, photometric="minisblack")
    path = tmp_path / "cut.tif"
    path.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"cut\.tif is truncated"):
        probe_image(path)


def test_garbage_with_tif_suffix(tmp_path):
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"this is not a TIFF file at all" * 10)
    with pytest.raises(InputError, match=r"cannot read .*garbage\.tif as TIFF"):
        read_image(path)


def test_garbage_with_png_suffix(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"\x89PNG not really" * 10)
    with pytest.raises(InputError, match=r"garbage\.png"):
        read_image(path)


def test_unsupported_suffix_lists_supported_ones(tmp_path):
    path = tmp_path / "image.bmp"
    path.write_bytes(b"BM")
    with pytest.raises(InputError, match=r"image\.bmp.*'\.bmp'.*\.tif, .*\.czi, .*\.npy"):
        read_image(path)


def test_channel_names_length_mismatch(tmp_path, stack):
    path = write_ome_tiff(tmp_path / "two.ome.tif", Image(stack, ("a", "b")))
    with pytest.raises(InputError, match=r"channel_names has 3 names but .*two\.ome\.tif has 2 channels"):
        read_image(path, channel_names=["x", "y", "z"])
    assert read_image(path, channel_names=["x", "y"]).channel_names == ("x", "y")


def test_axes_refused_for_self_describing_formats(tmp_path):
    path = tmp_path / "g.png"
    PILImage.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    with pytest.raises(InputError, match=r"axes applies only .*g\.png"):
        read_image(path, axes="YX")


def test_nd2_dispatch_names_the_file(tmp_path):
    # the nd2 package reads but cannot write ND2 files, and no sample file exists: check
    # that .nd2 reaches the nd2 reader and its failure becomes an InputError naming the file
    path = tmp_path / "fake.nd2"
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(InputError, match=r"cannot read .*fake\.nd2 as ND2"):
        read_image(path)


# --------------------------------------------------------------------------- one file per channel


def _write_channels(folder: Path, names: list[str], shape=(8, 10), dtype=np.uint16) -> None:
    for i, name in enumerate(names):
        tifffile.imwrite(folder / name, np.full(shape, i, dtype=dtype))


def test_group_and_read_channel_files(tmp_path):
    names = ["Ch10_CP0002.tif", "Ch3_CP0001.tif", "Ch10_CP0001.tif", "Ch3_CP0002.tif"]
    _write_channels(tmp_path, names)
    groups = group_channel_files(sorted(tmp_path.iterdir()))
    assert list(groups) == ["CP0001", "CP0002"]
    assert list(groups["CP0001"]) == ["Ch3", "Ch10"]  # natural order: 3 before 10
    assert groups["CP0002"]["Ch10"] == tmp_path / "Ch10_CP0002.tif"
    image = read_channel_files(groups["CP0001"])
    assert image.shape == (2, 1, 8, 10)
    assert image.channel_names == ("Ch3", "Ch10")
    # Ch3_CP0001 was written with value 1, Ch10_CP0001 with value 2
    assert image.data[:, 0, 0, 0].tolist() == [1, 2]


def test_group_channel_files_missing_channel(tmp_path):
    paths = [tmp_path / n for n in ["Ch3_CP0001.tif", "Ch4_CP0001.tif", "Ch3_CP0002.tif"]]
    with pytest.raises(InputError, match=r"key 'CP0002' lacks channel\(s\) \['Ch4'\]"):
        group_channel_files(paths)


def test_group_channel_files_custom_pattern_and_errors(tmp_path):
    paths = [Path(f"BPAE_{c}.tif") for c in ("nuclei", "mito", "actin")]
    groups = group_channel_files(paths, pattern=r"^(?P<key>[^_]+)_(?P<channel>.+)\.tif$")
    assert list(groups["BPAE"]) == ["actin", "mito", "nuclei"]
    with pytest.raises(InputError, match=r"README\.md does not match pattern"):
        group_channel_files([Path("Ch3_CP1.tif"), Path("README.md")], pattern=r"^(?P<channel>[^_]+)_(?P<key>.+)\.tif$")
    with pytest.raises(InputError, match=r"both give channel 'Ch3' of key 'CP1'"):
        group_channel_files([Path("a/Ch3_CP1.tif"), Path("b/Ch3_CP1.tif")])
    with pytest.raises(InputError, match=r"named groups 'channel' and 'key'"):
        group_channel_files(paths, pattern=r"(.+)")


def test_read_channel_files_refuses_unequal_shapes(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 10), np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((8, 12), np.uint16))
    with pytest.raises(InputError, match=r"b\.tif has shape \(1, 1, 8, 12\)"):
        read_channel_files({"a": tmp_path / "a.tif", "b": tmp_path / "b.tif"})


def test_read_channel_files_refuses_multichannel_file(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 10, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match=r"rgb\.tif holds 3 channels"):
        read_channel_files({"a": tmp_path / "rgb.tif"})


# --------------------------------------------------------------------------- montages


def _montage(ny: int, nx: int, th: int = 4, tw: int = 5) -> np.ndarray:
    """A (2, 1, ny*th, nx*tw) montage whose tile (row r, column c) is filled with 100*r + c."""
    values = 100 * np.arange(ny)[:, None] + np.arange(nx)[None, :]
    plane = np.kron(values, np.ones((th, tw), dtype=np.int64))
    return np.stack([plane, -plane])[:, None]


def test_montage_column_order():
    tiles = montage_tiles(_montage(3, 2), tile_size=(4, 5))
    assert tiles.shape == (6, 2, 1, 4, 5)
    assert tiles[:, 0, 0, 0, 0].tolist() == [0, 100, 200, 1, 101, 201]
    assert (tiles[:, 1] == -tiles[:, 0]).all()


def test_montage_row_order_and_n_tiles():
    tiles = montage_tiles(_montage(3, 2), tile_size=(4, 5), order="row", n_tiles=4)
    assert tiles[:, 0, 0, 0, 0].tolist() == [0, 1, 100, 101]


def test_split_montage_images_know_their_place():
    montage = Image(_montage(2, 2, 4, 4), ("a", "b"), (None, 0.3, 0.3), "m.tif")
    tiles = split_montage(montage, tile_size=4)
    assert [t.metadata["tile_row"] for t in tiles] == [0, 1, 0, 1]
    assert [t.metadata["tile_col"] for t in tiles] == [0, 0, 1, 1]
    assert tiles[2].source == "m.tif#2"
    assert tiles[2].data[0, 0, 0, 0] == 1
    assert tiles[2].pixel_size_um == (None, 0.3, 0.3)


def test_montage_errors():
    montage = Image(_montage(2, 2, 4, 4), ("a", "b"), source="m.tif")
    with pytest.raises(InputError, match=r"m\.tif of size \(Y, X\) = \(8, 8\) is not a multiple of tile_size \(3, 3\)"):
        split_montage(montage, tile_size=3)
    with pytest.raises(InputError, match=r"n_tiles must be between 1 and the 4 tiles of m\.tif, got n_tiles=5"):
        split_montage(montage, tile_size=4, n_tiles=5)
    with pytest.raises(InputError, match=r"order must be 'column' or 'row', got order='diagonal'"):
        split_montage(montage, tile_size=4, order="diagonal")
    with pytest.raises(InputError, match=r"tile_size must be a positive int"):
        split_montage(montage, tile_size=0)


# --------------------------------------------------------------------------- real data


def test_real_unlabelled_multichannel(real_data):
    folder = real_data / "unlabelled-multichannel"
    hela = read_image(folder / "hela-cells.tif")
    assert hela.shape == (3, 1, 512, 672)
    assert hela.data.dtype == np.uint16
    assert hela.channel_names == ("red", "green", "blue")
    assert hela.pixel_size_um[1] == pytest.approx(0.0515, abs=1e-4)  # ImageJ resolution in µm
    ixm = read_image(folder / "IXMtest_A02_s9.tif")
    assert ixm.shape == (3, 1, 395, 695)
    groups = group_channel_files(
        sorted(folder.glob("BPAE_*.tif")), pattern=r"^(?P<key>[^_]+)_(?P<channel>.+)\.tif$"
    )
    bpae = read_channel_files(groups["BPAE"])
    assert bpae.shape == (3, 1, 680, 1100)
    assert bpae.data.dtype == np.float32
    assert bpae.channel_names == ("actin", "mito", "nuclei")
    for path in folder.glob("*.tif"):
        info = probe_image(path)
        assert info.shape[0] in (1, 3)


def test_real_jurkat_montage_splits_into_cells(real_data):
    folder = real_data / "jurkat-cellcycle-ifc" / "Experiment_1"
    g1 = group_channel_files(sorted((folder / "G1").glob("*.tif")))
    (key, channels), = g1.items()
    tiles = split_montage(read_channel_files(channels), tile_size=40)
    assert len(tiles) == 900
    assert tiles[0].shape == (3, 1, 40, 40)
    assert tiles[0].channel_names == ("Ch3", "Ch4", "Ch6")
    # Anaphase: 16 cells filled column by column, the 16th a pixel-exact copy of the 13th
    (_, anaphase), = group_channel_files(sorted((folder / "Anaphase").glob("*.tif"))).items()
    cells = montage_tiles(read_channel_files(anaphase).data, tile_size=40, n_tiles=17)
    np.testing.assert_array_equal(cells[15], cells[12])
    assert cells[:16, 0].std(axis=(1, 2, 3)).min() > 5 * cells[16, 0].std()  # tile 17 is padding


def test_real_png_and_jpeg(real_data):
    crop = next(iter(sorted((real_data / "livedead-brightfield" / "crops" / "live").glob("*.png"))))
    assert read_image(crop).shape == (1, 1, 128, 128)  # grey stored as RGB
    jpeg = read_image(real_data / "hepg2-huh7-nuclei" / "images" / "1.jpg")
    assert jpeg.shape == (3, 1, 768, 1024)  # blue-tinted: colour planes differ


def test_tiff_mmap_maps_uncompressed_files_read_only_and_reads_the_rest(tmp_path):
    import tifffile

    data = np.random.default_rng(0).integers(0, 4000, (2, 3, 32, 48)).astype(np.uint16)
    ome = write_ome_tiff(tmp_path / "a.ome.tif", Image(data, ("dna", "mito"), (0.5, 0.1, 0.1)))
    mapped, read = read_image(ome, mmap=True), read_image(ome)
    np.testing.assert_array_equal(mapped.data, read.data)
    assert mapped.channel_names == ("dna", "mito") and mapped.pixel_size_um == read.pixel_size_um
    assert not mapped.data.flags.writeable and mapped.data.base is not None  # a view of the file, not a copy
    with pytest.raises(ValueError, match="read-only"):
        mapped.data[0, 0, 0, 0] = 1
    tifffile.imwrite(tmp_path / "hyper.tif", data.transpose(1, 0, 2, 3), imagej=True, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "hyper.tif", mmap=True).data, data)
    tifffile.imwrite(tmp_path / "zlib.tif", data[0], compression="zlib", photometric="minisblack")  # not mappable
    packed = read_image(tmp_path / "zlib.tif", mmap=True)
    assert packed.data.flags.writeable
    np.testing.assert_array_equal(packed.data, read_image(tmp_path / "zlib.tif").data)
