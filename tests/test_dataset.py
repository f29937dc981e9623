"""Image sets from class folders and CSV manifests, and their validation before any work."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cytofuse.io.imagesets import ImageSet
from cytofuse.errors import DataSetError, InputError
from cytofuse.io.readers import Image, write_ome_tiff

NAMES = ("mito", "er")


def _write(path: Path, *, shape=(2, 3, 16, 16), dtype=np.uint16, names=NAMES, seed=0) -> np.ndarray:
    """A small OME-TIFF with distinct, seeded pixel values; returns its data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(0, 200, size=shape).astype(dtype)
    write_ome_tiff(path, Image(data, tuple(names[: shape[0]])))
    return data


def _write_channel(path: Path, *, zyx=(3, 16, 16), seed=0) -> np.ndarray:
    """One single-channel file of a one-file-per-channel image; returns its (Z, Y, X) data."""
    return _write(path, shape=(1, *zyx), names=("x",), seed=seed)[0]


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _two_class_folder(root: Path, *, per_class: int = 2, **kw) -> Path:
    for c, label in enumerate(("A", "B")):
        for i in range(per_class):
            _write(root / label / f"img{i}.ome.tif", seed=10 * c + i, **kw)
    return root


def _error(excinfo) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------------- folder per class


def test_from_folder_one_multichannel_file_per_image(tmp_path):
    _write(tmp_path / "A" / "img1.ome.tif")
    _write(tmp_path / "A" / "img2.ome.tif", seed=1)
    _write(tmp_path / "B" / "day2" / "img3.ome.tif", seed=2)
    (tmp_path / "B" / "notes.txt").write_text("not an image")

    image_set = ImageSet.from_folder(tmp_path)

    assert len(image_set) == 3
    assert image_set.classes == ["A", "B"]
    assert [(r.image_id, r.label, r.group) for r in image_set] == [
        ("A/img1", "A", "A/img1"),
        ("A/img2", "A", "A/img2"),
        ("B/day2/img3", "B", "B/day2/img3"),
    ]
    assert image_set["B/day2/img3"].path == tmp_path / "B" / "day2" / "img3.ome.tif"
    assert image_set["A/img1"].channel_paths == ()


def test_from_folder_one_file_per_channel_groups_by_key(tmp_path):
    a3 = _write_channel(tmp_path / "A" / "Ch3_x.tif", seed=1)
    a4 = _write_channel(tmp_path / "A" / "Ch4_x.tif", seed=2)
    _write_channel(tmp_path / "A" / "Ch3_y.tif", seed=3)
    _write_channel(tmp_path / "A" / "Ch4_y.tif", seed=4)
    _write_channel(tmp_path / "B" / "Ch3_z.tif", seed=5)
    _write_channel(tmp_path / "B" / "Ch4_z.tif", seed=6)

    image_set = ImageSet.from_folder(tmp_path)

    assert [(r.image_id, r.label) for r in image_set] == [("A/x", "A"), ("A/y", "A"), ("B/z", "B")]
    rec = image_set["A/x"]
    assert rec.path is None
    assert rec.channel_paths == (("Ch3", tmp_path / "A" / "Ch3_x.tif"), ("Ch4", tmp_path / "A" / "Ch4_x.tif"))
    image = image_set.read("A/x")
    assert image.shape == (2, 3, 16, 16)
    assert image.channel_names == ("Ch3", "Ch4")
    np.testing.assert_array_equal(image.data[0], a3)
    np.testing.assert_array_equal(image.data[1], a4)
    report = image_set.validate()
    assert report.channel_names == ("Ch3", "Ch4")
    assert report.shapes["B/z"] == (2, 3, 16, 16)


def test_from_folder_orders_channel_files_naturally(tmp_path):
    for seed, name in enumerate(("Ch10_x.tif", "Ch2_x.tif", "Ch3_x.tif")):
        _write_channel(tmp_path / "A" / name, seed=seed)
    image = ImageSet.from_folder(tmp_path).read("A/x")
    assert image.channel_names == ("Ch2", "Ch3", "Ch10")
    np.testing.assert_array_equal(image.data[2], _write_channel(tmp_path / "ref.tif", seed=0))


