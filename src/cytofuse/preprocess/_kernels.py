"""Compiled inner loops of patch extraction (numba, cached on disk after the first call)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def histogram_int(stack: np.ndarray, offset: int, step: int, out: np.ndarray) -> None:
    """Add the values of an integer (Z, Y, X) stack, every ``step``-th row and column, to ``out``.

    ``out[v - offset]`` counts value ``v``. Four interleaved sub-histograms break the
    store-to-load dependency when neighbouring pixels share a value (dark background).
    """
    n_z, n_y, n_x = stack.shape
    sub = np.zeros((4, out.shape[0]), np.int64)
    n = (n_x + step - 1) // step
    for z in range(n_z):
        for y in range(0, n_y, step):
            row = stack[z, y]
            k = 0
            while k + 3 < n:
                sub[0, row[k * step] - offset] += 1
                sub[1, row[(k + 1) * step] - offset] += 1
                sub[2, row[(k + 2) * step] - offset] += 1
                sub[3, row[(k + 3) * step] - offset] += 1
                k += 4
            while k < n:
                sub[0, row[k * step] - offset] += 1
                k += 1
    for i in range(4):
        out += sub[i]


@numba.njit(cache=True, nogil=True)
def block_counts(plane: np.ndarray, threshold, block: int, out: np.ndarray) -> None:
    """Count pixels of a (Y, X) plane above ``threshold`` in each ``block`` x ``block`` cell.

    ``out`` has shape (ny, nx); only the top-left ``ny*block`` x ``nx*block`` region is read.
    Column sums over a band of rows come first so that the inner loop is contiguous and
    vectorises.
    """
    n_by, n_bx = out.shape
    width = n_bx * block
    col = np.zeros(width, np.int32)
    for by in range(n_by):
        col[:] = 0
        for y in range(by * block, (by + 1) * block):
            row = plane[y]
            for x in range(width):
                col[x] += np.int32(row[x] > threshold)
        for bx in range(n_bx):
            acc = 0
            for x in range(bx * block, (bx + 1) * block):
                acc += col[x]
            out[by, bx] = acc


@numba.njit(cache=True, nogil=True)
def cut_normalise(stack: np.ndarray, origins: np.ndarray, offset: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """Write ``(stack[c, z, y:y+S, x:x+S] - offset[c]) * scale[c]`` of each origin into ``out[k, :, :, c]``.

    stack: (C, Z, Y, X); origins: (N, 3) z, y, x, already checked to lie inside the stack;
    out: (N, S, S, C) float32, any strides (a channels-last buffer is written contiguously).
    One pass: each pixel is read once, converted and stored at its final place.
    """
    n_c = stack.shape[0]
    size = out.shape[1]
    for k in range(origins.shape[0]):
        z, y0, x0 = origins[k, 0], origins[k, 1], origins[k, 2]
        for c in range(n_c):
            lo, sc = offset[c], scale[c]
            for y in range(size):
                row = stack[c, z, y0 + y]
                dst = out[k, y]
                for x in range(size):
                    dst[x, c] = (np.float32(row[x0 + x]) - lo) * sc
