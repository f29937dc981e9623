"""Z-slice tiling with a global Otsu sparsity filter (Yee et al. 2026, "Patch sampling").

Per image and channel one Otsu threshold is computed over the whole 3D stack; every
z-slice is tiled into square patches of side ``size`` with step ``stride``; per patch and
channel the foreground ratio is the fraction of pixels above that channel's threshold, and
patches whose ratio (combined over channels by ``rule``) is below ``min_ratio`` are dropped.

Arrays are (C, Z, Y, X); patch origins are the top-left corner (z, y, x).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cytofuse.errors import InputError
from cytofuse.io.readers import select_channels
from cytofuse.runs import RunFolder, atomic_path

# Normalisation of a channel: (raw - low) / max(high - low, NORM_EPS), in training and prediction alike.
NORM_EPS = 1e-6

if TYPE_CHECKING:
    import pandas as pd


class PatchSettings(BaseModel):
    """How images are cut into patches and which patches are kept."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(64, gt=0, description="Patch side in pixels (the paper's optimum: 350).")
    stride: int | None = Field(None, gt=0, description="Step between patch origins; default: size (no overlap).")
    min_ratio: float = Field(0.05, ge=0.0, le=1.0, description="Minimum foreground ratio for a patch to be kept.")
    rule: Literal["any", "all", "mean"] = Field(
        "mean", description="How per-channel ratios are combined: any channel, all channels, or their mean."
    )
    channels: list[str | int] | None = Field(None, description="Channels to use, by name or index; default all.")
    exclude_channels: list[str | int] = Field(
        default_factory=list, description="Channels to drop, by name or index (e.g. the nucleus channel)."
    )
    z_step: int = Field(1, gt=0, description="Use every z_step-th slice (neighbouring slices are correlated).")
    min_patches: int = Field(1, ge=0, description="Images keeping fewer patches than this are reported.")
    fallback: Literal["none", "top_k"] = Field(
        "none",
        description="For images below min_patches: 'none' reports them; 'top_k' keeps their min_patches "
        "patches with the highest non-zero foreground score.",
    )
    max_per_image: int | None = Field(
        None, gt=0, description="Keep at most this many patches per image (random, seeded); default all."
    )
    percentiles: tuple[float, float] = Field(
        (1.0, 99.8), description="Intensity percentiles (low, high) of each channel mapped to 0 and 1."
    )
    normalise: Literal["auto", "image", "dataset", "fixed"] = Field(
        "auto", description="Scope of the normalisation percentiles: 'image' (each image its own, for whole fields "
        "and stacks, the paper's case), 'dataset' (the pixels of the training images only, the same for every "
        "patch: keeps intensity and size differences between single-cell tiles), 'fixed' (fixed_range), or "
        "'auto': 'dataset' when every image is a single tile (smaller than two patches per side), else 'image'.",
    )
    fixed_range: list[float] | None = Field(
        None, min_length=2, description="normalise 'fixed': raw intensities mapped to 0 and 1, as [low, high] for "
        "every channel or [low1, high1, low2, high2, ...] per channel.",
    )
    hist_samples: int | None = Field(
        8_000_000,
        gt=0,
        description="Pixels per channel used for the threshold histogram (a regular subsampling grid over "
        "the whole stack); None uses every pixel.",
    )
    group_by: Literal["image", "patch"] = Field(
        "image", description="CV group of a patch: its image, or the patch itself (single-cell montages)."
    )
    drop_duplicates: bool = Field(
        True,
        description="Drop patches that are pixel-exact copies of an earlier patch of the same image "
        "(duplicated cells), and all copies of content repeated three or more times (montage padding "
        "tiles); the count is reported.",
    )
    seed: int = Field(0, description="Seed of max_per_image subsampling.")
    empty_filter: Path | None = Field(
        None, description="A learned empty-patch filter folder (`cytofuse emptyfilter`), applied after the "
        "foreground-ratio filter: patches it calls empty are dropped and counted.",
    )

    @model_validator(mode="after")
    def _check(self) -> "PatchSettings":
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.normalise == "fixed" and self.fixed_range is None:
            raise ValueError("normalise 'fixed' needs fixed_range: [low, high] (or one pair per channel)")
        r = self.fixed_range or []
        if len(r) % 2 or any(a >= b for a, b in zip(r[::2], r[1::2])):
            raise ValueError(f"fixed_range must be [low, high] pairs with low < high, got {self.fixed_range}")
        return self

    def normalise_scope(self, images: "pd.DataFrame") -> str:
        """The normalisation scope for an image table (``y``, ``x`` columns): 'auto' resolved."""
        if self.normalise != "auto":
            return self.normalise
        tiles = bool(len(images)) and bool(((images["y"] < 2 * self.size) & (images["x"] < 2 * self.size)).all())
        return "dataset" if tiles else "image"

    def fixed_bounds(self, n_channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) per channel of ``fixed_range``; error when its length fits neither one pair nor C pairs."""
        r = np.asarray(self.fixed_range, np.float64)
        if len(r) == 2:
            r = np.tile(r, n_channels)
        if len(r) != 2 * n_channels:
            raise InputError(f"patches.fixed_range must hold 2 or {2 * n_channels} numbers for {n_channels} channels, "
                             f"got {self.fixed_range}")
        return r[::2].copy(), r[1::2].copy()

    @property
    def step(self) -> int:
        return self.stride or self.size


@dataclass
class ImagePatches:
    """Result of patching one image: kept patch origins, ratios and per-channel statistics."""

    origins: np.ndarray  # (N, 3) int: z, y, x
    ratios: np.ndarray  # (N, C) float32 foreground ratios of the kept patches
    channel_names: tuple[str, ...]
    thresholds: np.ndarray  # (C,)
    low: np.ndarray  # (C,) normalisation percentiles
    high: np.ndarray
    n_candidates: int
    n_passing: int  # patches that met min_ratio before any fallback or cap
    n_duplicates: int = 0
    fallback_used: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def n_kept(self) -> int:
        return len(self.origins)


def channel_histogram(channel: np.ndarray, *, hist_samples: int | None = 8_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of one (Z, Y, X) channel: (counts, bin values).

    Integer images get one bin per grey value; float images 4096 bins over their range.
    With ``hist_samples`` a regular grid of every k-th row and column is counted.
    """
    n_pixels = channel.size
    step = 1 if hist_samples is None else max(1, int(math.sqrt(n_pixels / hist_samples)))
    if np.issubdtype(channel.dtype, np.integer) and channel.dtype.itemsize <= 2:
        from cytofuse.preprocess._kernels import histogram_int

        info = np.iinfo(channel.dtype)
        parts = _z_parts(len(channel))
        sub = np.zeros((len(parts), int(info.max) - int(info.min) + 1), np.int64)
        if isinstance(channel, np.ndarray):
            channel = np.ascontiguousarray(channel)
            _parallel(lambda i: histogram_int(channel[parts[i]], int(info.min), step, sub[i]), len(parts))
        else:  # a lazy stack (OME-Zarr): each part reads its z-slices one at a time
            _parallel(lambda i: [histogram_int(np.ascontiguousarray(channel[z : z + 1]), int(info.min), step, sub[i])
                                 for z in range(len(channel))[parts[i]]], len(parts))
        counts = sub.sum(axis=0)
        values = np.arange(int(info.min), int(info.max) + 1)
        nz = np.flatnonzero(counts)
        return counts[nz[0] : nz[-1] + 1], values[nz[0] : nz[-1] + 1]
    sample = channel[:, ::step, ::step].astype(np.float64, copy=False)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return np.array([1]), np.array([0.0])
    counts, edges = np.histogram(finite, bins=4096)
    return counts, (edges[:-1] + edges[1:]) / 2


def otsu_from_histogram(counts: np.ndarray, values: np.ndarray) -> float:
    """Otsu threshold from a histogram; a single-valued histogram returns that value."""
    if len(counts) == 1 or np.count_nonzero(counts) == 1:
        return float(values[np.argmax(counts)])
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(hist=(counts, values)))


