import csv
import itertools

import numpy as np
import pytest
from scipy import ndimage, stats
from skimage.feature import hessian_matrix, hessian_matrix_eigvals
from skimage.filters import threshold_otsu

from cytofuse.errors import InputError
from cytofuse.io.readers import read_image
from cytofuse.synthetic.phantoms import (
    CHANNELS,
    CLASS_NAMES,
    CLASS_SPECS,
    class_table,
    image_seed,
    informative_channels,
    make_phantom,
    requires_fusion,
    separating_channels,
    write_synthetic_dataset,
)

SMALL = (8, 96, 96)
N_SEEDS = 5  # images per class for the statistical tests (distinct seeds for every image)


@pytest.fixture(scope="module")
def phantoms():
    """Phantoms at difficulty 0 (the designed class parameters), five per class."""
    return {
        k: [make_phantom(k, shape=(8, 160, 160), difficulty=0.0, seed=image_seed(1, k, i)) for i in range(N_SEEDS)]
        for k in range(len(CLASS_SPECS))
    }


def _fg(a: np.ndarray) -> np.ndarray:
    a = ndimage.gaussian_filter(a.astype(np.float32), 1.0)
    return a > threshold_otsu(a)


def _tubularity(image) -> float:
    """Mean ridge anisotropy (1 line, 0 spot) of the brightest mitochondria pixels, in the slice
    where the mitochondria are brightest (cells sit at different heights)."""
    z = int(np.argmax(np.percentile(image.data[1], 99, axis=(1, 2))))
    a = image.data[1, z].astype(np.float32)
    l1, l2 = hessian_matrix_eigvals(hessian_matrix(a, sigma=1.5, order="rc", use_gaussian_derivatives=False))
    m = (a > np.percentile(a, 97)) & (l2 < 0)
    return float(np.mean((np.abs(l2[m]) - np.abs(l1[m]) * (l1[m] < 0)) / np.abs(l2[m])))


def _puncta(a: np.ndarray) -> np.ndarray:
    """Bright spots of a 2D image above its local background (a top-hat removes the diffuse stain)."""
    a = ndimage.gaussian_filter(a.astype(np.float32), 1.0)
    spots = ndimage.white_tophat(a, size=9)
    return spots > threshold_otsu(spots)


def _nucleus_distance(image, channel: int) -> float:
    """Mean distance (px) of a channel's puncta to the nearest nucleus, on projections."""
    dist = ndimage.distance_transform_edt(~_fg(image.data[0].max(0)))
    return float(dist[_puncta(image.data[channel].max(0))].mean())


def _pearson(image, a: int = 1, b: int = 2) -> float:
    """Pearson correlation of two channels inside the cells."""
    x, y = (ndimage.gaussian_filter(image.data[c].astype(np.float32), (0, 1, 1)) for c in (a, b))
    cells = np.broadcast_to(_fg(image.data[1:].max(1).sum(0)), x.shape)
    return float(np.corrcoef(x[cells], y[cells])[0, 1])


def _values(phantoms, k, statistic):
    return [statistic(im) for im in phantoms[k]]


def _separated(low, high) -> bool:
    """Every value of ``high`` exceeds every value of ``low``."""
    return max(low) < min(high)


# --------------------------------------------------------------------------- basics


def test_shape_dtype_channels_metadata():
    im = make_phantom(2, shape=SMALL, seed=3, pixel_size_um=(0.4, 0.08, 0.08))
    assert im.data.shape == (4, *SMALL) and im.data.dtype == np.uint16
    assert im.channel_names == CHANNELS == ("nucleus", "mitochondria", "early_endosome", "recycling_endosome")
    assert im.pixel_size_um == (0.4, 0.08, 0.08)
    assert im.metadata["label"] == "ee_perinuclear"
    assert im.metadata["n_cells"] == len(im.metadata["cell_centers_yx"]) >= 1
    assert make_phantom("ee_perinuclear", shape=SMALL, seed=3).metadata["class_index"] == 2


def test_same_seed_identical_other_seed_different():
    a, b = make_phantom(1, shape=SMALL, seed=7), make_phantom(1, shape=SMALL, seed=7)
    c = make_phantom(1, shape=SMALL, seed=8)
    np.testing.assert_array_equal(a.data, b.data)
    assert (a.data != c.data).mean() > 0.5


