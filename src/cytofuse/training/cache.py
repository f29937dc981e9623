"""Patch cache, torch dataset, augmentation, class weights and a balanced sampler.

The patch index (one row per kept patch) is turned once into a memory-mapped cache of
normalised patches, ``(N, C, P, P)`` in index order. Training then reads patches from that
cache lazily, so neither the images nor all patches need to fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset, WeightedRandomSampler

from cytofuse.errors import InputError
from cytofuse.models.tta import dihedral
from cytofuse.preprocess.patches import NORM_EPS, PatchIndex, cut_patches
from cytofuse.preprocess.recipe import Normalisation, PatchRecipe
from cytofuse.runs import FitFolder, building_folder

CACHE_ARRAY = "patches.npy"
CACHE_META = "patches.json"
_EPS = NORM_EPS
_INDEX_KEYS = ["patch_id", "image_id", "z", "y", "x", "size"]


# --------------------------------------------------------------------------- cache


class PatchCache:
    """Read-only view of a patch cache folder: ``patches.npy`` (N, C, P, P) + ``patches.json``.

    The memory map is opened on first access, and dropped when pickled, so DataLoader
    workers each open their own map instead of receiving a copy of the patches.
    """

    def __init__(self, path: str | Path, meta: dict) -> None:
        self.path = Path(path)
        self.meta = meta
        self.patch_ids = np.asarray(meta["patch_ids"], dtype=np.int64)
        self.channels: tuple[str, ...] = tuple(meta["channels"])
        self.size = int(meta["size"])
        self.dtype = np.dtype(meta["dtype"])
        self.fingerprint: str = meta["fingerprint"]
        self._array: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path) -> "PatchCache":
        """Open the cache in folder ``path``; error when it is missing or inconsistent."""
        path = Path(path)
        meta_file = path / CACHE_META
        if not meta_file.is_file() or not (path / CACHE_ARRAY).is_file():
            raise InputError(f"PatchCache.open: no patch cache in {path} (expected {CACHE_ARRAY} and {CACHE_META})")
        cache = cls(path, json.loads(meta_file.read_text()))
        expected = (len(cache.patch_ids), len(cache.channels), cache.size, cache.size)
        if cache.array.shape != expected or cache.array.dtype != cache.dtype:
            raise InputError(
                f"PatchCache.open: {path / CACHE_ARRAY} has shape {cache.array.shape} {cache.array.dtype}, "
                f"its sidecar says {expected} {cache.dtype}; delete the folder to rebuild it"
            )
        return cache

    @property
    def array(self) -> np.ndarray:
        """The (N, C, P, P) memory map (read-only)."""
        if self._array is None:
            self._array = np.load(self.path / CACHE_ARRAY, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.patch_ids)

    def __getitem__(self, item):
        return self.array[item]

    def positions(self, patch_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row positions in the cache of the given patch ids (error on an unknown id)."""
        lookup = pd.Index(self.patch_ids)
        pos = lookup.get_indexer(np.asarray(patch_ids, dtype=np.int64))
        if (pos < 0).any():
            missing = np.asarray(patch_ids)[pos < 0][:5].tolist()
            raise InputError(f"PatchCache.positions: patch_ids {missing} are not in the cache {self.path}")
        return pos

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def __repr__(self) -> str:
        return f"PatchCache({str(self.path)!r}, n={len(self)}, channels={self.channels}, size={self.size})"


