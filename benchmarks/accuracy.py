"""Accuracy of cytofuse's deep models against its handcrafted baseline and shortcut probes on real data.

Runs ``cytofuse.workflows.cv.run_cv`` (5-fold grouped CV by default) on the public data sets of
``../shared/data`` (or ``$CYTOFUSE_DATA``) and prints, per task, every model next to the
handcrafted baseline and the probes of the same folds: fold mean ± sd of balanced accuracy
and MCC at the task's evaluation level, and the minutes each run took. Tasks whose data are
missing are skipped with a message.

| task | data | level | models |
|---|---|---|---|
| jurkat | Jurkat 7 cell-cycle phases, one 40 px tile per cell (BF, DF; DNA training-only) | patch = cell | intermediate BF+DF (early fusion beside it); the same with DNA as a training-only channel (modality dropout; distillation from a BF+DF+DNA teacher; reconstruction) |
| bbbc021 | MCF-7 DMSO vs protein synthesis inhibitor, 68 px crops, grouped by field | patch = cell | early and intermediate over DAPI, tubulin, actin |
| livedead | bright-field live vs dead crops (binned 2x to 64 px), grouped by source field | patch = cell | early |
| hepg2 | HepG2 vs Huh7 whole fields (blue plane), grouped by image | image | early on 128 px patches |
| demo | the built-in organelle phantoms (``cytofuse demo``) | image | early, intermediate, late |

A plain run trains the models the targets name (``DEFAULT_MODELS``: Jurkat's BF+DF and its DNA training-only
model, BBBC021's intermediate fusion, every model of the other tasks); ``--model all`` trains every model of
the table, ``--model NAME`` the named ones. The CV's fits run two side by side (``--jobs``, one share of
``--threads`` each) on machines with two or more cores.

Every task trains with the package's defaults (the recipe of ``cytofuse.training.fit``, 30 epochs) except
for what the table names. ``--set section.field=value`` changes a setting in every task's config (e.g.
``--set train.ema=false``), which is how the ablation table of ``benchmarks/README.md`` is
made: one change at a time against the defaults, on the same folds. ``--seeds N`` repeats each task with
``train.seed`` 0 .. N-1 on the same folds and adds each model's mean ± sd over seeds and its seed ensemble, the
spread a difference between two settings has to exceed.

    python benchmarks/accuracy.py [--tasks jurkat bbbc021 livedead hepg2 demo] [--folds 5] [--set k=v ...]
                                  [--model all] [--seeds 1] [--jobs 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real-data builders shared with the slow tests


def data_root() -> Path:
    return Path(os.environ.get("CYTOFUSE_DATA", ROOT.parent / "shared" / "data"))


def jurkat_config(work: Path) -> dict | None:
    from realsets import jurkat_cells

    root = data_root() / "jurkat-cellcycle-ifc" / "Experiment_1"
    if not root.is_dir():
        return None
    cells = jurkat_cells(root, work / "jurkat_cells")
    return {"data": {"images": str(cells)}, "patches": {"size": 40, "min_ratio": 0.0},
            "models": [{"fusion": "intermediate", "channels": ["BF", "DF"], "name": "BF+DF"},
                       {"fusion": "early", "channels": ["BF", "DF"], "name": "BF+DF, early"},
                       {"fusion": "intermediate", "channels": ["BF", "DF"], "auxiliary": ["DNA"], "name": "BF+DF, DNA training-only"},
                       {"fusion": "intermediate", "channels": ["BF", "DF"], "auxiliary": ["DNA"], "auxiliary_mode": "distill",
                        "name": "BF+DF, DNA distilled"},
                       {"fusion": "intermediate", "channels": ["BF", "DF"], "auxiliary": ["DNA"], "auxiliary_mode": "reconstruct",
                        "name": "BF+DF, DNA reconstructed"}],
            "cv": {"positive_class": "Metaphase"}}


def bbbc021_config(work: Path) -> dict | None:
    root = data_root() / "bbbc021-mcf7-crops"
    if not root.is_dir():
        return None
    return {"data": {"images": str(root), "axes": "YXC", "group_pattern": r"^(.*)_\d+\.npy$"},
            "patches": {"size": 64, "min_ratio": 0.0},
            "models": [{"fusion": "early", "name": "early"}, {"fusion": "intermediate", "name": "intermediate"}]}


def livedead_config(work: Path, bin_factor: int = 2) -> dict | None:
    from realsets import livedead_crops

    root = data_root() / "livedead-brightfield"
    if not root.is_dir():
        return None
    folder = "livedead_crops" if bin_factor == 2 else f"livedead_crops_bin{bin_factor}"
    crops = livedead_crops(root, work / folder, bin_factor=bin_factor)
    return {"data": {"images": str(crops), "group_pattern": r"^(.*)_(?:live|dead)_"},
            "patches": {"size": 128 // bin_factor, "min_ratio": 0.0},
            "models": [{"fusion": "early", "name": "early"}]}


def hepg2_config(work: Path) -> dict | None:
    import pandas as pd

    root = data_root() / "hepg2-huh7-nuclei"
    if not (root / "labels.csv").is_file():
        return None
    table = pd.read_csv(root / "labels.csv")
    manifest = pd.DataFrame({"path": [str((root / p).resolve()) for p in table["image"]], "label": table["cell_line"]})
    work.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(work / "hepg2.csv", index=False)
    return {"data": {"manifest": str(work / "hepg2.csv")},
            "patches": {"size": 128, "channels": ["blue"], "min_ratio": 0.05},
            "models": [{"fusion": "early", "name": "early"}]}


def demo_config(work: Path) -> dict:
    from cytofuse.workflows.demo import DEMO_CLASSES, DEMO_DIFFICULTY, DEMO_IMAGES_PER_CLASS, demo_config as config
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    data = work / "demo_data"
    if not (data / "labels.csv").is_file():
        write_synthetic_dataset(data, classes=DEMO_CLASSES, images_per_class=DEMO_IMAGES_PER_CLASS, shape=(8, 256, 256),
                                seed=0, difficulty=DEMO_DIFFICULTY, progress=False)
    raw = config(data)
    raw["models"] = [m for m in raw["models"] if m["fusion"] != "single"]
    return raw


TASKS = {"jurkat": (jurkat_config, "patch"), "bbbc021": (bbbc021_config, "patch"), "livedead": (livedead_config, "patch"),
         "hepg2": (hepg2_config, "image"), "demo": (demo_config, "image")}
# The models a plain run trains: the ones the targets of benchmarks/README.md name (the package's default
# training-only mode for Jurkat's DNA, the paper's intermediate fusion for BBBC021). `--model all` trains every
# model of a task's config; `--model NAME` picks by name.
DEFAULT_MODELS = {"jurkat": ("BF+DF", "BF+DF, DNA training-only"), "bbbc021": ("intermediate",)}


def _override(raw: dict, item: str) -> None:
    import yaml

    key, value = item.split("=", 1)
    node = raw
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)


def run_task(name: str, work: Path, *, folds: int, overrides: list[str], label: str, models: list[str] = (),
             options: dict | None = None) -> list[dict]:
    from cytofuse.config import validate_config
    from cytofuse.workflows.cv import run_cv

    make, level = TASKS[name]
    raw = make(work, **(options or {}).get(name, {}))
    if raw is None:
        print(f"{name}: data not found under {data_root()}; skipped", flush=True)
        return []
    raw.setdefault("train", {})["progress"] = False
    raw.setdefault("cv", {})["n_folds"] = folds
    for item in overrides:
        _override(raw, item)
    keep = models or DEFAULT_MODELS.get(name, ())
    if "all" not in keep and keep:
        raw["models"] = [m for m in raw["models"] if m.get("name", m["fusion"]) in keep] or raw["models"]
    start = time.perf_counter()
    result = run_cv(validate_config(raw, source=name), work / f"run_{name}_{label}", overwrite=True, progress=False)
    minutes = (time.perf_counter() - start) / 60
    rows = []
    from cytofuse.evaluation.metrics import RunMetrics

    for model, data in result.metrics.items():
        metrics = RunMetrics(data, source=model)
        bacc = metrics.stat("balanced_accuracy", level)
        rows.append({"task": name, "variant": label, "model": model, "kind": result.kinds.get(model, "model"),
                     "level": level, "bacc": bacc.mean, "bacc_sd": bacc.sd,
                     "mcc": metrics.stat("mcc", level).mean, "minutes": round(minutes, 1)})
    return rows


def seed_rows(name: str, work: Path, seed_runs: list[dict], *, variant: str) -> list[dict]:
    """Each deep model's spread over the rows ``seed_runs`` of one task (the same folds, one training seed per
    run): the mean and sd over seeds of the fold-mean balanced accuracy, and the seed ensemble, i.e. the fold
    models of all seeds averaged (their test-fold probabilities), scored as one model by the package's metrics."""
    import numpy as np
    import pandas as pd

    from cytofuse.evaluation.metrics import RunMetrics, evaluate_run, prob_columns
    from cytofuse.runs import RunFolder

    _, level = TASKS[name]
    rows = []
    for model in sorted({row["model"] for row in seed_runs if row["kind"] == "model"}):
        runs = [row for row in seed_runs if row["model"] == model]
        folders = [RunFolder(work / f"run_{name}_{row['variant']}").model(model) for row in runs]
        classes = json.loads(folders[0].metrics.read_text())["cv"]["classes"]
        cols = prob_columns(classes)
        frames = [pd.read_parquet(f.predictions).sort_values("patch_id", ignore_index=True) for f in folders]
        ensemble = frames[0].copy()
        ensemble[cols] = np.mean([f[cols].to_numpy() for f in frames], axis=0)
        metrics = RunMetrics({"cv": evaluate_run(ensemble, classes=classes)}, source=f"{model} seed ensemble")
        bacc = metrics.stat("balanced_accuracy", level)
        means = [row["bacc"] for row in runs]
        base = {"task": name, "model": model, "kind": "model", "level": level}
        rows.append({**base, "variant": f"{variant}: {len(runs)} seeds", "bacc": float(np.mean(means)),
                     "bacc_sd": float(np.std(means, ddof=1)), "mcc": float(np.mean([row["mcc"] for row in runs])),
                     "minutes": float(sum(row["minutes"] for row in runs))})
        rows.append({**base, "variant": f"{variant}: seed ensemble", "bacc": bacc.mean, "bacc_sd": bacc.sd,
                     "mcc": metrics.stat("mcc", level).mean, "minutes": float("nan")})
    return rows


