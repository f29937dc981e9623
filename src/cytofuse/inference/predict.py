"""Whole-image prediction with a model folder (or a CV run's fold ensemble), and heat-map stitching.

Every image gets exactly the training preprocessing, computed on that image: the card's
channels selected by name, the global Otsu thresholds and the normalisation percentiles of
that stack, the same patch grid and sparsity filter (``cytofuse.preprocess.patches.extract_patches``;
only the training cap ``max_per_image`` is lifted, so every kept position is predicted).
Batches are cut, normalised and run through the model by a few threads side by side (one
per core, each with one intra-op thread), so at most a few batches exist beside the stack.
An ensemble averages class probabilities.

Outputs (``out``)::

    summary.csv, summary.parquet   one row per image: patches, heatmap_cell_px, prob_<class>
                                   (mean of the patch probabilities), decision (the most
                                   probable class), notes
    patches.parquet                one row per kept patch: image, z, y, x, prob_<class>
    images/<name>/heatmap.tif      (classes, Z, y, x) float32 OME-TIFF: each pixel the mean
                                   probability of the patches covering it; NaN where no kept
                                   patch covers it (filtered out, skipped slice, image border)
    images/<name>/heatmap_max.tif  (classes, y, x) maximum over z (NaN-aware)
    images/<name>/overlay.png      the image (max projection) beside each class's heat map

The heat map is streamed: patches come in z order, so each slice is stitched as soon as the
model has moved past it and written by a background thread into its place in a contiguous,
uncompressed OME-TIFF (``HeatMapWriter``) while the model runs on later slices. Memory holds
one slice of heat map per class, never the whole (classes, Z, Y, X) array. The file is
written under a hidden temporary name and renamed when complete; a writer error is raised
in the caller.

Heat-map pixels: every value is constant over a stitching cell (the greatest common divisor
of patch size and stride, e.g. 64 x 64 image pixels for non-overlapping 64 px patches), so
by default (``heatmap_resolution="stride"``) one pixel is stored per cell, with the OME pixel
sizes scaled by the cell and the cell in the summary (``heatmap_cell_px``); y, x of the
outputs above are then the cell grid, and ``upsample_cells`` gives image pixels.
``heatmap_resolution="full"`` stores one value per image pixel (y, x = Y, X): the same
values in a file ``cell**2`` times larger (for a 100 x 1364 x 1364 stack and two classes,
1.5 GB instead of 0.4 MB, and writing it took longer than the model).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cytofuse.errors import InputError
from cytofuse.preprocess.patches import NORM_EPS as _EPS
from cytofuse.runtime import bf16_supported
from cytofuse.preprocess.patches import cut_patches
from cytofuse.runs import atomic_path, replacing_folder

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from cytofuse.io.readers import Image
    from cytofuse.inference.modelfolder import ModelCard
    from cytofuse.preprocess.patches import ImagePatches

SUMMARY_FILE = "summary.csv"
_OVERLAY_PX = 512


# --------------------------------------------------------------------------- preprocessing


def select_model_channels(image: "Image", channel_names: Sequence[str]) -> np.ndarray:
    """The (C, Z, Y, X) data of the model's channels, picked by name; error listing expected vs found."""
    found, expected = list(image.channel_names), list(channel_names)
    missing = [c for c in expected if c not in found]
    if missing:
        hint = (" (the file stores no channel names: name them with channel_names=...)"
                if all(n == f"ch{i}" for i, n in enumerate(found)) else "")
        raise InputError(
            f"image {image.source or '<array>'}: the model expects channels {expected} but the image has "
            f"{len(found)} channels {found}; missing {missing}{hint}"
        )
    idx = [found.index(c) for c in expected]
    return image.data if idx == list(range(len(found))) else image.data[idx]


def preprocess(stack: np.ndarray, card: "ModelCard") -> "ImagePatches":
    """Thresholds, percentiles and kept patch origins of one (C, Z, Y, X) stack of the card's channels."""
    from cytofuse.preprocess.patches import extract_patches

    res = extract_patches(stack, channel_names=card.channel_names, settings=card.recipe.prediction_settings())
    bounds = card.recipe.bounds()
    if bounds is not None:  # dataset or fixed scope: the training images' (or the given) range, not this image's
        res.low, res.high = bounds
    return res


def default_workers() -> int:
    """Model threads by default: as many as torch would use for one forward (one per core)."""
    import torch

    return max(1, torch.get_num_threads())


@contextlib.contextmanager
def _single_threaded_ops(enabled: bool = True) -> Iterator[None]:
    """torch's intra-op thread count set to 1 inside the block (process-wide), restored after."""
    import torch

    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(before)