def test_from_folder_missing_channel_file_names_image_and_channel(tmp_path):
    for name in ("Ch3_x.tif", "Ch4_x.tif", "Ch3_y.tif"):
        _write_channel(tmp_path / "A" / name)
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_folder(tmp_path)
    msg = _error(excinfo)
    assert "image 'y'" in msg
    assert str(tmp_path / "A") in msg
    assert "['Ch4']" in msg


def test_from_folder_without_class_folders_is_an_error(tmp_path):
    _write(tmp_path / "loose.ome.tif")
    with pytest.raises(DataSetError, match="has no class sub-folders"):
        ImageSet.from_folder(tmp_path)
    with pytest.raises(DataSetError, match="does not exist"):
        ImageSet.from_folder(tmp_path / "missing")


def test_read_returns_czyx_data_of_the_file(tmp_path):
    data = _write(tmp_path / "A" / "img.ome.tif", shape=(2, 4, 8, 12), seed=7)
    image = ImageSet.from_folder(tmp_path).read("A/img")
    assert image.shape == (2, 4, 8, 12)
    assert image.channel_names == NAMES
    np.testing.assert_array_equal(image.data, data)


# --------------------------------------------------------------------------- manifests


def test_from_manifest_path_column_relative_to_manifest_folder(tmp_path):
    for i in range(2):
        _write(tmp_path / "proj" / "images" / f"a{i}.ome.tif", seed=i)
    elsewhere = tmp_path / "elsewhere" / "b0.ome.tif"
    _write(elsewhere, seed=5)
    csv_path = _manifest(
        tmp_path / "proj" / "labels.csv",
        [
            {"path": "images/a0.ome.tif", "label": "ctrl", "group": "dish1", "treatment": "none", "day": "1"},
            {"path": "images/a1.ome.tif", "label": "ctrl", "group": "dish1", "treatment": "none", "day": "2"},
            {"path": str(elsewhere), "label": "drug", "group": "", "treatment": "taxol", "day": "1"},
        ],
    )

    image_set = ImageSet.from_manifest(csv_path)

    recs = list(image_set)
    assert [r.path for r in recs] == [
        tmp_path / "proj" / "images" / "a0.ome.tif",
        tmp_path / "proj" / "images" / "a1.ome.tif",
        elsewhere,
    ]
    assert [r.image_id for r in recs] == ["images/a0", "images/a1", "b0"]
    assert [r.label for r in recs] == ["ctrl", "ctrl", "drug"]
    # an empty group falls back to the image itself
    assert [r.group for r in recs] == ["dish1", "dish1", "b0"]
    assert recs[2].metadata == {"treatment": "taxol", "day": "1"}
    report = image_set.validate()
    assert report.groups_per_class == {"ctrl": 1, "drug": 1}
    assert report.images_per_class == {"ctrl": 2, "drug": 1}


def test_from_manifest_without_group_column_groups_by_image(tmp_path):
    _write(tmp_path / "a.ome.tif")
    _write(tmp_path / "b.ome.tif", seed=1)
    csv_path = _manifest(tmp_path / "m.csv", [{"path": "a.ome.tif", "label": "x"}, {"path": "b.ome.tif", "label": "x"}])
    assert [r.group for r in ImageSet.from_manifest(csv_path)] == ["a", "b"]


def test_from_manifest_per_channel_path_columns(tmp_path):
    mito = _write_channel(tmp_path / "img" / "c1_mito.tif", seed=1)
    er = _write_channel(tmp_path / "img" / "c1_er.tif", seed=2)
    _write_channel(tmp_path / "img" / "c2_mito.tif", seed=3)
    _write_channel(tmp_path / "img" / "c2_er.tif", seed=4)
    csv_path = _manifest(
        tmp_path / "m.csv",
        [
            {"path_mito": "img/c1_mito.tif", "path_er": "img/c1_er.tif", "label": "A", "group": "g1", "well": "B3"},
            {"path_mito": "img/c2_mito.tif", "path_er": "img/c2_er.tif", "label": "B", "group": "g2", "well": "C4"},
        ],
    )

    image_set = ImageSet.from_manifest(csv_path)

    first = image_set.records[0]
    assert first.path is None
    assert first.channel_paths == (("mito", tmp_path / "img" / "c1_mito.tif"), ("er", tmp_path / "img" / "c1_er.tif"))
    assert first.metadata == {"well": "B3"}
    assert first.group == "g1"
    image = image_set.read(first)
    assert image.channel_names == ("mito", "er")
    assert image.shape == (2, 3, 16, 16)
    np.testing.assert_array_equal(image.data, np.stack([mito, er]))
    assert image_set.validate().channel_names == ("mito", "er")


