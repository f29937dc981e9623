"""glibc allocator settings of ``cytofuse.runtime.tune_malloc`` (and others) against glibc's defaults.

The same short CPU training loop runs in one child process per setting, one after the other:
glibc's defaults (``CYTOFUSE_MALLOPT=0``: blocks above a threshold that grows up to 32 MiB are
fresh ``mmap`` pages, unmapped on ``free``), cytofuse as it sets itself up on import (mmap
threshold 64 MiB, trim threshold 1 GiB), both thresholds at 1 GiB (the speed-first setting a
user can choose with ``MALLOC_*_THRESHOLD_``), and any ``--variant NAME:VAR=VALUE,...`` (e.g.
``MALLOC_ARENA_MAX``, ``THP_MEM_ALLOC_ENABLE=1``, or ``BENCH_ALLOC_TRIM_EVERY=N``: the loop
calls ``malloc_trim(0)`` after every N steps). The loop: a smallcnn early-fusion model,
batches of ``--batch`` random 3-channel ``--size`` px patches stacked by a DataLoader from an
in-memory data set, a random flip, class-weighted cross-entropy, Adam; ``--steps`` timed steps
after ``--warmup`` steps.

Printed per child: wall, user and system time, system / user and minor page faults
(``resource.getrusage`` of the children, whole process), the loop's steps/s, the peak RSS
(``ru_maxrss``, reported by the child itself), its growth against glibc's defaults in MiB, %
and input batches, and the system time as a share of the defaults'; below, glibc's heap after
the loop (``mallinfo2``: size, free bytes inside it, mmapped bytes) and the peak after each
timed step (a peak that still grows means the heap's holes keep growing). At 400 px and batch
32 one step of smallcnn holds ~3.5 GiB and takes 5-15 s on the 2-core reference machine, so
the default run (3 children) takes ~3 min.

    python benchmarks/bench_alloc.py [--steps 3] [--warmup 1] [--size 400] [--batch 32] [--threads 2] [--variant ...]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time

CHANNELS, CLASSES, N_SAMPLES = 3, 4, 64


def train_loop(*, steps: int, warmup: int, size: int, batch: int, threads: int) -> dict:
    """Run the loop in this process; its steps/s, peak RSS (KiB) and cytofuse's allocator status."""
    import cytofuse  # before torch: sets OMP_WAIT_POLICY and the allocator
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from cytofuse.models import create_model
    from cytofuse.runtime import tune_malloc

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    data = np.random.default_rng(0).random((N_SAMPLES, CHANNELS, size, size), dtype=np.float32)
    labels = np.arange(N_SAMPLES) % CLASSES
    samples = [(torch.from_numpy(data[i]), int(labels[i])) for i in range(N_SAMPLES)]
    loader = DataLoader(samples, batch_size=batch, shuffle=True, drop_last=True)
    model = create_model("early", in_channels=CHANNELS, num_classes=CLASSES, encoder="smallcnn")
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights = torch.ones(CLASSES)
    model.train()

    trim_every, done = int(os.environ.get("BENCH_ALLOC_TRIM_EVERY", "0")), [0]
    libc = ctypes.CDLL(None) if trim_every else None

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.flip(x, dims=(2,)) if torch.rand(()) < 0.5 else torch.flip(x, dims=(3,))
        optimiser.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, weight=weights).backward()
        optimiser.step()
        done[0] += 1
        if trim_every and done[0] % trim_every == 0:
            libc.malloc_trim(0)

    batches = (b for _ in iter(int, 1) for b in loader)  # endless
    for _ in range(warmup):
        step(*next(batches))
    start, peaks = time.perf_counter(), []
    for _ in range(steps):
        step(*next(batches))
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    seconds = time.perf_counter() - start
    return {"steps_per_s": steps / seconds, "loop_s": seconds, "tuning": tune_malloc().reason,
            "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "peak_mib_per_step": peaks,
            **heap_mib()}