def fold_views(run_dir: Path):
    """For each finished deep model of a CV run and each fold: (name, model, view of the cache, test rows, input
    channels, labels, image ids, patch index). The view is the fold's own (normalisation of its training patches)."""
    import numpy as np
    import pandas as pd
    import yaml

    from cytofuse.config import model_channels, validate_config
    from cytofuse.models import load_model
    from cytofuse.preprocess.patches import read_patch_index
    from cytofuse.runs import RunFolder
    from cytofuse.training.cache import PatchCache, normalised_view

    cfg = validate_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    index, cache = read_patch_index(run_dir), PatchCache.open(run_dir / "cache")
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"image_id": str})
    rows_all = cache.positions(folds["patch_id"].to_numpy())
    for model_cfg in cfg.models:
        inputs, _ = model_channels(model_cfg, index.channel_names)
        folder = RunFolder(run_dir).model(model_cfg.display_name).root
        if not (folder / "metrics.json").is_file():
            print(f"{model_cfg.display_name}: not finished in {run_dir}; skipped")
            continue
        for k in sorted(folds.loc[folds["fold"] >= 0, "fold"].unique()):
            train = np.flatnonzero((folds["fold"] != k) & (folds["fold"] >= 0))
            test = np.flatnonzero(folds["fold"] == k)
            view = normalised_view(cfg.patches, cache, index, rows_all[train], None, seed=cfg.cv.seed + int(k))
            yield (model_cfg.display_name, load_model(folder / f"fold_{k}" / "best.safetensors"), view,
                   rows_all[test], inputs, folds["y_true"].to_numpy()[test], folds["image_id"].to_numpy()[test], index)


