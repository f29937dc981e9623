"""The per-image stages on a Dask cluster: images/s of the patch stage and of prediction over N stacks.

N synthetic stacks (3 channels, ``--z`` x ``--yx`` x ``--yx`` uint16, written as OME-TIFF with a
manifest) go through ``run_patches`` and ``predict_images`` (an early-fusion small CNN with random
weights, ``--size`` px patches) in four ways:

- ``local``: no scheduler, today's path (patching in this process; prediction with one model thread
  per core, batches side by side);
- ``local:1`` and ``local:2``: a ``LocalCluster`` of 1 or 2 worker processes (one thread each) that
  cytofuse starts and closes inside the call, as ``--scheduler local:N`` does: its start-up (worker
  processes importing cytofuse and torch) is part of the time;
- ``warm:1`` and ``warm:2``: the address of a 1- or 2-worker ``LocalCluster`` started (and its workers'
  imports done) before the clock starts, as a long-running cluster is used: the steady state of one
  task per image (each worker still loads the model on its first task).

Each case runs ``--reps`` times after an untimed warm-up (compiled kernels here, the model on each
warm worker). Printed per stage, N and mode: the fastest wall seconds, images/s, and the ratio of images/s to ``local`` and, for
2 workers, to 1 worker of the same kind. On a machine with C cores the 2-worker ratio is capped near
min(2, C); ``local`` already uses every core (threads), so a cluster on the same machine can at best
match it: the point of a cluster is more machines, and these figures are its per-image overhead.

    python benchmarks/bench_scale.py [--n 4 8 16] [--z 4] [--yx 512] [--size 64] [--reps 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pandas as pd  # noqa: E402

from bench_patches import synthetic_stack  # noqa: E402  (benchmarks/ is on the path of its scripts)

NAMES = ["mito", "early_endosome", "recycling_endosome"]
MODES = ("local", "local:1", "local:2", "warm:1", "warm:2")


def write_images(root: Path, n: int, *, z: int, yx: int) -> Path:
    """``n`` stacks and a manifest (two classes, alternating); the manifest's path."""
    from cytofuse.io.readers import Image, write_ome_tiff

    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = root / "images" / f"stack_{i:03d}.ome.tif"
        if not path.exists():
            write_ome_tiff(path, Image(synthetic_stack(z, yx, seed=i), tuple(NAMES)))
        rows.append({"path": str(path), "label": "ab"[i % 2]})
    pd.DataFrame(rows).to_csv(root / f"labels_{n}.csv", index=False)
    return root / f"labels_{n}.csv"


def write_model(root: Path, size: int) -> Path:
    import torch

    from cytofuse.inference.modelfolder import card_for, write_model_folder
    from cytofuse.models import create_model
    from cytofuse.preprocess.patches import PatchSettings

    torch.manual_seed(0)
    model = create_model("early", in_channels=len(NAMES), num_classes=2, encoder="smallcnn").eval()
    card = card_for([model], class_names=["a", "b"], channel_names=NAMES, patches=PatchSettings(size=size))
    return write_model_folder(root / "model", [model], card)


def patch_stage(manifest: Path, out: Path, size: int, scheduler: str | None) -> None:
    from cytofuse.config import validate_config
    from cytofuse.workflows.patching import run_patches

    raw = {"data": {"manifest": str(manifest)}, "patches": {"size": size}}
    run_patches(validate_config(raw | ({"scheduler": scheduler} if scheduler else {})), out, progress=False)


def prediction(model: Path, manifest: Path, out: Path, scheduler: str | None) -> None:
    from cytofuse.inference.predict import predict_images

    paths = pd.read_csv(manifest)["path"].tolist()
    predict_images(model, paths, out=out, progress=False, scheduler=scheduler)


def warm_up() -> None:
    """What a long-running worker has done before: import cytofuse's prediction and models (torch, MONAI)."""
    import cytofuse.inference.predict  # noqa: F401
    import cytofuse.models  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--z", type=int, default=4)
    parser.add_argument("--yx", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=1, help="Runs of each case; the fastest is printed.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    import logging

    from distributed import Client, LocalCluster

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; stacks 3 x {args.z} x {args.yx} x {args.yx} "
          f"uint16 ({3 * args.z * args.yx * args.yx * 2 / 2**20:.0f} MiB), patches {args.size} px")
    model = write_model(work, args.size)
    rows = []
    with contextlib.ExitStack() as stack:
        warm = {}
        for workers in (1, 2):
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=logging.ERROR))
            stack.enter_context(Client(cluster, set_as_default=False)).run(warm_up)  # before any clock
            warm[f"warm:{workers}"] = cluster.scheduler_address
        first = write_images(work / "data", 2, z=args.z, yx=args.yx)
        for scheduler in (None, *warm.values()):  # untimed: compiled kernels, each warm worker's model
            patch_stage(first, work / "warm_up_patches", args.size, scheduler)
            prediction(model, first, work / "warm_up_predict", scheduler)
            for out in ("warm_up_patches", "warm_up_predict"):
                shutil.rmtree(work / out)
        for n in args.n:
            manifest = write_images(work / "data", n, z=args.z, yx=args.yx)
            for mode in MODES:
                scheduler = {"local": None, **warm}.get(mode, mode)
                for stage, fn in (("patches", lambda out: patch_stage(manifest, out, args.size, scheduler)),
                                  ("predict", lambda out: prediction(model, manifest, out, scheduler))):
                    seconds = []
                    for rep in range(args.reps):
                        out = work / f"{stage}_{n}_{mode.replace(':', '')}_{rep}"
                        t = time.perf_counter()
                        fn(out)
                        seconds.append(time.perf_counter() - t)
                        shutil.rmtree(out, ignore_errors=True)
                    best = min(seconds)
                    rows.append({"stage": stage, "N": n, "mode": mode, "wall s": best, "images/s": n / best})
                    print(f"  {stage} N={n} {mode}: {', '.join(f'{v:.1f}' for v in seconds)} s", flush=True)
    table = pd.DataFrame(rows)
    speed = table.set_index(["stage", "N", "mode"])["images/s"]
    table["vs local"] = [r["images/s"] / speed[r["stage"], r["N"], "local"] for _, r in table.iterrows()]
    one = {"local:2": "local:1", "warm:2": "warm:1"}  # 2 workers against 1 of the same kind
    table["vs 1 worker"] = [r["images/s"] / speed[r["stage"], r["N"], one[r["mode"]]] if r["mode"] in one
                            else float("nan") for _, r in table.iterrows()]
    table = table.sort_values(["stage", "N"], kind="stable")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(table.to_markdown(index=False, floatfmt=".2f") if _has_tabulate() else "")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
