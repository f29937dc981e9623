"""`cytofuse tune`: the tune section's checks, the nested search, its honesty (no outer test group in any
trial), resumption and pruning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytofuse.config import validate_config
from cytofuse.errors import ConfigError

BASE = {"data": {"manifest": "labels.csv"}}


def _tune(space, **extra) -> dict:
    return {**BASE, "tune": {"space": space, **extra}}


@pytest.mark.parametrize("space, expected", [
    ({}, r"tune\.space: .*empty: name at least one setting"),
    ({"train.lr": {"low": 0.1, "high": 0.01}}, r"tune\.space\.train\.lr: .*low \(0\.1\) is above high \(0\.01\)"),
    ({"train.lrate": {"low": 0.1, "high": 0.2}}, r"unknown parameter 'train\.lrate'; did you mean train\.lr"),
    ({"models.dropout": {"low": 0.1, "high": 1.5}}, r"tune\.space\.models\.dropout: value 1\.5 is not a valid models\.dropout"),
    ({"models.encoder": {"choices": ["smallcnn", "vgg99"]}}, r"tune\.space\.models\.encoder: value 'vgg99'.*encoder must be one of"),
    ({"train.max_epochs": {"low": 1.5, "high": 4}}, r"tune\.space\.train\.max_epochs: value 1\.5.*valid integer"),
    ({"train.lr": {"low": 0, "high": 0.1, "log": True}}, r"tune\.space\.train\.lr: .*log range needs low > 0, got low=0"),
    ({"train.lr": {"low": 0.1}}, r"tune\.space\.train\.lr: .*needs both low and high \(got low=0\.1, high=None\)"),
    ({"models.encoder": {"choices": []}}, r"tune\.space\.models\.encoder: .*choices is empty"),
    ({"patches.size": {"choices": [32, 48]}}, r"'patches\.size' changes the patch cache.*searchable patch "
     r"settings: patches\.normalise"),
    ({"patches.normalise": {"choices": ["image", "per-cell"]}}, r"patches\.normalise is searched over choices among "
     r"\['auto', 'image', 'dataset', 'fixed'\], got \['image', 'per-cell'\]"),
    ({"patches.normalise": {"low": 0, "high": 1}}, r"patches\.normalise is searched over choices .* got a numeric range"),
    ({"train.lr": {"low": 0.001, "high": 0.01, "spread": 2}}, r"tune\.space\.train\.lr\.spread: unknown key"),
])
def test_bad_tune_sections_name_the_key_and_the_value(space, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_config(_tune(space))


def test_unknown_tune_key_and_settings_out_of_range():
    with pytest.raises(ConfigError, match=r"tune\.budget: unknown key"):
        validate_config(_tune({"train.lr": {"low": 0.001, "high": 0.01}}, budget=3))
    with pytest.raises(ConfigError, match=r"tune\.trials: Input should be greater than or equal to 1 \(got 0\)"):
        validate_config(_tune({"train.lr": {"low": 0.001, "high": 0.01}}, trials=0))
    with pytest.raises(ConfigError, match=r"tune searches the settings of one model; the config has 2"):
        validate_config({**_tune({"train.lr": {"low": 0.001, "high": 0.01}}),
                         "models": [{"fusion": "early"}, {"fusion": "late"}]})


def test_a_valid_space_and_with_parameters():
    from cytofuse.config import with_parameters

    cfg = validate_config(_tune({"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                 "train.batch_size": {"low": 8, "high": 32, "step": 8},
                                 "train.augment.gain": {"low": 0.0, "high": 0.2},
                                 "models.dropout": {"low": 0.0, "high": 0.5},
                                 "models.encoder": {"choices": ["smallcnn", "resnet18"]}}))
    assert cfg.tune.space["train.batch_size"].integer and not cfg.tune.space["train.lr"].integer
    tuned = with_parameters(cfg, {"train.lr": 0.003, "train.augment.gain": 0.1, "models.dropout": 0.2,
                                  "models.encoder": "resnet18", "train.batch_size": 16})
    assert tuned.tune is None
    assert tuned.train_settings.lr == 0.003 and tuned.train_settings.augment.gain == 0.1
    assert tuned.train_settings.batch_size == 16
    assert tuned.models[0].dropout == 0.2 and tuned.models[0].encoder == "resnet18"


# --------------------------------------------------------------------------- the nested search on a tiny set


def _tiny(manifest, **tune) -> dict:
    return {
        "data": {"manifest": str(manifest)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": 2, "batch_size": 16, "progress": False, "accelerator": "cpu", "tta": False},
        "cv": {"n_folds": 2, "baseline": False, "probes": False},
        "tune": {"space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                           "models.dropout": {"low": 0.0, "high": 0.5}},
                 "trials": 2, "final": "folds", **tune},
    }


@pytest.fixture
def spy_fits(monkeypatch):
    """Every fit_model call of the tune workflow (trials in tune, refits through cv's fold fit): (out folder,
    patch ids of the fit part, of the validation part)."""
    import cytofuse.workflows.cv as cv
    import cytofuse.workflows.tune as tune

    calls = []
    real = tune.fit_model

    def spy(model_cfg, cache, rows, labels, fit_idx, val_idx, index, classes, settings, out, **kwargs):
        calls.append((Path(out), np.asarray(fit_idx), np.asarray(val_idx)))
        return real(model_cfg, cache, rows, labels, fit_idx, val_idx, index, classes, settings, out, **kwargs)

    monkeypatch.setattr(tune, "fit_model", spy)
    monkeypatch.setattr(cv, "fit_model", spy)
    return calls


def test_nested_search_never_shows_an_outer_test_group_to_a_trial(synthetic_set, tmp_path, spy_fits):
    import time

    import torch
    import yaml

    from cytofuse.workflows.tune import run_tune

    torch.set_num_threads(1)
    cfg = validate_config(_tiny(synthetic_set / "labels.csv"))
    started = time.monotonic()
    result = run_tune(cfg, tmp_path / "run", progress=False)
    seconds = time.monotonic() - started
    run = tmp_path / "run"
    folds = pd.read_csv(run / "folds.csv")
    # the search: 2 trials per outer fold, each fitted and scored inside the outer training part only
    trial_calls = [c for c in spy_fits if "trials" in c[0].parts]
    assert len(trial_calls) == 4
    for out, fit_idx, val_idx in spy_fits:
        k = int(next(p for p in out.parts if p.startswith("outer_")).split("_")[1])
        test_groups = set(folds.loc[folds["fold"] == k, "group"])
        seen = set(folds.iloc[np.concatenate([fit_idx, val_idx])]["group"])
        assert test_groups and not seen & test_groups, f"{out} saw outer test groups {seen & test_groups}"
        if "trials" in out.parts:  # trials: inner fit and inner validation parts are grouped apart
            assert not set(folds.iloc[fit_idx]["group"]) & set(folds.iloc[val_idx]["group"])
    # the refits: tuned and default on each outer fold
    assert sorted(str(c[0].relative_to(run / "tune")) for c in spy_fits if "trials" not in c[0].parts) == [
        "outer_0/default", "outer_0/tuned", "outer_1/default", "outer_1/tuned"]
    nested = json.loads((run / "tune" / "nested.json").read_text())
    assert set(nested["metrics"]) == {"tuned", "default"}
    for proc in ("tuned", "default"):
        bacc = nested["metrics"][proc]["image"]["summary"]["balanced_accuracy"]["mean"]
        assert 0.0 <= bacc <= 1.0
    table = pd.read_csv(run / "tune" / "nested.csv")
    assert set(table["procedure"]) == {"tuned", "default"}
    trials = pd.read_csv(run / "tune" / "trials.csv")
    assert sorted(trials["study"].unique()) == ["outer_0", "outer_1"] and len(trials) == 4
    best = yaml.safe_load((run / "best_config.yaml").read_text())
    assert "tune" not in best
    assert best["train"]["lr"] == pytest.approx(result.final["train.lr"])
    assert 1e-4 <= best["train"]["lr"] <= 1e-2 and 0.0 <= best["models"][0]["dropout"] <= 0.5
    validate_config(best)  # ready for cytofuse cv
    assert not list((run / "tune").glob("outer_*/trials/*")), "trial folders are removed after scoring"
    print(f"tiny nested search: {seconds:.1f} s")


def test_a_search_over_the_normalisation_scope_tries_each_scope_once_on_inner_fit_statistics(
        synthetic_set, tmp_path, spy_fits, monkeypatch):
    """patches.normalise in a space of choices only: each study tries every scope exactly once at its full
    budget (brute force, no pruning, tune.trials above the grid's size); a dataset-scope trial sees the
    patches with percentiles of its inner fit part only; the best scope reaches best_config.yaml and the
    outer refits."""
    import optuna
    import torch
    import yaml

    import cytofuse.workflows.tune as tune

    torch.set_num_threads(1)
    views = []
    real_view = tune.normalised_view

    def spy_view(settings, cache, index, train_rows, folder=None, **kwargs):
        views.append((settings.normalise, np.asarray(train_rows)))
        return real_view(settings, cache, index, train_rows, folder, **kwargs)

    monkeypatch.setattr(tune, "normalised_view", spy_view)
    raw = _tiny(synthetic_set / "labels.csv", trials=5, defaults=False)
    raw["train"]["max_epochs"] = 2
    raw["tune"]["space"] = {"patches.normalise": {"choices": ["image", "dataset"]}}
    result = tune.run_tune(validate_config(raw), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    storage = f"sqlite:///{run / 'tune' / 'study.db'}"
    for k in (0, 1):
        study = optuna.load_study(study_name=f"outer_{k}", storage=storage)
        assert sorted(t.params["patches.normalise"] for t in study.trials) == ["dataset", "image"]
        assert all(t.state.name == "COMPLETE" and len(t.intermediate_values) == 2 for t in study.trials)
        fits = [c for c in spy_fits if f"outer_{k}" in c[0].parts and "trials" in c[0].parts]
        assert len(fits) == 2
    # every dataset-scope view of a trial has the percentiles of exactly that study's inner fit part
    from cytofuse.training.cache import PatchCache

    folds = pd.read_csv(run / "folds.csv")
    rows = PatchCache.open(run / "cache").positions(folds["patch_id"].to_numpy())
    fit_parts = {tuple(sorted(rows[f[1]])) for f in spy_fits if "trials" in f[0].parts}
    dataset_views = [tuple(sorted(r)) for scope, r in views if scope == "dataset"]
    assert dataset_views and set(dataset_views) <= fit_parts
    best = yaml.safe_load((run / "best_config.yaml").read_text())
    assert best["patches"]["normalise"] == result.final["patches.normalise"] in ("image", "dataset")
    for k in (0, 1):  # each outer refit is seen with the scope its study chose
        chosen = tune.search_result(optuna.load_study(study_name=f"outer_{k}", storage=storage)).params
        recipe = json.loads((run / "tune" / f"outer_{k}" / "tuned" / "recipe.json").read_text())
        assert recipe["settings"]["normalise"] == chosen["patches.normalise"]
        assert (recipe["normalisation"] or {"scope": "image"})["scope"] == chosen["patches.normalise"]


def test_a_space_of_choices_is_a_grid_searched_setting_by_setting_without_pruning(tmp_path):
    import optuna
    from optuna.distributions import CategoricalDistribution

    from cytofuse.workflows.tune import grid_points, next_grid_point, open_study

    grid = validate_config(_tune({"patches.normalise": {"choices": ["image", "dataset"]},
                                  "models.encoder": {"choices": ["smallcnn", "resnet18"]}}))
    mixed = validate_config(_tune({"patches.normalise": {"choices": ["image", "dataset"]},
                                   "train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    assert grid_points(grid.tune.space) == [
        {"patches.normalise": "image", "models.encoder": "smallcnn"},
        {"patches.normalise": "image", "models.encoder": "resnet18"},
        {"patches.normalise": "dataset", "models.encoder": "smallcnn"},
        {"patches.normalise": "dataset", "models.encoder": "resnet18"}]
    assert grid_points(mixed.tune.space) is None
    assert isinstance(open_study("outer_0", f"sqlite:///{tmp_path / 'g.db'}", grid, seed=0).pruner,
                      optuna.pruners.NopPruner)
    assert isinstance(open_study("outer_0", f"sqlite:///{tmp_path / 'm.db'}", mixed, seed=0).pruner,
                      optuna.pruners.HyperbandPruner)

    # which setting a process runs next: not one finished, nor one another process is running; a running trial
    # of the process's own worker number was left by an interrupted run and is run again
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    points, dist = [{"a": 1}, {"a": 2}, {"a": 3}], {"a": CategoricalDistribution([1, 2, 3])}

    def start(value, worker):
        study.enqueue_trial({"a": value})
        trial = study.ask(dist)
        trial.set_user_attr("worker", worker)
        return trial

    assert next_grid_point(study, points, 0) == {"a": 1} and next_grid_point(study, points, 1) == {"a": 2}
    by_other, done, left_by_self = start(1, 1), start(2, 0), start(3, 0)
    study.tell(done, 0.5)
    assert next_grid_point(study, points, 0) == {"a": 3}
    assert next_grid_point(study, points, 1) == {"a": 1}
    study.tell(by_other, 0.6)
    study.tell(left_by_self, 0.7)
    assert next_grid_point(study, points, 0) is None
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"a": 1})  # queued (by another process) but not yet started: taken
    assert next_grid_point(study, points, 0) == {"a": 2}


def test_a_grid_setting_whose_process_fell_silent_is_free_again_and_the_leader_waits_for_living_ones():
    import time

    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    from cytofuse.workflows.tune import STALE_S, leader_waits, next_grid_point

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    points, dist = [{"a": 1}, {"a": 2}], {"a": CategoricalDistribution([1, 2])}

    def start(value, worker, alive):
        study.enqueue_trial({"a": value})
        trial = study.ask(dist)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("alive", alive)
        return trial

    living, silent = start(1, 1, time.time()), start(2, 2, time.time() - STALE_S - 60)
    # the leader has nothing left to run but must wait: no trial has completed, and worker 1 is alive
    assert next_grid_point(study, points, 3) == {"a": 2}  # worker 2's trial is taken for dead ...
    assert study.trials[silent.number].state == TrialState.FAIL  # ... and failed, so its setting is free
    start(2, 3, time.time())
    assert next_grid_point(study, points, 0) is None and leader_waits(study)
    study.tell(living, 0.8)
    assert not leader_waits(study)  # a complete trial: the leader can refit
    study = optuna.create_study(direction="maximize")
    start(1, 1, time.time() - STALE_S - 60)
    assert not leader_waits(study)  # nobody alive to wait for: the leader stops and says no trial completed


# --------------------------------------------------------------------------- pruning


class _FakeTrial:
    def __init__(self, prune_below: float) -> None:
        self.prune_below, self.reports = prune_below, []

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self) -> bool:
        return self.reports[-1][1] < self.prune_below


class _FakeTrainer:
    def __init__(self, epoch, value, sanity=False):
        import torch

        self.current_epoch, self.sanity_checking = epoch, sanity
        self.callback_metrics = {"val_balanced_accuracy": torch.tensor(value)}


def test_epoch_reporter_reports_each_epoch_and_prunes_a_poor_trial():
    import optuna

    from cytofuse.workflows.tune import EpochReporter

    trial = _FakeTrial(prune_below=0.6)
    reporter = EpochReporter(trial)
    reporter.on_validation_end(_FakeTrainer(0, 0.1, sanity=True), None)  # sanity check: not an epoch
    reporter.on_validation_end(_FakeTrainer(0, 0.75), None)
    assert trial.reports == [(1, 0.75)]  # the step is the number of epochs trained
    with pytest.raises(optuna.TrialPruned, match=r"pruned at epoch 1 with val_balanced_accuracy 0\.250"):
        reporter.on_validation_end(_FakeTrainer(1, 0.25), None)
    assert reporter.reported == {0: 0.75, 1: 0.25}


def test_hyperband_stops_trials_after_exactly_its_rungs_epochs():
    """With a budget of 9 epochs and reduction factor 3, Hyperband's rungs sit at 1 and 3 epochs: a pruned
    trial has trained 1 or 3 epochs (an off-by-one step would train 2 or 4); one that trained all 9 completes
    (Hyperband's last bracket would prune it at 9, when nothing is left to save)."""
    import optuna

    from cytofuse.workflows.tune import EpochReporter, make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(9, reduction_factor=3),
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        quality = trial.suggest_float("q", 0.0, 1.0)
        reporter = EpochReporter(trial, epochs=9)
        for epoch in range(9):
            reporter.on_validation_end(_FakeTrainer(epoch, quality * (1 + epoch) / 9), None)
        return reporter.reported[8]

    study.optimize(objective, n_trials=30)
    trained = {t.number: len(t.intermediate_values) for t in study.trials}
    pruned = [trained[t.number] for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [trained[t.number] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(pruned) >= 10 and set(pruned) <= {1, 3} and set(complete) == {9}


def test_a_pruned_trial_stops_training_inside_lightning(synthetic_set, tmp_path, spy_fits, monkeypatch):
    """Through fit_model and Lightning: a pruner that prunes everything stops each trial after its first epoch."""
    import optuna
    import torch

    import cytofuse.workflows.tune as tune

    torch.set_num_threads(1)
    monkeypatch.setattr(tune, "make_pruner", lambda *a, **kw: optuna.pruners.ThresholdPruner(lower=1.01))
    cfg = validate_config(_tiny(synthetic_set / "labels.csv", defaults=False))
    with pytest.raises(Exception, match=r"study outer_0: no trial completed \(2 pruned, 0 failed\)"):
        tune.run_tune(cfg, tmp_path / "run", progress=False)
    study = optuna.load_study(study_name="outer_0", storage=f"sqlite:///{tmp_path / 'run' / 'tune' / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert all(list(t.intermediate_values) == [1] for t in study.trials)  # stopped after 1 epoch of 2


@pytest.mark.filterwarnings("ignore::cytofuse.training.fit.ChanceLevelWarning")  # 3 epochs of a tiny set
def test_trials_train_their_own_budget_and_the_refits_the_full_one(synthetic_set, tmp_path):
    """tune.trial_epochs: each trial trains (and reports) that many epochs, Hyperband's largest resource; the
    outer refits train the config's train.max_epochs."""
    import optuna
    import torch

    from cytofuse.workflows.tune import run_tune

    torch.set_num_threads(1)
    raw = _tiny(synthetic_set / "labels.csv", trial_epochs=1, defaults=False)
    raw["train"]["max_epochs"] = 3
    run_tune(validate_config(raw), tmp_path / "run", progress=False)
    storage = f"sqlite:///{tmp_path / 'run' / 'tune' / 'study.db'}"
    for k in (0, 1):
        study = optuna.load_study(study_name=f"outer_{k}", storage=storage)
        assert [(t.state.name, list(t.intermediate_values)) for t in study.trials] == [("COMPLETE", [1])] * 2
        history = pd.read_csv(tmp_path / "run" / "tune" / f"outer_{k}" / "tuned" / "history.csv")
        assert history["epoch"].tolist() == [0, 1, 2]


def test_a_trial_budget_beside_a_searched_epoch_budget_is_an_error():
    with pytest.raises(ConfigError, match=r"trial_epochs \(4\) and a searched train\.max_epochs both set"):
        validate_config(_tune({"train.max_epochs": {"low": 2, "high": 8}}, trial_epochs=4))
    with pytest.raises(ConfigError, match=r"tune\.trial_epochs: Input should be greater than or equal to 1"):
        validate_config(_tune({"train.lr": {"low": 0.001, "high": 0.01}}, trial_epochs=0))


# --------------------------------------------------------------------------- resumption and storage


def test_a_killed_search_resumes_to_the_requested_total(synthetic_set, tmp_path, spy_fits, monkeypatch):
    import optuna
    import torch

    import cytofuse.workflows.tune as tune

    torch.set_num_threads(1)
    cfg = validate_config(_tiny(synthetic_set / "labels.csv", defaults=False))
    spy = tune.fit_model

    def dies_at_second_trial(*args, **kwargs):
        if len(spy_fits) == 1:
            raise RuntimeError("killed")
        return spy(*args, **kwargs)

    monkeypatch.setattr(tune, "fit_model", dies_at_second_trial)
    with pytest.raises(RuntimeError, match="killed"):
        tune.run_tune(cfg, tmp_path / "run", progress=False)
    storage = f"sqlite:///{tmp_path / 'run' / 'tune' / 'study.db'}"
    first = optuna.load_study(study_name="outer_0", storage=storage)
    assert [t.state.name for t in first.trials] == ["COMPLETE", "FAIL"]
    kept = first.trials[0].params

    monkeypatch.setattr(tune, "fit_model", spy)
    spy_fits.clear()
    tune.run_tune(cfg, tmp_path / "run", progress=False)
    outer_0 = optuna.load_study(study_name="outer_0", storage=storage)
    assert [t.state.name for t in outer_0.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert outer_0.trials[0].params == kept
    # the continued study's sampler does not replay its first draw (that would be a repeat, scored without a fit)
    assert outer_0.trials[2].params != kept and "repeat_of" not in outer_0.trials[2].user_attrs
    trial_fits = [c[0] for c in spy_fits if "trials" in c[0].parts]
    assert sum("outer_0" in p.parts for p in trial_fits) == 1 and sum("outer_1" in p.parts for p in trial_fits) == 2

    # a finished search continues when asked for more trials; its refits of unchanged settings are read back
    spy_fits.clear()
    tune.run_tune(cfg, tmp_path / "run", trials=3, progress=False)
    for name in ("outer_0", "outer_1"):
        study = optuna.load_study(study_name=name, storage=storage)
        assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 3
    assert sum("trials" in c[0].parts for c in spy_fits) == 2


def test_a_changed_space_does_not_continue_an_old_study(synthetic_set, tmp_path):
    import torch

    from cytofuse.workflows.tune import run_tune

    torch.set_num_threads(1)
    raw = _tiny(synthetic_set / "labels.csv", defaults=False, trials=1)
    run_tune(validate_config(raw), tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "config.yaml").read_text()
    raw["tune"]["space"]["train.lr"]["high"] = 0.1
    with pytest.raises(ConfigError, match=r"study '(outer_\d|all)' in the storage was made for another config or search space"):
        run_tune(validate_config(raw), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # refused before anything is rewritten


def test_an_unreachable_storage_is_named(synthetic_set, tmp_path):
    from cytofuse.workflows.tune import run_tune

    cfg = validate_config(_tiny(synthetic_set / "labels.csv"))
    url = "postgresql://nobody@127.0.0.1:9/none"
    with pytest.raises(ConfigError, match=r"--storage 'postgresql://nobody@127\.0\.0\.1:9/none': (cannot open the "
                                          r"study storage|its database driver '\w+' is not installed)"):
        run_tune(cfg, tmp_path / "run", storage=url, progress=False)
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_a_silent_database_server_is_reported_after_the_connect_timeout(synthetic_set, tmp_path, monkeypatch):
    """A port that accepts connections but never answers (a hung server, a firewall that swallows packets) fails
    after the connect timeout, naming --storage and the URL without its password."""
    import socket
    import time

    import cytofuse.workflows.tune as tune

    pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver of the dev extra) is not installed")
    monkeypatch.setattr(tune, "CONNECT_TIMEOUT_S", 2)
    cfg = validate_config(_tiny(synthetic_set / "labels.csv"))
    with socket.create_server(("127.0.0.1", 0)) as server:  # the kernel accepts; nobody ever answers
        port = server.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConfigError, match=rf"--storage 'postgresql\+psycopg://nobody:\*\*\*@127\.0\.0\.1:{port}/none': "
                                              r"cannot open the study storage \(OperationalError: .*timeout"):
            tune.run_tune(cfg, tmp_path / "run", storage=f"postgresql+psycopg://nobody:secret@127.0.0.1:{port}/none",
                          progress=False)
        seconds = time.monotonic() - started
    assert 1.5 <= seconds < 10, seconds
    assert not (tmp_path / "run").exists()
    assert tune.engine_options("postgresql://h/db") == {"connect_args": {"connect_timeout": 2}}
    assert tune.engine_options("postgresql://h/db?connect_timeout=30") == {}  # the URL's own timeout wins
    assert tune.engine_options("sqlite:///study.db") == {}


# --------------------------------------------------------------------------- a real PostgreSQL server


def _postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: Debian's newest /usr/lib/postgresql/<version>/bin, else PATH."""
    import shutil

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else -1)
    if found:
        return found[-1].parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which and shutil.which("initdb") else None


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 and a free port (trust authentication, data in a temporary
    folder), stopped and removed at teardown; yields its SQLAlchemy URL. Skips, saying what is missing, without
    the server binaries, the driver, or (as root, which postgres refuses to run as) the postgres user."""
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH: install "
                    "Debian's postgresql package to run this test")
    pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver of the dev extra) is not installed")
    prefix, owner = [], None
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, which postgres refuses, and there is no postgres user to run it as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root, which postgres refuses, and runuser (to run it as postgres) is missing")
        prefix = [shutil.which("runuser"), "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="cytofuse-pg-"))  # not under pytest's tmp_path, which postgres cannot enter
    (root / "sockets").mkdir()
    if owner is not None:
        for path in (root, root / "sockets"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def run(*args: str) -> None:
        done = subprocess.run(prefix + list(args), capture_output=True, text=True, timeout=120)
        if done.returncode:
            log = (root / "server.log").read_text() if (root / "server.log").is_file() else ""
            pytest.fail(f"{' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}{log}")

    data = str(root / "data")
    try:
        run(str(bindir / "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale",
            "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", data, "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-h 127.0.0.1 -p {port} -k {root / 'sockets'} -F", "start")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (root / "data" / "postmaster.pid").is_file():
            subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_studies_live_in_a_postgresql_server(synthetic_set, tmp_path, postgres_url):
    import optuna
    import psycopg
    import torch

    from cytofuse.workflows.tune import config_fingerprint, opened_storage, run_tune

    torch.set_num_threads(1)
    cfg = validate_config(_tiny(synthetic_set / "labels.csv", defaults=False))
    run_tune(cfg, tmp_path / "run", storage=postgres_url, progress=False)
    with opened_storage(postgres_url) as storage:
        studies = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    assert sorted(studies) == ["outer_0", "outer_1", "refits"]  # the searches, and the outer refits as jobs
    for summary in studies.values():
        assert summary.n_trials == 2 and summary.user_attrs["config"] == config_fingerprint(cfg)
    with psycopg.connect(postgres_url.replace("+psycopg", "")) as db:  # Optuna's own tables, in that server
        states = db.execute("SELECT state, count(*) FROM trials GROUP BY state").fetchall()
        jobs = db.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'job' ORDER BY value_json").fetchall()
    assert sum(n for _, n in states) == 6 and {s for s, _ in states} <= {"COMPLETE", "PRUNED"}
    assert [json.loads(v) for (v,) in jobs] == ["outer_0/tuned/trials_2", "outer_1/tuned/trials_2"]
    assert not (tmp_path / "run" / "tune" / "study.db").exists()
    assert json.loads((tmp_path / "run" / "tune" / "nested.json").read_text())["storage"] == postgres_url
    assert len(pd.read_csv(tmp_path / "run" / "tune" / "trials.csv")) == 4


# --------------------------------------------------------------------------- the command


def test_cli_tune_prints_the_nested_estimate_beside_the_defaults(synthetic_set, tmp_path):
    import torch
    import yaml
    from typer.testing import CliRunner

    from cytofuse.cli import app

    torch.set_num_threads(1)
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(_tiny(synthetic_set / "labels.csv", trials=3)))
    journal = tmp_path / "shared" / "journal.log"
    result = CliRunner().invoke(app, ["tune", str(config), "--out", str(tmp_path / "run"), "--trials", "1",
                                      "--storage", str(journal), "--set", "train.max_epochs=1"])
    assert result.exit_code == 0, result.output
    assert "nested estimate, image level" in result.output and "tuned" in result.output and "default" in result.output
    assert "best_config.yaml" in result.output and journal.is_file() and not (tmp_path / "run" / "tune" / "study.db").exists()
    trials = pd.read_csv(tmp_path / "run" / "tune" / "trials.csv")
    assert len(trials) == 2  # --trials 1 per outer study
    bad_cfg = _tiny(synthetic_set / "labels.csv")
    bad_cfg["tune"]["space"]["train.lr"]["low"] = 0.5
    config.write_text(yaml.safe_dump(bad_cfg))
    bad = CliRunner().invoke(app, ["tune", str(config), "--out", str(tmp_path / "run2")])
    assert bad.exit_code == 2 and "low (0.5) is above high (0.01)" in bad.output


# --------------------------------------------------------------------------- the HTML report of a tune run


def _html_rows(page: str, first: str) -> list[list[str]]:
    """The cells of the report's table rows whose first cell is ``first`` (tags stripped, entities decoded)."""
    import html
    import re

    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", page, flags=re.S):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        if cells and cells[0] == first:
            rows.append(cells)
    return rows


def test_report_of_a_tune_run_shows_the_estimate_trials_histories_and_best_settings(synthetic_set, tmp_path):
    import html

    import torch

    from cytofuse.evaluation.report import tune_importances, write_report
    from cytofuse.workflows.tune import run_tune

    torch.set_num_threads(1)
    run = tmp_path / "run"
    result = run_tune(validate_config(_tiny(synthetic_set / "labels.csv")), run, progress=False)
    page = write_report(run).read_text()

    # the nested estimate, every number of nested.csv as mean ± sd, and what it was measured on
    nested = pd.read_csv(run / "tune" / "nested.csv")
    for row in nested.itertuples():
        cells = [c for c in _html_rows(page, row.level) if c[1] == row.procedure]
        assert len(cells) == 1, (row.level, row.procedure)
        assert cells[0][2:6] == [f"{getattr(row, m + '_mean'):.3f} ± {getattr(row, m + '_sd'):.3f}"
                                 for m in ("balanced_accuracy", "auroc_macro", "mcc", "macro_f1")]
    assert "Measured on: 2 outer folds of the grouped CV (cv.seed 0); trials scored on a grouped inner validation split" in page
    # trial counts per study, as in trials.csv
    trials = pd.read_csv(run / "tune" / "trials.csv")
    for name in ("outer_0", "outer_1"):
        part = trials[trials["study"] == name]
        counts = [str(int((part["state"] == s).sum())) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")]
        (cells,) = _html_rows(page, name)[:1]
        assert cells[1:6] == counts + [str(len(part))] and cells[6] == f"0: {len(part)}"
        assert (run / "report" / "figures" / "tune" / f"history_{name}.png").stat().st_size > 1000
        assert f"Optimisation history, {name}" in page
    # best settings per outer fold and of best_config.yaml (tune.final: folds)
    for fold in result.folds:
        (cells,) = [c for c in _html_rows(page, fold.name) if len(c) == 4]
        assert cells[1:] == [f"{fold.value:.3f}" if fold.value % 1 else f"{int(fold.value)}",
                             f"{fold.params['train.lr']:.3g}", f"{fold.params['models.dropout']:.3g}"]
    (final,) = _html_rows(page, "best_config.yaml (tune.final: folds)")
    assert final[2:] == [f"{result.final['train.lr']:.3g}", f"{result.final['models.dropout']:.3g}"]
    assert "# written by cytofuse tune" in page
    # importances from the run's storage: each study's column, or the reason it has none
    found = tune_importances(None, run, ["outer_0", "outer_1"])
    columns = [] if found["table"] is None else list(found["table"].columns)
    for reason in found["missing"]:
        assert f"<li>{html.escape(reason)}</li>" in page
    for name in columns:
        (cells,) = _html_rows(page, "train.lr")
        assert f"{found['table'].loc['train.lr', name]:.3f}" in cells
    assert len(columns) + len(found["missing"]) == 2
    assert (run / "report" / "figures" / "tune" / "importances.png").is_file() == bool(columns)
    assert (run / "report" / "figures" / "tune" / "attrition.png").is_file()


def test_tune_importances_from_the_storage_and_why_they_are_missing(tmp_path):
    import optuna

    from cytofuse.evaluation.report import tune_importances
    from cytofuse.workflows.tune import open_storage

    journal = tmp_path / "studies.log"
    storage = open_storage(str(journal))
    varied = optuna.create_study(study_name="outer_0", storage=storage, direction="maximize",
                                 sampler=optuna.samplers.RandomSampler(seed=0))
    varied.optimize(lambda t: t.suggest_float("train.lr", 0, 1) * 0.9 + 0.1 * t.suggest_float("models.dropout", 0, 1),
                    n_trials=12)
    flat = optuna.create_study(study_name="outer_1", storage=storage, direction="maximize")
    flat.optimize(lambda t: 0.5 + 0 * t.suggest_float("train.lr", 0, 1), n_trials=3)
    found = tune_importances(str(journal), tmp_path, ["outer_0", "outer_1", "all"])
    table = found["table"]
    assert list(table.columns) == ["outer_0"] and table["outer_0"].sum() == pytest.approx(1.0)
    assert table.loc["train.lr", "outer_0"] > table.loc["models.dropout", "outer_0"]
    assert found["missing"] == ["outer_1: all 3 complete trials scored the same (0.500), so no setting explains a difference",
                                "all: the study is not in the storage"]
    assert tune_importances(str(tmp_path / "gone.log"), tmp_path, ["outer_0"])["missing"] == [
        f"storage {tmp_path / 'gone.log'}: the journal file is missing"]
    assert "without its password" in tune_importances("postgresql://u:***@h/db", tmp_path, ["outer_0"])["missing"][0]
    assert not (tmp_path / "gone.log").exists()


def test_report_of_a_worker_or_an_unfinished_tune_run_says_what_to_do(tmp_path):
    from cytofuse.errors import InputError
    from cytofuse.evaluation.report import write_report

    run = tmp_path / "run"
    (run / "tune").mkdir(parents=True)
    (run / "config.yaml").write_text("cv:\n  n_folds: 2\n")
    with pytest.raises(InputError, match=r"tune run folder .* lacks tune/nested\.json, tune/nested\.csv, "
                                          r"tune/trials\.csv .*cytofuse tune CONFIG --out"):
        write_report(run)
    (run / "tune" / "worker.json").write_text(json.dumps({"worker": 1, "storage": "shared/studies.log"}))
    with pytest.raises(InputError, match=r"is a tune worker's \(worker\.json\): it ran trials of the studies in "
                                          r"shared/studies\.log .*report of the leader's run folder"):
        write_report(run)
