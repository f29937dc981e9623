"""Whole-image prediction on a paper-sized stack: preprocessing, end-to-end vs forward-only, bf16 vs fp32, memory.

The stack is synthetic, 100 x 3 x 1364 x 1364 uint16, written once to an uncompressed OME-TIFF
so that end-to-end runs include reading the file; the model is an early-fusion small CNN
(random weights, BN in eval mode). Figures, each with its ratio against a baseline from the
same process; the end-to-end ratios are repeated ``--reps`` times, each against a forward-only
run just before it (the machine's speed drifts), and the median is printed:

- preprocessing (Otsu thresholds, percentiles, sparsity filter on that stack) vs ``np.max``
  over the stack; target <= 1 s;
- end-to-end ``predict_images`` on the file (reading, patching, streamed batches, stitching,
  TIFF/PNG/parquet writing) vs the pure model forward over the same number of patches with
  the same threading (``workers`` batches side by side, or ``workers=0``: torch's intra-op
  threads), for fp32 and bf16 with the default stride-resolution heat maps, and for bf16
  with full-resolution heat maps and with ``workers=0``; target <= 1.2;
- three images in one call (bf16, stride heat maps), with and without ``read_ahead`` (the next
  image read and preprocessed while the model runs), from the uncompressed file (memory-mapped,
  so reading costs almost nothing) and from a zlib-compressed tiled copy (decoding is slow);
- the forward with batches side by side vs intra-op threads, and bf16 autocast vs fp32, with
  the max |probability difference| and the decision agreement over every patch;
- system time / user time (``getrusage`` of the process) of each end-to-end case and forward;
- peak resident memory during prediction above the resident memory before it, vs the stack.

    python benchmarks/bench_predict.py [--z 100] [--yx 1364] [--size 64] [--batch 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from bench_patches import synthetic_stack  # noqa: E402  (benchmarks/ is on the path of its scripts)
from cytofuse.io.readers import Image, write_ome_tiff  # noqa: E402
from cytofuse.inference.modelfolder import card_for, read_model_folder, write_model_folder  # noqa: E402
from cytofuse.models import create_model  # noqa: E402
from cytofuse.preprocess.patches import PatchSettings  # noqa: E402
from cytofuse.inference.predict import ensemble_proba, predict_images, prepare_models, preprocess  # noqa: E402
from cytofuse.inference.threads import default_workers, in_order, single_threaded_ops  # noqa: E402

NAMES = ["mito", "early_endosome", "recycling_endosome"]


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> np.ndarray:
    """User and system CPU seconds of this process so far (all threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return np.array([r.ru_utime, r.ru_stime])


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def forward_only(models, n: int, *, size: int, batch: int, bf16: bool, workers: int, tta: bool = False) -> float:
    """Seconds for the model forward over ``n`` patches from one ready-made batch (no cutting, no copy),
    threaded as predict threads it: ``workers`` batches side by side with one intra-op thread each
    (0: one batch at a time, torch's own intra-op threads). The batch starts on the CPU, as a cut batch
    does, and moves to the models' device in each call."""
    x = torch.randn(batch, len(NAMES), size, size).contiguous(memory_format=torch.channels_last)

    def run(start: int) -> np.ndarray:
        return ensemble_proba(models, x[: min(batch, n - start)], bf16=bf16, tta=tta)

    with single_threaded_ops(workers > 0):
        for _ in in_order(run, range(0, min(n, 4 * batch * max(workers, 1)), batch), workers):  # warm-up
            pass
        t = time.perf_counter()
        for _ in in_order(run, range(0, n, batch), workers):
            pass
        return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--z", type=int, default=100)
    parser.add_argument("--yx", type=int, default=1364)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--encoder", default="smallcnn", help="e.g. resnet50 with --fusion intermediate --size 350: "
                        "the paper's model")
    parser.add_argument("--fusion", default="early", choices=["early", "intermediate", "late"])
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where the model runs (forward and predict)")
    parser.add_argument("--tta", action="store_true", help="the model card asks for test-time augmentation (the "
                        "mean over the 8 dihedral transforms; the forward baseline runs them too)")
    parser.add_argument("--cases", nargs="+", default=None,
                        help="only these end-to-end cases, by name (e.g. 'bf16' 'bf16, workers=0 (intra-op threads)')")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    stack = synthetic_stack(args.z, args.yx)
    stack_mb = stack.nbytes / 2**20
    path = write_ome_tiff(work / "bench.ome.tif", Image(stack, tuple(NAMES)))
    packed = work / "bench_zlib.ome.tif"
    tifffile.imwrite(packed, stack, compression="zlib", compressionargs={"level": 1}, tile=(256, 256), ome=True,
                     metadata={"axes": "CZYX", "Channel": {"Name": NAMES}})
    torch.manual_seed(0)
    model = create_model(args.fusion, in_channels=3, num_classes=2, encoder=args.encoder).eval()
    settings = PatchSettings(size=args.size, min_ratio=0.05)
    card = card_for([model], class_names=["a", "b"], channel_names=NAMES, patches=settings, tta=args.tta)
    folder = write_model_folder(work / "model", [model], card)
    models, card = read_model_folder(folder)
    models = prepare_models(models, device=args.device)

    t_max = min(timed(lambda: stack.max())[0] for _ in range(3))
    t_pre, res = min((timed(lambda: preprocess(stack, card)) for _ in range(2)), key=lambda r: r[0])
    n = len(res.origins)
    del stack, res
    print(f"stack {(3, args.z, args.yx, args.yx)} uint16 ({stack_mb:.0f} MB, read from an OME-TIFF in every run; "
          f"zlib copy {packed.stat().st_size / 2**20:.0f} MB); "
          f"{n} kept patches of {args.size} px; {args.encoder} {args.fusion} fusion on {args.device}"
          f"{', TTA x8' if args.tta else ''}; torch threads {torch.get_num_threads()}")
    print(f"preprocessing        {t_pre:7.2f} s   np.max {t_max:.2f} s   ratio {t_pre / t_max:5.2f}   "
          f"(target <= 1 s: {'ok' if t_pre <= 1 else 'MISSED'})")

    def predict(out: str, paths: list, **kw) -> tuple[float, float]:
        shutil.rmtree(work / out, ignore_errors=True)
        reset_peak()
        before, cpu0 = rss_mb("VmRSS"), cpu_s()
        t, _ = timed(lambda: predict_images(folder, paths, out=work / out, batch_size=args.batch, progress=False,
                                            device=args.device, **kw))
        cpu[out] = cpu.get(out, 0) + cpu_s() - cpu0
        return t, rss_mb("VmHWM") - before

    w = default_workers()
    cpu: dict[str, np.ndarray] = {}  # user, system seconds summed over the repetitions, per case / forward
    cases = {  # name: (precision, workers, images (negative: the compressed file), keyword arguments)
        "fp32": ("fp32", w, 1, {}),
        "bf16": ("bf16", w, 1, {}),
        "bf16, full-resolution heat maps": ("bf16", w, 1, {"heatmap_resolution": "full"}),
        "bf16, workers=0 (intra-op threads)": ("bf16", 0, 1, {}),
        "3 images, bf16": ("bf16", w, 3, {}),
        "3 images, bf16, read_ahead": ("bf16", w, 3, {"read_ahead": True}),
        "3 zlib images, bf16": ("bf16", w, -3, {}),
        "3 zlib images, bf16, read_ahead": ("bf16", w, -3, {"read_ahead": True}),
    }
    if args.cases:
        unknown = sorted(set(args.cases) - set(cases))
        if unknown:
            raise SystemExit(f"--cases: unknown {unknown}; the cases are {list(cases)}")
        cases = {name: case for name, case in cases.items() if name in args.cases}
    ratios: dict[str, list[float]] = {c: [] for c in cases}
    per_image: dict[str, list[float]] = {c: [] for c in cases}  # end-to-end seconds per image
    peaks: dict[str, float] = {}
    fwd: dict[tuple[str, int], list[float]] = {(p, k): [] for p, k, _, _ in cases.values()}
    for rep in range(args.reps):
        for (precision, workers), times in fwd.items():
            cpu0 = cpu_s()
            times.append(forward_only(models, n, size=args.size, batch=args.batch, bf16=precision == "bf16",
                                      workers=workers, tta=args.tta))
            key = f"forward {precision} workers={workers}"
            cpu[key] = cpu.get(key, 0) + cpu_s() - cpu0
        for name, (precision, workers, k, kw) in cases.items():
            files = [path] * k if k > 0 else [packed] * -k
            out = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("=", "")
            t, peak = predict(out, files, precision=precision, workers=workers, **kw)
            ratios[name].append(t / (len(files) * fwd[precision, workers][-1]))
            per_image[name].append(t / len(files))
            peaks[name] = max(peak, peaks.get(name, 0.0))
        print(f"  rep {rep + 1}: forward " + ", ".join(f"{p} workers={k} {t[-1]:.2f} s" for (p, k), t in fwd.items())
              + "; ratios " + ", ".join(f"{r[-1]:.2f}" for r in ratios.values()), flush=True)
    print(f"(workers={w}: {w} batches side by side, one intra-op thread each; workers=0: one batch at a time "
          f"over torch's {torch.get_num_threads()} intra-op threads. Each ratio is against the forward threaded "
          "the same way; heat maps at stride resolution unless named)")
    for name, r in ratios.items():
        med = float(np.median(r))
        print(f"end-to-end / forward-only  {name:41s} median {med:5.2f}  (reps {', '.join(f'{x:.2f}' for x in r)}; "
              f"target <= 1.2: {'ok' if med <= 1.2 else 'MISSED'}); {np.median(per_image[name]):.2f} s per image")
    med = {key: float(np.median(t)) for key, t in fwd.items()}
    if ("fp32", w) not in med or ("bf16", w) not in med or ("bf16", 0) not in med:
        print_cpu_and_peaks(cpu, peaks, stack_mb)
        return
    f32, f16, intra = med["fp32", w], med["bf16", w], med["bf16", 0]
    print(f"forward, bf16        workers={w} {f16:6.2f} s   workers=0 {intra:.2f} s   speed-up {intra / f16:5.2f}x (medians)")
    print(f"bf16 vs fp32 forward {f16:7.2f} s   vs {f32:.2f} s   speed-up {f32 / f16:5.2f}x (medians, workers={w})")
    cols = ["prob_a", "prob_b"]
    p32 = pd.read_parquet(work / "fp32" / "patches.parquet")[cols].to_numpy()
    p16 = pd.read_parquet(work / "bf16" / "patches.parquet")[cols].to_numpy()
    agree = float((p32.argmax(1) == p16.argmax(1)).mean())
    print(f"bf16 accuracy        max |prob diff| {np.abs(p32 - p16).max():.4f}   mean {np.abs(p32 - p16).mean():.5f}   "
          f"patch decision agreement {agree:.4f}   (probability range {p32[:, 0].min():.3f}-{p32[:, 0].max():.3f})")
    print_cpu_and_peaks(cpu, peaks, stack_mb)


def print_cpu_and_peaks(cpu: dict, peaks: dict, stack_mb: float) -> None:
    for name, (user, system) in cpu.items():
        print(f"system / user time {name:41s} {system / max(user, 1e-9):6.3f}   (user {user:.1f} s, system {system:.1f} s)")
    for name, peak in peaks.items():
        print(f"peak memory {name:41s} {peak:6.0f} MB above the resident set before predict   "
              f"stack {stack_mb:.0f} MB   ratio {peak / stack_mb:5.2f}")


if __name__ == "__main__":
    main()
