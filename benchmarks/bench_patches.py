"""Patch extraction + Otsu sparsity filtering on a paper-sized stack, against np.max.

The stack is synthetic, 100 x 3 x 1364 x 1364 uint16 (the paper's image size). Timings are
printed as ratios against one plain reduction (``np.max``) over the same array in the same
process, since this machine's absolute speed varies; memory as peak traced allocations
(stack included) over the stack's size. Targets: ratio <= 4, memory <= 2x the stack.

    python benchmarks/bench_patches.py [--z 100] [--size 350] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from cytofuse.preprocess.patches import PatchSettings, extract_patches


def synthetic_stack(z: int, yx: int, seed: int = 0) -> np.ndarray:
    """Dark noisy background with bright cell-sized blobs, as a confocal stack looks."""
    rng = np.random.default_rng(seed)
    stack = rng.integers(90, 130, size=(3, z, yx, yx), dtype=np.uint16)
    for _ in range(12):
        y, x = rng.integers(0, yx - 200, size=2)
        stack[:, :, y : y + 200, x : x + 200] += rng.integers(500, 2000, dtype=np.uint16)
    return stack


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--z", type=int, default=100)
    parser.add_argument("--yx", type=int, default=1364)
    parser.add_argument("--size", type=int, default=350)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    stack = synthetic_stack(args.z, args.yx)
    names = ["mito", "early_endosome", "recycling_endosome"]
    extract_patches(stack[:, :2], channel_names=names, settings=PatchSettings(size=args.size))  # compile once
    print(f"stack {stack.shape} {stack.dtype}, {stack.nbytes / 2**20:.0f} MiB")
    base = best_of(lambda: stack.max(), args.repeats)
    print(f"baseline np.max: {base:.3f} s")
    for label, settings in (
        ("no overlap", PatchSettings(size=args.size)),
        ("50% overlap", PatchSettings(size=args.size, stride=args.size // 2)),
        ("exact histogram", PatchSettings(size=args.size, hist_samples=None)),
    ):
        t = best_of(lambda: extract_patches(stack, channel_names=names, settings=settings), args.repeats)
        tracemalloc.start()
        res = extract_patches(stack, channel_names=names, settings=settings)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        memory = (stack.nbytes + peak) / stack.nbytes
        print(
            f"extract + filter, {label:15s}: {t:.3f} s  ratio {t / base:5.2f} (target <= 4)  "
            f"peak memory {memory:.2f}x stack (target <= 2)  kept {res.n_kept}/{res.n_candidates}"
        )


if __name__ == "__main__":
    main()
