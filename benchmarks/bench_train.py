"""Training throughput of ``cytofuse.training.fit.fit`` against a plain PyTorch loop, and loader throughput.

1. ``fit`` (Lightning) against a hand-written ``for x, y in loader: loss.backward(); opt.step()``
   loop on the same model class and initial weights, data, batch size, Adam with the same
   staircase decay, class-weighted cross-entropy and batch augmentation. Throughput is
   patches/s of the fastest whole epoch after the first (warm-up) over ``--repeats`` runs; each
   side also validates every epoch, and ``fit`` also writes its checkpoints and history as it
   always does. The two sides alternate. Target: fit / plain >= 0.9.
2. The training DataLoader that ``fit`` builds (augmenting collate, no model) for 0, 1 and
   2 worker processes, against the training throughput of (1). Target: loader / training >= 3.

The data are ``--patches`` random patches (3 channels, ``--size`` px) in a float16 patch
cache built by ``build_patch_cache``, as ``run_cv`` builds it. torch uses ``--threads``
intra-op threads (2 by default, the cores of the reference machine). ``OMP_WAIT_POLICY``
defaults to PASSIVE here: on a machine whose cores are busy with other work, OpenMP threads
that spin while waiting made a 2-thread training step ~9x slower than 1 thread (measured on
the 2-core reference machine), which would drown what is measured. Set it to ACTIVE to see.

    python benchmarks/bench_train.py [--patches 1024] [--size 64] [--epochs 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP: see the docstring

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cytofuse.training.cache import Augment, AugmentCollate, PatchDataset, build_patch_cache, class_weights
from cytofuse.models import create_model
from cytofuse.training.fit import TrainSettings, _loaders, fit

CHANNELS = ["mito", "early_endosome", "recycling_endosome"]
NUM_CLASSES = 4


# --------------------------------------------------------------------------- data


def random_cache(folder: Path, *, n_patches: int, size: int, seed: int = 0):
    """A patch cache of about ``n_patches`` random patches from (3, 4, 4*size, 4*size) images."""
    per_image = 4 * 16
    n_images = max(1, -(-n_patches // per_image))
    rows, stats = [], []
    for i in range(n_images):
        for z in range(4):
            for y in range(4):
                for x in range(4):
                    rows.append({"patch_id": len(rows), "image_id": f"img{i}", "z": z, "y": y * size, "x": x * size,
                                 "size": size, "label": len(rows) % NUM_CLASSES})
        stats.append({"image_id": f"img{i}"} | {f"{p}_{c}": v for c in CHANNELS for p, v in (("lo", 0.0), ("hi", 1.0))})
    index = pd.DataFrame(rows).iloc[:n_patches]

    def load(image_id: str) -> np.ndarray:
        rng = np.random.default_rng([seed, int(image_id[3:])])
        return rng.random((len(CHANNELS), 4, 4 * size, 4 * size), dtype=np.float32)

    cache = build_patch_cache(index, pd.DataFrame(stats), load_image=load, channels=CHANNELS, out=folder,
                              progress=False)
    return cache, index["label"].to_numpy()


def datasets(cache, labels: np.ndarray, n_val: int) -> tuple[PatchDataset, PatchDataset]:
    rows = np.arange(len(cache))
    train = PatchDataset(cache, rows, labels)
    val = PatchDataset(cache, rows[:n_val], labels[:n_val])
    return train, val


def new_model(seed: int = 0, encoder: str = "smallcnn"):
    torch.manual_seed(seed)
    return create_model("intermediate", in_channels=len(CHANNELS), num_classes=NUM_CLASSES, encoder=encoder)


# --------------------------------------------------------------------------- the two training paths


class EpochClock(L.Callback):
    """Wall time of each whole epoch (training, validation, checkpoints) and of its training part."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.train_parts: list[float] = []
        self.threads = 0
        self.step_cpu = np.zeros(2)  # user, system seconds inside the training steps (batch start to end)
        self.val_cpu = np.zeros(2)  # and inside the validation epochs

    def _cpu(self) -> np.ndarray:
        return np.array(_cpu_times())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = self._cpu()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_cpu += self._cpu() - self._batch

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_cpu += self._cpu() - self._val

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val = self._cpu()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.threads = torch.get_num_threads()
        _sync()
        self._start = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            _sync()
            self.train_parts.append(time.perf_counter() - self._start)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _sync()
        self.epochs.append(time.perf_counter() - self._start)


