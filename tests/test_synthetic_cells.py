import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import cross_val_score

from cytofuse.errors import InputError, RunFolderError
from cytofuse.io.readers import read_image
from cytofuse.runs import MARKER
from cytofuse.synthetic.cells import (
    CELL_CYCLE_CLASSES,
    DEAD_LOOK,
    LIVE_LOOK,
    dna_content,
    make_livedead_field,
    make_single_cell,
    write_livedead_set,
    write_single_cell_set,
)


def _disc_means(channel: np.ndarray, truth: pd.DataFrame, scale: float) -> np.ndarray:
    yy, xx = np.ogrid[: channel.shape[0], : channel.shape[1]]
    return np.array([channel[np.hypot(yy - r.y, xx - r.x) < scale * r.radius].mean() for r in truth.itertuples()])


def _bf_features(image, truth) -> np.ndarray:
    """Per cell: radius, centre contrast and rim contrast relative to the field's median."""
    bf = image.data[0, 0].astype(float)
    bf = bf / np.median(bf) - 1
    rows = []
    for r in truth.itertuples():
        y0, x0 = max(0, int(r.y - r.radius - 1)), max(0, int(r.x - r.radius - 1))
        box = bf[y0 : int(r.y + r.radius + 2), x0 : int(r.x + r.radius + 2)]
        yy, xx = np.ogrid[y0 : y0 + box.shape[0], x0 : x0 + box.shape[1]]
        d = np.hypot(yy - r.y, xx - r.x) / r.radius
        rows.append([r.radius, box[d < 0.35].mean(), box[(d > 0.6) & (d < 0.95)].mean()])
    return np.array(rows)


def _cells(truths: list[pd.DataFrame], images: list) -> tuple[np.ndarray, np.ndarray]:
    x = np.vstack([_bf_features(i, t) for i, t in zip(images, truths)])
    return (x - x.mean(0)) / x.std(0), np.concatenate([t.dead.to_numpy() for t in truths])


def _fields(difficulty: float, n: int = 6, dead_fraction: float = 0.5):
    pairs = [make_livedead_field(seed=s, difficulty=difficulty, dead_fraction=dead_fraction) for s in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# --------------------------------------------------------------------------- live/dead fields


def test_field_layout_and_determinism():
    image, truth = make_livedead_field(seed=3)
    again, truth_again = make_livedead_field(seed=3)
    other, _ = make_livedead_field(seed=4)
    assert image.data.shape == (2, 1, 256, 256) and image.data.dtype == np.uint16
    assert image.channel_names == ("BF", "PI")
    assert list(truth.columns) == ["x", "y", "radius", "dead"] and truth.dead.dtype == bool
    assert 30 <= len(truth) <= 41  # one cell per 1600 px^2 tried
    np.testing.assert_array_equal(image.data, again.data)
    pd.testing.assert_frame_equal(truth, truth_again)
    assert not np.array_equal(image.data, other.data)


def test_dead_fraction_changes_only_states_for_one_seed():
    low_image, low = make_livedead_field(seed=7, dead_fraction=0.2)
    high_image, high = make_livedead_field(seed=7, dead_fraction=0.7)
    np.testing.assert_array_equal(low[["x", "y"]], high[["x", "y"]])
    assert (high.dead | ~low.dead).all()  # every cell dead at 0.2 is dead at 0.7
    assert high.dead.sum() > low.dead.sum()
    for key in ("bf_level", "bf_gradient", "gain", "offset", "read_sd"):
        assert low_image.metadata[key] == high_image.metadata[key]
    bf_low, bf_high = (np.median(i.data[0]) for i in (low_image, high_image))
    assert abs(bf_high / bf_low - 1) < 0.03


def test_dead_fraction_is_met_on_average():
    fractions = [make_livedead_field(seed=s, dead_fraction=0.3)[1].dead.mean() for s in range(8)]
    assert abs(np.mean(fractions) - 0.3) < 0.08
    assert make_livedead_field(seed=1, dead_fraction=0.0)[1].dead.sum() == 0
    assert make_livedead_field(seed=1, dead_fraction=1.0)[1].dead.all()


def test_pi_lights_dead_nuclei_only():
    image, truth = make_livedead_field(seed=2, dead_fraction=0.5)
    pi = image.data[1, 0].astype(float)
    means = _disc_means(pi, truth, 0.3)
    background = np.percentile(pi, 10)
    assert truth.dead.sum() >= 5 and (~truth.dead).sum() >= 5
    assert np.median(means[truth.dead]) - background > 10 * (np.median(means[~truth.dead]) - background)
    assert np.median(means[~truth.dead]) < 1.3 * background


def _patch_purity(xy: np.ndarray, dead: np.ndarray, size: int = 64) -> list[float]:
    """Share of the majority state among the cells of each 64-px patch holding two or more."""
    tile = (xy // size).astype(int) @ np.array([1000, 1])
    return [max(dead[tile == t].mean(), 1 - dead[tile == t].mean()) for t in np.unique(tile) if (tile == t).sum() >= 2]


def test_states_are_spatially_coherent():
    rng = np.random.default_rng(0)
    agree, shuffled, purity, shuffled_purity = [], [], [], []
    for seed in range(8):
        _, truth = make_livedead_field(seed=seed, dead_fraction=0.5)
        xy, dead = truth[["y", "x"]].to_numpy(), truth.dead.to_numpy()
        dist = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1)) + np.eye(len(xy)) * 1e9
        nearest, perm = dist.argmin(1), rng.permutation(dead)
        agree.append((dead == dead[nearest]).mean())
        shuffled.append((perm == perm[nearest]).mean())
        purity += _patch_purity(xy, dead)
        shuffled_purity += _patch_purity(xy, perm)
    assert np.mean(agree) > 0.78 and np.mean(agree) - np.mean(shuffled) > 0.25
    assert np.mean(purity) > 0.85 and np.mean(purity) - np.mean(shuffled_purity) > 0.1