def test_manifest_missing_label_column_names_file_and_column(tmp_path):
    csv_path = _manifest(tmp_path / "m.csv", [{"path": "a.tif", "class": "x"}])
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_manifest(csv_path)
    msg = _error(excinfo)
    assert str(csv_path) in msg and "label column 'label'" in msg and "'class'" in msg
    # a custom label column is honoured
    _write(tmp_path / "a.tif")
    assert ImageSet.from_manifest(csv_path, label_column="class").records[0].label == "x"


def test_manifest_without_path_columns_is_an_error(tmp_path):
    csv_path = _manifest(tmp_path / "m.csv", [{"file": "a.tif", "label": "x"}])
    with pytest.raises(DataSetError, match=r"needs a 'path' column or path_<channel> columns"):
        ImageSet.from_manifest(csv_path)


def test_manifest_empty_values_name_file_line_and_column(tmp_path):
    csv_path = _manifest(tmp_path / "m.csv", [{"path": "a.tif", "label": "x"}, {"path": "b.tif", "label": " "}])
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_manifest(csv_path)
    assert f"manifest {csv_path}, line 3: empty value in column 'label'" in _error(excinfo)

    csv_path = _manifest(tmp_path / "n.csv", [{"path": "a.tif", "label": "x"}, {"path": "", "label": "y"}])
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_manifest(csv_path)
    assert f"manifest {csv_path}, line 3: empty value in column 'path'" in _error(excinfo)


# --------------------------------------------------------------------------- validation


def test_validate_report_on_a_clean_set(tmp_path):
    root = _two_class_folder(tmp_path, per_class=3)
    report = ImageSet.from_folder(root).validate(n_folds=3)
    assert report.n_images == 6
    assert report.classes == ["A", "B"]
    assert report.images_per_class == {"A": 3, "B": 3}
    assert report.groups_per_class == {"A": 3, "B": 3}
    assert report.channel_names == NAMES
    assert report.shapes["A/img0"] == (2, 3, 16, 16)
    assert set(report.dtypes.values()) == {"uint16"}
    assert report.warnings == []


def test_zero_byte_file_is_named(tmp_path):
    root = _two_class_folder(tmp_path)
    empty = root / "B" / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_folder(root).validate()
    assert f"{empty}: zero-byte file" in _error(excinfo)
    assert "(1 problem(s))" in _error(excinfo)


def test_unreadable_file_is_named(tmp_path):
    root = _two_class_folder(tmp_path)
    junk = root / "A" / "junk.tif"
    junk.write_bytes(b"this is not a TIFF file at all" * 10)
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_folder(root).validate()
    msg = _error(excinfo)
    assert str(junk) in msg
    assert "(1 problem(s))" in msg


def test_missing_file_in_manifest_is_named(tmp_path):
    _write(tmp_path / "a.ome.tif")
    csv_path = _manifest(tmp_path / "m.csv", [{"path": "a.ome.tif", "label": "x"}, {"path": "gone.tif", "label": "y"}])
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_manifest(csv_path).validate()
    assert f"{tmp_path / 'gone.tif'}: file does not exist" in _error(excinfo)


def test_truncated_tiff_is_named(tmp_path):
    root = _two_class_folder(tmp_path)
    bad = root / "B" / "cut.tif"
    tifffile.imwrite(bad, np.ones((3, 16, 16), np.uint16), photometric="minisblack", metadata={"axes": "ZYX"})
    bad.write_bytes(bad.read_bytes()[:-400])
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_folder(root).validate()
    msg = _error(excinfo)
    assert str(bad) in msg
    assert "truncated" in msg


