import numpy as np
import pandas as pd
import pytest
from skimage.filters import threshold_otsu

from cytofuse.io.imagesets import ImageSet
from cytofuse.errors import InputError
from cytofuse.io.readers import Image, write_ome_tiff
from cytofuse.preprocess.patches import (
    PatchSettings,
    build_patch_index,
    channel_statistics,
    extract_patches,
    foreground_ratios,
    patch_grid,
    read_patch_index,
    select_channels,
)


def _two_level_stack(seed=0):
    """(2, 3, 96, 96) uint16: channel 0 bright in the top-left quarter, channel 1 noise only."""
    rng = np.random.default_rng(seed)
    stack = rng.poisson(100, size=(2, 3, 96, 96)).astype(np.uint16)
    stack[0, :, :48, :48] += 2000
    return stack


def test_otsu_is_global_over_the_stack_and_matches_skimage():
    stack = _two_level_stack()
    thr, low, high = channel_statistics(stack, hist_samples=None)
    for c in range(2):
        assert thr[c] == pytest.approx(threshold_otsu(stack[c]), abs=1.0)
        assert low[c] == pytest.approx(np.percentile(stack[c], 1.0), abs=1.0)
        assert high[c] == pytest.approx(np.percentile(stack[c], 99.8), abs=1.0)


def test_subsampled_histogram_gives_nearly_the_same_threshold():
    stack = _two_level_stack()
    exact, _, _ = channel_statistics(stack, hist_samples=None)
    sampled, _, _ = channel_statistics(stack, hist_samples=2000)
    assert abs(sampled[0] - exact[0]) / exact[0] < 0.05


def test_foreground_ratios_equal_brute_force_with_overlap():
    stack = _two_level_stack()
    thr = np.array([1000.0, 100.0])
    ratios = foreground_ratios(stack, thr, size=32, stride=16, z_step=2)
    ys, xs = patch_grid((96, 96), size=32, stride=16)
    assert ratios.shape == (2, len(ys), len(xs), 2)
    for iz, z in enumerate((0, 2)):
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                for c in range(2):
                    want = (stack[c, z, y : y + 32, x : x + 32] > thr[c]).mean()
                    assert ratios[iz, i, j, c] == pytest.approx(want, abs=1e-6)


def test_float_images_are_supported():
    stack = _two_level_stack().astype(np.float32) / 3000
    res = extract_patches(stack, channel_names=["a", "b"], settings=PatchSettings(size=48, rule="all", min_ratio=0.5))
    # only the bright quarter of channel 0 is foreground; "all" also needs channel 1 (noise: ~half above Otsu)
    assert set(map(tuple, res.origins[:, 1:])) <= {(0, 0)}


@pytest.mark.parametrize("rule, expected", [("any", 12), ("mean", 6), ("all", 0)])
def test_rules_combine_channels(rule, expected):
    stack = np.zeros((2, 3, 64, 64), np.uint16)
    stack[0, :, :32, :32] = 1000  # patch (0,0) of channel 0 fully bright
    stack[1, :, :32, 32:] = 1000  # patch (0,32) of channel 1 fully bright
    stack[1, :, 32:, :] = np.tile([0, 1000], 32)  # half the pixels of the bottom row of patches
    res = extract_patches(stack, channel_names=["a", "b"], settings=PatchSettings(size=32, rule=rule, min_ratio=0.5, drop_duplicates=False))
    assert res.n_candidates == 12
    assert res.n_kept == expected


def test_patch_size_larger_than_image_is_an_error():
    with pytest.raises(InputError, match=r"patch size must be <= image size \(30, 40\), got 64"):
        patch_grid((30, 40), size=64, stride=64)


def test_all_dark_image_yields_zero_patches_and_a_note():
    res = extract_patches(np.zeros((1, 2, 64, 64), np.uint16), channel_names=["a"], settings=PatchSettings(size=32))
    assert res.n_kept == 0
    assert "fewer than min_patches=1" in res.notes[0]


def _sparse_field():
    """A dark field with three tiny bright cells: no 64-px patch reaches a 5 % foreground ratio."""
    rng = np.random.default_rng(1)
    field = rng.normal(100, 5, size=(1, 1, 256, 256)).clip(0).astype(np.uint16)
    for y, x in ((20, 20), (100, 180), (200, 60)):
        field[0, 0, y : y + 6, x : x + 6] = 5000
    return field


