"""Whole-image prediction on a paper-sized stack: preprocessing, end-to-end vs forward-only, bf16 vs fp32, memory.

The stack is synthetic, 100 x 3 x 1364 x 1364 uint16; the model an early-fusion small CNN
(random weights, BN in eval mode). Figures, each with its ratio against a baseline from the
same process:

- preprocessing (Otsu thresholds, percentiles, sparsity filter on that stack) vs ``np.max``
  over the stack; target <= 1 s;
- end-to-end ``predict_images`` (patching, streamed batches, stitching, TIFF/PNG/parquet
  writing) vs the pure model forward over the same number of patches; target <= 1.2;
- the same for bf16 with ``heatmap_resolution="stride"`` (one heat-map pixel per patch cell);
- bf16 autocast vs fp32 forward speed, with the max |probability difference| and the
  decision agreement over every patch;
- peak resident memory during prediction above the resident memory before it, vs the stack.

    python benchmarks/bench_predict.py [--z 100] [--yx 1364] [--size 64] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from cytofuse.io import Image  # noqa: E402
from cytofuse.modelfolder import card_for, read_model_folder, write_model_folder  # noqa: E402
from cytofuse.models import create_model  # noqa: E402
from cytofuse.patches import PatchSettings  # noqa: E402
from cytofuse.predict import ensemble_proba, predict_images, prepare_models, preprocess  # noqa: E402

NAMES = ["mito", "early_endosome", "recycling_endosome"]


def synthetic_stack(z: int, yx: int, seed: int = 0) -> np.ndarray:
    """Dark noisy background with bright cell-sized blobs, as a confocal stack looks."""
    rng = np.random.default_rng(seed)
    stack = rng.integers(90, 130, size=(3, z, yx, yx), dtype=np.uint16)
    for _ in range(12):
        y, x = rng.integers(0, yx - 200, size=2)
        stack[:, :, y : y + 200, x : x + 200] += rng.integers(500, 2000, dtype=np.uint16)
    return stack


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def forward_only(models, n: int, *, size: int, batch: int, bf16: bool) -> float:
    """Seconds for the model forward over ``n`` patches from one ready-made batch (no cutting, no copy)."""
    x = torch.randn(batch, len(NAMES), size, size).contiguous(memory_format=torch.channels_last)
    ensemble_proba(models, x, bf16=bf16)  # warm-up
    t = time.perf_counter()
    for start in range(0, n, batch):
        ensemble_proba(models, x[: min(batch, n - start)], bf16=bf16)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--z", type=int, default=100)
    parser.add_argument("--yx", type=int, default=1364)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    stack = synthetic_stack(args.z, args.yx)
    image = Image(stack, tuple(NAMES), source="bench.tif")
    stack_mb = stack.nbytes / 2**20
    torch.manual_seed(0)
    model = create_model("early", in_channels=3, num_classes=2, encoder="smallcnn").eval()
    settings = PatchSettings(size=args.size, min_ratio=0.05)
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    card = card_for([model], class_names=["a", "b"], channel_names=NAMES, patches=settings)
    folder = write_model_folder(work / "model", [model], card)
    models, card = read_model_folder(folder)
    models = prepare_models(models)

    t_max = min(timed(lambda: stack.max())[0] for _ in range(3))
    t_pre, res = min((timed(lambda: preprocess(stack, card)) for _ in range(2)), key=lambda r: r[0])
    n = len(res.origins)
    print(f"stack {stack.shape} uint16 ({stack_mb:.0f} MB); {n} kept patches of {args.size} px "
          f"out of {res.n_candidates}; torch threads {torch.get_num_threads()}")
    print(f"preprocessing        {t_pre:7.2f} s   np.max {t_max:.2f} s   ratio {t_pre / t_max:5.2f}   "
          f"(target <= 1 s: {'ok' if t_pre <= 1 else 'MISSED'})")

    t_fwd32 = forward_only(models, n, size=args.size, batch=args.batch, bf16=False)
    t_fwd16 = forward_only(models, n, size=args.size, batch=args.batch, bf16=True)
    runs = {}
    for precision in ("fp32", "bf16"):
        reset_peak()
        before = rss_mb("VmRSS")
        t, _ = timed(lambda p=precision: predict_images(folder, [image], out=work / p, batch_size=args.batch,
                                                       progress=False, precision=p))
        runs[precision] = (t, rss_mb("VmHWM") - before)
    for precision, fwd in (("fp32", t_fwd32), ("bf16", t_fwd16)):
        t, peak = runs[precision]
        print(f"end-to-end {precision}      {t:7.2f} s   forward-only {fwd:.2f} s   ratio {t / fwd:5.2f}   "
              f"({n / t:.0f} patches/s; target ratio <= 1.2: {'ok' if t / fwd <= 1.2 else 'MISSED'})")
    print(f"bf16 vs fp32 forward {t_fwd16:7.2f} s   vs {t_fwd32:.2f} s   speed-up {t_fwd32 / t_fwd16:5.2f}x")
    cols = ["prob_a", "prob_b"]
    p32 = pd.read_parquet(work / "fp32" / "patches.parquet")[cols].to_numpy()
    p16 = pd.read_parquet(work / "bf16" / "patches.parquet")[cols].to_numpy()
    agree = float((p32.argmax(1) == p16.argmax(1)).mean())
    print(f"bf16 accuracy        max |prob diff| {np.abs(p32 - p16).max():.4f}   mean {np.abs(p32 - p16).mean():.5f}   "
          f"patch decision agreement {agree:.4f}   (probability range {p32[:, 0].min():.3f}-{p32[:, 0].max():.3f})")
    t_stride, _ = timed(lambda: predict_images(folder, [image], out=work / "stride", batch_size=args.batch,
                                               progress=False, precision="bf16", heatmap_resolution="stride"))
    print(f"end-to-end bf16, heatmap_resolution='stride' {t_stride:7.2f} s   ratio {t_stride / t_fwd16:5.2f}   "
          f"(target ratio <= 1.2: {'ok' if t_stride / t_fwd16 <= 1.2 else 'MISSED'})")
    for precision, (t, peak) in runs.items():
        print(f"peak memory {precision}     {peak:7.0f} MB above the resident set before predict   "
              f"stack {stack_mb:.0f} MB   ratio {peak / stack_mb:5.2f}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