def _balanced(y, pred) -> float:
    import numpy as np

    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def rescore_without_tta(run_dir: Path) -> None:
    """Balanced accuracy of every deep model of a finished CV run with and without test-time augmentation:
    the fold models are re-run on their own test folds with one pass per patch (no retraining)."""
    import numpy as np

    from cytofuse.training.cache import PatchDataset
    from cytofuse.training.fit import predict_proba

    scores: dict[str, dict[bool, list]] = {}
    for name, model, view, rows, inputs, y, _, _ in fold_views(run_dir):
        ds = PatchDataset(view, rows, y, channels=inputs)
        for tta in (True, False):
            pred = predict_proba(model, ds, batch_size=128, tta=tta)[0].argmax(1)
            scores.setdefault(name, {True: [], False: []})[tta].append(_balanced(ds.labels, pred))
    for name, s in scores.items():
        print(f"{name}: patch-level balanced accuracy, fold mean ± sd: with TTA {np.mean(s[True]):.3f} ± "
              f"{np.std(s[True], ddof=1):.3f}, without {np.mean(s[False]):.3f} ± {np.std(s[False], ddof=1):.3f}",
              flush=True)


EXPOSURE_GAINS = (0.8, 1.0, 1.25)


def exposure_check(run_dir: Path, gains=EXPOSURE_GAINS) -> None:
    """How much a finished run's fold models lean on exposure: each test image's raw intensities are scaled by a
    gain (as a longer or shorter exposure would), the fold's normalisation left as training fitted it, and the
    image-level balanced accuracy (mean patch probability, TTA) and the share of test images whose class changes
    are printed. Per-image normalisation cancels any gain, so the check is for dataset and fixed scope."""
    import numpy as np
    import pandas as pd

    from cytofuse.training.cache import NormalisedCache, PatchDataset, cache_image_ids
    from cytofuse.training.fit import predict_proba

    out: dict[str, dict[float, list]] = {}
    for name, model, view, rows, inputs, y, image_ids, index in fold_views(run_dir):
        if not isinstance(view, NormalisedCache):
            print(f"{name}: per-image normalisation cancels exposure; nothing to check")
            return
        images, row_images = index.images, cache_image_ids(view.cache, index)
        bounds = [c for c in images.columns if c.startswith(("lo_", "hi_"))]
        calls = {}
        for gain in gains:
            scaled = images.assign(**{c: images[c] * gain for c in bounds})
            seen = NormalisedCache(view.cache, row_images, scaled, view.norm)
            prob = predict_proba(model, PatchDataset(seen, rows, y, channels=inputs), batch_size=128, tta=True)[0]
            table = pd.DataFrame(prob).assign(image=image_ids, y=y).groupby("image").mean()
            calls[gain] = table.drop(columns="y").to_numpy().argmax(1), table["y"].to_numpy().astype(int)
        for gain, (pred, truth) in calls.items():
            out.setdefault(name, {}).setdefault(gain, []).append(
                (_balanced(truth, pred), float((pred != calls[1.0][0]).mean()) if 1.0 in calls else float("nan")))
    for name, per_gain in out.items():
        for gain, values in per_gain.items():
            acc, flips = np.array(values).T
            print(f"{name}: raw intensities x {gain:.2f}: image-level balanced accuracy {acc.mean():.3f} ± "
                  f"{acc.std(ddof=1):.3f}, test images whose class changes {flips.mean():.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--label", default="defaults", help="Name of this variant in the table.")
    parser.add_argument("--model", action="append", default=[],
                        help="Keep only the models of this name (repeatable); 'all' for every model of a task. "
                             "Default: the models the targets name (see DEFAULT_MODELS).")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cytofuse-accuracy")
    parser.add_argument("--json", type=Path, help="Append the rows to this JSON-lines file.")
    parser.add_argument("--livedead-bin", type=int, default=2, choices=[1, 2, 4],
                        help="Bin the 128 px live/dead crops this many times (mean) before the CV; the patch is the "
                             "whole binned crop (2: 64 px, the table's; 1: full resolution, about 4x the time).")
    parser.add_argument("--seeds", type=int, default=1,
                        help="Run each task this many times with train.seed 0, 1, ... on the same folds and add each "
                             "model's mean ± sd over seeds and its seed ensemble (probabilities averaged) to the table.")
    parser.add_argument("--rescore-without-tta", type=Path, metavar="RUN",
                        help="Only re-score the fold models of a finished CV run with and without TTA.")
    parser.add_argument("--exposure-check", type=Path, metavar="RUN",
                        help="Only re-score the fold models of a finished CV run on test images whose raw "
                             f"intensities are scaled by {EXPOSURE_GAINS} (dataset or fixed normalisation).")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch intra-op threads (1 when other jobs share the cores: oversubscribed "
                             "threads wait on each other and slow training many times over).")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, (os.cpu_count() or 1))),
                        help="cv.jobs: fits side by side, one share of --threads each (2 on 2 cores: 2.5-4x faster "
                             "than one 2-thread fit, the same numbers as any run with the same threads per fit).")
    args = parser.parse_args()
    args.overrides = [f"cv.jobs={args.jobs}", *args.overrides]
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    if args.rescore_without_tta:
        rescore_without_tta(args.rescore_without_tta)
        return
    if args.exposure_check:
        exposure_check(args.exposure_check)
        return
    rows = []
    for name in args.tasks:
        seeds = [(args.label, [])] if args.seeds == 1 else \
            [(f"{args.label}_seed{s}", [f"train.seed={s}"]) for s in range(args.seeds)]
        task_rows = []
        for label, seed_set in seeds:
            task_rows += run_task(name, args.work, folds=args.folds, overrides=[*args.overrides, *seed_set],
                                  label=label, models=args.model, options={"livedead": {"bin_factor": args.livedead_bin}})
        if args.seeds > 1 and task_rows:
            task_rows += seed_rows(name, args.work, task_rows, variant=args.label)
        rows += task_rows
        if task_rows:
            print(pd.DataFrame(task_rows).to_string(index=False, float_format="%.3f"), flush=True)
        if args.json:
            with args.json.open("a") as fh:
                for row in task_rows:
                    fh.write(json.dumps(row) + "\n")
    if rows:
        print("\nfold mean ± sd of balanced accuracy and mean MCC, 5-fold grouped CV, models beside the baseline and "
              "probes of the same folds:")
        print(pd.DataFrame(rows).to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
