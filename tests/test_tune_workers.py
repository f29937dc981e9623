"""`cytofuse tune --worker N`: several processes on one study through a shared storage (Optuna's journal file),
and a leader that finishes while another process still runs a trial."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pandas as pd
import pytest

from cytofuse.config import validate_config
from cytofuse.errors import ConfigError

TRIALS = 2
WAIT_S = 120  # longest a trial waits for the other process before the test fails instead of hanging


def _config(manifest, **tune) -> dict:
    return {
        "data": {"manifest": str(manifest)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu", "tta": False},
        "cv": {"n_folds": 2, "baseline": False, "probes": False},
        "tune": {"space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                           "models.dropout": {"low": 0.0, "high": 0.5}},
                 "trials": TRIALS, "final": "folds", **tune},
    }


def _trials(journal: Path, name: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _meeting_fit(real, journal: Path, worker: int):
    """``fit_model`` that makes every trial fit wait until the other process has a trial in the same study, and
    every refit until the other process has claimed a refit, so that both processes work on every study and
    on the refits however fast either starts."""

    def fit(*args, **kwargs):
        out = Path(args[9])  # RUN/tune/<study>/trials/<number> or RUN/tune/outer_<k>/<procedure>
        if out.parent.name != "trials" or "trials" in out.parts:
            study = out.parent.parent.name if "trials" in out.parts else "refits"
            deadline = time.monotonic() + WAIT_S
            while not any(t.user_attrs.get("worker", 0) != worker for t in _trials(journal, study)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {worker} waited {WAIT_S} s for the other process in study {study}")
                time.sleep(0.2)
        return real(*args, **kwargs)

    return fit


def _worker_process(config: str, out: str, journal: str, worker: int, report: str) -> None:
    """A spawned process: `cytofuse tune CONFIG --out OUT --storage JOURNAL --worker N`; its exit code and output
    are written to ``report`` (JSON)."""
    import torch
    from typer.testing import CliRunner

    import cytofuse.workflows.tune as tune
    from cytofuse.cli import app

    torch.set_num_threads(1)
    import cytofuse.workflows.cv as cv

    tune.fit_model = cv.fit_model = _meeting_fit(tune.fit_model, Path(journal), worker)  # trials, refits
    result = CliRunner().invoke(app, ["tune", config, "--out", out, "--storage", journal, "--worker", str(worker)])
    Path(report).write_text(json.dumps({"exit_code": result.exit_code, "output": result.output}))


def test_two_processes_share_the_studies_of_one_search(synthetic_set, tmp_path, monkeypatch):
    import torch
    import yaml
    from typer.testing import CliRunner

    import cytofuse.workflows.tune as tune
    from cytofuse.cli import app

    torch.set_num_threads(1)
    config, journal = tmp_path / "tune.yaml", tmp_path / "shared" / "studies.log"
    config.write_text(yaml.safe_dump(_config(synthetic_set / "labels.csv")))
    leader_dir, worker_dir, report = tmp_path / "leader", tmp_path / "worker1", tmp_path / "worker1.json"
    started = time.monotonic()
    process = multiprocessing.get_context("spawn").Process(
        target=_worker_process, args=(str(config), str(worker_dir), str(journal), 1, str(report)))
    process.start()
    try:
        import cytofuse.workflows.cv as cv

        meeting = _meeting_fit(tune.fit_model, journal, 0)
        monkeypatch.setattr(tune, "fit_model", meeting)  # the trials
        monkeypatch.setattr(cv, "fit_model", meeting)  # the refits
        leader = CliRunner().invoke(app, ["tune", str(config), "--out", str(leader_dir), "--storage", str(journal)])
        process.join(timeout=WAIT_S)
    finally:
        if process.is_alive():
            process.kill()
    seconds = time.monotonic() - started
    assert leader.exit_code == 0, leader.output
    assert process.exitcode == 0
    done = json.loads(report.read_text())
    assert done["exit_code"] == 0, done["output"]
    assert "worker 1: ran" in done["output"] and "outer refits by this worker: outer_" in done["output"]
    assert "nested estimate, image level" in leader.output

    # every study holds trials of both processes; tune.trials finished ones, plus at most one (workers - 1) that
    # the other process was running when the cap was reached
    counts = {}
    for name in ("outer_0", "outer_1"):
        trials = _trials(journal, name)
        states = [t.state.name for t in trials]
        counts[name] = [(t.user_attrs["worker"], s.lower()) for t, s in zip(trials, states)]
        finished = sum(s in ("COMPLETE", "PRUNED") for s in states)
        assert TRIALS <= finished <= TRIALS + 1, (name, states)
        assert states.count("RUNNING") == 0 and states.count("FAIL") == 0
        assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    table = pd.read_csv(leader_dir / "tune" / "trials.csv")
    assert set(table["worker"]) == {0, 1}
    assert all(set(part["worker"]) == {0, 1} for _, part in table.groupby("study"))

    # the leader wrote the results; the worker only its own patches and what it ran, on the same folds
    assert (leader_dir / "best_config.yaml").is_file() and (leader_dir / "tune" / "nested.json").is_file()
    assert not (worker_dir / "best_config.yaml").exists() and not (worker_dir / "tune" / "nested.json").exists()
    assert (worker_dir / "folds.csv").read_text() == (leader_dir / "folds.csv").read_text()
    ran = json.loads((worker_dir / "tune" / "worker.json").read_text())
    assert ran["worker"] == 1 and [s["name"] for s in ran["studies"]] == ["outer_0", "outer_1"]
    assert all(s["ran"] >= 1 and s["workers"]["1"] == s["ran"] for s in ran["studies"])
    nested = json.loads((leader_dir / "tune" / "nested.json").read_text())
    # the four refits (tuned and default on two outer folds) were shared: each ran once, in one of the processes,
    # whose run folder holds its fit; the leader's estimate reads the worker's test-fold probabilities
    by = {f"outer_{k}/tuned": f["refit_by"] for k, f in enumerate(nested["folds"])}
    by |= {f"outer_{k}/default": w for k, w in nested["default_refit_by"].items()}
    assert sorted(by) == ["outer_0/default", "outer_0/tuned", "outer_1/default", "outer_1/tuned"]
    assert set(by.values()) == {0, 1}
    assert sorted(key.removesuffix(f"/trials_{TRIALS}") for key in ran["refits"]) == sorted(k for k, w in by.items() if w == 1)
    for key, w in by.items():
        assert ((worker_dir if w else leader_dir) / "tune" / key / "fit.json").is_file(), key
        assert not ((leader_dir if w else worker_dir) / "tune" / key / "fit.json").exists(), key
    predictions = json.loads((leader_dir / "tune" / "nested.json").read_text())["metrics"]
    assert set(predictions) == {"tuned", "default"}
    for fold in nested["folds"]:  # the studies when the leader's search of each ended: a trial may still run
        finished = fold["complete"] + fold["pruned"]
        assert sum(fold["workers"].values()) == finished >= TRIALS and fold["running"] <= 1
    print(f"two processes, {TRIALS} trials per study: {seconds:.1f} s; (worker, state) per study: {counts}")

    # a worker started with another config, or without the shared storage, is refused before it writes anything
    other = _config(synthetic_set / "labels.csv")
    other["tune"]["space"]["train.lr"]["high"] = 0.1
    with pytest.raises(ConfigError, match=r"study 'outer_\d' in the storage was made for another config or search space"):
        tune.run_tune(validate_config(other), tmp_path / "worker2", storage=str(journal), worker=2, progress=False)
    with pytest.raises(ConfigError, match=r"--worker 2 needs --storage"):
        tune.run_tune(validate_config(other), tmp_path / "worker2", worker=2, progress=False)
    assert not (tmp_path / "worker2").exists()


def test_a_worker_on_other_folds_is_refused(synthetic_set, tmp_path):
    from cytofuse.workflows.tune import open_storage, open_study

    cfg = validate_config(_config(synthetic_set / "labels.csv"))
    storage = open_storage(str(tmp_path / "studies.log"))
    open_study("outer_0", storage, cfg, seed=0, data="0123456789abcdef")
    assert open_study("outer_0", storage, cfg, seed=1009, data="0123456789abcdef").user_attrs["folds"] == "0123456789abcdef"
    with pytest.raises(ConfigError, match=r"study 'outer_0' in the storage was made for other patches or folds "
                                          r"\(.*fingerprint 0123456789abcdef, this run fedcba9876543210\)"):
        open_study("outer_0", storage, cfg, seed=1009, data="fedcba9876543210")


def test_the_leader_finishes_while_another_process_still_runs_a_trial(synthetic_set, tmp_path):
    """A trial some worker started and never finished (still busy, or killed) neither blocks nor breaks the leader."""
    import optuna
    import torch

    from cytofuse.workflows.tune import open_storage, open_study, run_tune

    torch.set_num_threads(1)
    journal = tmp_path / "studies.log"
    cfg = validate_config(_config(synthetic_set / "labels.csv", defaults=False))
    busy = open_study("outer_0", open_storage(str(journal)), cfg, seed=1009).ask()
    busy.set_user_attr("worker", 1)
    busy.suggest_float("train.lr", 1e-4, 1e-2, log=True)
    result = run_tune(cfg, tmp_path / "run", storage=str(journal), progress=False)
    study = optuna.load_study(study_name="outer_0", storage=open_storage(str(journal)))
    states = [t.state.name for t in study.trials]
    assert states[0] == "RUNNING" and sum(s in ("COMPLETE", "PRUNED") for s in states) == TRIALS
    assert result.folds[0].running == 1 and result.folds[0].workers == {"0": TRIALS}
    table = pd.read_csv(tmp_path / "run" / "tune" / "trials.csv")
    running = table[table["state"] == "RUNNING"]
    assert running[["study", "number", "worker"]].values.tolist() == [["outer_0", 0, 1]]
    assert (tmp_path / "run" / "best_config.yaml").is_file()
    # the report counts it as running (complete, pruned, failed, running, total, by worker)
    from cytofuse.evaluation.report import trial_counts

    counts = trial_counts(table).set_index("study")
    assert counts.loc["outer_0", ["complete", "pruned", "failed", "running", "total"]].sum() == 2 * (TRIALS + 1)
    assert counts.loc["outer_0", "running"] == 1 and counts.loc["outer_1", "running"] == 0
    assert counts.loc["outer_0", "complete or pruned, by worker"] == f"0: {TRIALS}"


def test_a_refit_left_by_a_dead_process_is_done_again_and_finished_ones_are_read_back(synthetic_set, tmp_path,
                                                                                      monkeypatch):
    """A refit whose process died (its heartbeat old) is failed and refitted by the leader; a finished refit of
    an interrupted run is read back from the storage instead of fitted again."""
    import optuna
    import torch

    import cytofuse.workflows.tune as tune
    from cytofuse.workflows.tune import open_storage, open_study, run_tune

    torch.set_num_threads(1)
    journal = tmp_path / "studies.log"
    cfg = validate_config(_config(synthetic_set / "labels.csv", defaults=False))
    dead = open_study("refits", open_storage(str(journal)), cfg, seed=0).ask()
    for key, value in {"worker": 3, "job": f"outer_0/tuned/trials_{TRIALS}", "alive": time.time() - 3600}.items():
        dead.set_user_attr(key, value)
    first = run_tune(cfg, tmp_path / "run", storage=str(journal), progress=False)
    refits = optuna.load_study(study_name="refits", storage=open_storage(str(journal))).trials
    assert [(t.user_attrs["job"], t.state.name, t.user_attrs["worker"]) for t in refits] == [
        (f"outer_0/tuned/trials_{TRIALS}", "FAIL", 3), (f"outer_0/tuned/trials_{TRIALS}", "COMPLETE", 0),
        (f"outer_1/tuned/trials_{TRIALS}", "COMPLETE", 0)]
    assert [f.refit_by for f in first.folds] == [0, 0]

    fits = []
    import cytofuse.workflows.cv as cv

    for module in (tune, cv):  # trials and refits
        monkeypatch.setattr(module, "fit_model", lambda *a, **kw: fits.append(a[9]))
    again = run_tune(cfg, tmp_path / "run", storage=str(journal), progress=False)  # nothing left to fit
    assert fits == []
    assert again.metrics["tuned"] == first.metrics["tuned"]


def test_the_heartbeat_beats_while_a_refit_runs_and_stops_quietly_when_its_trial_was_taken_over():
    import optuna

    from cytofuse.workflows.tune import heartbeat

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr("alive", 0.0)
    started = time.time()
    with heartbeat(trial, every_s=0.05):
        time.sleep(0.4)  # a refit that runs no Lightning callback (e.g. the test fold's prediction)
    first = study.trials[0].user_attrs["alive"]
    assert started < first <= time.time()

    other = study.ask()
    with heartbeat(other, every_s=0.05):
        study.tell(other.number, state=optuna.trial.TrialState.FAIL)  # another process took it for dead
        time.sleep(0.3)
    assert study.trials[1].state.name == "FAIL" and "alive" not in study.trials[1].user_attrs


def test_a_claim_waits_for_an_older_trial_to_name_its_job_and_then_yields_it():
    """Two processes that claim at once: the newer trial must not take the job that the older one is about to
    name (it names it just after its trial is created); it waits, yields, and takes the next job."""
    import threading

    import optuna

    from cytofuse.workflows.tune import RefitJob, _claim

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    jobs = [RefitJob(0, "default", TRIALS), RefitJob(1, "default", TRIALS)]
    older = study.ask()
    older.set_user_attr("worker", 1)
    older.set_user_attr("alive", time.time())
    timer = threading.Timer(0.5, lambda: older.set_user_attr("job", jobs[0].key))
    timer.start()
    claimed, _, _ = _claim(study, jobs, started=float("-inf"), worker=0)
    timer.join()
    assert claimed[0] == jobs[1]
    states = [(t.user_attrs.get("job"), t.state.name) for t in study.trials]
    assert states == [("outer_0/default", "RUNNING"), ("outer_0/default", "PRUNED"), ("outer_1/default", "RUNNING")]