def test_fluorescence_like_dark_background_bright_structures():
    im = make_phantom(0, shape=(8, 128, 128), seed=0)
    for c in range(4):
        a = im.data[c].astype(float)
        background, peak = np.percentile(a, 10), np.percentile(a, 99.9)
        assert 60 < background < 200  # camera offset plus a little autofluorescence
        assert peak > background + 40  # organelles stand well above it
    assert np.abs(np.diff(im.data[1].astype(float), axis=2)).mean() > 1  # noise is present


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"label": 6}, "label must be"),
        ({"label": "golgi"}, "label must be one of"),
        ({"difficulty": 1.5}, "difficulty must be in"),
        ({"shape": (8, 16, 256)}, "shape must be"),
        ({"cell_density": 0.0}, "cell_density must be"),
        ({"pixel_size_um": (0.5, 0, 0.1)}, "pixel_size_um"),
        ({"shortcut": {"contrast": {0: 2.0}}}, "shortcut must map"),
        ({"shortcut": {"background": {0: -1.0}}}, "factor for class 0 must be > 0"),
        ({"seed": -1}, "seed must be a non-negative int"),
    ],
)
def test_bad_arguments_raise_input_error(kwargs, match):
    args = {"label": 0, "shape": SMALL, "seed": 0} | kwargs
    with pytest.raises(InputError, match=match):
        make_phantom(**args)


# --------------------------------------------------------------------------- ground truth table


def test_class_table_ground_truth():
    assert len(CLASS_SPECS) >= 6 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert informative_channels("control", "fragmented") == {"mitochondria"}
    assert informative_channels(0, 2) == {"early_endosome"}
    assert informative_channels(0, 3) == {"recycling_endosome"}
    assert informative_channels(0, 4) == {"mitochondria", "early_endosome"}
    assert separating_channels(0, 4) == set() and requires_fusion(0, 4)
    assert not requires_fusion(0, 1) and informative_channels(3, 3) == set()
    for a, b in itertools.combinations(range(len(CLASS_SPECS)), 2):
        assert "nucleus" not in informative_channels(a, b)
        assert informative_channels(a, b), f"classes {a} and {b} are identical"


def test_class_table_rows():
    rows = class_table()
    assert [r["name"] for r in rows] == list(CLASS_NAMES)
    assert rows[0]["vs_control"] == [] and rows[1]["vs_control"] == ["mitochondria"]
    assert rows[4]["vs_control"] == ["mitochondria", "early_endosome"] and rows[4]["requires_fusion"]
    assert rows[5]["vs_control"] == ["mitochondria", "early_endosome", "recycling_endosome"]


def test_uninformative_channels_are_bit_identical_for_one_seed():
    """Streams are split per channel, so the table's ground truth shows in the arrays."""
    images = [make_phantom(k, shape=SMALL, seed=11) for k in range(len(CLASS_SPECS))]
    for a, b in itertools.combinations(range(len(CLASS_SPECS)), 2):
        informative, separating = informative_channels(a, b), separating_channels(a, b)
        for c, name in enumerate(CHANNELS):
            same = np.array_equal(images[a].data[c], images[b].data[c])
            assert same or name in informative, (CLASS_NAMES[a], CLASS_NAMES[b], name)
            assert not same or name not in separating, (CLASS_NAMES[a], CLASS_NAMES[b], name)


def test_difficulty_one_is_a_null_data_set():
    ref = make_phantom(0, shape=SMALL, seed=5, difficulty=1.0)
    for k in range(1, len(CLASS_SPECS)):
        np.testing.assert_array_equal(make_phantom(k, shape=SMALL, seed=5, difficulty=1.0).data, ref.data)


# --------------------------------------------------------------------------- designed differences


def test_mitochondria_tubular_vs_fragmented(phantoms):
    tubular, fragmented = _values(phantoms, 0, _tubularity), _values(phantoms, 1, _tubularity)
    assert _separated(fragmented, tubular), (tubular, fragmented)
    assert _separated(_values(phantoms, 5, _tubularity), _values(phantoms, 4, _tubularity))