def test_inconsistent_channel_counts_name_both_files(tmp_path):
    _write(tmp_path / "A" / "two.ome.tif", shape=(2, 3, 16, 16))
    three = tmp_path / "B" / "three.ome.tif"
    _write(three, shape=(3, 3, 16, 16), names=("mito", "er", "golgi"))
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_folder(tmp_path).validate()
    msg = _error(excinfo)
    assert f"{three}: 3 channels ['mito', 'er', 'golgi']" in msg
    assert f"{tmp_path / 'A' / 'two.ome.tif'} has 2 ['mito', 'er']" in msg


def test_inconsistent_channel_names_name_file_and_names(tmp_path):
    _write(tmp_path / "A" / "a.ome.tif")
    other = tmp_path / "B" / "b.ome.tif"
    _write(other, names=("mito", "golgi"))
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_folder(tmp_path).validate()
    assert f"{other}: channel names ['mito', 'golgi'] differ from ['mito', 'er']" in _error(excinfo)


def test_unknown_channel_name_names_argument_and_value(tmp_path):
    image_set = ImageSet.from_folder(_two_class_folder(tmp_path))
    with pytest.raises(DataSetError) as excinfo:
        image_set.validate(channels=["nucleus"])
    msg = _error(excinfo)
    assert "channels: unknown channel name 'nucleus'" in msg
    assert "['mito', 'er']" in msg
    with pytest.raises(DataSetError, match="exclude_channels: unknown channel name 'dapi'"):
        image_set.validate(exclude_channels=["dapi"])
    assert image_set.validate(exclude_channels=["er"]).channel_names == NAMES


def test_duplicate_paths_are_named(tmp_path):
    _write(tmp_path / "a.ome.tif")
    _write(tmp_path / "b.ome.tif", seed=1)
    csv_path = _manifest(
        tmp_path / "m.csv",
        [
            {"path": "a.ome.tif", "label": "x", "image_id": "first"},
            {"path": "./a.ome.tif", "label": "y", "image_id": "second"},
            {"path": "b.ome.tif", "label": "y", "image_id": "third"},
        ],
    )
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_manifest(csv_path).validate()
    msg = _error(excinfo)
    assert "duplicate path (also used by image 'first')" in msg
    assert "a.ome.tif" in msg


def test_class_with_fewer_groups_than_folds(tmp_path):
    for i in range(3):
        _write(tmp_path / f"a{i}.ome.tif", seed=i)
        _write(tmp_path / f"b{i}.ome.tif", seed=10 + i)
    rows = [{"path": f"a{i}.ome.tif", "label": "A", "group": f"a{i}"} for i in range(3)]
    rows += [{"path": f"b{i}.ome.tif", "label": "B", "group": "same dish"} for i in range(3)]
    image_set = ImageSet.from_manifest(_manifest(tmp_path / "m.csv", rows))
    with pytest.raises(DataSetError) as excinfo:
        image_set.validate(n_folds=3)
    msg = _error(excinfo)
    assert "class 'B' has 1 group(s) but n_folds=3 needs at least 3" in msg
    assert "class 'A'" not in msg
    assert image_set.validate(n_folds=1).groups_per_class == {"A": 3, "B": 1}


def test_validate_collects_several_problems_in_one_error(tmp_path):
    root = _two_class_folder(tmp_path)
    empty = root / "A" / "empty.tif"
    empty.write_bytes(b"")
    junk = root / "B" / "junk.tif"
    junk.write_bytes(b"garbage" * 50)
    with pytest.raises(DataSetError) as excinfo:
        ImageSet.from_folder(root).validate(n_folds=5)
    msg = _error(excinfo)
    assert msg.startswith(f"image set {root} failed validation (4 problem(s)):")
    assert f"{empty}: zero-byte file" in msg
    assert str(junk) in msg
    assert "class 'A' has 3 group(s) but n_folds=5" in msg
    assert "class 'B' has 3 group(s) but n_folds=5" in msg


def test_validation_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError):
        ImageSet([], source="nothing")
    assert issubclass(DataSetError, ValueError)


# --------------------------------------------------------------------------- shortcut warnings