def test_bf_difference_is_real_but_noisy():
    images, truths = _fields(0.3)
    x, dead = _cells(truths, images)
    accuracy = cross_val_score(LogisticRegression(), x, dead, cv=4).mean()
    assert 0.7 < accuracy < 0.97
    images, truths = _fields(1.0)
    x, dead = _cells(truths, images)
    assert cross_val_score(LogisticRegression(), x, dead, cv=4).mean() < 0.65


def test_dead_cells_are_smaller_and_round():
    truth = pd.concat(_fields(0.0)[1])
    ratio = truth.radius[truth.dead].median() / truth.radius[~truth.dead].median()
    assert ratio == pytest.approx(DEAD_LOOK.radius / LIVE_LOOK.radius, abs=0.08)
    truth = pd.concat(_fields(1.0)[1])
    assert truth.radius[truth.dead].median() / truth.radius[~truth.dead].median() == pytest.approx(1.0, abs=0.1)


def test_field_background_does_not_predict_condition():
    fields = [
        make_livedead_field(shape=(128, 128), seed=100 * k + s, dead_fraction=f)
        for k, f in enumerate((0.2, 0.7))
        for s in range(10)
    ]
    level = [np.median(image.data[0]) for image, _ in fields]
    condition = np.repeat([0, 1], 10)
    assert 0.25 < roc_auc_score(condition, level) < 0.75
    assert np.ptp(level) > 1000  # the level varies a lot between fields of one condition


def test_write_livedead_set(tmp_path):
    out = tmp_path / "ld"
    table = write_livedead_set(out, conditions={"a": 0.1, "b": 0.9}, n_fields=2, shape=(96, 128), seed=1)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a", "b", "cells.csv"]
    assert set(table.path) == {"a/field_0.ome.tif", "a/field_1.ome.tif", "b/field_0.ome.tif", "b/field_1.ome.tif"}
    assert list(table.columns) == ["path", "condition", "field", "x", "y", "radius", "dead"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "cells.csv"), table)
    assert table.dead[table.condition == "b"].mean() > table.dead[table.condition == "a"].mean()
    image = read_image(out / "b" / "field_1.ome.tif")
    assert image.channel_names == ("BF", "PI") and image.data.shape == (2, 1, 96, 128)
    with pytest.raises(RunFolderError, match="ld exists; pass --overwrite"):
        write_livedead_set(out, n_fields=1, shape=(64, 64))
    table = write_livedead_set(out, conditions={"c": 0.5}, n_fields=1, shape=(64, 64), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "c", "cells.csv"] and set(table.condition) == {"c"}