def _in_order(fn: Callable[[int], object], items: Sequence[int], workers: int) -> Iterator:
    """``fn(item)`` for every item, run by ``workers`` threads (0: in the calling thread), yielded
    in the items' order. At most ``2 * workers`` calls are under way or waiting to be taken."""
    if workers <= 0:
        yield from (fn(i) for i in items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cytofuse-model")
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for job in pending:
            job.cancel()
        pool.shutdown(wait=True)


# --------------------------------------------------------------------------- inference


def _use_bf16(precision: str) -> bool:
    if precision not in ("fp32", "bf16", "auto"):
        raise InputError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    return precision == "bf16" or (precision == "auto" and bf16_supported())


def prepare_models(models: Sequence["torch.nn.Module"], *, device: str = "cpu") -> list["torch.nn.Module"]:
    """Models in eval mode, channels_last, on ``device``."""
    import torch

    return [m.eval().to(device).to(memory_format=torch.channels_last) for m in models]


def ensemble_proba(models: Sequence["torch.nn.Module"], x: "torch.Tensor", *, bf16: bool = False,
                   tta: bool = False) -> np.ndarray:
    """Mean class probabilities (B, K) of ``models`` on one batch (channels_last, optional bf16 autocast;
    ``tta``: each model's mean over the 8 dihedral transforms)."""
    import torch

    from cytofuse.models.tta import tta_proba

    device = next(models[0].parameters()).device
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        probs = sum(tta_proba(m, x, tta=tta) for m in models) / len(models)
    return probs.cpu().numpy()


def predict_patches(stack: np.ndarray, res: "ImagePatches", models: Sequence["torch.nn.Module"], *, size: int,
                    batch_size: int = 64, bf16: bool = False, workers: int | None = None,
                    on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None, tta: bool = False) -> np.ndarray:
    """Class probabilities (N, K) of the kept patches of one stack, streamed in batches.

    workers: threads that each cut a batch and run the models on it with one intra-op thread
        (default ``default_workers()``; 0: everything in the calling thread with torch's own
        threading). Small CNNs on small patches split poorly over threads within an operation;
        whole batches side by side keep every core busy (on 2 cores about 1.5x the patches per
        second) and leave no thread waiting on another.
    on_batch: called in the calling thread with each batch's origins (B, 3) and probabilities
        (B, K), in patch order."""
    import torch

    workers = default_workers() if workers is None else workers
    n_classes = int(models[0].num_classes)
    out = np.empty((len(res.origins), n_classes), np.float32)
    pin = next(models[0].parameters()).device.type == "cuda"

    def run(start: int) -> tuple[int, np.ndarray]:
        origins = res.origins[start : start + batch_size]
        x = torch.from_numpy(cut_patches(stack, origins, res.low, res.high, size=size, channels_last=True))
        return start, ensemble_proba(models, x.pin_memory() if pin else x, bf16=bf16, tta=tta)

    with _single_threaded_ops(workers > 0):
        for start, probs in _in_order(run, range(0, len(res.origins), batch_size), workers):
            out[start : start + len(probs)] = probs
            if on_batch is not None:
                on_batch(res.origins[start : start + len(probs)], probs)
    return out


# --------------------------------------------------------------------------- stitching


def upsample_cells(cells: np.ndarray, block: int, shape: tuple[int, int]) -> np.ndarray:
    """Image pixels (..., Y, X) float32 of a (..., ny, nx) cell grid, each cell ``block`` x ``block``
    pixels; NaN beyond the grid. Turns a stride-resolution heat map (its cell size is the summary's
    ``heatmap_cell_px``) into one value per image pixel: ``upsample_cells(heat, cell, image_yx)``."""
    n_y, n_x = shape
    *lead, c_y, c_x = cells.shape
    out = np.full((*lead, n_y, n_x), np.nan, np.float32)
    rows = np.repeat(cells.astype(np.float32, copy=False), block, axis=-1)  # (..., c_y, c_x * block)
    out[..., : c_y * block, :].reshape(*lead, c_y, block, n_x)[..., : c_x * block] = rows[..., :, None, :]
    return out


def _accumulate(total: np.ndarray, count: np.ndarray, cells: tuple[np.ndarray, ...], probs: np.ndarray,
                k_cells: int) -> None:
    """Add each patch's probabilities (N, K) to the ``k_cells`` x ``k_cells`` cells it covers.

    total: (K, *grid) float64; count: grid int32; cells: index arrays of the patches' first cells
    (the last two are y and x)."""
    *lead, by, bx = cells
    for dy in range(k_cells):
        for dx in range(k_cells):
            where = (*lead, by + dy, bx + dx)
            np.add.at(count, where, 1)
            for k in range(probs.shape[1]):
                np.add.at(total[k], where, probs[:, k])


def _mean_cells(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


@dataclass
class HeatMap:
    """Per-class probability maps on a grid of ``block`` x ``block`` pixel cells (exact: patch
    corners fall on cell corners). ``values`` is (K, Z, ny, nx); NaN where no patch covers a cell."""

    values: np.ndarray
    block: int
    shape: tuple[int, int, int]  # image (Z, Y, X)

    def plane(self, k: int, z: int) -> np.ndarray:
        """One class and slice at image resolution (Y, X), float32."""
        return upsample_cells(self.values[k, z], self.block, self.shape[1:])

    def max_projection(self) -> np.ndarray:
        """(K, Y, X) maximum over z at image resolution; NaN where no slice has a value."""
        cells = np.full((len(self.values), *self.values.shape[2:]), np.nan, np.float32)
        for z in range(self.values.shape[1]):
            np.fmax(cells, self.values[:, z], out=cells)  # fmax skips NaN: uncovered cells stay NaN
        return np.stack([upsample_cells(c, self.block, self.shape[1:]) for c in cells])

    def full(self) -> np.ndarray:
        """(K, Z, Y, X) at image resolution (large: for tests and small images)."""
        return np.stack([np.stack([self.plane(k, z) for z in range(self.shape[0])]) for k in range(len(self.values))])


def stitch(origins: np.ndarray, probs: np.ndarray, *, shape: tuple[int, int, int], size: int, stride: int) -> HeatMap:
    """Average the probabilities (N, K) of patches at ``origins`` (z, y, x) into per-class maps of an image (Z, Y, X).

    In memory for the whole image; prediction streams slice by slice with ``SliceStitcher``."""
    n_z, n_y, n_x = shape
    block = math.gcd(size, stride)
    total = np.zeros((probs.shape[1], n_z, n_y // block, n_x // block), np.float64)
    count = np.zeros((n_z, n_y // block, n_x // block), np.int32)
    if len(origins):
        cells = (origins[:, 0], origins[:, 1] // block, origins[:, 2] // block)
        _accumulate(total, count, cells, probs, size // block)
    return HeatMap(_mean_cells(total, count), block, (n_z, n_y, n_x))


class SliceStitcher:
    """``stitch`` one z-slice at a time: feed patches in z order, get each slice's (K, ny, nx) cells
    once the patches have moved past it. Holds one slice of sums and the running max over z."""

    def __init__(self, shape: tuple[int, int, int], n_classes: int, *, size: int, stride: int) -> None:
        self.shape, self.block = tuple(shape), math.gcd(size, stride)
        self.k_cells = size // self.block
        self.cells_shape = (shape[1] // self.block, shape[2] // self.block)
        self.total = np.zeros((n_classes, *self.cells_shape), np.float64)
        self.count = np.zeros(self.cells_shape, np.int32)
        self.max_cells = np.full((n_classes, *self.cells_shape), np.nan, np.float32)
        self.z = 0  # the slice being summed

    def add(self, origins: np.ndarray, probs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Add patches (origins (N, 3), probs (N, K)); yield (z, cells) of every slice now finished."""
        z = origins[:, 0]
        if len(z) and (z[0] < self.z or np.any(np.diff(z) < 0) or z[-1] >= self.shape[0]):
            raise ValueError(f"patches must come in z order within 0..{self.shape[0] - 1}; got z {z[0]}..{z[-1]} "
                             f"after slice {self.z}")
        for part in np.split(np.arange(len(z)), np.flatnonzero(np.diff(z)) + 1):
            if not len(part):
                continue
            while self.z < z[part[0]]:
                yield self._emit()
            cells = (origins[part, 1] // self.block, origins[part, 2] // self.block)
            _accumulate(self.total, self.count, cells, probs[part], self.k_cells)

    def finish(self) -> Iterator[tuple[int, np.ndarray]]:
        """(z, cells) of the remaining slices (NaN where no patch came)."""
        while self.z < self.shape[0]:
            yield self._emit()

    def _emit(self) -> tuple[int, np.ndarray]:
        values = _mean_cells(self.total, self.count)
        np.fmax(self.max_cells, values, out=self.max_cells)
        self.total.fill(0)
        self.count.fill(0)
        self.z += 1
        return self.z - 1, values


# --------------------------------------------------------------------------- writing

HEATMAP_RESOLUTIONS = ("full", "stride")
_DONE = object()
# When the model splits each operation over OpenMP threads (workers=0), the background threads
# (heat-map writer, overlay, read-ahead) run at a lower priority: on a few cores an equal-priority
# thread preempts one OpenMP thread and every parallel region then waits for it (measured on 2
# cores: 0.3 s of writing slowed a 1.9 s forward to 3.6 s; at nice 19 the forward kept its speed).
# With single-threaded batches side by side nothing waits on a preempted thread, and a low-priority
# writer would only starve until the last batch: background threads keep the normal priority.
_WRITER_NICE = int(os.environ.get("CYTOFUSE_WRITER_NICE", "19"))


def _background_nice(workers: int) -> int:
    return _WRITER_NICE if workers == 0 else 0


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value (Linux threads have their own); elsewhere a no-op."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        pass


def _ome_metadata(axes: str, class_names: Sequence[str], pixel_size_um, scale: int = 1) -> dict:
    meta = {"axes": axes, "Channel": {"Name": list(class_names)}}
    _, py, px = pixel_size_um
    if py and px:
        meta |= {"PhysicalSizeY": py * scale, "PhysicalSizeX": px * scale}
    return meta


def _write_tiff_atomic(path: Path, data: np.ndarray, **kwargs) -> None:
    """``tifffile.imwrite`` to a hidden temporary name beside ``path``, renamed into place."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)


class HeatMapWriter:
    """Stitch and write one image's heat maps slice by slice in a background thread.

    ``add`` patches (in z order) as the model produces them; each finished z-slice is stitched
    and written into its place in ``path``, a contiguous (K, Z, Y, X) float32 OME-TIFF created
    at full size under a hidden temporary name. ``close`` finishes the last slices, renames
    the file into place, and writes ``<stem>_max.tif`` (K, Y, X), the NaN-aware max over z.
    An exception in the thread is raised by the next ``add`` or by ``close``; ``abort`` (or
    leaving the ``with`` block by an exception) removes the temporary file.

    resolution: "full" (image pixels) or "stride" (one pixel per stitching cell).
    project: optional (C, Z, Y, X) stack whose max over z is kept as ``projection`` on the way.
    nice: the writer thread's nice value (see ``_background_nice``).
    """

    def __init__(self, path: str | Path, *, shape: tuple[int, int, int], class_names: Sequence[str], size: int,
                 stride: int, pixel_size_um=(None, None, None), resolution: str = "full",
                 project: np.ndarray | None = None, max_pending: int = 1024, nice: int = _WRITER_NICE) -> None:
        import tifffile

        if resolution not in HEATMAP_RESOLUTIONS:
            raise InputError(f"heatmap_resolution must be one of {list(HEATMAP_RESOLUTIONS)}, got {resolution!r}")
        self.path, self.class_names, self.resolution = Path(path), list(class_names), resolution
        self.stitcher = SliceStitcher(shape, len(class_names), size=size, stride=stride)
        scale = self.cell = 1 if resolution == "full" else self.stitcher.block  # image pixels per stored pixel
        self._plane_shape = tuple(shape[1:]) if resolution == "full" else self.stitcher.cells_shape
        self._meta = lambda axes: _ome_metadata(axes, class_names, pixel_size_um, scale)
        # the heat map is written under the hidden name of atomic_path: close renames it onto path, abort removes it
        self._output = atomic_path(self.path)
        self._tmp = self._output.__enter__()
        full_shape = (len(class_names), shape[0], *self._plane_shape)
        self._offset, _ = tifffile.imwrite(self._tmp, shape=full_shape, dtype=np.float32, ome=True,
                                           photometric="minisblack", metadata=self._meta("CZYX"), returnoffset=True)
        self._file = open(self._tmp, "r+b", buffering=0)
        self._project, self._nice = project, nice
        self.projection = None if project is None or not project.shape[1] else project[:, 0].copy()
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="heatmap-writer", daemon=True)
        self._thread.start()

    # ----- caller side
    def add(self, origins: np.ndarray, probs: np.ndarray) -> None:
        """Queue patches (origins (N, 3) z, y, x in z order; probs (N, K)) for stitching."""
        self._raise_error()
        self._queue.put((np.array(origins), np.array(probs)))

    def close(self) -> None:
        """Finish every slice, rename the heat map into place and write its max projection."""
        if self._closed:
            return
        self._join()
        if self._error is not None:
            self._discard()
            self._raise_error()
        self._output.__exit__(None, None, None)
        _write_tiff_atomic(self.path.with_name(self.path.stem + "_max.tif"), self.max_projection(full=False),
                           ome=True, photometric="minisblack", metadata=self._meta("CYX"))

    def abort(self) -> None:
        """Stop the thread and remove the temporary file (nothing is left under ``path``)."""
        if self._closed:
            return
        self._stop.set()
        self._join()
        self._discard()

    def max_projection(self, *, full: bool = True) -> np.ndarray:
        """(K, Y, X) max over z at image resolution (``full``) or at the stored resolution."""
        cells, block = self.stitcher.max_cells, self.stitcher.block
        if not full and self.resolution == "stride":
            return cells.copy()
        return np.stack([upsample_cells(c, block, self.stitcher.shape[1:]) for c in cells])

    def sampled_max_projection(self, step: int) -> np.ndarray:
        """``max_projection()[:, ::step, ::step]``, computed from the cells (for the overlay)."""
        block, shape = self.stitcher.block, self.stitcher.shape[1:]
        return np.stack([_sample_cells(c, block, shape, step) for c in self.stitcher.max_cells])

    def __enter__(self) -> "HeatMapWriter":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _join(self) -> None:
        self._closed = True
        self._queue.put(_DONE)
        self._thread.join()
        self._file.close()

    def _discard(self) -> None:
        aborted = RuntimeError(f"heat map {self.path} discarded")
        self._output.__exit__(RuntimeError, aborted, None)  # removes the file, never renames it

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            err.add_note(f"raised while writing the heat map {self.path}")
            raise err

    # ----- writer thread
    def _run(self) -> None:
        _lower_priority(self._nice)
        try:
            while (item := self._queue.get()) is not _DONE:
                if self._stop.is_set():
                    continue
                for z, cells in self.stitcher.add(*item):
                    self._write_slice(z, cells)
            if not self._stop.is_set():
                for z, cells in self.stitcher.finish():
                    self._write_slice(z, cells)
        except BaseException as err:  # handed to the caller by add() / close()
            self._error = err
            while self._queue.get() is not _DONE:  # keep draining so add() never blocks
                pass

    def _write_slice(self, z: int, cells: np.ndarray) -> None:
        n_z = self.stitcher.shape[0]
        for k, values in enumerate(cells):
            plane = upsample_cells(values, self.stitcher.block, self.stitcher.shape[1:]) if self.resolution == "full" else values
            self._file.seek(self._offset + (k * n_z + z) * plane.nbytes)
            view = memoryview(np.ascontiguousarray(plane)).cast("B")
            while view:
                view = view[self._file.write(view):]
        if self._project is not None:
            np.maximum(self.projection, self._project[:, z], out=self.projection)


def write_heatmap_tiff(path: Path, heat: HeatMap, class_names: Sequence[str], pixel_size_um=(None, None, None)) -> None:
    """(K, Z, Y, X) float32 OME-TIFF of an in-memory ``HeatMap``, and its (K, Y, X) max projection beside it."""
    import tifffile

    k, (n_z, n_y, n_x) = len(class_names), heat.shape
    planes = (heat.plane(c, z) for c in range(k) for z in range(n_z))
    # one strip per plane: from an iterator, tifffile's default strips write ~7x slower
    tifffile.imwrite(path, planes, shape=(k, n_z, n_y, n_x), dtype=np.float32, ome=True, photometric="minisblack",
                     metadata=_ome_metadata("CZYX", class_names, pixel_size_um), rowsperstrip=n_y)
    tifffile.imwrite(path.with_name(path.stem + "_max.tif"), heat.max_projection(), ome=True, photometric="minisblack",
                     metadata=_ome_metadata("CYX", class_names, pixel_size_um))


def _composite(projection: np.ndarray) -> np.ndarray:
    """RGB (Y, X, 3) of up to three channels of a (C, Y, X) projection, each stretched to its 1-99.8 %."""
    rgb = np.zeros((*projection.shape[1:], 3), np.float32)
    colours = [(1, 0, 1), (0, 1, 0), (0, 0.6, 1)] if len(projection) > 1 else [(1, 1, 1)]
    for channel, colour in zip(projection, colours):
        lo, hi = np.percentile(channel[::4, ::4], (1, 99.8))
        norm = np.clip((channel - lo) / max(hi - lo, _EPS), 0, 1)
        rgb += norm[..., None] * np.asarray(colour, np.float32)
    return np.clip(rgb, 0, 1)


def overlay_step(shape_yx: Sequence[int]) -> int:
    """Pixel step that samples an image of ``shape_yx`` down to overlay panels of about ``_OVERLAY_PX`` px."""
    return max(1, math.ceil(max(shape_yx) / _OVERLAY_PX))


def _sample_cells(cells: np.ndarray, block: int, shape: tuple[int, int], step: int) -> np.ndarray:
    """``upsample_cells(cells, block, shape)[::step, ::step]`` without building the image-sized plane."""
    rows, cols = np.arange(0, shape[0], step) // block, np.arange(0, shape[1], step) // block
    in_y, in_x = rows < cells.shape[0], cols < cells.shape[1]
    out = np.full((len(rows), len(cols)), np.nan, np.float32)
    out[np.ix_(in_y, in_x)] = cells[np.ix_(rows[in_y], cols[in_x])]
    return out


@functools.cache
def _inferno() -> np.ndarray:
    """The 256 RGB colours (0-1) of matplotlib's perceptually uniform "inferno" map."""
    import matplotlib

    return matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3].astype(np.float32)


def write_overlay_png(path: Path, projection: np.ndarray, heat: np.ndarray, class_names: Sequence[str],
                      *, title: str) -> None:
    """A PNG for people: the image (max projection, up to three channels in colour) beside one panel
    per class with its heat map (inferno, 60 % opaque) over the grey image, and a colour bar.

    projection (C, h, w) and heat (K, h, w) are at display resolution (``overlay_step``); NaN heat
    (no kept patch) shows the image alone. Drawn with Pillow: a fraction of matplotlib's time."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    zoom = max(1, 256 // max(projection.shape[1:]))  # small images: panels of at least ~256 px
    rgb = _composite(projection).repeat(zoom, 0).repeat(zoom, 1)
    grey = rgb.mean(axis=2, keepdims=True)
    panels = [rgb]
    for values in heat.repeat(zoom, 1).repeat(zoom, 2):
        alpha = 0.6 * np.isfinite(values)[..., None]
        colour = _inferno()[np.clip(np.nan_to_num(values) * 255 + 0.5, 0, 255).astype(np.uint8)]
        panels.append(grey * (1 - alpha) + colour * alpha)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    h, w = rgb.shape[:2]
    pad, top, bar = 10, 48, 14
    canvas = PILImage.new("RGB", (pad + len(panels) * (w + pad) + bar + 48, top + h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((canvas.width / 2, 4), title, fill="black", font=font, anchor="ma")
    labels = ["image (max over z)", *(f"P({name})" for name in class_names)]
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x = pad + i * (w + pad)
        canvas.paste(PILImage.fromarray((np.clip(panel, 0, 1) * 255 + 0.5).astype(np.uint8)), (x, top))
        draw.text((x + w / 2, top - 4), label, fill="black", font=small, anchor="md")
    x = pad + len(panels) * (w + pad)
    ramp = _inferno()[np.linspace(255, 0, h).astype(int)][:, None, :].repeat(bar, 1)
    canvas.paste(PILImage.fromarray((ramp * 255 + 0.5).astype(np.uint8)), (x, top))
    for value in (0.0, 0.5, 1.0):
        y = top + round((1 - value) * (h - 1))
        draw.line([(x + bar, y), (x + bar + 3, y)], fill="black")
        draw.text((x + bar + 5, y), f"{value:g}", fill="black", font=small, anchor="lm")
    draw.text((x + bar / 2, top - 4), "prob.", fill="black", font=small, anchor="md")
    canvas.save(path, format="PNG", compress_level=1)


# --------------------------------------------------------------------------- the command


@dataclass
class ImageResult:
    """What prediction produced for one image (its heat maps are already written)."""

    name: str
    source: str
    probabilities: np.ndarray  # (K,) mean of the patch probabilities; NaN without patches
    decision: str
    patches: "pd.DataFrame"
    heat_max: np.ndarray  # (K, h, w) max over z of the heat maps, every overlay_step-th pixel
    projection: np.ndarray  # (C, h, w) max over z of the image, all its channels, the same pixels
    notes: list[str]
    heatmap_cell: int = 1  # image pixels per heat-map pixel along y and x


def apply_empty_filter(stack: np.ndarray, res: "ImagePatches", filter_dir: Path, *, size: int, name: str,
                       chunk: int = 1024) -> "ImagePatches":
    """Drop the patches the model's learned empty-patch filter calls empty, as training did (in chunks)."""
    from dataclasses import replace

    from cytofuse.preprocess.emptyfilter import EmptyFilter

    if not Path(filter_dir).is_dir():
        raise InputError(f"the model was trained with the empty-patch filter {filter_dir}, which is missing here; "
                         "copy it to that path (the card's recipe.settings.empty_filter) to predict as in training")
    flt = EmptyFilter.load(filter_dir)
    keep = np.ones(len(res.origins), bool)
    for start in range(0, len(keep), chunk):
        part = cut_patches(stack, res.origins[start:start + chunk], res.low, res.high, size=size)
        keep[start:start + chunk] = flt.predict(part, groups=np.full(len(part), name))
    notes = [*res.notes, f"the learned empty-patch filter dropped {int((~keep).sum())} of {len(keep)} patches"]
    return replace(res, origins=res.origins[keep], ratios=res.ratios[keep], notes=notes)


def _z_ordered(res: "ImagePatches") -> "ImagePatches":
    """``res`` with origins in z order (as ``extract_patches`` returns them; streaming relies on it)."""
    from dataclasses import replace

    z = res.origins[:, 0]
    if np.all(z[1:] >= z[:-1]):
        return res
    order = np.argsort(z, kind="stable")
    return replace(res, origins=res.origins[order], ratios=res.ratios[order])


def prepare_image(image: "Image", card: "ModelCard", *, name: str) -> tuple[np.ndarray, "ImagePatches"]:
    """The model's channels of one image and its kept patches in z order, preprocessed as in training."""
    stack = select_model_channels(image, card.channel_names)
    settings = card.recipe.prediction_settings()
    res = _z_ordered(preprocess(stack, card))
    if settings.empty_filter is not None:
        res = apply_empty_filter(stack, res, settings.empty_filter, size=settings.size, name=name)
    return stack, res


def predict_image(image: "Image", models: Sequence["torch.nn.Module"], card: "ModelCard", *, name: str,
                  folder: Path, batch_size: int = 64, bf16: bool = False, workers: int | None = None,
                  heatmap_resolution: str = "stride",
                  prepared: tuple[np.ndarray, "ImagePatches"] | None = None) -> ImageResult:
    """Preprocess one image as in training (unless ``prepared`` by ``prepare_image``), predict its
    patches, and stream its heat maps into ``folder``."""
    import pandas as pd

    stack, res = prepared if prepared is not None else prepare_image(image, card, name=name)
    settings = card.recipe.prediction_settings()
    workers = default_workers() if workers is None else workers
    step = overlay_step(stack.shape[2:])  # the overlay needs every step-th pixel only
    writer = HeatMapWriter(folder / "heatmap.tif", shape=stack.shape[1:], class_names=card.class_names,
                           size=settings.size, stride=settings.step, pixel_size_um=image.pixel_size_um,
                           resolution=heatmap_resolution, project=image.data[:, :, ::step, ::step],
                           nice=_background_nice(workers))
    with writer:
        probs = predict_patches(stack, res, models, size=settings.size, batch_size=batch_size, bf16=bf16,
                                workers=workers, on_batch=writer.add, tta=card.tta)
    classes = card.class_names
    table = pd.DataFrame(res.origins, columns=["z", "y", "x"])
    table.insert(0, "image", name)
    for k, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, k]
    notes = list(res.notes)
    if len(probs):
        mean = probs.mean(axis=0)
        decision = classes[int(np.argmax(mean))]
    else:
        mean, decision = np.full(len(classes), np.nan, np.float32), ""
        notes.append("no patch passed the sparsity filter: no decision")
    projection = writer.projection if writer.projection is not None else image.data[:, :, ::step, ::step].max(axis=1)
    return ImageResult(name, image.source, mean, decision, table, writer.sampled_max_projection(step), projection,
                       notes, writer.cell)


def _image_names(images: Sequence) -> list[str]:
    """Unique folder names from the images' file names (a suffix _2, _3, ... on repeats)."""
    names, seen = [], {}
    for item in images:
        source = item.source if hasattr(item, "channel_names") else str(item)
        stem = Path(source).name.split(".")[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _write_overlay(folder: Path, result: ImageResult, class_names: Sequence[str], *, nice: int = 0) -> None:
    _lower_priority(nice)
    probs = ", ".join(f"{c} {p:.2f}" for c, p in zip(class_names, result.probabilities))
    with atomic_path(folder / "overlay.png") as tmp:
        write_overlay_png(tmp, result.projection, result.heat_max, class_names,
                          title=f"{result.name}: {result.decision or 'no decision'} ({probs})")


def _summary_row(result: ImageResult, class_names: Sequence[str]) -> dict:
    row = {"image": result.name, "source": result.source, "patches": len(result.patches),
           "heatmap_cell_px": result.heatmap_cell}
    row |= {f"prob_{c}": float(p) for c, p in zip(class_names, result.probabilities)}
    return row | {"decision": result.decision, "notes": "; ".join(result.notes)}


def _read(item, channel_names: Sequence[str] | None, axes: str | None) -> "Image":
    from cytofuse.io.readers import Image, check_finite, read_image

    if isinstance(item, Image):  # files are checked when read; an array handed over is checked here
        check_finite(np.asarray(item.data), item.source or "<array>", item.channel_names)
        return item
    return read_image(item, axes=axes, channel_names=channel_names, mmap=True)


def predict_images(
    model_dir_or_run: str | Path,
    images: Sequence,
    *,
    out: str | Path,
    model_name: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    precision: Literal["fp32", "bf16", "auto"] = "auto",
    channel_names: Sequence[str] | None = None,
    axes: str | None = None,
    device: str = "cpu",
    heatmap_resolution: Literal["full", "stride"] = "stride",
    read_ahead: bool = False,
) -> "pd.DataFrame":
    """Predict every image (file path or ``cytofuse.io.readers.Image``) and write the folder ``out``; return the summary.

    model_dir_or_run: a model folder, or a CV run folder (its ``model_name`` folds form an ensemble).
    workers: threads that each cut a batch and run the model on it, one intra-op thread each (default:
        torch's thread count, one per core; 0: one batch at a time with torch's own threading).
    precision: "bf16" autocast, "fp32", or "auto" (bf16 where the CPU computes it natively).
    channel_names / axes: passed to ``cytofuse.io.readers.read_image`` (names for files that store none).
    heatmap_resolution: "stride" (one pixel per stitching cell, the default) or "full" (image pixels); see
        the module notes.
    read_ahead: read and preprocess the next image while the model runs on the current one (faster on
        folders of images; two images in memory instead of one).
    The image decision is the class with the highest mean patch probability.
    """
    import pandas as pd
    from rich.progress import Progress

    from cytofuse.inference.modelfolder import load_models

    if not images:
        raise InputError("predict_images: images is empty; give at least one image file")
    workers = default_workers() if workers is None else workers
    if batch_size < 1 or workers < 0:
        raise InputError(f"batch_size must be >= 1 and workers >= 0, got batch_size={batch_size}, workers={workers}")
    if heatmap_resolution not in HEATMAP_RESOLUTIONS:
        raise InputError(f"heatmap_resolution must be one of {list(HEATMAP_RESOLUTIONS)}, got {heatmap_resolution!r}")
    bf16 = _use_bf16(precision)
    models, card = load_models(model_dir_or_run, model_name=model_name)
    models = prepare_models(models, device=device)
    out = Path(out)
    rows, tables = [], []
    names = _image_names(images)

    def load(i: int, nice: int) -> tuple["Image", tuple[np.ndarray, "ImagePatches"]]:
        _lower_priority(nice)
        image = _read(images[i], channel_names, axes)
        return image, prepare_image(image, card, name=names[i])

    # Two helper threads (see _background_nice for their priority): one reads and preprocesses the
    # next image (read_ahead), one draws the finished image's overlay while the model runs on the next.
    nice = _background_nice(workers)
    with replacing_folder(out, overwrite=overwrite, what="prediction folder") as tmp:
        pool = ThreadPoolExecutor(2, thread_name_prefix="cytofuse-predict")
        ahead, overlay = None, None
        try:
            with Progress(disable=not progress) as bar:
                task = bar.add_task("predicting images", total=len(images))
                for i, name in enumerate(names):
                    image, prepared = ahead.result() if ahead is not None else load(i, 0)
                    ahead = pool.submit(load, i + 1, nice) if read_ahead and i + 1 < len(images) else None
                    folder = tmp / "images" / name
                    folder.mkdir(parents=True)
                    result = predict_image(image, models, card, name=name, folder=folder, batch_size=batch_size,
                                           bf16=bf16, workers=workers, heatmap_resolution=heatmap_resolution,
                                           prepared=prepared)
                    del image, prepared
                    if overlay is not None:
                        overlay.result()  # at most one overlay waits
                    overlay = pool.submit(_write_overlay, folder, result, card.class_names, nice=nice)
                    rows.append(_summary_row(result, card.class_names))
                    tables.append(result.patches)
                    del result
                    bar.advance(task)
                if overlay is not None:
                    overlay.result()
            summary = pd.DataFrame(rows)
            summary.to_csv(tmp / SUMMARY_FILE, index=False)
            summary.to_parquet(tmp / "summary.parquet", index=False)
            pd.concat(tables, ignore_index=True).to_parquet(tmp / "patches.parquet", index=False)
        finally:
            for job in (ahead, overlay):
                if job is not None:
                    job.cancel()
            pool.shutdown(wait=True)
    return summary