def test_sparse_field_is_reported_and_top_k_fallback_keeps_its_best_patches():
    field = _sparse_field()
    plain = extract_patches(field, channel_names=["a"], settings=PatchSettings(size=64, min_patches=2))
    assert plain.n_kept == 0 and plain.n_passing == 0
    fallback = extract_patches(field, channel_names=["a"], settings=PatchSettings(size=64, min_patches=2, fallback="top_k"))
    assert fallback.n_kept == 2 and fallback.fallback_used
    kept = {tuple(o[1:]) for o in fallback.origins}
    assert kept <= {(0, 0), (64, 128), (192, 0)}  # patches holding a bright cell


def test_repeated_tiles_are_dropped():
    rng = np.random.default_rng(2)
    montage = np.zeros((1, 1, 40, 200), np.uint16)
    cells = [rng.integers(500, 1500, size=(40, 40), dtype=np.uint16) for _ in range(2)]
    pad = rng.integers(800, 900, size=(40, 40), dtype=np.uint16)
    for i, tile in enumerate([cells[0], cells[1], cells[0], pad, pad]):
        montage[0, 0, :, i * 40 : (i + 1) * 40] = tile
    res = extract_patches(montage, channel_names=["a"], settings=PatchSettings(size=40, min_ratio=0.0))
    # a copy of a cell is dropped; content seen twice keeps its first occurrence
    assert [o[2] for o in res.origins] == [0, 40, 120]
    montage[0, 0, :, 160:200] = pad  # unchanged: still two copies
    more = np.concatenate([montage, montage[:, :, :, 120:160]], axis=3)  # third copy of the padding tile
    res = extract_patches(more, channel_names=["a"], settings=PatchSettings(size=40, min_ratio=0.0))
    assert [o[2] for o in res.origins] == [0, 40]
    assert res.n_duplicates == 4


def test_select_channels_by_name_index_and_exclusion():
    names = ["nucleus", "mito", "ee"]
    assert select_channels(names, exclude=["nucleus"]) == [1, 2]
    assert select_channels(names, channels=[2, "mito"]) == [2, 1]
    with pytest.raises(InputError, match=r"unknown channel name 'golgi'.*\['nucleus', 'mito', 'ee'\]"):
        select_channels(names, channels=["golgi"])
    with pytest.raises(InputError, match="channel index 5 out of range"):
        select_channels(names, exclude=[5])
    with pytest.raises(InputError, match="no channel left"):
        select_channels(names, channels=["mito"], exclude=["mito"])


def _write_set(tmp_path, n_per_class=2):
    rows = []
    for label in ("a", "b"):
        for i in range(n_per_class):
            stack = _two_level_stack(seed=i + (10 if label == "b" else 0))
            path = tmp_path / "img" / f"{label}{i}.ome.tif"
            path.parent.mkdir(exist_ok=True)
            write_ome_tiff(path, Image(stack, ("mito", "nuc")))
            rows.append({"path": f"img/{path.name}", "label": label})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return ImageSet.from_manifest(tmp_path / "labels.csv")


def test_build_patch_index_writes_artifacts(tmp_path):
    image_set = _write_set(tmp_path)
    settings = PatchSettings(size=32, exclude_channels=["nuc"], min_ratio=0.5)
    index = build_patch_index(image_set, settings, tmp_path / "run", progress=False)
    assert index.channel_names == ("mito",)
    # the bright 48x48 corner fills patch (0, 0) and half of (0, 32) and (32, 0): 3 of 9 per slice
    assert len(index.patches) == 3 * 3 * 4
    assert list(index.patches["patch_id"]) == list(range(36))
    assert {"image_id", "label", "group", "z", "y", "x", "size", "fg_mito"} <= set(index.patches.columns)
    assert (index.patches["fg_mito"] >= 0.5).all()
    assert index.attrition.set_index("label").loc["a", "kept"] == 18
    assert index.attrition.set_index("label").loc["a", "attrition_pct"] == pytest.approx(100 * 36 / 54)
    reread = read_patch_index(tmp_path / "run")
    pd.testing.assert_frame_equal(reread.patches, index.patches)
    assert not (tmp_path / "run" / ".patch_parts").exists()


