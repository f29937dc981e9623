"""Heat maps: stitching patch probabilities into per-class maps on a grid of cells, and cells to image pixels.

Every heat-map value is constant over a stitching cell (the greatest common divisor of patch
size and stride, e.g. 64 x 64 image pixels for non-overlapping 64 px patches): ``stitch``
averages a whole image in memory, ``SliceStitcher`` one z-slice at a time as the patches come
in z order, and ``upsample_cells`` / ``sample_cells`` give image pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


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


def sample_cells(cells: np.ndarray, block: int, shape: tuple[int, int], step: int) -> np.ndarray:
    """``upsample_cells(cells, block, shape)[::step, ::step]`` without building the image-sized plane."""
    rows, cols = np.arange(0, shape[0], step) // block, np.arange(0, shape[1], step) // block
    in_y, in_x = rows < cells.shape[0], cols < cells.shape[1]
    out = np.full((len(rows), len(cols)), np.nan, np.float32)
    out[np.ix_(in_y, in_x)] = cells[np.ix_(rows[in_y], cols[in_x])]
    return out

