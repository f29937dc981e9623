import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from cytofuse.training.cache import (
    Augment,
    AugmentCollate,
    PatchCache,
    PatchDataset,
    build_patch_cache,
    class_weights,
    make_sampler,
)
from cytofuse.errors import InputError

CHANNELS = ["mito", "endo"]
P = 8


def _images(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.integers(0, 4000, size=(2, 3, 20, 24), dtype=np.uint16),
        "b": rng.integers(100, 900, size=(2, 2, 16, 16), dtype=np.uint16),
    }


def _index() -> pd.DataFrame:
    rows = [("a", 0, 0, 0), ("b", 1, 8, 8), ("a", 2, 12, 16), ("b", 0, 0, 4), ("a", 1, 5, 3)]
    df = pd.DataFrame(rows, columns=["image_id", "z", "y", "x"])
    df.insert(0, "patch_id", np.array([10, 11, 12, 13, 14], dtype=np.int64))
    df["label"], df["group"], df["size"] = "x", "g", P
    return df


def _stats() -> pd.DataFrame:
    return pd.DataFrame(
        {"image_id": ["a", "b"], "lo_mito": [100.0, 200.0], "hi_mito": [3000.0, 800.0], "lo_endo": [0.0, 150.0], "hi_endo": [4000.0, 850.0]}
    )


class CountingLoader:
    def __init__(self, images):
        self.images, self.calls = images, []

    def __call__(self, image_id):
        self.calls.append(image_id)
        return self.images[image_id]


def _build(tmp_path, index=None, stats=None, loader=None, **kw):
    loader = loader or CountingLoader(_images())
    cache = build_patch_cache(
        _index() if index is None else index, _stats() if stats is None else stats,
        load_image=loader, channels=CHANNELS, out=tmp_path / "cache", progress=False, **kw,
    )
    return cache, loader


def test_cache_equals_normalised_crops(tmp_path):
    cache, loader = _build(tmp_path)
    images, index, stats = _images(), _index(), _stats().set_index("image_id")
    assert sorted(loader.calls) == ["a", "b"]  # one read per image
    assert cache.array.shape == (5, 2, P, P) and cache.array.dtype == np.float16
    assert cache.patch_ids.tolist() == [10, 11, 12, 13, 14]
    for k, r in index.iterrows():
        raw = images[r.image_id][:, r.z, r.y : r.y + P, r.x : r.x + P].astype(np.float64)
        lo = np.array([stats.loc[r.image_id, f"lo_{c}"] for c in CHANNELS])[:, None, None]
        hi = np.array([stats.loc[r.image_id, f"hi_{c}"] for c in CHANNELS])[:, None, None]
        np.testing.assert_allclose(cache[k].astype(np.float64), (raw - lo) / (hi - lo), rtol=1e-3, atol=1e-3)
    reopened = PatchCache.open(tmp_path / "cache")
    np.testing.assert_array_equal(reopened[3], cache[3])
    assert not reopened.array.flags.writeable
    assert cache.positions([14, 10]).tolist() == [4, 0]


def test_cache_reused_when_fingerprint_matches_and_rebuilt_when_stale(tmp_path):
    cache, _ = _build(tmp_path)
    _, loader = _build(tmp_path)
    assert loader.calls == []  # reused, no image read
    stats = _stats()
    stats.loc[0, "hi_mito"] = 6000.0
    rebuilt, loader = _build(tmp_path, stats=stats)
    assert sorted(loader.calls) == ["a", "b"]
    assert rebuilt.fingerprint != cache.fingerprint
    raw = _images()["a"][0, 0, :P, :P].astype(np.float64)
    np.testing.assert_allclose(rebuilt[0][0].astype(np.float64), (raw - 100) / 5900, rtol=1e-3, atol=1e-3)
    index = _index().iloc[:3]
    smaller, _ = _build(tmp_path, index=index)
    assert len(smaller) == 3 and len(PatchCache.open(tmp_path / "cache")) == 3
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left


def test_cache_errors_name_the_problem(tmp_path):
    index = _index()
    index.loc[2, "x"] = 20  # 20 + 8 > 24
    with pytest.raises(InputError, match=r"patch 12 .* outside image 'a'"):
        _build(tmp_path, index=index)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(InputError, match="must return .* C=2"):
        _build(tmp_path, loader=lambda i: np.zeros((3, 2, 20, 24)))
    index = _index()
    index.loc[0, "size"] = 4
    with pytest.raises(InputError, match="one size"):
        _build(tmp_path, index=index)
    with pytest.raises(InputError, match="no patch cache"):
        PatchCache.open(tmp_path / "nowhere")


def test_flat_channel_warns_and_stays_finite(tmp_path):
    stats = _stats()
    stats.loc[1, ["lo_endo", "hi_endo"]] = 150.0
    with pytest.warns(UserWarning, match=r"image 'b' has hi <= lo in channels \['endo'\]"):
        cache, _ = _build(tmp_path, stats=stats)
    assert np.isfinite(cache.array).all()