def percentiles_from_histogram(counts: np.ndarray, values: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Percentiles (0-100) of the values a histogram counts."""
    cdf = np.cumsum(counts) / counts.sum()
    idx = np.searchsorted(cdf, np.asarray(qs) / 100.0, side="left")
    return values[np.clip(idx, 0, len(values) - 1)].astype(np.float64)


def channel_statistics(
    stack: np.ndarray, *, percentiles: tuple[float, float] = (1.0, 99.8), hist_samples: int | None = 8_000_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global Otsu threshold and normalisation percentiles of each channel of a (C, Z, Y, X) stack."""
    thr, low, high = (np.zeros(stack.shape[0]) for _ in range(3))
    for c in range(stack.shape[0]):  # each histogram is split over the cores along z
        counts, values = channel_histogram(stack[c], hist_samples=hist_samples)
        thr[c] = otsu_from_histogram(counts, values)
        low[c], high[c] = percentiles_from_histogram(counts, values, percentiles)
    return thr, low, high


def _z_parts(n_z: int) -> list[slice]:
    """``n_z`` slices cut into one contiguous range per core (fewer for short stacks)."""
    bounds = np.linspace(0, n_z, min(n_z, os.cpu_count() or 1) + 1).round().astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _parallel(fn, n: int) -> None:
    """``fn(i)`` for i in range(n), on up to one thread per core (the compiled kernels release the GIL)."""
    workers = min(n, os.cpu_count() or 1)
    if workers <= 1:
        for i in range(n):
            fn(i)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="cytofuse-patches") as pool:
        for done in [pool.submit(fn, i) for i in range(n)]:
            done.result()


