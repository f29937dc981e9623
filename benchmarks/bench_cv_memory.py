"""Peak memory of a 5-fold cross-validation, and how it grows when the data set doubles.

Each run is ``cytofuse.workflows.cv.run_cv`` on synthetic phantoms (``write_synthetic_dataset``:
4 classes, (Z, Y, X) = (4, 128, 128), nucleus excluded, 32 px patches, smallcnn early fusion)
in a fresh child process (with ``OMP_WAIT_POLICY=PASSIVE`` unless set, see bench_train.py);
its peak resident memory is read from ``os.wait4``. The baseline,
measured in the same way, is a child that only imports what a CV imports (torch, lightning,
cytofuse). Printed: the peak of the base data set (``--images`` per class) and of twice as
many images, their ratio (target ~1: patches are memory-mapped and images are read one at a
time, so memory must not grow with the data set), and the ratio of their peaks above the
import baseline, which shows growth more sharply.

    python benchmarks/bench_cv_memory.py [--images 5] [--epochs 2] [--threads 2]
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


def child_floor() -> dict:
    import lightning  # noqa: F401
    import torch  # noqa: F401

    import cytofuse.workflows.cv  # noqa: F401
    import cytofuse.evaluation.metrics  # noqa: F401
    import cytofuse.models  # noqa: F401
    import cytofuse.training.fit  # noqa: F401

    return {}


def child_cv(manifest: str, run_dir: str, *, epochs: int, threads: int) -> dict:
    import torch

    from cytofuse.config import validate_config
    from cytofuse.workflows.cv import run_cv

    torch.set_num_threads(threads)
    cfg = validate_config({
        "data": {"manifest": manifest},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.05, "min_patches": 8, "fallback": "top_k"},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": epochs, "batch_size": 32, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 5},
    }, source="bench_cv_memory")
    result = run_cv(cfg, run_dir, progress=False)
    n_patches = len(next(iter(result.predictions.values())))
    return {"patches": n_patches, "threads": torch.get_num_threads()}


def measure(args: list[str], log: Path) -> tuple[float, float, dict]:
    """Run this script as a child with ``args``; its peak RSS (MiB), wall time (s) and JSON answer."""
    start = time.perf_counter()
    with open(log, "w") as out:
        env = {"OMP_WAIT_POLICY": "PASSIVE"} | dict(os.environ)  # see bench_train.py: spinning threads on busy cores
        proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed with exit code {proc.returncode}:\n{text[-3000:]}")
    answer = json.loads(text.strip().splitlines()[-1])
    return usage.ru_maxrss / 1024, elapsed, answer  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5, help="images per class of the base data set")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        if args.child == ["floor"]:
            answer = child_floor()
        else:
            answer = child_cv(*args.child, epochs=args.epochs, threads=args.threads)
        print(json.dumps(answer))
        return

    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    opts = ["--epochs", str(args.epochs), "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="bench_cv_memory_") as tmp:
        tmp = Path(tmp)
        floor, _, _ = measure(["floor"], tmp / "floor.log")
        print(f"import baseline (torch, lightning, cytofuse): peak RSS {floor:6.0f} MiB")
        peaks = {}
        for n in (args.images, 2 * args.images):
            data = write_synthetic_dataset(tmp / f"data{n}", classes=4, images_per_class=n, shape=(4, 128, 128),
                                           seed=0, progress=False)
            peak, elapsed, answer = measure([str(data / "labels.csv"), str(tmp / f"run{n}"), *opts], tmp / f"cv{n}.log")
            peaks[n] = peak
            print(f"5-fold CV, {4 * n:3d} images, {answer['patches']:5d} patches, {args.epochs} epochs: "
                  f"peak RSS {peak:6.0f} MiB ({peak - floor:5.0f} above baseline), {elapsed:5.1f} s "
                  f"({answer['threads']} torch threads)")
        base, double = peaks[args.images], peaks[2 * args.images]
        print(f"doubled / base peak RSS: {double / base:5.2f} (target ~1, <= 1.1)   "
              f"above baseline: {(double - floor) / max(base - floor, 1.0):5.2f}")


if __name__ == "__main__":
    main()