def test_dataset_items_and_pickle_drops_memmap(tmp_path):
    cache, _ = _build(tmp_path)
    ds = PatchDataset(cache, np.array([4, 1]), np.array([1, 0]))
    x, y = ds[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, P, P) and y == 1
    np.testing.assert_array_equal(x.numpy(), cache[4].astype(np.float32))
    blob = pickle.dumps(ds)
    assert len(blob) < 5000  # the patches are not pickled
    clone = pickle.loads(blob)
    torch.testing.assert_close(clone[1][0], ds[1][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    xb, yb = next(iter(loader))
    assert tuple(xb.shape) == (2, 2, P, P) and yb.tolist() == [1, 0]
    with pytest.raises(InputError, match=r"rows must lie in \[0, 5\)"):
        PatchDataset(cache, np.array([5]), np.array([0]))


def _copies(b=16, c=3, h=12):
    base = torch.rand(b, 1, h, h)
    return base.repeat(1, c, 1, 1)


def test_augment_keeps_shape_and_channel_copies():
    torch.manual_seed(0)
    x = _copies()
    out = Augment()(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    for c in (1, 2):
        torch.testing.assert_close(out[:, c], out[:, 0])
    assert not torch.allclose(out, x)
    single = Augment()(x[0])
    assert single.shape == x[0].shape
    torch.testing.assert_close(single[1], single[0])


def test_flips_and_rot90_permute_pixels():
    torch.manual_seed(1)
    aug = Augment(crop_scale=1.0, rotate_deg=0.0, gain=0.0, offset=0.0)
    x = torch.rand(32, 2, 9, 9)
    out = aug(x)
    changed = 0
    for a, b in zip(x, out):
        torch.testing.assert_close(torch.sort(a.flatten())[0], torch.sort(b.flatten())[0], rtol=0, atol=0)
        changed += int(not torch.equal(a, b))
    assert changed >= 20  # 1 - P(identity) = 7/8 of the patches change
    off = Augment(enabled=False)
    assert off(x) is x


def test_rot90_only_gives_quarter_turns_and_collate_augments_batches():
    torch.manual_seed(4)
    aug = Augment(flip=False, crop_scale=1.0, rotate_deg=0.0, gain=0.0, offset=0.0)
    x = torch.rand(24, 2, 5, 5)
    out = aug(x)
    for a, b in zip(x, out):
        assert any(torch.equal(torch.rot90(a, k, dims=(-2, -1)), b) for k in range(4))
    items = [(x[i], i % 2) for i in range(4)]
    xb, yb = AugmentCollate(aug)(items)
    assert tuple(xb.shape) == (4, 2, 5, 5) and yb.tolist() == [0, 1, 0, 1]
    assert any(not torch.equal(xb[i], x[i]) for i in range(4))


def test_intensity_jitter_is_shared_across_channels_and_bounded():
    torch.manual_seed(2)
    aug = Augment(flip=False, rot90=False, crop_scale=1.0, rotate_deg=0.0, gain=0.1, offset=0.05)
    x = torch.ones(64, 2, 4, 4)
    out = aug(x)
    assert torch.all(out[:, 0] == out[:, 1])
    assert out.min() >= 0.85 - 1e-6 and out.max() <= 1.15 + 1e-6


def test_affine_identity_when_disabled_and_reflect_padding_keeps_range():
    torch.manual_seed(3)
    x = torch.rand(8, 2, 16, 16)
    aug = Augment(flip=False, rot90=False, crop_scale=0.8, rotate_deg=15.0, gain=0.0, offset=0.0)
    out = aug(x)
    assert out.min() >= x.min() - 1e-5 and out.max() <= x.max() + 1e-5  # bilinear + reflect: no new extremes
    assert not torch.allclose(out, x)


def test_augment_rejects_unknown_option():
    with pytest.raises(ValueError, match="extra"):
        Augment(flips=True)


def test_class_weights_known_imbalance_and_missing_class():
    labels = np.array([0] * 30 + [1] * 10)
    np.testing.assert_allclose(class_weights(labels, 2), [40 / 60, 2.0], rtol=1e-6)
    w = class_weights(np.array([0] * 5 + [1] * 3 + [2] * 2), 3)
    np.testing.assert_allclose((w[[0] * 5 + [1] * 3 + [2] * 2]).mean(), 1.0, rtol=1e-6)
    with pytest.raises(InputError, match=r"class \['b'\] has no training sample"):
        class_weights(np.array([0, 0, 2]), 3, class_names=["a", "b", "c"])
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\)"):
        class_weights(np.array([0, 2]), 2)


def test_sampler_balances_classes():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = make_sampler(labels, num_samples=20000, generator=torch.Generator().manual_seed(0))
    drawn = labels[np.fromiter(iter(sampler), dtype=np.int64)]
    assert len(drawn) == 20000
    assert abs(drawn.mean() - 0.5) < 0.02