def test_build_patch_index_resumes_from_finished_images(tmp_path, monkeypatch):
    import cytofuse.preprocess.patches as patches_mod

    image_set = _write_set(tmp_path)
    settings = PatchSettings(size=32)
    calls = []
    real = patches_mod._patch_one

    def flaky(image_set, image_id, settings):
        calls.append(image_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(image_set, image_id, settings)

    monkeypatch.setattr(patches_mod, "_patch_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_patch_index(image_set, settings, tmp_path / "run", progress=False)
    calls.clear()
    monkeypatch.setattr(patches_mod, "_patch_one", real)
    seen = []
    monkeypatch.setattr(patches_mod, "_patch_one", lambda s, i, st: seen.append(i) or real(s, i, st))
    index = build_patch_index(image_set, settings, tmp_path / "run", progress=False)
    assert len(seen) == 2  # the two finished images were not read again
    assert index.images["image_id"].tolist() == [r.image_id for r in image_set]


def test_parallel_workers_give_the_same_index(tmp_path):
    image_set = _write_set(tmp_path)
    settings = PatchSettings(size=32, stride=16)
    one = build_patch_index(image_set, settings, None, workers=1, progress=False)
    two = build_patch_index(image_set, settings, None, workers=2, progress=False)
    pd.testing.assert_frame_equal(one.patches, two.patches)


@pytest.mark.realdata
def test_jurkat_montage_tiles_become_cells(real_data):
    root = real_data / "jurkat-cellcycle-ifc" / "Experiment_1"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    image_set = ImageSet.from_folder(root)
    g1 = ImageSet([r for r in image_set if r.label in ("G1", "Anaphase", "Telophase")])
    settings = PatchSettings(size=40, rule="any", group_by="patch")
    index = build_patch_index(g1, settings, None, progress=False)
    kept = index.attrition.set_index("label")["kept"].to_dict()
    # the folder's documented counts; Anaphase's 16th tile repeats its 13th and is dropped
    assert kept == {"Anaphase": 15, "G1": 900, "Telophase": 28}
    assert index.patches["group"].nunique() == len(index.patches)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cut_patches_matches_numpy_in_both_layouts(dtype, channels_last):
    from cytofuse.preprocess.patches import cut_patches

    rng = np.random.default_rng(3)
    stack = rng.integers(0, 200, size=(2, 3, 20, 24)).astype(dtype)
    origins = np.array([[0, 0, 0], [2, 12, 16], [1, 5, 3]])
    low, high = np.array([10.0, 0.0]), np.array([190.0, 0.0])  # a flat channel divides by eps
    out = cut_patches(stack, origins, low, high, size=8, channels_last=channels_last)
    ref = np.stack([(stack[:, z, y:y + 8, x:x + 8].astype(np.float32) - low.astype(np.float32)[:, None, None])
                    * (1 / np.maximum(high - low, 1e-6)).astype(np.float32)[:, None, None] for z, y, x in origins])
    assert out.shape == (3, 2, 8, 8)
    np.testing.assert_array_equal(out, ref)
    # channels-last memory: the channel axis is the innermost one
    assert (out.strides[1] == 4) == channels_last


def test_cut_patches_refuses_origins_outside_the_stack():
    from cytofuse.preprocess.patches import cut_patches

    stack = np.zeros((1, 2, 16, 16), np.uint16)
    with pytest.raises(InputError, match=r"outside the stack of shape \(1, 2, 16, 16\)"):
        cut_patches(stack, np.array([[0, 9, 0]]), np.zeros(1), np.ones(1), size=8)
    with pytest.raises(InputError, match="outside"):
        cut_patches(stack, np.array([[2, 0, 0]]), np.zeros(1), np.ones(1), size=8)
    assert cut_patches(stack, np.zeros((0, 3), int), np.zeros(1), np.ones(1), size=8).shape == (0, 1, 8, 8)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_duplicate_rule_matches_a_brute_force_count(dtype):
    from collections import Counter

    from cytofuse.preprocess.patches import _first_occurrences

    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 4, (2, 8, 8)).astype(dtype) for _ in range(5)]
    img = np.zeros((2, 3, 64, 64), dtype)
    for z in range(3):  # 8 x 8 tiles per slice, most of them copies of 5 contents
        for a in range(8):
            for b in range(8):
                tile = tiles[rng.integers(0, 5)] if rng.random() < 0.7 else rng.integers(0, 4, (2, 8, 8))
                img[:, z, a * 8 : (a + 1) * 8, b * 8 : (b + 1) * 8] = tile
    keep = np.arange(3 * 64)
    got = _first_occurrences(img, keep, (3, 8, 8), np.arange(3), np.arange(0, 64, 8), np.arange(0, 64, 8), 8)
    content = [img[:, k // 64, (k % 64) // 8 * 8 :][:, : 8, (k % 8) * 8 : (k % 8) * 8 + 8].tobytes() for k in keep]
    copies, first = Counter(content), {}
    for k, c in zip(keep, content):
        first.setdefault(c, k)
    expected = sorted(k for c, k in first.items() if copies[c] < 3)  # first copies of content seen < 3 times
    assert 10 < len(expected) < 150 and got.tolist() == expected