class CacheChannels:
    """A patch cache restricted to some of its channels, in a given order (a view: nothing is copied)."""

    def __init__(self, cache: PatchCache, channels: Sequence[int]) -> None:
        idx = [int(c) for c in channels]
        if not idx or any(not 0 <= c < len(cache.channels) for c in idx):
            raise InputError(f"CacheChannels: channels must be indices into {cache.channels}, got {list(channels)}")
        self.cache, self.index = cache, idx
        self.path, self.size, self.dtype = cache.path, cache.size, cache.dtype
        self.patch_ids = cache.patch_ids
        self.channels: tuple[str, ...] = tuple(cache.channels[c] for c in idx)
        self.fingerprint = f"{cache.fingerprint}:{idx}"

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, item):
        block = self.cache[item]
        return block[self.index] if block.ndim == 3 else block[:, self.index]

    def positions(self, patch_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.cache.positions(patch_ids)

    def __repr__(self) -> str:
        return f"CacheChannels({self.cache!r}, channels={self.channels})"


def raw_rows(cache, rows: np.ndarray, image_lo: np.ndarray, image_hi: np.ndarray) -> np.ndarray:
    """Cache rows (N, C, P, P) back to raw intensities with each row's image percentiles (N, C)."""
    block = np.asarray(cache[rows], dtype=np.float32)
    span = np.maximum(image_hi - image_lo, _EPS).astype(np.float32)
    return block * span[:, :, None, None] + image_lo.astype(np.float32)[:, :, None, None]


def image_bounds(images: pd.DataFrame, image_ids: Sequence[str], channels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per item of ``image_ids``: that image's ``lo_<ch>`` and ``hi_<ch>`` (N, C) from the image table."""
    table = images.drop_duplicates("image_id").set_index("image_id").loc[list(image_ids)]
    lo = table[[f"lo_{c}" for c in channels]].to_numpy(np.float64)
    hi = table[[f"hi_{c}" for c in channels]].to_numpy(np.float64)
    return lo, hi


def dataset_normalisation(cache, rows: np.ndarray, image_ids: Sequence[str], images: pd.DataFrame, *,
                          percentiles: tuple[float, float] = (1.0, 99.8), max_patches: int = 4000, seed: int = 0,
                          measured_on: str = "") -> Normalisation:
    """Percentiles of each channel over the raw pixels of cache ``rows`` (the training patches only).

    ``image_ids`` gives each row's image (for its cache scaling); at most ``max_patches`` rows,
    drawn with ``seed``, are read.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise InputError("dataset_normalisation: rows is empty (no training patch to take percentiles from)")
    pick = np.arange(len(rows))
    if len(rows) > max_patches:
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), max_patches, replace=False))
    channels = list(cache.channels)
    lo_img, hi_img = image_bounds(images, [image_ids[i] for i in pick], channels)
    order = np.argsort(rows[pick], kind="stable")  # memory maps read fastest in order
    raw = raw_rows(cache, rows[pick][order], lo_img[order], hi_img[order])
    flat = raw.transpose(1, 0, 2, 3).reshape(len(channels), -1)
    low, high = np.percentile(flat, percentiles, axis=1)
    return Normalisation(scope="dataset", percentiles=tuple(percentiles), channels=channels, low=low.tolist(),
                         high=high.tolist(), measured_on=measured_on or f"{len(pick)} training patches")


class NormalisedCache:
    """A patch cache seen with one ``low``/``high`` per channel for every patch (dataset or fixed scope).

    The cache holds ``(raw - lo_img) / (hi_img - lo_img)``; each row is mapped to
    ``(raw - low) / (high - low)`` by a per-row affine transform, so nothing is copied or rebuilt.
    Same interface as :class:`PatchCache` (``cache[rows]``, ``positions``, ``channels``).
    """

    def __init__(self, cache, image_ids: Sequence[str], images: pd.DataFrame, norm: Normalisation) -> None:
        channels = list(cache.channels)
        if norm.channels != channels or norm.low is None or norm.high is None:
            raise InputError(f"NormalisedCache: normalisation for channels {norm.channels} does not fit the cache "
                             f"channels {channels}")
        if len(image_ids) != len(cache):
            raise InputError(f"NormalisedCache: image_ids has {len(image_ids)} entries for {len(cache)} cache rows")
        lo_img, hi_img = image_bounds(images, image_ids, channels)
        low, high = np.asarray(norm.low), np.asarray(norm.high)
        span = np.maximum(high - low, _EPS)
        self.scale = (np.maximum(hi_img - lo_img, _EPS) / span).astype(np.float32)
        self.shift = ((lo_img - low) / span).astype(np.float32)
        self.cache, self.norm = cache, norm
        self.path, self.size, self.dtype = cache.path, cache.size, np.dtype(np.float32)
        self.patch_ids, self.channels = cache.patch_ids, tuple(channels)
        self.fingerprint = f"{cache.fingerprint}:{norm.scope}:{np.round(low, 6).tolist()}:{np.round(high, 6).tolist()}"

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, item):
        block = np.asarray(self.cache[item], dtype=np.float32)
        return block * self.scale[item][..., None, None] + self.shift[item][..., None, None]

    def positions(self, patch_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.cache.positions(patch_ids)

    def __repr__(self) -> str:
        return f"NormalisedCache({self.cache!r}, scope={self.norm.scope})"


def index_fingerprint(index: pd.DataFrame, stats: pd.DataFrame, *, channels: Sequence[str], dtype) -> str:
    """A hash of everything the cache content depends on: patch positions, stats, channels, dtype."""
    h = hashlib.sha256()
    h.update(json.dumps([list(channels), np.dtype(dtype).str]).encode())
    h.update(pd.util.hash_pandas_object(index[_INDEX_KEYS], index=False).to_numpy().tobytes())
    cols = ["image_id"] + [f"{p}_{c}" for c in channels for p in ("lo", "hi")]
    used = stats.loc[stats["image_id"].isin(index["image_id"]), cols].drop_duplicates("image_id").sort_values("image_id")
    h.update(pd.util.hash_pandas_object(used, index=False).to_numpy().tobytes())
    return h.hexdigest()[:32]


def _check_inputs(index: pd.DataFrame, stats: pd.DataFrame, channels: Sequence[str]) -> int:
    missing = [c for c in _INDEX_KEYS if c not in index.columns]
    if missing:
        raise InputError(f"build_patch_cache: index lacks columns {missing}; it has {list(index.columns)}")
    if len(index) == 0:
        raise InputError("build_patch_cache: index has no patches")
    if not index["patch_id"].is_unique:
        raise InputError("build_patch_cache: index patch_id values are not unique")
    sizes = index["size"].unique()
    if len(sizes) != 1:
        raise InputError(f"build_patch_cache: all patches must share one size, got sizes {sorted(sizes.tolist())}")
    need = ["image_id"] + [f"{p}_{c}" for c in channels for p in ("lo", "hi")]
    missing = [c for c in need if c not in stats.columns]
    if missing:
        raise InputError(f"build_patch_cache: stats lacks columns {missing} for channels {list(channels)}")
    absent = sorted(set(index["image_id"]) - set(stats["image_id"]))
    if absent:
        raise InputError(f"build_patch_cache: stats has no row for image_id {absent[:5]}")
    return int(sizes[0])


def _cut_patches(image: np.ndarray, rows: pd.DataFrame, lo: np.ndarray, hi: np.ndarray, *, size: int, image_id: str) -> np.ndarray:
    """Cut and normalise the patches of ``rows`` from one (C, Z, Y, X) image."""
    _, nz, ny, nx = image.shape
    z, y, x = (rows[k].to_numpy() for k in ("z", "y", "x"))
    bad = (z < 0) | (z >= nz) | (y < 0) | (x < 0) | (y + size > ny) | (x + size > nx)
    if bad.any():
        r = rows[bad].iloc[0]
        raise InputError(
            f"build_patch_cache: patch {r['patch_id']} (z={r['z']}, y={r['y']}, x={r['x']}, size={size}) "
            f"lies outside image {image_id!r} of shape {image.shape}"
        )
    return cut_patches(image, np.stack([z, y, x], axis=1), lo, hi, size=size)


def _write_cache(index, stats, *, load_image, channels, tmp: Path, size: int, dtype, progress: bool, chunk: int) -> None:
    arr = np.lib.format.open_memmap(tmp / CACHE_ARRAY, mode="w+", dtype=dtype, shape=(len(index), len(channels), size, size))
    stats = stats.drop_duplicates("image_id").set_index("image_id")
    positions = pd.Series(np.arange(len(index)), index=index.index)
    groups = index.groupby("image_id", sort=False).groups
    bar = _progress(len(groups), progress, "caching patches")
    for image_id, labels in groups.items():
        image = np.asarray(load_image(image_id))
        if image.ndim != 4 or image.shape[0] != len(channels):
            raise InputError(
                f"build_patch_cache: load_image({image_id!r}) must return (C, Z, Y, X) with C={len(channels)} "
                f"channels {list(channels)}, got shape {image.shape}"
            )
        lo = stats.loc[image_id, [f"lo_{c}" for c in channels]].to_numpy(np.float64)
        hi = stats.loc[image_id, [f"hi_{c}" for c in channels]].to_numpy(np.float64)
        _warn_flat(image_id, channels, lo, hi)
        rows = index.loc[labels]
        for start in range(0, len(rows), chunk):
            part = rows.iloc[start : start + chunk]
            patches = _cut_patches(image, part, lo, hi, size=size, image_id=image_id)
            arr[positions[part.index].to_numpy()] = _to_dtype(patches, dtype)
        del image
        bar.update(1)
    bar.close()
    arr.flush()
    del arr


def _warn_flat(image_id: str, channels: Sequence[str], lo: np.ndarray, hi: np.ndarray) -> None:
    flat = [c for c, a, b in zip(channels, lo, hi) if b - a <= _EPS]
    if flat:
        warnings.warn(
            f"build_patch_cache: image {image_id!r} has hi <= lo in channels {flat}; "
            f"their values are divided by {_EPS} and clipped to the cache dtype's range",
            stacklevel=4,
        )


def _to_dtype(patches: np.ndarray, dtype) -> np.ndarray:
    """Cast, clipping to the finite range of a float ``dtype`` (float16 overflows at 65504)."""
    if np.issubdtype(dtype, np.floating):
        big = np.finfo(dtype).max
        patches = np.clip(patches, -big, big)
    return patches.astype(dtype)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


def build_patch_cache(
    index: pd.DataFrame,
    stats: pd.DataFrame,
    *,
    load_image: Callable[[str], np.ndarray],
    channels: Sequence[str],
    out: str | Path,
    dtype=np.float16,
    progress: bool = True,
    chunk: int = 512,
) -> PatchCache:
    """Cut, normalise and store every indexed patch in folder ``out``; reuse it when up to date.

    ``load_image(image_id)`` returns that image's (C, Z, Y, X) array of exactly ``channels``;
    images are read one at a time. Patch values are ``(raw - lo) / max(hi - lo, eps)`` with that
    image's ``lo_<channel>`` / ``hi_<channel>`` from ``stats``. A cache whose fingerprint (index
    positions, stats, channels, dtype) matches is reused; a stale one is rebuilt.
    """
    out = Path(out)
    channels = list(channels)
    size = _check_inputs(index, stats, channels)
    fingerprint = index_fingerprint(index, stats, channels=channels, dtype=dtype)
    if (out / CACHE_META).is_file():
        try:
            cached = PatchCache.open(out)
        except (InputError, ValueError, KeyError):
            cached = None
        if cached is not None and cached.fingerprint == fingerprint:
            return cached
    meta = {
        "patch_ids": index["patch_id"].astype(np.int64).tolist(),
        "channels": channels,
        "size": size,
        "dtype": np.dtype(dtype).str,
        "fingerprint": fingerprint,
        "normalisation": "(raw - lo) / max(hi - lo, eps) per image and channel",
    }
    with building_folder(out) as tmp:  # a stale cache is derived data of its run: replaced without a marker check
        _write_cache(index, stats, load_image=load_image, channels=channels, tmp=tmp, size=size, dtype=dtype, progress=progress, chunk=chunk)
        (tmp / CACHE_META).write_text(json.dumps(meta))
    return PatchCache.open(out)


# --------------------------------------------------------------------------- augmentation


class Augment(BaseModel):
    """Random patch augmentation, applied identically to every channel of a patch.

    Works on a (C, H, W) patch or a (B, C, H, W) batch (each patch gets its own draw), on any
    device, with torch's random generator (seeded per DataLoader worker by torch itself).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Master switch; False leaves patches unchanged.")
    flip: bool = Field(True, description="Random horizontal and vertical flips (p=0.5 each).")
    rot90: bool = Field(True, description="Random rotation by 0, 90, 180 or 270 degrees.")
    crop_scale: float = Field(
        1.0, gt=0.0, le=1.0, description="Random crop of this to 1.0 times the side, resized back; 1.0 (default) "
        "disables. Off by default: on 40-64 px cell tiles a crop cuts the cell and the resize blurs it; "
        "0.85-0.9 suits patches of 128 px and more.")
    rotate_deg: float = Field(
        0.0, ge=0.0, le=180.0, description="Random rotation within +-this angle (reflect padding); 0 (default) "
        "disables. Quarter turns and flips already cover the symmetries without interpolation.")
    gain: float = Field(
        0.0, ge=0.0, lt=1.0, description="Intensity gain drawn from 1 +- gain, same for all channels; 0 (default) "
        "disables. Intensity carries biology (DNA content, viability); jitter only for batch-to-batch exposure drift.")
    offset: float = Field(0.0, ge=0.0, description="Intensity offset drawn from +-offset, same for all channels; 0 disables.")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        single = x.ndim == 3
        if single:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise InputError(f"Augment: expected a (C, H, W) patch or (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if self.flip or self.rot90:
            x = _random_dihedral(x, flip=self.flip, rot90=self.rot90 and x.shape[-1] == x.shape[-2])
        if self.crop_scale < 1.0 or self.rotate_deg > 0:
            x = _random_affine(x, self.crop_scale, self.rotate_deg)
        if self.gain > 0 or self.offset > 0:
            x = _random_intensity(x, self.gain, self.offset)
        return x[0] if single else x


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _random_dihedral(x: torch.Tensor, *, flip: bool, rot90: bool) -> torch.Tensor:
    """Random flips and / or quarter turns: each pixel is copied once, whatever the draw."""
    n = x.shape[0]
    if rot90 and flip:
        codes = torch.randint(0, 8, (n,))
    elif rot90:  # the four rotations: identity, 90, 180, 270 degrees
        codes = torch.tensor([0, 5, 3, 6])[torch.randint(0, 4, (n,))]
    else:  # independent left-right and up-down flips
        codes = torch.randint(0, 4, (n,))
    out = torch.empty_like(x)
    for code in codes.unique().tolist():
        sel = (codes == code).nonzero().flatten().to(x.device)
        out[sel] = dihedral(x[sel], code)
    return out


def _random_affine(x: torch.Tensor, crop_scale: float, rotate_deg: float) -> torch.Tensor:
    """One bilinear resample per batch: a random crop (zoom in) and a small rotation."""
    import torch.nn.functional as F

    n = x.shape[0]
    scale = _uniform(n, crop_scale, 1.0, x.device)
    angle = _uniform(n, -rotate_deg, rotate_deg, x.device) * (math.pi / 180.0)
    shift = (torch.rand(n, 2, device=x.device) * 2 - 1) * (1 - scale)[:, None]
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    work = x if x.is_floating_point() else x.float()
    grid = F.affine_grid(theta.to(work.dtype), list(work.shape), align_corners=False)
    return F.grid_sample(work, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _random_intensity(x: torch.Tensor, gain: float, offset: float) -> torch.Tensor:
    n = x.shape[0]
    g = _uniform(n, 1 - gain, 1 + gain, x.device).to(x.dtype)[:, None, None, None]
    o = _uniform(n, -offset, offset, x.device).to(x.dtype)[:, None, None, None]
    return x * g + o


class AugmentCollate:
    """DataLoader ``collate_fn`` that stacks items and augments the batch (inside the workers)."""

    def __init__(self, augment: Augment) -> None:
        self.augment = augment

    def __call__(self, items):
        x, y = torch.utils.data.default_collate(items)
        return self.augment(x), y


# --------------------------------------------------------------------------- dataset


class PatchDataset(Dataset):
    """Patches ``rows`` (cache positions) of a :class:`PatchCache` with integer ``labels``.

    Items are ``(float32 tensor (C, P, P), int label)``; ``augment`` is applied per item.
    ``channels`` picks and orders the cache channels a model sees (default: all). ``views``
    (a list of such channel lists) makes each row appear once per view, with the same label:
    training-only auxiliary channels as extra samples, e.g. ``[[bf], [dna]]`` trains a
    one-channel model on bright-field and DNA images of the same cells. ``soft_targets`` (N, K)
    class probabilities per row (a teacher's, for distillation) make items ``(x, label, probabilities)``.
    """

    def __init__(self, cache: PatchCache, rows: np.ndarray, labels: np.ndarray, *, augment: Augment | None = None,
                 channels: Sequence[int] | None = None, views: Sequence[Sequence[int]] | None = None,
                 soft_targets: np.ndarray | None = None) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if rows.ndim != 1 or labels.shape != rows.shape:
            raise InputError(f"PatchDataset: rows and labels must be 1D of equal length, got {rows.shape} and {labels.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(cache)):
            raise InputError(f"PatchDataset: rows must lie in [0, {len(cache)}) for cache {cache.path}, got {rows.min()}..{rows.max()}")
        if len(labels) and labels.min() < 0:
            raise InputError(f"PatchDataset: labels must be >= 0, got {labels.min()}")
        if channels is not None and views is not None:
            raise InputError("PatchDataset: give channels or views, not both")
        views = [list(channels)] if channels is not None else [list(v) for v in views] if views is not None else None
        if views is not None:
            n_channels = len(getattr(cache, "channels", ())) or np.asarray(cache[rows[:1]]).shape[1]
            widths = {len(v) for v in views}
            bad = [c for v in views for c in v if not 0 <= int(c) < n_channels]
            if not views or len(widths) != 1 or 0 in widths or bad:
                raise InputError(f"PatchDataset: channels/views must be non-empty lists of equal length of cache "
                                 f"channel indices in [0, {n_channels}), got {views}")
        self.cache = cache
        self.base_rows = rows
        self.views = views
        n_views = 1 if views is None else len(views)
        self.rows = np.tile(rows, n_views)
        self.labels = np.tile(labels, n_views)
        self.soft_targets = None
        if soft_targets is not None:
            soft = np.asarray(soft_targets, dtype=np.float32)
            if soft.ndim != 2 or len(soft) != len(rows) or not np.all(np.isfinite(soft)) or soft.min() < 0:
                raise InputError(f"PatchDataset: soft_targets must be finite non-negative (rows, classes) = ({len(rows)}, K) "
                                 f"probabilities, got shape {soft.shape}")
            self.soft_targets = np.tile(soft, (n_views, 1))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        patch = self.cache[self.rows[i]]
        if self.views is not None:
            patch = patch[self.views[i // len(self.base_rows)]]
        x = torch.from_numpy(np.array(patch, dtype=np.float32))
        if self.augment is not None:
            x = self.augment(x)
        if self.soft_targets is not None:
            return x, int(self.labels[i]), torch.from_numpy(self.soft_targets[i])
        return x, int(self.labels[i])


# --------------------------------------------------------------------------- imbalance


def _class_counts(labels: np.ndarray, num_classes: int, class_names: Sequence[str] | None, fn: str) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise InputError(f"{fn}: labels is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InputError(f"{fn}: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        names = [class_names[i] if class_names is not None else int(i) for i in empty]
        raise InputError(f"{fn}: class {names} has no training sample (counts per class {counts.tolist()})")
    return counts


def class_weights(labels: np.ndarray, num_classes: int, *, class_names: Sequence[str] | None = None) -> np.ndarray:
    """Loss weight per class, inverse to its frequency in ``labels``: ``n / (K * n_k)``.

    The weights average to 1 over the training samples (scikit-learn's "balanced"); e.g.
    30 and 10 samples give [0.667, 2.0]. Errors naming the class when one has no sample.
    """
    counts = _class_counts(labels, num_classes, class_names, "class_weights")
    return (counts.sum() / (num_classes * counts)).astype(np.float32)


def log_prior(labels: np.ndarray, num_classes: int, *, class_names: Sequence[str] | None = None) -> np.ndarray:
    """The logit adjustment of ``labels``: the log of each class's frequency, e.g. 30 and 10 samples give
    [log 0.75, log 0.25]. Added to the logits in the loss only, it leaves the plain logits aiming at
    balanced accuracy (Menon et al. 2021). Errors naming the class when one has no sample."""
    counts = _class_counts(labels, num_classes, class_names, "log_prior")
    return np.log(counts / counts.sum()).astype(np.float32)


class EpochSampler(torch.utils.data.Sampler):
    """Indices of one epoch drawn from ``(seed, epoch)`` alone: a permutation, or with ``weights`` a draw
    with replacement. The trainer calls ``set_epoch`` before each epoch, so a fit resumed at an epoch
    sees the same order as an uninterrupted one, whatever was drawn before."""

    def __init__(self, n: int, *, seed: int = 0, weights: np.ndarray | None = None) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch])
        order = rng.permutation(self.n) if self.p is None else rng.choice(self.n, self.n, replace=True, p=self.p)
        return iter(order.tolist())


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights that draw each class equally often on average."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = _class_counts(labels, int(labels.max()) + 1 if len(labels) else 1, None, "balanced_weights")
    return 1.0 / counts[labels]


def make_sampler(labels: np.ndarray, *, num_samples: int | None = None, generator: torch.Generator | None = None) -> WeightedRandomSampler:
    """A sampler drawing each class equally often on average (with replacement)."""
    weights = torch.as_tensor(balanced_weights(labels), dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=num_samples or len(weights), replacement=True, generator=generator)


def cache_image_ids(cache, index: PatchIndex) -> np.ndarray:
    """The image of every cache row (rows whose patch a later filter dropped get a placeholder image)."""
    ids = index.patches.set_index("patch_id")["image_id"].reindex(cache.patch_ids)
    return ids.fillna(ids.dropna().iloc[0]).to_numpy()


def normalised_view(settings, cache, index: PatchIndex, train_rows: np.ndarray, folder: Path | None = None, *,
                    seed: int = 0, measured_on: str = "", channels: Sequence[str] | None = None):
    """The cache as a model of this fold sees it: per-image scope as cached, dataset scope with percentiles
    of ``train_rows`` only (never a test patch), fixed scope with ``settings.fixed_range``.

    When a ``folder`` is given, the model's ``PatchRecipe`` is written to ``folder/recipe.json``
    (``FitFolder.recipe``): ``settings``, the model's input ``channels`` (names, in order; required with a
    folder, since training-only auxiliary channels are no input) and this normalisation (over every cache
    channel, as training saw them).
    """
    scope = settings.normalise_scope(index.images)
    cached = list(cache.channels)
    image_ids = None if scope == "image" else cache_image_ids(cache, index)
    if scope == "image":
        norm = Normalisation(scope="image", percentiles=tuple(settings.percentiles), channels=cached)
    elif scope == "fixed":
        low, high = settings.fixed_bounds(len(cached))
        norm = Normalisation(scope="fixed", percentiles=tuple(settings.percentiles), channels=cached,
                             low=low.tolist(), high=high.tolist(), measured_on="patches.fixed_range")
    else:
        norm = dataset_normalisation(cache, train_rows, image_ids[train_rows], index.images,
                                     percentiles=tuple(settings.percentiles), seed=seed, measured_on=measured_on)
    if folder is not None:
        if channels is None:
            raise InputError("normalised_view: a folder to write the model's recipe to needs the model's input channels")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        PatchRecipe.build(settings, channels, norm).write(FitFolder(folder).recipe)
    return cache if scope == "image" else NormalisedCache(cache, image_ids, index.images, norm)