def patch_grid(shape_yx: tuple[int, int], *, size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left y and x coordinates of all patches that fit entirely inside the plane."""
    n_y, n_x = shape_yx
    if size > min(n_y, n_x):
        raise InputError(f"patch size must be <= image size {tuple(shape_yx)}, got {size}")
    return np.arange(0, n_y - size + 1, stride), np.arange(0, n_x - size + 1, stride)


def foreground_ratios(stack: np.ndarray, thresholds: Sequence[float], *, size: int, stride: int, z_step: int = 1) -> np.ndarray:
    """Foreground ratio of every patch: array (Z', ny, nx, C) for slices 0, z_step, 2*z_step, ...

    Pixels above a channel's threshold are counted in blocks of gcd(size, stride) pixels;
    each patch sums its blocks through a summed-area table, so overlap costs nothing extra.
    """
    from cytofuse.preprocess._kernels import block_counts

    n_c, n_z, n_y, n_x = stack.shape
    ys, xs = patch_grid((n_y, n_x), size=size, stride=stride)
    block = math.gcd(size, stride)
    n_by, n_bx = (ys[-1] + size) // block, (xs[-1] + size) // block
    k, s = size // block, stride // block
    zs = range(0, n_z, z_step)
    out = np.empty((len(zs), len(ys), len(xs), n_c), np.float32)
    by, bx = np.arange(len(ys)) * s, np.arange(len(xs)) * s

    parts = [(c, part) for c in range(n_c) for part in _z_parts(len(zs))]  # balanced over the cores

    def one(unit: int) -> None:
        c, part = parts[unit]
        counts = np.zeros((n_by, n_bx), np.int32)
        table = np.zeros((n_by + 1, n_bx + 1), np.int64)
        thr = _typed_threshold(thresholds[c], stack.dtype)
        for i in range(len(zs))[part]:
            z = zs[i]
            block_counts(stack[c, z], thr, block, counts)
            table[1:, 1:] = counts.cumsum(0).cumsum(1)
            total = (
                table[np.ix_(by + k, bx + k)] - table[np.ix_(by, bx + k)] - table[np.ix_(by + k, bx)] + table[np.ix_(by, bx)]
            )
            out[i, :, :, c] = total / float(size * size)

    _parallel(one, len(parts))
    return out


def cut_patches(stack: np.ndarray, origins: np.ndarray, low: np.ndarray, high: np.ndarray, *, size: int,
                channels_last: bool = False) -> np.ndarray:
    """Normalised float32 patches (N, C, size, size) at ``origins`` (z, y, x): (raw - low) / max(high - low, eps).

    One compiled pass per batch (``cytofuse.preprocess._kernels.cut_normalise``, no GIL held). With
    ``channels_last`` the array is a (N, C, size, size) view of (N, size, size, C) memory, the
    layout the model's convolutions run on, so no copy is needed on the way into the model."""
    from cytofuse.preprocess._kernels import cut_normalise

    origins = np.ascontiguousarray(origins, dtype=np.int64).reshape(-1, 3)
    c, n_z, n_y, n_x = stack.shape
    first, last = (origins.min(axis=0), origins.max(axis=0)) if len(origins) else (None, None)
    if first is not None and (min(first) < 0 or last[0] >= n_z or last[1] + size > n_y or last[2] + size > n_x):
        raise InputError(f"patch origins reach outside the stack of shape {stack.shape} (patch size {size})")
    if not isinstance(stack, np.ndarray):  # a lazy stack (OME-Zarr): cut from one z-slice at a time
        out = np.empty((len(origins), size, size, c) if channels_last else (len(origins), c, size, size), np.float32)
        view = out.transpose(0, 3, 1, 2) if channels_last else out
        for z in np.unique(origins[:, 0]):
            rows = np.flatnonzero(origins[:, 0] == z)
            plane = np.ascontiguousarray(stack[:, int(z) : int(z) + 1])
            view[rows] = cut_patches(plane, origins[rows] * [0, 1, 1], low, high, size=size)
        return view
    scale = (1.0 / np.maximum(np.asarray(high, np.float64) - low, NORM_EPS)).astype(np.float32)
    offset = np.asarray(low, np.float32)
    if channels_last:
        out = np.empty((len(origins), size, size, c), np.float32)
        cut_normalise(stack, origins, offset, scale, out)
        return out.transpose(0, 3, 1, 2)
    out = np.empty((len(origins), c, size, size), np.float32)
    cut_normalise(stack, origins, offset, scale, out.transpose(0, 2, 3, 1))
    return out


def _typed_threshold(threshold: float, dtype: np.dtype):
    """The threshold as the image's own type, so that `value > threshold` compiles to a fast compare."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return dtype.type(min(max(math.floor(threshold), info.min), info.max))
    return dtype.type(threshold)


def combine_ratios(ratios: np.ndarray, *, rule: str) -> np.ndarray:
    """One foreground score per patch from per-channel ratios on the last axis."""
    if rule == "any":
        return ratios.max(axis=-1)
    if rule == "all":
        return ratios.min(axis=-1)
    if rule == "mean":
        return ratios.mean(axis=-1)
    raise InputError(f"rule must be one of 'any', 'all', 'mean', got {rule!r}")


def extract_patches(stack: np.ndarray, *, channel_names: Sequence[str], settings: PatchSettings) -> ImagePatches:
    """Patch one (C, Z, Y, X) stack of already selected channels: statistics, ratios and kept origins."""
    if stack.ndim != 4:
        raise InputError(f"stack must be (C, Z, Y, X), got shape {stack.shape}")
    thr, low, high = channel_statistics(stack, percentiles=settings.percentiles, hist_samples=settings.hist_samples)
    size, step = settings.size, settings.step
    ratios = foreground_ratios(stack, thr, size=size, stride=step, z_step=settings.z_step)
    ys, xs = patch_grid(stack.shape[2:], size=size, stride=step)
    zs = np.arange(0, stack.shape[1], settings.z_step)
    flat = ratios.reshape(-1, stack.shape[0])
    score = combine_ratios(flat, rule=settings.rule)
    keep = np.flatnonzero(score >= settings.min_ratio) if settings.min_ratio > 0 else np.flatnonzero(score >= 0)
    n_passing, fallback_used, notes = len(keep), False, []
    if n_passing < settings.min_patches:
        notes.append(f"kept {n_passing} patches, fewer than min_patches={settings.min_patches}")
        if settings.fallback == "top_k":
            order = np.argsort(-score, kind="stable")
            keep = np.sort(order[: settings.min_patches][score[order[: settings.min_patches]] > 0])
            fallback_used = True
            notes.append(f"fallback top_k kept the {len(keep)} patches with the highest foreground score")
    n_duplicates = 0
    if settings.drop_duplicates and len(keep) > 1:
        unique = _first_occurrences(stack, keep, ratios.shape[:3], zs, ys, xs, size)
        n_duplicates = len(keep) - len(unique)
        if n_duplicates:
            notes.append(f"dropped {n_duplicates} patches that repeat other patches pixel for pixel")
        keep = unique
    if settings.max_per_image is not None and len(keep) > settings.max_per_image:
        rng = np.random.default_rng(settings.seed)
        keep = np.sort(rng.choice(keep, settings.max_per_image, replace=False))
    iz, iy, ix = np.unravel_index(keep, ratios.shape[:3])
    origins = np.stack([zs[iz], ys[iy], xs[ix]], axis=1).astype(np.int64)
    return ImagePatches(
        origins=origins,
        ratios=flat[keep],
        channel_names=tuple(channel_names),
        thresholds=thr,
        low=low,
        high=high,
        n_candidates=len(score),
        n_passing=n_passing,
        n_duplicates=n_duplicates,
        fallback_used=fallback_used,
        notes=notes,
    )


def _sample_hashes(stack, z, y, x, size, *, chunk: int = 65_536) -> np.ndarray:
    """A 64-bit hash (N,) of a sparse pixel grid (every ``size // 8``-th row and column, all
    channels) of each patch at (z, y, x); equal patches get equal hashes."""
    off = np.arange(0, size, max(1, size // 8))
    weights = np.random.default_rng(0).integers(1, 2**63, (stack.shape[0], len(off), len(off)), dtype=np.uint64) | 1
    out = np.empty(len(z), np.uint64)
    for a in range(0, len(z), chunk):
        zz, yy, xx = z[a : a + chunk], y[a : a + chunk], x[a : a + chunk]
        samples = stack[:, zz[:, None, None], (yy[:, None] + off)[:, :, None], (xx[:, None] + off)[:, None, :]]
        bits = np.ascontiguousarray(samples).view(f"u{stack.dtype.itemsize}").astype(np.uint64)  # (C, n, m, m)
        with np.errstate(over="ignore"):  # wrapping arithmetic is the hash
            out[a : a + chunk] = np.einsum("cnij,cij->n", bits, weights, dtype=np.uint64)
    return out


def _first_occurrences(stack, keep, grid_shape, zs, ys, xs, size) -> np.ndarray:
    """The flat patch indices of ``keep`` without pixel-exact repeats (all channels compared).

    A later copy of an earlier patch is dropped; content that occurs three or more times is fill
    (montage padding, blank tiles) and is dropped entirely, first occurrence included. A hash of
    a sparse pixel sample keys each patch (vectorised); only patches whose keys collide are
    compared in full, in ``keep`` order.
    """
    iz, iy, ix = np.unravel_index(keep, grid_shape)
    z, y, x = zs[iz], ys[iy], xs[ix]
    keys = _sample_hashes(stack, z, y, x, size)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    shared = np.flatnonzero(counts[inverse] > 1)  # the only patches that can repeat one another
    drop = np.zeros(len(keep), bool)
    seen: dict[int, list[list]] = {}  # key -> [[position of the first copy, count], ...]
    for i in shared:
        patch = stack[:, z[i], y[i] : y[i] + size, x[i] : x[i] + size]
        for entry in seen.setdefault(int(keys[i]), []):
            j = entry[0]
            if np.array_equal(patch, stack[:, z[j], y[j] : y[j] + size, x[j] : x[j] + size]):
                entry[1] += 1
                drop[i] = True  # a later copy
                break
        else:
            seen[int(keys[i])].append([i, 1])
    for entries in seen.values():
        for j, count in entries:
            drop[j] |= count >= 3  # fill: the first copy goes too
    return np.sort(keep[~drop])


# --------------------------------------------------------------------------- the patch stage


@dataclass
class PatchIndex:
    """The artifacts of the patch stage (all also written to the run folder)."""

    patches: "pd.DataFrame"  # one row per kept patch
    images: "pd.DataFrame"  # one row per image: statistics, counts, notes
    attrition: "pd.DataFrame"  # one row per class
    channel_names: tuple[str, ...]
    sparse_images: list[str]  # images that kept fewer than min_patches




def _patch_one(image_set, image_id: str, settings: PatchSettings) -> dict:
    """Read one image, select its channels, patch it; return plain data (runs in a worker)."""
    image = image_set.read(image_id)
    idx = select_channels(image.channel_names, channels=settings.channels, exclude=settings.exclude_channels)
    names = tuple(image.channel_names[i] for i in idx)
    try:
        stack = image.data[idx]  # a lazy stack (OME-Zarr) stays lazy: the stage reads it a z-slice at a time
        result = extract_patches(np.asarray(stack) if isinstance(stack, np.ndarray) else stack, channel_names=names,
                                 settings=settings)
    except InputError as exc:
        raise InputError(f"{image_set[image_id].display}: {exc}") from None
    return {"image_id": image_id, "shape": image.shape, "dtype": str(image.data.dtype), "result": result}


def build_patch_index(
    image_set,
    settings: PatchSettings,
    out_dir: str | Path | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    scheduler: str | None = None,
) -> PatchIndex:
    """Patch every image of ``image_set``; write the index, statistics and attrition to ``out_dir``.

    Each image is read and processed on its own (one stack in memory per worker). Finished
    images are kept in ``out_dir/.patch_parts`` so an interrupted run resumes where it stopped.
    scheduler: None (``workers`` processes here), or a Dask cluster (``local:N`` or an address, see
        ``cytofuse.io.distributed``) that runs one task per image and writes the part files itself;
        the tables are the same either way.
    """
    parts = _Parts(RunFolder(out_dir).patch_parts, settings) if out_dir is not None else None
    results: dict[str, dict] = parts.load() if parts else {}
    todo = [r.image_id for r in image_set if r.image_id not in results]
    if scheduler is None:
        items = _map_images(image_set, todo, settings, workers=workers, progress=progress, done=len(results))
    else:
        items = _map_on_cluster(image_set, todo, settings, parts, scheduler=scheduler, progress=progress,
                                done=len(results))
    for item in items:
        results[item["image_id"]] = item
        if parts and scheduler is None:
            parts.save(item)
    index = _assemble(image_set, results, settings)
    if parts:
        write_patch_index(index, out_dir)
        parts.clear()
    return index


def _map_images(image_set, todo: list[str], settings: PatchSettings, *, workers: int, progress: bool, done: int):
    """Yield per-image results, in worker processes when workers > 1, with a progress bar."""
    from rich.progress import Progress

    with Progress(disable=not progress) as bar:
        task = bar.add_task("patching images", total=done + len(todo), completed=done)
        if workers <= 1 or len(todo) <= 1:
            for image_id in todo:
                yield _patch_one(image_set, image_id, settings)
                bar.advance(task)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
            futures = [pool.submit(_patch_one, image_set, i, settings) for i in todo]
            for future in as_completed(futures):
                yield future.result()
                bar.advance(task)


def patch_record(record, axes: str | None, settings: PatchSettings, parts_folder: Path | None) -> dict:
    """Patch the image of one ``ImageRecord`` and save its part file into ``parts_folder``: one cluster task."""
    from cytofuse.io.imagesets import ImageSet

    item = _patch_one(ImageSet([record], axes=axes), record.image_id, settings)
    if parts_folder is not None:
        _Parts(parts_folder, settings).save(item)
    return item


def _absolute(record):
    """``record`` with absolute paths: a worker's working directory is not the client's."""
    from dataclasses import replace

    return replace(record, path=None if record.path is None else record.path.absolute(),
                   channel_paths=tuple((name, p.absolute()) for name, p in record.channel_paths))


def _map_on_cluster(image_set, todo: list[str], settings: PatchSettings, parts: "_Parts | None", *, scheduler: str,
                    progress: bool, done: int):
    """Yield per-image results of one Dask task per image (``cytofuse.io.distributed``)."""
    from cytofuse.io.distributed import map_images

    folder = parts.folder.absolute() if parts else None
    calls = [(_absolute(image_set[i]), image_set.axes, settings, folder) for i in todo]
    for _, item in map_images(patch_record, calls, images=[image_set[i].display for i in todo], scheduler=scheduler,
                              description="patching images", progress=progress, done=done):
        yield item


def _assemble(image_set, results: dict[str, dict], settings: PatchSettings) -> PatchIndex:
    import pandas as pd

    names = {tuple(v["result"].channel_names) for v in results.values()}
    if len(names) > 1:
        raise InputError(f"images have different selected channels {sorted(names)}; validate the image set first")
    channel_names = names.pop()
    rows, images = [], []
    for record in image_set:
        item = results[record.image_id]
        res: ImagePatches = item["result"]
        frame = pd.DataFrame(res.origins, columns=["z", "y", "x"])
        frame.insert(0, "image_id", record.image_id)
        frame.insert(1, "label", record.label)
        frame.insert(2, "group", record.group)
        frame["size"] = settings.size
        for c, name in enumerate(channel_names):
            frame[f"fg_{name}"] = res.ratios[:, c].astype(np.float32)
        if settings.group_by == "patch":
            frame["group"] = frame["image_id"] + "@" + frame[["z", "y", "x"]].astype(str).agg(",".join, axis=1)
        rows.append(frame)
        images.append(_image_row(record, item, res, channel_names))
    patches = pd.concat(rows, ignore_index=True)
    patches.insert(0, "patch_id", np.arange(len(patches), dtype=np.int64))
    images = pd.DataFrame(images)
    sparse = images.loc[images["n_kept"] < settings.min_patches, "image_id"].tolist()
    return PatchIndex(patches, images, attrition_table(images), channel_names, sparse)


def _image_row(record, item: dict, res: ImagePatches, channel_names) -> dict:
    c, z, y, x = item["shape"]
    row = {"image_id": record.image_id, "label": record.label, "group": record.group, "source": record.display,
           "channels": c, "z": z, "y": y, "x": x, "dtype": item["dtype"]}
    for i, name in enumerate(channel_names):
        row[f"thr_{name}"], row[f"lo_{name}"], row[f"hi_{name}"] = res.thresholds[i], res.low[i], res.high[i]
    row.update(n_candidates=res.n_candidates, n_passing=res.n_passing, n_duplicates=res.n_duplicates,
               n_kept=res.n_kept, fallback_used=res.fallback_used, notes="; ".join(res.notes))
    return row


def attrition_table(images: "pd.DataFrame") -> "pd.DataFrame":
    """Patches before and after filtering, per class (the paper's Fig. 7)."""
    table = images.groupby("label").agg(
        images=("image_id", "size"),
        candidates=("n_candidates", "sum"),
        kept=("n_kept", "sum"),
        images_below_minimum=("notes", lambda s: int(s.str.contains("fewer than min_patches").sum())),
    )
    table["attrition_pct"] = 100.0 * (1 - table["kept"] / table["candidates"].clip(lower=1))
    return table.reset_index()


def write_patch_index(index: PatchIndex, out_dir: str | Path) -> None:
    """Write the patch index, image statistics and attrition table, each renamed into place."""
    run = RunFolder(out_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    for path, frame in ((run.patches, index.patches), (run.images, index.images)):
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
    with atomic_path(run.attrition) as tmp:
        index.attrition.to_csv(tmp, index=False)


def read_patch_index(run_dir: str | Path) -> PatchIndex:
    """Load the artifacts of the patch stage from a run folder."""
    import pandas as pd

    run = RunFolder(run_dir)
    missing = [p.name for p in (run.patches, run.images) if not p.is_file()]
    if missing:
        raise InputError(f"run folder {run_dir} lacks the patch stage ({', '.join(missing)}): run `cytofuse patches` first")
    patches = pd.read_parquet(run.patches)
    images = pd.read_parquet(run.images)
    names = tuple(c[3:] for c in patches.columns if c.startswith("fg_"))
    sparse = images.loc[images["notes"].str.contains("fewer than min_patches"), "image_id"].tolist()
    return PatchIndex(patches, images, attrition_table(images), names, sparse)


_PART_ARRAYS = ("origins", "ratios", "thresholds", "low", "high")
_PARTS_FORMAT = "npz-1"  # part of the key: parts of another format are never read


def _part_arrays(item: dict) -> dict[str, np.ndarray]:
    """One image's result as arrays only: the numbers as they are, the rest as a JSON string."""
    res: ImagePatches = item["result"]
    meta = {"image_id": item["image_id"], "shape": [int(v) for v in item["shape"]], "dtype": item["dtype"],
            "channel_names": list(res.channel_names), "n_candidates": int(res.n_candidates),
            "n_passing": int(res.n_passing), "n_duplicates": int(res.n_duplicates),
            "fallback_used": bool(res.fallback_used), "notes": list(res.notes)}
    return {k: np.asarray(getattr(res, k)) for k in _PART_ARRAYS} | {"meta": np.array(json.dumps(meta))}


def _part_item(data) -> dict:
    """The inverse of :func:`_part_arrays`."""
    meta = json.loads(str(data["meta"]))
    arrays = {k: data[k] for k in _PART_ARRAYS}
    result = ImagePatches(**arrays, channel_names=tuple(meta["channel_names"]), n_candidates=meta["n_candidates"],
                          n_passing=meta["n_passing"], n_duplicates=meta["n_duplicates"],
                          fallback_used=meta["fallback_used"], notes=list(meta["notes"]))
    return {"image_id": meta["image_id"], "shape": tuple(meta["shape"]), "dtype": meta["dtype"], "result": result}


class _Parts:
    """Per-image results of an unfinished patch stage, tied to the settings that made them.

    Each image is one ``.npz`` of plain arrays (read with ``allow_pickle=False``); a part that
    cannot be read as such is ignored and its image patched again.
    """

    def __init__(self, folder: Path, settings: PatchSettings) -> None:
        import hashlib

        self.folder = folder
        self.key = hashlib.sha256((_PARTS_FORMAT + settings.model_dump_json()).encode()).hexdigest()[:16]

    def load(self) -> dict[str, dict]:
        if not (self.folder / self.key).is_dir():
            self.clear()
            return {}
        out = {}
        for f in (self.folder / self.key).glob("*.npz"):
            item = self._read(f)
            if item is not None:
                out[item["image_id"]] = item
        return out

    @staticmethod
    def _read(file: Path) -> dict | None:
        try:
            with np.load(file, allow_pickle=False) as data:
                return _part_item(data)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, zipfile.BadZipFile):
            return None  # unreadable or not ours: the image is patched again

    def save(self, item: dict) -> None:
        import hashlib

        folder = self.folder / self.key
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(item["image_id"].encode()).hexdigest()[:24]
        with atomic_path(folder / f"{name}.npz") as tmp:
            with open(tmp, "wb") as fh:  # a file object: np.savez adds no .npz to it
                np.savez(fh, **_part_arrays(item))

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