# --------------------------------------------------------------------------- single cells


def _cell_set(difficulty: float, n: int = 40) -> dict[str, list]:
    return {
        c: [make_single_cell(c, seed=1000 * k + i, difficulty=difficulty) for i in range(n)]
        for k, c in enumerate(CELL_CYCLE_CLASSES)
    }


def _border(channel: np.ndarray) -> np.ndarray:
    return np.concatenate([channel[0], channel[-1], channel[:, 0], channel[:, -1]]).astype(float)


def _bf_radius(image) -> float:
    bf = image.data[0, 0].astype(float)
    smooth = ndimage.gaussian_filter(bf, 1.5) / np.median(_border(bf))
    return float(np.sqrt((smooth < 0.96).sum() / np.pi))


def test_single_cell_layout_and_determinism():
    image = make_single_cell("G2", seed=5)
    assert image.data.shape == (3, 1, 48, 48) and image.data.dtype == np.uint16
    assert image.channel_names == ("BF", "DF", "DNA")
    np.testing.assert_array_equal(image.data, make_single_cell("G2", seed=5).data)
    assert not np.array_equal(image.data, make_single_cell("G2", seed=6).data)
    assert make_single_cell(1, seed=5).metadata["label"] == "G2"
    assert make_single_cell("M", size=64, seed=0).data.shape == (3, 1, 64, 64)


def test_dna_content_is_2n_4n():
    cells = _cell_set(0.3, n=30)
    dna = {c: np.array([dna_content(i) for i in imgs]) for c, imgs in cells.items()}
    assert np.mean(dna["G2"]) / np.mean(dna["G1"]) == pytest.approx(2.0, abs=0.15)
    assert np.mean(dna["M"]) / np.mean(dna["G1"]) == pytest.approx(2.0, abs=0.15)
    values = np.log(np.concatenate(list(dna.values())))[:, None]
    is_4n = np.repeat([False, True, True], 30)
    mixture = GaussianMixture(2, random_state=0).fit(values)
    predicted_4n = mixture.predict(values) == np.argmax(mixture.means_.ravel())
    assert (predicted_4n == is_4n).mean() >= 0.95


def test_mitotic_chromatin_is_condensed():
    def bright_area(image):
        dna = image.data[2, 0].astype(float) - np.median(_border(image.data[2, 0]))
        return (dna > 0.5 * dna.max()).sum()

    cells = _cell_set(0.3, n=15)
    assert np.median([bright_area(i) for i in cells["M"]]) < 0.5 * np.median([bright_area(i) for i in cells["G2"]])


def test_bf_radius_carries_a_weak_signal():
    radius = {c: np.array([i.metadata["radius_px"] for i in imgs]) for c, imgs in _cell_set(0.0, n=30).items()}
    assert np.median(radius["G2"]) / np.median(radius["G1"]) == pytest.approx(2 ** (1 / 3), abs=0.1)
    cells = _cell_set(0.3)
    measured = np.array([_bf_radius(i) for c in ("G1", "G2") for i in cells[c]])
    truth = np.array([i.metadata["radius_px"] for c in ("G1", "G2") for i in cells[c]])
    assert np.corrcoef(measured, truth)[0, 1] > 0.9
    label = np.repeat([0, 1], 40)
    accuracy = cross_val_score(LogisticRegression(), measured[:, None], label, cv=5).mean()
    assert 0.6 < accuracy < 0.9
    radius = {c: np.array([i.metadata["radius_px"] for i in imgs]) for c, imgs in _cell_set(1.0, n=30).items()}
    assert np.median(radius["G2"]) / np.median(radius["G1"]) == pytest.approx(1.0, abs=0.1)


def test_mitotic_cells_are_rounder_and_more_granular():
    def scatter(image):
        df = image.data[1, 0].astype(float) - np.median(_border(image.data[1, 0]))
        return df.sum() / image.metadata["radius_px"] ** 2 / image.metadata["gain"][1]

    cells = _cell_set(0.0, n=30)
    aspect = {c: np.median([i.metadata["aspect"] for i in imgs]) for c, imgs in cells.items()}
    assert aspect["M"] - 1 < 0.3 * (aspect["G1"] - 1)
    assert np.median([scatter(i) for i in cells["M"]]) > 1.15 * np.median([scatter(i) for i in cells["G1"]])