def test_early_endosomes_clustered_vs_dispersed(phantoms):
    dispersed = _values(phantoms, 0, lambda im: _nucleus_distance(im, 2))
    clustered = _values(phantoms, 2, lambda im: _nucleus_distance(im, 2))
    assert _separated(clustered, dispersed), (clustered, dispersed)


def test_recycling_endosomes_perinuclear_vs_peripheral(phantoms):
    perinuclear = _values(phantoms, 0, lambda im: _nucleus_distance(im, 3))
    peripheral = _values(phantoms, 3, lambda im: _nucleus_distance(im, 3))
    assert _separated(perinuclear, peripheral), (perinuclear, peripheral)


def test_colocalisation_pair_differs_only_in_the_relation(phantoms):
    independent, on_mito = _values(phantoms, 0, _pearson), _values(phantoms, 4, _pearson)
    assert _separated(independent, on_mito), (independent, on_mito)
    for statistic in (_tubularity, lambda im: _nucleus_distance(im, 2), lambda im: im.data[2].mean()):
        p = stats.mannwhitneyu(_values(phantoms, 0, statistic), _values(phantoms, 4, statistic)).pvalue
        assert p > 0.05, "a single channel separates the co-localisation pair"


def test_difficulty_brings_classes_closer():
    seeds = [image_seed(2, 0, i) for i in range(3)]

    def gap(d):
        t = [[_tubularity(make_phantom(k, shape=(8, 160, 160), seed=s, difficulty=d)) for s in seeds] for k in (0, 1)]
        return np.mean(t[0]) - np.mean(t[1])

    easy, default, hard = gap(0.0), gap(0.5), gap(0.75)
    assert easy > default > hard > 0.0 and default > 0.5 * easy  # the default stays clearly separable


# --------------------------------------------------------------------------- no shortcuts


def test_nucleus_and_intensity_carry_no_class_signal(phantoms):
    """Kruskal-Wallis across all classes: mean, background, peak and nucleus area do not differ."""
    statistics = {f"mean {n}": (lambda im, c=c: im.data[c].mean()) for c, n in enumerate(CHANNELS)}
    statistics |= {f"background {n}": (lambda im, c=c: np.percentile(im.data[c], 5)) for c, n in enumerate(CHANNELS)}
    statistics |= {f"peak {n}": (lambda im, c=c: np.percentile(im.data[c], 99.9)) for c, n in enumerate(CHANNELS)}
    statistics["nucleus area"] = lambda im: _fg(im.data[0].max(0)).mean()
    for name, statistic in statistics.items():
        groups = [_values(phantoms, k, statistic) for k in phantoms]
        assert stats.kruskal(*groups).pvalue > 0.01, f"{name} separates the classes"
    # the same check finds a planted shortcut of modest size, so the passes above mean something
    shortcut = {"background": {1: 1.5}}
    planted = [
        make_phantom(1, shape=(8, 160, 160), difficulty=0.0, seed=image_seed(1, 1, i), shortcut=shortcut)
        for i in range(N_SEEDS)
    ]
    others = [v for k in phantoms if k != 1 for v in _values(phantoms, k, statistics["background mitochondria"])]
    assert stats.mannwhitneyu([np.percentile(im.data[1], 5) for im in planted], others).pvalue < 0.001


def test_planted_background_shortcut_shifts_only_its_class():
    shortcut = {"background": {"fragmented": 2.0}}
    plain = make_phantom(1, shape=SMALL, seed=4)
    planted = make_phantom(1, shape=SMALL, seed=4, shortcut=shortcut)
    for c in range(4):
        ratio = np.percentile(planted.data[c], 5) / np.percentile(plain.data[c], 5)
        assert 1.8 < ratio < 2.2
    other = make_phantom(0, shape=SMALL, seed=4, shortcut=shortcut)
    np.testing.assert_array_equal(other.data, make_phantom(0, shape=SMALL, seed=4).data)


# --------------------------------------------------------------------------- data set writer


