"""Wall time of a nested hyperparameter search (``cytofuse tune``) on the demo phantoms, and its estimate.

The search of issue "hyperparameter search": the demo's data and patches, intermediate fusion only, 5 outer
folds x ``--trials`` trials (lr, weight decay, dropout), Hyperband over epochs, best settings by the folds'
median (``tune.final: folds``), the untuned config refitted on the same outer folds. A leader and
``--workers`` more processes share one Optuna journal file, each with ``--threads`` torch threads (one each
on the 2-core reference machine). Target: <= 20 minutes in all, with the nested estimate printed beside the
defaults'.

Printed: the wall time, split into the searches (first trial start to last trial end) and the outer refits;
the epochs the trials trained and their states; the nested estimate (image level) of the tuned procedure and
of the defaults. The run folders stay under ``--out`` (a temporary folder by default).

    python benchmarks/bench_tune.py [--trials 20] [--trial-epochs 8] [--reduction-factor 4] [--workers 1]
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

import pandas as pd
import yaml


def demo_tune_config(data_dir: Path, *, trials: int, trial_epochs: int | None, reduction_factor: int) -> dict:
    from cytofuse.workflows.demo import demo_config

    raw = demo_config(data_dir)
    raw["models"] = [{"fusion": "intermediate"}]
    raw["cv"] = {"n_folds": raw["cv"]["n_folds"]}
    raw["tune"] = {"trials": trials, "final": "folds", "reduction_factor": reduction_factor,
                   "space": {"train.lr": {"low": 3e-4, "high": 3e-3, "log": True},
                             "train.weight_decay": {"low": 1e-4, "high": 1e-1, "log": True},
                             "models.dropout": {"low": 0.1, "high": 0.6}}}
    if trial_epochs is not None:
        raw["tune"]["trial_epochs"] = trial_epochs
    return raw


def spans(storage: Path) -> dict:
    """Seconds of the searches and of the refits, the epochs trials trained and their states, from the journal."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    store = JournalStorage(JournalFileBackend(str(storage)))
    out = {"epochs": 0, "states": {}}
    for summary in optuna.get_all_study_summaries(store, include_best_trial=False):
        trials = optuna.load_study(study_name=summary.study_name, storage=store).trials
        starts = [t.datetime_start for t in trials if t.datetime_start]
        ends = [t.datetime_complete for t in trials if t.datetime_complete]
        kind = "refits" if summary.study_name == "refits" else "search"
        first, last = out.get(kind, (None, None))
        out[kind] = (min([*starts, *([first] if first else [])]), max([*ends, *([last] if last else [])]))
        if kind == "search":
            out["epochs"] += sum(len(t.intermediate_values) for t in trials)
            for t in trials:
                out["states"][t.state.name] = out["states"].get(t.state.name, 0) + 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--trial-epochs", type=int, default=8, help="tune.trial_epochs; 0: the fit's 15 epochs")
    parser.add_argument("--reduction-factor", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="processes beside the leader")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", type=Path, default=None, help="folder for the data and the runs (default: temporary)")
    args = parser.parse_args()

    from cytofuse.synthetic.phantoms import write_synthetic_dataset
    from cytofuse.workflows.demo import DEMO_CLASSES, DEMO_DIFFICULTY, DEMO_IMAGES_PER_CLASS

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_tune_"))
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if not (data_dir / "labels.csv").is_file():
        write_synthetic_dataset(data_dir, classes=DEMO_CLASSES, images_per_class=DEMO_IMAGES_PER_CLASS,
                                shape=(8, 256, 256), seed=0, difficulty=DEMO_DIFFICULTY, progress=False)
    raw = demo_tune_config(data_dir, trials=args.trials, trial_epochs=args.trial_epochs or None,
                           reduction_factor=args.reduction_factor)
    config = out / "demo_tune.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    storage = out / "studies.log"
    storage.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-c", "from cytofuse.cli import main; main()", "tune", str(config), "--storage",
               str(storage), "--overwrite"]
    started = time.monotonic()
    procs = []
    for worker in range(args.workers + 1):
        run = out / ("lead" if worker == 0 else f"worker_{worker}")
        log = (out / f"{run.name}.log").open("w")
        procs.append(subprocess.Popen([*command, "--out", str(run), *(["--worker", str(worker)] if worker else [])],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
        if worker == 0:
            time.sleep(10)  # the leader creates the studies before anyone draws a trial
    codes = [p.wait() for p in procs]
    minutes = (time.monotonic() - started) / 60
    if any(codes):
        raise SystemExit(f"tune exited with {codes}; see the logs in {out}")
    s = spans(storage)
    search = (s["search"][1] - s["search"][0]).total_seconds() / 60
    refits = (s["refits"][1] - s["refits"][0]).total_seconds() / 60
    nested = json.loads((out / "lead" / "tune" / "nested.json").read_text())
    budget = f"{args.trial_epochs} epochs per trial" if args.trial_epochs else "the fit's 15 epochs per trial"
    print(f"demo tune: 5 outer folds x {args.trials} trials ({budget}, reduction factor {args.reduction_factor}), "
          f"{args.workers + 1} processes x {args.threads} thread(s)")
    print(f"wall {minutes:.1f} min (target <= 20): searches {search:.1f} min, refits {refits:.1f} min; "
          f"trials trained {s['epochs']} epochs; states {s['states']}")
    rows = []
    for procedure, levels in nested["metrics"].items():
        summary = levels["image"]["summary"]
        rows.append({"procedure": procedure,
                     **{m: f"{summary[m]['mean']:.3f} ± {summary[m]['sd']:.3f}" for m in ("balanced_accuracy", "mcc")}})
    print("nested estimate, image level (outer folds):")
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
