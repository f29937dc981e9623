"""glibc allocator thresholds raised by ``cytofuse.runtime.tune_malloc`` against glibc's defaults.

The same short CPU training loop runs in two child processes, one after the other: one as
cytofuse sets it up on import (mmap and trim thresholds at 1 GiB), one with
``CYTOFUSE_MALLOPT=0`` (glibc's defaults: large blocks are fresh ``mmap`` pages, unmapped
on ``free``). The loop: a smallcnn early-fusion model, batches of ``--batch`` random
3-channel ``--size`` px patches stacked by a DataLoader from an in-memory data set, a random
flip, class-weighted cross-entropy, Adam; ``--steps`` timed steps after ``--warmup`` steps.

Printed per child: wall, user and system time and minor page faults (``resource.getrusage``
of the children, whole process), the loop's steps/s, the peak RSS (``ru_maxrss``, reported
by the child itself) and, for the tuned child, ratios against the default one. The tuned
peak grows by the holes that large blocks leave in the heap: it is printed in MiB, as a
share of the default peak and in input batches. At 400 px and batch 32 one step of
smallcnn holds ~3 GiB of activations and takes 5-15 s on the 2-core reference machine,
so the default run is short (~2 min); ``--steps 24`` gives steadier numbers (~8 min).

    python benchmarks/bench_alloc.py [--steps 3] [--warmup 1] [--size 400] [--batch 32] [--threads 2]
"""

from __future__ import annotations

import argparse
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

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.flip(x, dims=(2,)) if torch.rand(()) < 0.5 else torch.flip(x, dims=(3,))
        optimiser.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, weight=weights).backward()
        optimiser.step()

    batches = (b for _ in iter(int, 1) for b in loader)  # endless
    for _ in range(warmup):
        step(*next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    seconds = time.perf_counter() - start
    return {"steps_per_s": steps / seconds, "loop_s": seconds, "tuning": tune_malloc().reason,
            "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def run_child(args: argparse.Namespace, *, tuned: bool) -> dict:
    """One child process; getrusage of the children before and after it gives its times and faults."""
    env = {k: v for k, v in os.environ.items() if k not in ("CYTOFUSE_MALLOPT", "MALLOC_MMAP_THRESHOLD_",
                                                              "MALLOC_TRIM_THRESHOLD_")}
    if not tuned:
        env["CYTOFUSE_MALLOPT"] = "0"
    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads)]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"child ({'tuned' if tuned else 'default'}) failed:\n{proc.stderr}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "minflt": after.ru_minflt - before.ru_minflt}


def report(default: dict, tuned: dict, args: argparse.Namespace) -> None:
    batch_mib = args.batch * CHANNELS * args.size**2 * 4 / 2**20
    print(f"training loop: smallcnn early fusion, {args.steps} steps of batch {args.batch} x {CHANNELS} x "
          f"{args.size} x {args.size} float32 ({batch_mib:.0f} MiB per batch), {args.threads} threads")
    print(f"{'allocator':<22}{'wall s':>9}{'user s':>9}{'sys s':>9}{'minor faults':>14}{'steps/s':>9}{'peak RSS MiB':>14}")
    for name, r in (("glibc default", default), ("cytofuse (1 GiB)", tuned)):
        print(f"{name:<22}{r['wall_s']:>9.1f}{r['user_s']:>9.1f}{r['sys_s']:>9.1f}{r['minflt']:>14,}"
              f"{r['steps_per_s']:>9.2f}{r['maxrss_kib'] / 1024:>14.0f}")
    ratio = {k: tuned[k] / max(default[k], 1e-9) for k in ("wall_s", "user_s", "sys_s", "minflt", "maxrss_kib")}
    print(f"{'cytofuse / default':<22}{ratio['wall_s']:>9.2f}{ratio['user_s']:>9.2f}{ratio['sys_s']:>9.2f}"
          f"{ratio['minflt']:>14.3f}{tuned['steps_per_s'] / default['steps_per_s']:>9.2f}{ratio['maxrss_kib']:>14.2f}")
    grown = (tuned["maxrss_kib"] - default["maxrss_kib"]) / 1024
    print(f"peak RSS grows by {grown:+.0f} MiB ({100 * grown / (default['maxrss_kib'] / 1024):+.0f} % of the default "
          f"peak, {grown / batch_mib:+.1f} input batches); system time "
          f"{100 * tuned['sys_s'] / tuned['user_s']:.0f} % of user time (default {100 * default['sys_s'] / default['user_s']:.0f} %)")
    print(f"children said: tuned: {tuned['tuning']!r}; default: {default['tuning']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per child")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps before them")
    parser.add_argument("--size", type=int, default=400, help="patch side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_loop(steps=args.steps, warmup=args.warmup, size=args.size, batch=args.batch,
                                    threads=args.threads)))
        return
    default = run_child(args, tuned=False)
    tuned = run_child(args, tuned=True)
    report(default, tuned, args)


if __name__ == "__main__":
    main()