def test_write_dataset_files_and_manifest(tmp_path):
    out = write_synthetic_dataset(tmp_path / "ds", classes=3, images_per_class=2, shape=(4, 64, 64), progress=True)
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == ["control"] * 2 + ["fragmented"] * 2 + ["ee_perinuclear"] * 2
    assert len({r["group"] for r in rows}) == 6
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r["path"].split("/")[1] for r in rows)
    image = read_image(out / rows[3]["path"])
    assert image.data.shape == (4, 4, 64, 64) and image.data.dtype == np.uint16
    assert image.channel_names == CHANNELS and image.pixel_size_um == pytest.approx((0.5, 0.1, 0.1))
    np.testing.assert_array_equal(image.data, make_phantom(1, shape=(4, 64, 64), seed=image_seed(0, 1, 1)).data)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folder left behind


def test_write_dataset_refuses_to_overwrite(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    write_synthetic_dataset(out, classes=1, images_per_class=1, shape=(2, 32, 32), progress=False)  # empty: fine
    with pytest.raises(FileExistsError, match="ds exists; pass --overwrite"):
        write_synthetic_dataset(out, classes=1, images_per_class=1, shape=(2, 32, 32), progress=False)
    write_synthetic_dataset(out, classes=2, images_per_class=1, shape=(2, 32, 32), overwrite=True, progress=False)
    assert len(list((out / "images").iterdir())) == 2
    with pytest.raises(InputError, match="classes must be in"):
        write_synthetic_dataset(tmp_path / "x", classes=9, progress=False)


# --------------------------------------------------------------------------- sparsity filter and z extent


@pytest.fixture(scope="module")
def default_phantoms():
    """One default-sized phantom per class at the default difficulty."""
    return [make_phantom(k, seed=image_seed(3, k, 0)) for k in range(5)]


def _patch_ratios(image, size: int = 64):
    """Per-channel foreground ratios (organelle channels) of patches far from every cell (all
    slices), and of patches centred on a cell (each location's best slice: cells are thin)."""
    from cytofuse.preprocess.patches import PatchSettings, extract_patches

    res = extract_patches(image.data[1:], channel_names=CHANNELS[1:], settings=PatchSettings(size=size, min_ratio=0))
    centers = np.array(image.metadata["cell_centers_yx"])
    mid = res.origins[:, 1:] + size / 2
    gap = np.maximum(0, np.abs(centers[None] - mid[:, None]) - size / 2)  # patch edge to cell centre, per axis
    empty = np.hypot(*gap.transpose(2, 0, 1)).min(1) > 72  # beyond the largest cell radius plus blur
    centred = np.hypot(*(centers[None] - mid[:, None]).transpose(2, 0, 1)).min(1) < 24
    best = {}
    for (z, y, x), r in zip(res.origins[centred], res.ratios[centred]):
        if (y, x) not in best or r.mean() > best[y, x].mean():
            best[y, x] = r
    return res.ratios[empty], np.array(list(best.values())).reshape(-1, 3)


def test_otsu_filter_separates_empty_field_from_cells(default_phantoms):
    """The global Otsu threshold of each organelle channel lies above the background noise:
    empty patches have (almost) no foreground, patches on cells have plenty."""
    empty, centred = zip(*(_patch_ratios(im) for im in default_phantoms))
    empty, centred = np.concatenate(empty), np.concatenate(centred)
    assert len(empty) > 50 and len(centred) > 5
    assert empty.max() < 0.02, empty.max(0)
    assert (np.median(centred, axis=0) > 0.05).all(), np.median(centred, axis=0)
    assert np.mean(centred.mean(1) >= 0.05) > 0.6  # most cells pass a 5 % "mean" minimum


def test_organelle_signal_spans_the_z_range(default_phantoms):
    """Cells sit at different heights and organelles span several slices: over a few images
    every slice has organelle foreground, none is pure noise (one cell spans about four)."""
    profiles = []
    for im in default_phantoms:
        a = im.data[1:].astype(np.float32)
        per_slice = np.mean([(c > threshold_otsu(c)).mean(axis=(1, 2)) for c in a], axis=0)
        profiles.append(per_slice / per_slice.max())
        assert (per_slice > 0.25 * per_slice.max()).sum() >= 4, np.round(profiles[-1], 2)
    assert np.mean(profiles, axis=0).min() > 0.1, np.round(np.mean(profiles, axis=0), 2)