def heap_mib() -> dict:
    """glibc's ``mallinfo2`` after the loop: heap from sbrk, free bytes inside it, bytes in mmapped blocks (MiB)."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"heap_mib": info.arena / 2**20, "heap_free_mib": info.fordblks / 2**20, "mmapped_mib": info.hblkhd / 2**20}


CLEARED = ("CYTOFUSE_MALLOPT", "BENCH_ALLOC_TRIM_EVERY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
           "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")


def run_child(args: argparse.Namespace, extra_env: dict[str, str]) -> dict:
    """One child process; getrusage of the children before and after it gives its times and faults."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED} | extra_env
    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads)]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"child ({extra_env}) failed:\n{proc.stderr}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "minflt": after.ru_minflt - before.ru_minflt}


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    """One row per variant; ratios, peak growth and system share against the first (glibc's defaults)."""
    batch_mib = args.batch * CHANNELS * args.size**2 * 4 / 2**20
    print(f"training loop: smallcnn early fusion, {args.steps} steps of batch {args.batch} x {CHANNELS} x "
          f"{args.size} x {args.size} float32 ({batch_mib:.0f} MiB per batch), {args.threads} threads")
    (base_name, base), width = next(iter(results.items())), max(22, 2 + max(map(len, results)))
    print(f"{'allocator':<{width}}{'wall s':>8}{'user s':>8}{'sys s':>8}{'sys/user':>9}{'minor faults':>14}"
          f"{'steps/s':>9}{'peak MiB':>10}{'peak growth':>24}{'sys vs base':>12}")
    for name, r in results.items():
        grown = (r["maxrss_kib"] - base["maxrss_kib"]) / 1024
        growth = f"{grown:+.0f} MiB {100 * grown / (base['maxrss_kib'] / 1024):+.0f}% {grown / batch_mib:+.1f} b"
        print(f"{name:<{width}}{r['wall_s']:>8.1f}{r['user_s']:>8.1f}{r['sys_s']:>8.1f}"
              f"{r['sys_s'] / max(r['user_s'], 1e-9):>9.2f}{r['minflt']:>14,}{r['steps_per_s']:>9.3f}"
              f"{r['maxrss_kib'] / 1024:>10.0f}{growth:>24}{r['sys_s'] / max(base['sys_s'], 1e-9):>12.2f}")
    print(f"(peak growth against {base_name!r}: MiB, % of its peak, input batches of {batch_mib:.0f} MiB; "
          "targets: sys/user <= 0.10, growth <= a few batches)")
    for name, r in results.items():
        heap = (f"; after the loop: heap {r['heap_mib']:.0f} MiB of which {r['heap_free_mib']:.0f} free, "
                f"{r['mmapped_mib']:.0f} MiB mmapped" if "heap_mib" in r else "")
        heap += f"; peak MiB after each timed step {r['peak_mib_per_step']}"
        print(f"  {name}: {r['env'] or 'no variables'}; cytofuse said {r['tuning']!r}{heap}")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:VAR=VALUE,VAR=VALUE`` (values may not contain commas)."""
    name, _, assignments = text.partition(":")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return name, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per child")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps before them")
    parser.add_argument("--size", type=int, default=400, help="patch side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME:VAR=VALUE,...",
                        help="a further child with these environment variables (repeatable), e.g. "
                             "'mmap 256M:MALLOC_MMAP_THRESHOLD_=268435456'")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_loop(steps=args.steps, warmup=args.warmup, size=args.size, batch=args.batch,
                                    threads=args.threads)))
        return
    one_gib = str(1 << 30)
    variants = [("glibc default", {"CYTOFUSE_MALLOPT": "0"}), ("cytofuse", {}),
                ("mmap+trim 1 GiB", {"MALLOC_MMAP_THRESHOLD_": one_gib, "MALLOC_TRIM_THRESHOLD_": one_gib}),
                *args.variant]
    results = {}
    for name, env in variants:
        results[name] = run_child(args, env) | {"env": ", ".join(f"{k}={v}" for k, v in env.items())}
        print(f"  {name}: {results[name]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