def _sync() -> None:
    """Wait for queued GPU work, so that wall clocks measure it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_fit(train_ds, val_ds, settings: TrainSettings, out_dir: Path, encoder: str = "smallcnn") -> EpochClock:
    clock = EpochClock()
    fit(new_model(encoder=encoder), train_ds, val_ds, settings=settings, out_dir=out_dir, resume=False, callbacks=[clock])
    return clock


def run_plain(train_ds, val_ds, settings: TrainSettings, *, fast: bool = True, encoder: str = "smallcnn") -> EpochClock:
    """The same training by hand: loader, weighted loss, optimiser and schedule, a validation pass per epoch.

    fast: the recipe's CPU path (bf16 autocast where ``precision: auto`` picks it, channels_last,
    fused AdamW, the weight average updated every step and validated); otherwise the previous
    path: fp32, contiguous memory, Adam with its default multi-tensor update, no weight average.
    """
    from cytofuse.training.fit import eval_device, resolve_precision

    L.seed_everything(settings.seed, verbose=False)
    device = eval_device(settings)
    model = new_model(encoder=encoder)
    bf16 = fast and resolve_precision(settings) == "bf16-mixed"
    fmt = torch.channels_last if fast else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    ema = [p.detach().clone() for p in model.parameters()] if fast else None
    weight = torch.as_tensor(class_weights(train_ds.labels, NUM_CLASSES)).to(device)
    collate = AugmentCollate(settings.augment)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=settings.batch_size, shuffle=True, collate_fn=collate)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=settings.batch_size)
    if fast:
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, fused=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    total = settings.max_epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + np.cos(np.pi * min(1.0, step / total))))
    clock = EpochClock()
    for _ in range(settings.max_epochs):
        _sync()
        start = time.perf_counter()
        model.train()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x.contiguous(memory_format=fmt)).float(), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 0.01)
        _sync()
        clock.train_parts.append(time.perf_counter() - start)
        model.eval()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            correct = sum(int((model(x.to(device).contiguous(memory_format=fmt)).argmax(1).cpu() == y).sum())
                          for x, y in val_loader)
        assert 0 <= correct <= len(val_ds)
        clock.epochs.append(time.perf_counter() - start)
    return clock


def best_throughput(n: int, clocks: list[EpochClock], part: str) -> float:
    """Patches per second of the fastest epoch after the first, over all runs (load bursts only slow)."""
    return n / min(t for clock in clocks for t in getattr(clock, part)[1:])


# --------------------------------------------------------------------------- loader


def loader_throughput(train_ds, val_ds, settings: TrainSettings, *, epochs: int) -> float:
    """Patches/s of iterating the training loader ``fit`` builds, best epoch after the first."""
    loader, _ = _loaders(train_ds, val_ds, settings)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        times.append(time.perf_counter() - start)
    del loader  # shuts down persistent workers
    return n / min(times[1:])


# --------------------------------------------------------------------------- table over sizes and encoders

TABLE = [(40, "smallcnn"), (64, "smallcnn"), (128, "smallcnn"), (64, "resnet18"), (128, "resnet18"),
         (350, "smallcnn"), (350, "resnet18"), (350, "resnet50")]


def _cpu_times() -> tuple[float, float]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def table_row(tmp: Path, size: int, encoder: str, *, batch: int, epochs: int, threads: int, device: str = "cpu",
              precision: str = "auto", patches: int | None = None) -> dict:
    """fit against the bare forward + backward + optimiser step (the recipe's path on ``device``) on the same
    batches."""
    n = patches or max(2 * batch, min(1024, int(2 * batch * (128 / size) ** 2 * (4 if encoder == "smallcnn" else 1))))
    cache, labels = random_cache(tmp / f"cache_{size}", n_patches=n, size=size)
    train_ds, val_ds = datasets(cache, labels, batch)
    settings = TrainSettings(max_epochs=epochs, batch_size=batch, accelerator="gpu" if device == "cuda" else "cpu",
                             precision=precision, progress=False, augment=Augment())
    u0, s0 = _cpu_times()
    fits = [run_fit(train_ds, val_ds, settings, tmp / f"fit_{size}_{encoder}", encoder=encoder)]
    u1, s1 = _cpu_times()
    bare = [run_plain(train_ds, val_ds, settings, encoder=encoder)]
    f, b = best_throughput(len(train_ds), fits, "train_parts"), best_throughput(len(train_ds), bare, "train_parts")
    (su, ss), (vu, vs) = fits[0].step_cpu, fits[0].val_cpu
    from cytofuse.training.fit import resolve_precision

    return {"size": size, "encoder": f"{encoder} x3 (intermediate)", "device": device,
            "precision": resolve_precision(settings), "patches": len(train_ds), "fit img/s": round(f, 1),
            "bare img/s": round(b, 1), "fit / bare": round(f / b, 2),
            "sys / user (fit)": round((s1 - s0) / max(u1 - u0, 1e-9), 3),
            "sys / user (steps)": round(ss / max(su, 1e-9), 3),
            "sys / user (rest)": round((s1 - s0 - ss - vs) / max(u1 - u0 - su - vu, 1e-9), 3),
            "rest user+sys s": round(u1 - u0 - su - vu + s1 - s0 - ss - vs, 1)}


def print_table(args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_train_table_") as tmp:
        rows = []
        for size, encoder in TABLE:
            if size > args.max_size or (args.sizes and size not in args.sizes) or (
                    args.encoders and encoder not in args.encoders):
                continue
            rows.append(table_row(Path(tmp), size, encoder, batch=args.batch, epochs=args.epochs, threads=args.threads,
                                  device=args.device, precision=args.precision, patches=args.table_patches))
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
        print("\n" + pd.DataFrame(rows).to_string(index=False))
        print("targets: fit / bare >= 0.9, sys / user <= 0.10")


# --------------------------------------------------------------------------- profile of one training step

PHASES = ("loader (collate + augmentation)", "forward + loss", "backward", "optimiser step + EMA")
OP_GROUPS = [  # (label, predicate on a torch.profiler op name); first match wins
    ("conv backward", lambda n: "convolution_backward" in n or "mkldnn_convolution_backward" in n),
    ("conv forward", lambda n: n in ("aten::conv2d", "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution")),
    ("batch norm fwd+bwd", lambda n: "batch_norm" in n),
    ("optimiser", lambda n: n.startswith("Optimizer.step") or "adam" in n.lower() or n.startswith("aten::_foreach")),
    ("relu / pool / add fwd+bwd", lambda n: any(k in n for k in ("relu", "threshold", "pool", "aten::add"))),
]


def _rusage() -> tuple[float, float, float, int]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def profile_step(args) -> None:
    """Wall, user, system time and minor faults per phase of the bare training step (the recipe's CPU
    path, as in ``run_plain``), torch.profiler's self CPU time of one step grouped by kind of op, and
    Lightning's overhead (``fit``'s training time per step minus the bare step's)."""
    from torch.profiler import ProfilerActivity, profile

    from cytofuse.training.fit import resolve_precision

    n = args.batch * (args.profile_steps + 1)
    with tempfile.TemporaryDirectory(prefix="bench_train_profile_") as tmp:
        cache, labels = random_cache(Path(tmp) / "cache", n_patches=n, size=args.size)
        train_ds, val_ds = datasets(cache, labels, args.batch)
        settings = TrainSettings(max_epochs=2, batch_size=args.batch, accelerator="cpu", progress=False,
                                 augment=Augment())
        bf16 = resolve_precision(settings) == "bf16-mixed"
        model = new_model(encoder=args.encoder).to(memory_format=torch.channels_last)
        ema = [p.detach().clone() for p in model.parameters()]
        weight = torch.as_tensor(class_weights(train_ds.labels, NUM_CLASSES))
        loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch, shuffle=True,
                                             collate_fn=AugmentCollate(settings.augment), drop_last=True)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, fused=True)
        model.train()
        totals = {phase: np.zeros(4) for phase in PHASES}

        def step(batches, record: bool) -> None:
            marks = [_rusage()]
            x, y = next(batches)
            x = x.contiguous(memory_format=torch.channels_last)
            marks.append(_rusage())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float(), y, weight=weight)
            marks.append(_rusage())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            marks.append(_rusage())
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 0.01)
            marks.append(_rusage())
            if record:
                for phase, a, b in zip(PHASES, marks, marks[1:]):
                    totals[phase] += np.subtract(b, a)

        batches = iter(loader)
        step(batches, record=False)  # warm-up: oneDNN primitives, first-touch of the heap
        for _ in range(args.profile_steps - 1):
            step(batches, record=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batches, record=True)
        recorded = args.profile_steps
        bare_step = sum(t[0] for t in totals.values()) / recorded

        groups: dict[str, float] = {}
        for event in prof.key_averages():
            label = next((g for g, match in OP_GROUPS if match(event.key)), "other ops")
            groups[label] = groups.get(label, 0.0) + event.self_cpu_time_total / 1e6
        clock = run_fit(train_ds, val_ds, settings, Path(tmp) / "fit", encoder=args.encoder)
        fit_step = clock.train_parts[-1] / len(loader)

    print(f"one training step: {args.encoder} x3 intermediate fusion, {args.size} px, batch {args.batch}, "
          f"precision {'bf16-mixed' if bf16 else 'fp32'}, channels_last, fused AdamW + EMA, "
          f"{torch.get_num_threads()} threads; mean of {recorded} steps after a warm-up step")
    rows = [{"phase": phase, "wall s": t[0] / recorded, "share": t[0] / recorded / bare_step,
             "user s": t[1] / recorded, "sys s": t[2] / recorded, "minor faults": int(t[3] / recorded)}
            for phase, t in totals.items()]
    rows.append({"phase": "bare step", "wall s": bare_step, "share": 1.0,
                 "user s": sum(t[1] for t in totals.values()) / recorded,
                 "sys s": sum(t[2] for t in totals.values()) / recorded,
                 "minor faults": int(sum(t[3] for t in totals.values()) / recorded)})
    rows.append({"phase": "fit step (Lightning), 2nd epoch", "wall s": fit_step, "share": fit_step / bare_step,
                 "user s": float("nan"), "sys s": float("nan"), "minor faults": -1})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    total = sum(groups.values())
    print(f"\ntorch.profiler, self CPU time of the last step by kind of op (sum over threads {total:.2f} s):")
    print(pd.DataFrame([{"ops": g, "self CPU s": t, "share": t / total} for g, t in
                        sorted(groups.items(), key=lambda kv: -kv[1])]).to_string(index=False,
                                                                                    float_format=lambda v: f"{v:.3f}"))
    if args.profile_ops:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_ops))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=1024)
    parser.add_argument("--val", type=int, default=128, help="validation patches (a subset of the training ones)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--table", action="store_true",
                        help="the table over patch sizes and encoders (fit vs bare step, system-time share)")
    parser.add_argument("--max-size", type=int, default=350, help="--table: largest patch size to include")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--table: where both sides train")
    parser.add_argument("--precision", default="auto", help="--table: the fits' precision (auto, bf16-mixed, 32-true)")
    parser.add_argument("--table-patches", type=int, help="--table: patches per row (default: fewer for larger "
                        "patches, sized for the 2-core CPU)")
    parser.add_argument("--sizes", type=int, nargs="+", help="--table: only these patch sizes")
    parser.add_argument("--encoders", nargs="+", help="--table: only these encoders")
    parser.add_argument("--profile", action="store_true",
                        help="where one training step's time goes at --size (use --size 350 --batch 4 "
                             "--encoder resnet50 for the paper's setting): phases, ops, Lightning's overhead")
    parser.add_argument("--encoder", default="resnet50", help="--profile: the encoder (x3, intermediate fusion)")
    parser.add_argument("--profile-steps", type=int, default=3, help="--profile: measured steps after one warm-up")
    parser.add_argument("--profile-ops", type=int, default=0, help="--profile: also print torch.profiler's top N ops")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is warm-up)")

    torch.set_num_threads(args.threads)
    if args.profile:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            profile_step(args)
        return
    if args.table:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            print_table(args)
        return
    settings = TrainSettings(max_epochs=args.epochs, batch_size=args.batch, accelerator="cpu", progress=False,
                             augment=Augment())
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        cache, labels = random_cache(tmp / "cache", n_patches=args.patches, size=args.size)
        train_ds, val_ds = datasets(cache, labels, args.val)
        n = len(train_ds)
        print(f"{n} training + {len(val_ds)} validation patches {(len(CHANNELS), args.size, args.size)} float16 cache, "
              f"smallcnn intermediate fusion, batch {args.batch}, {args.epochs} epochs (first is warm-up), "
              f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
              f"fastest epoch of {args.repeats} runs")
        fits, plains, olds = [], [], []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # num_workers=0 on purpose
            for r in range(args.repeats):
                olds.append(run_plain(train_ds, val_ds, settings, fast=False))
                plains.append(run_plain(train_ds, val_ds, settings))
                fits.append(run_fit(train_ds, val_ds, settings, tmp / f"fit{r}"))
        threads = {c.threads for c in fits}
        from cytofuse.training.fit import resolve_precision

        print(f"recipe's CPU path: precision {resolve_precision(settings)}, channels_last, fused AdamW, weight EMA")
        for part, label in (("epochs", "whole epochs"), ("train_parts", "training steps only")):
            f, p = best_throughput(n, fits, part), best_throughput(n, plains, part)
            print(f"fit (lightning), {label:20s}: {f:7.1f} patches/s   plain loop {p:7.1f} patches/s   "
                  f"ratio {f / p:5.2f} (target >= 0.9)")
        p, o = best_throughput(n, plains, "train_parts"), best_throughput(n, olds, "train_parts")
        print(f"plain loop, recipe's CPU path {p:7.1f} patches/s   fp32 contiguous Adam {o:7.1f} patches/s   "
              f"speed-up {p / o:5.2f}")
        print(f"  torch threads inside fit: {sorted(threads)}")

        model_rate = best_throughput(n, fits, "train_parts")
        for workers in args.workers:
            s = settings.model_copy(update={"num_workers": workers})
            rate = max(loader_throughput(train_ds, val_ds, s, epochs=args.epochs) for _ in range(args.repeats))
            print(f"train loader with augmentation, num_workers={workers}: {rate:7.1f} patches/s   "
                  f"training {model_rate:7.1f} patches/s   ratio {rate / model_rate:5.2f} (target >= 3)")


if __name__ == "__main__":
    main()
