"""Peak memory of patching and predicting an OME-Zarr image, against the image's size.

A synthetic (C, Z, Y, X) = (3, ``--z``, ``--size``, ``--size``) uint16 stack (noise and blobs, one
chunk per plane) is written as OME-Zarr (NGFF 0.4) and as an uncompressed OME-TIFF, with a 4-slice copy
of each for warming up. Each case runs in a fresh child process: it runs the same case on the small
copy first (imports, compiled kernels, thread pools, allocator pools), resets the kernel's high-water
mark of its resident memory, and then runs the case on the stack:

- patch: the patch stage (``build_patch_index``: Otsu thresholds, percentiles, foreground ratios,
  duplicate check) of the image;
- predict: ``predict_images`` of the image with a smallcnn early-fusion model folder (64 px patches,
  heat maps streamed to disk as OME-Zarr for the Zarr image, OME-TIFF for the TIFF).

Printed: the peak resident memory during the case above the resident memory just before it, and that
over the stack's size in memory (C x Z x Y x X x 2 bytes); also the child's whole peak. Target for
OME-Zarr: well below 1 (the stages read a z-slice, or the patches of one, at a time; a few decoded
z-blocks are cached). The OME-TIFF rows are the comparison: its patch stage holds the whole stack in
memory, and prediction memory-maps the uncompressed file (mapped pages count as resident).

    python benchmarks/bench_zarr.py [--z 40] [--size 1364] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHANNELS = ["mito", "endo", "nucleus"]


def make_stack(z: int, size: int, seed: int = 0):
    """(3, z, size, size) uint16: noise plus 40 Gaussian blobs per slice and channel, drawn in local windows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data = rng.integers(90, 130, (3, z, size, size), dtype=np.uint16)
    r = 24
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    for c in range(3):
        blob = (2500 * np.exp(-(yy**2 + xx**2) / (2 * (5 + 3 * c) ** 2))).astype(np.uint16)
        for k in range(z):
            for cy, cx in rng.integers(r, size - r - 1, (40, 2)):
                data[c, k, cy - r : cy + r + 1, cx - r : cx + r + 1] += blob
    return data


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_case(case: str, image: str, model: str, out: str, fmt: str) -> int:
    """Patches of ``image`` kept by the patch stage or predicted."""
    from cytofuse.inference.modelfolder import read_card

    if case == "patch":
        from cytofuse.io.imagesets import ImageSet
        from cytofuse.preprocess.patches import build_patch_index

        csv = Path(out).with_suffix(".csv")
        csv.write_text(f"path,label\n{image},a\n")
        index = build_patch_index(ImageSet.from_manifest(csv), read_card(model).recipe.settings, out, progress=False)
        return int(len(index.patches))
    from cytofuse.inference.predict import predict_images

    summary = predict_images(model, [image], out=out, progress=False, heatmap_format=fmt)
    return int(summary["patches"].iloc[0])


def child(case: str, image: str, warm: str, model: str, out: str, threads: int, fmt: str) -> dict:
    import gc

    import torch

    torch.set_num_threads(threads)
    run_case(case, warm, model, out + "_warm", fmt)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident memory
    before = rss_mib("VmRSS")
    patches = run_case(case, image, model, out, fmt)
    return {"patches": patches, "above_mib": rss_mib("VmHWM") - before, "before_mib": before}


def measure(args: list[str], log: Path) -> tuple[float, float, dict]:
    """Run this script as a child with ``args``; its peak RSS (MiB), wall time (s) and JSON answer."""
    start = time.perf_counter()
    with open(log, "w") as out:
        env = {"OMP_WAIT_POLICY": "PASSIVE"} | dict(os.environ)  # see bench_train.py: spinning threads on busy cores
        proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child {args} failed:\n{text[-3000:]}")
    return usage.ru_maxrss / 1024, elapsed, json.loads(text.strip().splitlines()[-1])


def write_inputs(tmp: Path, z: int, size: int, name: str = "stack") -> tuple[dict[str, Path], Path, int]:
    import torch

    from cytofuse.inference.modelfolder import card_for, write_model_folder
    from cytofuse.io.readers import Image, write_ome_tiff
    from cytofuse.io.zarr import write_ome_zarr
    from cytofuse.models import create_model
    from cytofuse.preprocess.patches import PatchSettings

    stack = make_stack(z, size)
    images = {"ome-zarr": write_ome_zarr(tmp / f"{name}.ome.zarr", stack, channel_names=CHANNELS,
                                         pixel_size_um=(1.0, 0.2, 0.2)),
              "tiff": write_ome_tiff(tmp / f"{name}.ome.tif", Image(stack, tuple(CHANNELS), (1.0, 0.2, 0.2)))}
    torch.manual_seed(0)
    model = create_model("early", in_channels=3, num_classes=2, encoder="smallcnn").eval()
    card = card_for([model], class_names=["control", "treated"], channel_names=CHANNELS,
                    patches=PatchSettings(size=64, stride=64, min_ratio=0.05))
    return images, write_model_folder(tmp / f"model_{name}", [model], card), stack.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--z", type=int, default=40, help="z-slices of the stack")
    parser.add_argument("--size", type=int, default=1364, help="Y = X of the stack")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        case, image, warm, model, out, fmt = args.child
        print(json.dumps(child(case, image, warm, model, out, args.threads, fmt)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_zarr_") as tmp:
        tmp = Path(tmp)
        images, model, nbytes = write_inputs(tmp, args.z, args.size)
        warm, _, _ = write_inputs(tmp, 4, args.size, name="warm")
        mib = nbytes / 2**20
        disk = sum(f.stat().st_size for f in images["ome-zarr"].rglob("*") if f.is_file()) / 2**20
        print(f"stack (3, {args.z}, {args.size}, {args.size}) uint16: {mib:.0f} MiB in memory, {disk:.0f} MiB as "
              f"OME-Zarr on disk; {args.threads} threads")
        for fmt, image in images.items():
            for case in ("patch", "predict"):
                out = str(tmp / f"{case}_{fmt}")
                peak, wall, answer = measure([case, str(image), str(warm[fmt]), str(model), out, fmt], tmp / "child.log")
                above = answer["above_mib"]
                print(f"{fmt:8s} {case:8s} {answer['patches']:6d} patches: peak {above:6.0f} MiB above the "
                      f"{answer['before_mib']:4.0f} MiB before = {above / mib:5.2f} x the stack   "
                      f"(child's whole peak {peak:5.0f} MiB, {wall:5.1f} s with warm-up)")


if __name__ == "__main__":
    main()