def test_gain_and_background_do_not_predict_class():
    first = make_single_cell("G1", seed=9).metadata
    for label in ("G2", "M"):
        other = make_single_cell(label, seed=9).metadata
        assert other["gain"] == first["gain"] and other["offset"] == first["offset"]
    corners = (slice(None, 5), slice(-5, None))
    cells = _cell_set(0.3, n=100)
    background = [np.median([i.data[0, 0][y, x] for y in corners for x in corners]) for c in ("G1", "G2") for i in cells[c]]
    assert 0.35 < roc_auc_score(np.repeat([0, 1], 100), background) < 0.65
    same_seed = [np.median(make_single_cell(c, seed=9).data[0, 0][:5, :5]) for c in CELL_CYCLE_CLASSES]
    assert np.ptp(same_seed) < 0.02 * np.mean(same_seed)


def test_write_single_cell_set(tmp_path):
    out = tmp_path / "cells"
    table = write_single_cell_set(out, counts={"G1": 3, "G2": 2, "M": 1}, seed=2)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "G1", "G2", "M", "cells.csv"]
    assert table.label.value_counts().to_dict() == {"G1": 3, "G2": 2, "M": 1}
    assert list(table.path[:2]) == ["G1/cell_0.ome.tif", "G1/cell_1.ome.tif"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "cells.csv"), table)
    image = read_image(out / "M" / "cell_0.ome.tif")
    assert image.channel_names == ("BF", "DF", "DNA") and image.data.shape == (3, 1, 48, 48)
    np.testing.assert_array_equal(image.data, make_single_cell("M", seed=int(table.seed[5])).data)
    with pytest.raises(RunFolderError, match="exists; pass --overwrite"):
        write_single_cell_set(out, counts={"G1": 1})
    write_single_cell_set(out, counts={"G1": 1}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "G1", "cells.csv"]


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_livedead_field(dead_fraction=1.5), "dead_fraction must be a number in \\[0, 1\\], got 1.5"),
        (lambda: make_livedead_field(difficulty=-0.1), "difficulty must be a number in \\[0, 1\\], got -0.1"),
        (lambda: make_livedead_field(shape=(32, 256)), "shape must be \\(Y, X\\) integers >= 64, got \\(32, 256\\)"),
        (lambda: make_livedead_field(n_cells=-1), "n_cells must be an int .*got -1"),
        (lambda: make_livedead_field(seed=-2), "seed must be a non-negative int, got -2"),
        (lambda: make_livedead_field(pixel_size_um=(1, 0)), "pixel_size_um must be three positive sizes"),
        (lambda: make_single_cell("S", seed=0), "label must be one of \\('G1', 'G2', 'M'\\) or its index, got 'S'"),
        (lambda: make_single_cell("G1", seed=0, size=16), "size must be an int in \\[32, 512\\], got 16"),
        (lambda: make_single_cell("G1", seed=0, difficulty=2), "difficulty must be a number in \\[0, 1\\], got 2"),
        (
            lambda: dna_content(make_livedead_field(shape=(64, 64))[0]),
            "image must have a 'DNA' channel, got channels \\('BF', 'PI'\\)",
        ),
    ],
)
def test_bad_arguments_name_the_argument_and_value(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_bad_set_arguments(tmp_path):
    with pytest.raises(InputError, match="dead fraction of condition 'x' must be a number in \\[0, 1\\], got -1"):
        write_livedead_set(tmp_path / "a", conditions={"x": -1})
    with pytest.raises(InputError, match="condition name must be a non-empty folder name without '/', got 'a/b'"):
        write_livedead_set(tmp_path / "a", conditions={"a/b": 0.5})
    with pytest.raises(InputError, match="n_fields must be an int >= 1, got 0"):
        write_livedead_set(tmp_path / "a", n_fields=0)
    with pytest.raises(InputError, match="counts keys must be classes .*got 'S'"):
        write_single_cell_set(tmp_path / "b", counts={"S": 3})
    with pytest.raises(InputError, match="count of class 'M' must be an int >= 0, got -3"):
        write_single_cell_set(tmp_path / "b", counts={"M": -3})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