def test_bit_depth_separating_classes_warns(tmp_path):
    for i in range(2):
        _write(tmp_path / "A" / f"a{i}.ome.tif", dtype=np.uint8, seed=i)
        _write(tmp_path / "B" / f"b{i}.ome.tif", dtype=np.uint16, seed=i)
    with pytest.warns(UserWarning, match="bit depth differs systematically between classes") as record:
        report = ImageSet.from_folder(tmp_path).validate()
    assert len(record) == 1
    assert report.warnings == [
        "bit depth differs systematically between classes (A: ['uint8']; B: ['uint16']); "
        "a model can learn this shortcut"
    ]


def test_image_size_separating_classes_warns(tmp_path):
    for i in range(2):
        _write(tmp_path / "A" / f"a{i}.ome.tif", shape=(2, 2, 16, 16), seed=i)
        _write(tmp_path / "B" / f"b{i}.ome.tif", shape=(2, 2, 24, 24), seed=i)
    with pytest.warns(UserWarning, match=r"image size \(Y, X\) differs systematically") as record:
        report = ImageSet.from_folder(tmp_path).validate()
    assert len(record) == 1
    assert "A: ['(16, 16)']" in report.warnings[0] and "B: ['(24, 24)']" in report.warnings[0]


def test_no_shortcut_warning_when_both_classes_mix_sizes_and_depths(tmp_path):
    for label in ("A", "B"):
        _write(tmp_path / label / "small.ome.tif", shape=(2, 2, 16, 16), dtype=np.uint8)
        _write(tmp_path / label / "large.ome.tif", shape=(2, 2, 24, 24), dtype=np.uint16)
    # warnings are errors in this suite, so a shortcut warning would fail here
    report = ImageSet.from_folder(tmp_path).validate()
    assert report.warnings == []
    assert report.shapes["A/large"] == (2, 2, 24, 24)
    assert report.dtypes == {"A/large": "uint16", "A/small": "uint8", "B/large": "uint16", "B/small": "uint8"}


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.realdata
def test_real_one_file_per_channel_montages(real_data):
    root = real_data / "jurkat-cellcycle-ifc" / "Experiment_1"
    image_set = ImageSet.from_folder(root)
    report = image_set.validate()
    assert report.classes == ["Anaphase", "G1", "G2", "Metaphase", "Prophase", "S_phase", "Telophase"]
    assert report.channel_names == ("Ch3", "Ch4", "Ch6")
    assert set(report.shapes.values()) == {(3, 1, 1200, 1200)}
    assert set(report.dtypes.values()) == {"uint16"}
    assert report.warnings == []
    # one montage per class: image-grouped folds are impossible, and validation says so per class
    with pytest.raises(DataSetError) as excinfo:
        image_set.validate(n_folds=2)
    assert "(7 problem(s))" in str(excinfo.value)
    assert "class 'Anaphase' has 1 group(s) but n_folds=2" in str(excinfo.value)


@pytest.mark.slow
@pytest.mark.realdata
def test_real_manifest_with_custom_columns(real_data):
    csv_path = real_data / "hepg2-huh7-nuclei" / "labels.csv"
    image_set = ImageSet.from_manifest(csv_path, path_column="image", label_column="cell_line")
    report = image_set.validate(n_folds=5)
    assert report.images_per_class == {"HepG2": 25, "Huh7": 16}
    assert report.groups_per_class == {"HepG2": 25, "Huh7": 16}
    assert image_set.records[0].path == csv_path.parent / "images" / "1.jpg"
    assert set(report.shapes.values()) == {(3, 1, 768, 1024)}
    assert set(report.dtypes.values()) == {"uint8"}


def test_too_few_groups_for_a_validation_split_is_refused_before_any_work(tmp_path):
    """2 images per class and 2 folds: each training split keeps one image per class, too few to validate on."""
    import numpy as np

    from cytofuse.io.imagesets import ImageSet
    from cytofuse.io.readers import Image, write_ome_tiff

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            write_ome_tiff(tmp_path / label / f"{i}.ome.tif", Image(np.ones((1, 1, 8, 8), np.uint16), ("c",)))
    image_set = ImageSet.from_folder(tmp_path)
    with pytest.raises(DataSetError, match=r"class 'a' has 2 group\(s\): with n_folds=2 a training split keeps as few "
                                           r"as 1, and its grouped validation split needs 2"):
        image_set.validate(n_folds=2, min_classes=2)
    image_set.validate(n_folds=2, min_classes=1)  # labels from a channel: patches of one image differ in label
