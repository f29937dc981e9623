"""Nested hyperparameter search (``cytofuse tune``): Optuna's TPE sampler and Hyperband pruner inside the
run's grouped cross-validation, so that no reported number has seen the data it is scored on.

For each OUTER fold of the run's grouped CV (the folds ``cytofuse cv`` uses: same patches, same seed):

1. the outer-training part is split, grouped and stratified as the outer folds, into an inner fit part
   and an inner validation part (``tune.val_fraction`` of its groups);
2. an Optuna study (TPE sampler seeded with ``tune.seed``, Hyperband pruner with epochs as its resource)
   runs ``tune.trials`` trials; each trial fits the model with its settings on the inner fit part (for
   ``tune.trial_epochs`` epochs when set, else the config's budget) and reports the inner validation
   balanced accuracy after every epoch (:class:`EpochReporter`), so the pruner can stop a poor trial
   early; the trial's score is its last reported value. A space of choices only (a finite grid) is
   searched exhaustively instead: each setting once, in the order of the space's choices (the first
   ``tune.trials`` of them), every trial to its full budget (no pruning); the best inner score wins. A
   setting whose trial an interrupted run left unfinished is tried again when the search resumes.
   Besides training and model settings, the search may include ``patches.normalise`` (the normalisation
   scope: image or dataset statistics, fitted on the inner fit part), which changes how the cached
   patches are seen, not the cache;
3. the best trial's settings are refitted on the outer-training part (with the validation split of
   ``cv.val_fraction`` that ``cytofuse cv`` uses) and scored on the outer test fold; the untuned config is
   fitted and scored on the same outer fold (``tune.defaults``).

The outer test folds, and the held-out test set of ``cv.test_fraction``, are never seen by a trial. The
outer-fold balanced accuracy of step 3 estimates the whole procedure, tuning included.

``best_config.yaml`` (ready for ``cytofuse cv`` / ``cytofuse train``, without its tune section) holds, with
``tune.final: all`` (default), the best settings of one more inner search on every CV group (the same
procedure as in each outer fold, applied to all data: what the nested estimate describes); with
``tune.final: folds``, per setting the median over the outer folds' best trials (numbers; integers rounded)
or the most frequent value (choices; ties go to the earlier fold).

The studies live in ``tune/study.db`` (SQLite) in the run folder, or in the storage given as ``storage``
(an SQLAlchemy URL such as ``postgresql+psycopg://user@host/db``, which several processes or machines can
share, or the path of an Optuna journal file); they are created with ``load_if_exists``, so a killed ``tune``
continues each study up to ``tune.trials`` complete or pruned trials (a continued study's sampler is seeded
anew from the number of trials it holds, so it does not replay its first draws). A study remembers a
fingerprint of the config and of the run's folds it was made for and refuses to continue for other ones.

Several processes share the search through one ``storage`` (Optuna's distributed mode): ``worker=0`` (the
leader) does everything above; each ``worker=N > 0``, started with the same config and storage but its own
run folder, patches its own copy of the data (deterministic, and checked against the studies' folds
fingerprint), runs trials of the same studies in the same order, then takes its share of the refits (below)
and stops: no ``best_config.yaml``, no nested estimate. Each process seeds its TPE sampler with ``tune.seed + i + 1009 * worker`` (study ``i``)
and uses TPE's constant liar, so processes do not propose the same settings; each trial records its
``worker``. A process stops a study once it holds ``tune.trials`` complete or pruned trials, counted over
all processes; trials that other processes are still running then finish too, so a study of ``W``
processes ends with between ``tune.trials`` and ``tune.trials + W - 1`` of them.

The outer refits (step 3: tuned and default on each outer fold) are shared too: they are the trials of one
more study, ``refits``, in the same storage. Each process, once its searches end, claims one refit at a time
(a new trial names its job; of two processes that name the same job at once, the lower trial number keeps
it), fits it in its own run folder and stores the test fold's class probabilities (float32, exact) in the
trial; the leader waits for the refits others run and computes the nested estimate from all of them. A tuned
refit uses the best trial of its study when the refit begins. A refitting process writes a heartbeat into its
trial every ``HEARTBEAT_S`` seconds; a refit silent for ``STALE_S`` seconds (a process killed), or silent since
before the leader started (left by an interrupted run), is failed and done again. A refit's weights stay in
the run folder of the process that ran it (``nested.json`` says which).

Run folder (beside the usual ``config.yaml``, ``patches.parquet``, ``folds.csv``, ``cache/``)::

    tune/study.db                       the Optuna studies: outer_<k> and all
    tune/worker.json                    (worker N > 0 only) the trials and refits this worker ran
    tune/outer_<k>/{tuned,default}/     the refits of outer fold k this process ran (fit.json, history.csv, weights)
    tune/trials.csv                     every trial of every study: state, value, settings
    tune/nested.json, tune/nested.csv   nested estimate of the tuned procedure and of the defaults
    best_config.yaml
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd

from cytofuse.config import RunConfig, TuneRange, dump_config, with_parameters
from cytofuse.errors import ConfigError, InputError
from cytofuse.preprocess.patches import PatchIndex
from cytofuse.runs import (MARKER, RunFolder, mark_finished, prepare_run_dir, write_json_atomic, write_table_atomic,
                           write_text_atomic)
from cytofuse.training.cache import normalised_view
from cytofuse.workflows.cv import check_fold_classes, inner_split, patch_stage, validated_image_set
from cytofuse.workflows.fitting import fit_model

MONITOR = "val_balanced_accuracy"
SEED_STRIDE = 1009  # sampler seed of worker N: tune.seed + study number + SEED_STRIDE * N
RESUME_STRIDE = 7919  # a continued study's sampler seed moves on by this per trial it already holds
CONNECT_TIMEOUT_S = 10  # how long a database storage may take to answer before its URL is reported unreachable


# --------------------------------------------------------------------------- pruning


class EpochReporter(L.Callback):
    """Reports the validation metric to an Optuna trial after every validation epoch and raises
    ``optuna.TrialPruned`` when the trial's pruner says so (optuna-integration's Lightning callback breaks
    with current Lightning). ``reported`` maps epoch -> value. The step reported is the number of epochs
    trained (epoch + 1), Hyperband's resource: its rungs at 1, 3, 9, ... epochs then stop a trial after that
    many epochs, not one more. The last epoch of the budget (``epochs``) is reported but never pruned: the
    trial has trained in full, so it completes with that value."""

    def __init__(self, trial, monitor: str = MONITOR, *, epochs: int | None = None) -> None:
        self.trial, self.monitor, self.epochs = trial, monitor, epochs
        self.reported: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        import optuna

        epoch, value = int(trainer.current_epoch), float(trainer.callback_metrics[self.monitor])
        self.reported[epoch] = value
        self.trial.report(value, step=epoch + 1)
        if (self.epochs is None or epoch + 1 < self.epochs) and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with {self.monitor} {value:.3f}")


# --------------------------------------------------------------------------- the data of a run


@dataclass
class RunData:
    """What every fit of a tune run reads: the patch index, cache, folds (as ``folds.csv``) and classes."""

    index: PatchIndex
    cache: object
    folds: pd.DataFrame
    classes: list[str]

    @property
    def rows(self) -> np.ndarray:
        return self.cache.positions(self.folds["patch_id"].to_numpy())

    @property
    def labels(self) -> np.ndarray:
        return self.folds["y_true"].to_numpy()

    @property
    def groups(self) -> np.ndarray:
        return self.folds["group"].to_numpy()

    @property
    def n_folds(self) -> int:
        return int(self.folds["fold"].max()) + 1

    def outer(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(training part, test fold) of outer fold ``k``; the held-out test set (fold -1) is in neither."""
        fold = self.folds["fold"].to_numpy()
        return np.flatnonzero((fold != k) & (fold >= 0)), np.flatnonzero(fold == k)

    @property
    def pool(self) -> np.ndarray:
        """Every CV patch (the held-out test set excluded): the data of the final search."""
        return np.flatnonzero(self.folds["fold"].to_numpy() >= 0)


def prepare_data(cfg: RunConfig, run_dir: Path, *, progress: bool) -> RunData:
    """Patches, cache and folds exactly as ``cytofuse cv`` makes them (resumed stages are read back)."""
    index, cache, classes, folds = patch_stage(cfg, validated_image_set(cfg), run_dir, progress=progress)
    return RunData(index, cache, folds, classes)


# --------------------------------------------------------------------------- storage and studies


def open_storage(url: str):
    """An Optuna storage: an SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``) or a journal file path."""
    import optuna

    try:
        if "://" in url:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_options(url))
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(url)))
    except ImportError as exc:  # Optuna re-raises the driver's ModuleNotFoundError as a plain ImportError
        missing = getattr(exc.__cause__, "name", None) or getattr(exc, "name", None)
        raise ConfigError(f"--storage {storage_label(url)!r}: its database driver {missing!r} is not installed "
                          "(PostgreSQL: pip install 'psycopg[binary]' and write postgresql+psycopg://..., or "
                          "psycopg2-binary for postgresql+psycopg2://...)") from None
    except Exception as exc:  # noqa: BLE001 - any driver's error, re-raised with the URL named
        raise ConfigError(f"--storage {storage_label(url)!r}: cannot open the study storage "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None


@contextmanager
def opened_storage(url: str):
    """:func:`open_storage` as a context: a database storage's connections are closed at its end."""
    storage = open_storage(url)
    try:
        yield storage
    finally:
        close_storage(storage)


def close_storage(storage) -> None:
    """Close the database connections of an Optuna storage (a journal file needs nothing)."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        storage.remove_session()
        engine.dispose()


def engine_options(url: str) -> dict:
    """SQLAlchemy engine options of a storage URL: a connect timeout for database servers (a URL's own
    ``connect_timeout`` wins), so an unreachable server is reported instead of waited for."""
    if url.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres", "mysql") and "connect_timeout" not in url:
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return {}


def storage_label(url: str) -> str:
    """A storage URL as it may be printed or written into a run folder: its password replaced by ``***``."""
    return re.sub(r"^([a-z0-9+]+://[^:/@]*:)[^/]*@", r"\1***@", url, flags=re.IGNORECASE)


def config_fingerprint(cfg: RunConfig) -> str:
    """What a study's trials depend on: the config without the search's budget (trials, timeout)."""
    raw = cfg.model_dump(mode="json")
    raw["tune"] = {k: v for k, v in raw["tune"].items() if k not in ("trials", "timeout_min", "final", "defaults")}
    for key in ("workers", "scheduler"):  # where the per-image stages run, not what they compute
        raw.pop(key, None)
    raw["cv"] = {k: v for k, v in raw["cv"].items() if k != "jobs"}  # how cytofuse cv runs its fits
    raw["train"] = {k: v for k, v in raw["train"].items() if k not in ("progress", "verbose", "num_workers")}
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def grid_points(space: dict) -> list[dict] | None:
    """Every setting of a space of choices only (searched exhaustively), in the order the space lists its
    choices; None when a range is in it."""
    if any(spec.choices is None for spec in space.values()):
        return None
    return [dict(zip(space, values)) for values in itertools.product(*(spec.choices for spec in space.values()))]


def make_pruner(max_epochs: int | str, *, reduction_factor: int):
    """Hyperband over epochs: brackets of successive halving from 1 epoch up to the (largest) budget."""
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=reduction_factor)


def data_fingerprint(folds: pd.DataFrame) -> str:
    """What a study's inner splits depend on: the run's patches, their images, groups, labels and folds."""
    table = folds[["patch_id", "image_id", "group", "y_true", "fold"]].to_csv(index=False)
    return hashlib.sha256(table.encode()).hexdigest()[:16]


def open_study(name: str, storage, cfg: RunConfig, *, seed: int, overwrite: bool = False, data: str | None = None):
    """The study ``name`` in ``storage`` (created, or loaded when it exists and was made for this config and,
    when ``data`` (a :func:`data_fingerprint`) is given, for these folds). ``seed`` seeds the TPE sampler."""
    import optuna

    if overwrite:
        delete_studies(storage, [name])
    tune = cfg.tune
    if tune.trial_epochs is not None:
        max_epochs = tune.trial_epochs
    elif "train.max_epochs" in tune.space:
        max_epochs = tune.space["train.max_epochs"].high
    else:
        max_epochs = "auto" if cfg.train_settings.max_steps else cfg.train_settings.max_epochs
    grid = grid_points(tune.space) is not None  # searched setting by setting (search), every one to its budget
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
        pruner=optuna.pruners.NopPruner() if grid else make_pruner(max_epochs, reduction_factor=tune.reduction_factor),
    )
    if held := len(study.get_trials(deepcopy=False)):
        # a continued study (a resumed search, another process's): a sampler seeded as at the study's start would
        # replay its first random draws, so the seed moves on with the trials the study already holds
        study.sampler = optuna.samplers.TPESampler(seed=seed + RESUME_STRIDE * held, constant_liar=True)
    for key, mark, what in (("config", config_fingerprint(cfg), "another config or search space"),
                            ("folds", data, "other patches or folds (a worker must read the same images, at the "
                                            "same paths relative to the manifest, as the leader)")):
        found = study.user_attrs.get(key)
        if mark is None:
            continue
        if found is None:
            study.set_user_attr(key, mark)
        elif found != mark:
            raise ConfigError(f"study {name!r} in the storage was made for {what} (fingerprint {found}, this run "
                              f"{mark}); pass --overwrite, or another --out / --storage")
    return study


def delete_studies(storage, names: list[str]) -> None:
    """Remove the studies ``names`` from ``storage`` (those that exist)."""
    import optuna

    for name in names:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass


def check_storage(storage, cfg: RunConfig) -> None:
    """Refuse to continue studies made for another config (see :func:`open_study`)."""
    import optuna

    mark = config_fingerprint(cfg)
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        found = summary.user_attrs.get("config")
        if found not in (None, mark):
            raise ConfigError(f"study {summary.study_name!r} in the storage was made for another config or search "
                              f"space (fingerprint {found}, this config {mark}); pass --overwrite, or another --out / "
                              "--storage")


def finished_trials(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def suggest(trial, name: str, spec: TuneRange):
    """One value of setting ``name`` for ``trial``."""
    if spec.choices is not None:
        return trial.suggest_categorical(name, spec.choices)
    if spec.integer:
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step or 1, log=spec.log)
    return trial.suggest_float(name, float(spec.low), float(spec.high), step=spec.step, log=spec.log)


# --------------------------------------------------------------------------- one search


@dataclass
class SearchResult:
    name: str
    params: dict
    value: float
    complete: int
    pruned: int
    failed: int
    running: int = 0  # trials other processes were still running when this process's search of the study ended
    workers: dict = field(default_factory=dict)  # worker number (str) -> complete or pruned trials it ran
    refit_by: int | None = None  # the process (worker number) that refitted these settings on the outer fold


def search(name: str, cfg: RunConfig, data: RunData, pool: np.ndarray, storage, work: Path, *, trials: int,
           timeout_s: float | None, seed: int, worker: int = 0, overwrite: bool = False,
           on_trial=lambda study, trial: None) -> SearchResult:
    """Run study ``name`` up to ``trials`` complete or pruned trials (counted over every process that works on
    it), each fitted on an inner fit part of ``pool`` and scored on the grouped inner validation part of
    ``pool`` (no patch outside ``pool``). ``seed`` fixes the inner split; the sampler's seed is
    ``seed + SEED_STRIDE * worker``. The leader (``worker`` 0) needs a complete trial; a worker does not."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    labels, groups, rows = data.labels, data.groups, data.rows
    fit_rel, val_rel = inner_split(labels[pool], groups[pool], fraction=cfg.tune.val_fraction, seed=seed,
                                   what="inner validation")
    fit_idx, val_idx = pool[fit_rel], pool[val_rel]
    check_fold_classes(labels, fit_idx, data.classes, fold=-1 if name == "all" else int(name.rsplit("_", 1)[1]))
    views = {}  # by normalisation scope, when the search includes it: the patches as that scope shows them

    def view_of(patches):
        scope = patches.normalise_scope(data.index.images)
        if scope not in views:
            views[scope] = normalised_view(patches, data.cache, data.index, rows[fit_idx], None, seed=seed,
                                           measured_on=f"the {len(fit_idx)} inner-fit patches of study {name}")
        return views[scope]

    study = open_study(name, storage, cfg, seed=seed + SEED_STRIDE * worker, overwrite=overwrite,
                       data=data_fingerprint(data.folds))

    def objective(trial) -> float:
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("alive", time.time())
        params = {key: suggest(trial, key, spec) for key, spec in cfg.tune.space.items()}
        trial_cfg = with_parameters(cfg, params)
        settings = trial_settings(trial_cfg, cfg.tune)
        out = work / name / "trials" / str(trial.number)
        reporter = EpochReporter(trial, epochs=None if settings.max_steps else settings.max_epochs)
        try:
            with heartbeat(trial):
                fit_model(trial_cfg.models[0], view_of(trial_cfg.patches), rows, labels, fit_idx, val_idx,
                          data.index, data.classes, settings, out, callbacks=[reporter])
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if not reporter.reported:
            raise RuntimeError(f"trial {trial.number} of study {name}: the fit reported no validation epoch to "
                               "the pruner")
        return reporter.reported[max(reporter.reported)]

    started = time.monotonic()
    grid = grid_points(cfg.tune.space)
    cap = MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    # optimize ends after its own n_trials, at the cap (counted over all processes) or at the timeout; a trial
    # another process failed or abandoned leaves the study short, so this process asks again
    while (todo := trials - finished_trials(study)) > 0:
        left = None if timeout_s is None else timeout_s - (time.monotonic() - started)
        if left is not None and left <= 0:
            break
        if grid is not None:  # a space of choices: the next setting no process has finished or is running
            if (point := next_grid_point(study, grid[:trials], worker)) is None:
                if worker == 0 and leader_waits(study):
                    time.sleep(POLL_S)
                    continue
                break
            study.enqueue_trial(point)
            todo = 1
        study.optimize(objective, n_trials=todo, timeout=left, catch=(), callbacks=[cap, on_trial])
    return search_result(study, required=worker == 0)


def running_elsewhere(study, worker: int) -> list:
    """The running trials of processes other than ``worker`` whose heartbeat is recent. One silent for
    ``STALE_S`` (its process died) is failed, so that its setting is free again."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker", 0) != worker and beating(study, t)]


def beating(study, trial, *, since: float = float("-inf")) -> bool:
    """Whether the process of a running ``trial`` (a refit or a search trial) is alive: its heartbeat is newer
    than ``STALE_S`` ago and than ``since``. A silent trial is failed, so that its work is free again."""
    from optuna.trial import TrialState

    start = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    if float(trial.user_attrs.get("alive", start)) >= max(since, time.time() - STALE_S):
        return True
    try:
        study.tell(trial.number, state=TrialState.FAIL)
    except (RuntimeError, ValueError):  # finished or failed meanwhile by its process or another
        pass
    return False


def leader_waits(study) -> bool:
    """Whether the leader, with no grid setting left to run, waits: no trial has completed yet and other
    processes are running some (it needs a complete trial to refit)."""
    from optuna.trial import TrialState

    return not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) and bool(running_elsewhere(study, 0))


def next_grid_point(study, points: list[dict], worker: int) -> dict | None:
    """The first of ``points`` (the grid's settings, in order) without a complete or pruned trial in ``study``
    and not being run by another living process (:func:`running_elsewhere`; a running trial of this process's own
    ``worker`` number is left by an interrupted run, so its setting is run again); the process's turn among
    several such settings is its ``worker`` number. None when every setting is done or taken."""
    from optuna.trial import TrialState

    taken = [t.params for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))]
    queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    taken += [t.system_attrs.get("fixed_params", {}) for t in queued]
    taken += [t.params for t in running_elsewhere(study, worker)]
    free = [p for p in points if p not in taken]
    return free[worker % len(free)] if free else None


def trial_settings(trial_cfg: RunConfig, tune):
    """The training settings of a trial (``trial_cfg``: the config with the trial's parameters applied):
    ``tune.trial_epochs``, when set, replaces the fit's budget (epochs or steps); no progress bar."""
    settings = trial_cfg.train_settings
    update = {"progress": False}
    if (epochs := tune.trial_epochs) is not None:
        update.update(max_epochs=epochs, max_steps=None)
        if settings.min_epochs is not None:
            update["min_epochs"] = min(settings.min_epochs, epochs)
    return settings.model_copy(update=update)


def search_result(study, *, required: bool = True) -> SearchResult:
    """The best trial and the trial counts of ``study``; with ``required``, an error when no trial completed."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    workers = Counter(str(t.user_attrs.get("worker", 0)) for t in trials
                      if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    if not states[TrialState.COMPLETE]:
        if required:
            raise InputError(f"study {study.study_name}: no trial completed ({states[TrialState.PRUNED]} pruned, "
                             f"{states[TrialState.FAIL]} failed); raise tune.trials or tune.timeout_min")
        params, value = {}, float("nan")
    else:
        params, value = dict(study.best_trial.params), float(study.best_trial.value)
    return SearchResult(study.study_name, params, value, states[TrialState.COMPLETE], states[TrialState.PRUNED],
                        states[TrialState.FAIL], states[TrialState.RUNNING], dict(sorted(workers.items())))


# --------------------------------------------------------------------------- outer folds


def refit_outer(cfg: RunConfig, data: RunData, k: int, params: dict, out: Path) -> np.ndarray:
    """Fit ``cfg`` with ``params`` on outer fold ``k``'s training part as ``cytofuse cv`` fits a fold (its
    validation split, normalisation from the training part; the same function) and return the class
    probabilities of the test fold's patches."""
    from cytofuse.workflows.cv import fit_fold

    run_cfg = with_parameters(cfg, params)
    settings = run_cfg.train_settings.model_copy(update={"progress": False})
    fold = fit_fold(run_cfg.models[0], run_cfg, data.cache, data.index, data.folds, data.classes, out, k, settings,
                    extras=False)
    return fold.test[[f"prob_{name}" for name in data.classes]].to_numpy(dtype=np.float32)


def outer_frame(data: RunData, k: int, proba: np.ndarray) -> pd.DataFrame:
    """The out-of-fold predictions of outer fold ``k`` (as ``predictions.parquet`` of ``cytofuse cv``)."""
    _, test = data.outer(k)
    frame = data.folds.iloc[test][["patch_id", "image_id", "group", "y_true"]].reset_index(drop=True)
    frame.insert(3, "fold", k)
    for c, name in enumerate(data.classes):
        frame[f"prob_{name}"] = proba[:, c]
    return frame


# --------------------------------------------------------------------------- refits shared by the processes


REFITS = "refits"  # the study whose trials are the outer refits, claimed one at a time by every process
HEARTBEAT_S = 30.0  # a process refitting or running a search trial writes the time into it at least this often
STALE_S = 300.0  # a refit or search trial silent for this long is taken to have died and is done again
POLL_S = 2.0  # how often the leader looks for refits that other processes are running


@dataclass
class RefitJob:
    fold: int
    procedure: str  # "tuned" or "default"
    trials: int  # tune.trials: a search continued to more trials refits its (new) best settings again

    @property
    def key(self) -> str:
        return f"outer_{self.fold}/{self.procedure}" + (f"/trials_{self.trials}" if self.procedure == "tuned" else "")


def refit_jobs(cfg: RunConfig, n_folds: int) -> list[RefitJob]:
    procedures = ["tuned"] + (["default"] if cfg.tune.defaults else [])
    return [RefitJob(k, proc, cfg.tune.trials) for k in range(n_folds) for proc in procedures]


@contextmanager
def heartbeat(trial, every_s: float = HEARTBEAT_S):
    """Writes the time into a refit's or a search trial's ``trial`` every ``every_s`` seconds while the block runs
    (fit, validation and test-fold prediction alike), so that the other processes can tell a running trial from
    one whose process died. A thread, so that no step of the fit has to remember to beat."""
    import threading

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                trial.set_user_attr("alive", time.time())
            except Exception:  # noqa: BLE001 - taken for dead and finished elsewhere, or the storage is gone:
                return  # the refit's own final write reports either

    thread = threading.Thread(target=beat, name="cytofuse-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _encode(proba: np.ndarray) -> dict:
    import base64

    array = np.ascontiguousarray(proba, dtype="<f4")
    return {"shape": list(array.shape), "float32_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode(stored: dict) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(stored["float32_base64"]), dtype="<f4").reshape(stored["shape"]).copy()


def _refit_state(study, *, started: float):
    """(finished: job key -> its complete trial, live: keys of refits that a living process runs). A running
    refit whose heartbeat is older than ``STALE_S``, or than ``started`` (the leader's start: left by an
    interrupted run), is failed and its job is free again."""
    from optuna.trial import TrialState

    finished, live = {}, set()
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("job")
        if key is None:
            continue
        if t.state == TrialState.COMPLETE:
            finished.setdefault(key, t)
        elif t.state == TrialState.RUNNING and beating(study, t, since=started):
            live.add(key)
    return finished, live


CLAIM_WAIT_S = 10.0  # how long a claim waits for an older trial that has not named its job yet


def _claim(study, jobs: list[RefitJob], *, started: float, worker: int):
    """A new trial of the refit study holding the first job that no other process has finished or runs, or
    None when there is none. Two processes that pick the same job at once both see it; the trial with the
    lower number keeps it, the other tries again. A trial names its job just after it is created, so a claim
    first waits (up to ``CLAIM_WAIT_S``) until every older running trial has named one."""
    import datetime

    from optuna.trial import TrialState

    while True:
        finished, live = _refit_state(study, started=started)
        free = [j for j in jobs if j.key not in finished and j.key not in live]
        if not free:
            return None, finished, live
        job, trial = free[0], study.ask()
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("alive", time.time())
        trial.set_user_attr("job", job.key)
        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            older = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number
                     and t.state in (TrialState.RUNNING, TrialState.COMPLETE)]
            rival = any(t.user_attrs.get("job") == job.key for t in older)
            recent = datetime.datetime.now() - datetime.timedelta(seconds=60)
            unnamed = [t for t in older if t.state == TrialState.RUNNING and "job" not in t.user_attrs
                       and t.datetime_start is not None and t.datetime_start > recent]
            if rival or not unnamed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not rival:
            return (job, trial), finished, live
        study.tell(trial, state=TrialState.PRUNED)  # another process has it


def run_refits(cfg: RunConfig, data: RunData, storage, work: Path, jobs: list[RefitJob], *, worker: int,
               started: float, bar=None, task=None) -> dict[str, tuple]:
    """Every refit of ``jobs``, shared with the other processes of the search through the refit study of
    ``storage``: each process claims one job at a time and stores its test-fold probabilities in its trial.
    The leader (``worker`` 0) waits for the jobs other processes run and returns every finished job as
    (probabilities, settings, worker, inner value of the settings); a worker returns when no job is left to
    claim. ``started``: the leader's start (its stale-refit rule); a worker passes -inf."""
    from optuna.exceptions import UpdateFinishedTrialError

    study = open_study(REFITS, storage, cfg, seed=0, data=data_fingerprint(data.folds))
    while True:
        claimed, finished, live = _claim(study, jobs, started=started, worker=worker)
        done = sum(j.key in finished for j in jobs)
        if bar is not None:
            bar.update(task, completed=done,
                       description=f"tune: refits on the outer folds ({len(live)} running elsewhere)" if live
                       else "tune: refits on the outer folds")
        if claimed is None:
            if done == len(jobs) or worker:
                break
            time.sleep(POLL_S)  # the leader waits for refits that other processes are running
            continue
        job, trial = claimed
        params = {}
        if job.procedure == "tuned":
            best = search_result(open_study(f"outer_{job.fold}", storage, cfg, seed=0))
            params, trial_value = best.params, best.value
            trial.set_user_attr("inner_value", trial_value)
        trial.set_user_attr("params", params)
        with heartbeat(trial):
            proba = refit_outer(cfg, data, job.fold, params, work / f"outer_{job.fold}" / job.procedure)
        try:
            trial.set_user_attr("proba", _encode(proba))
            study.tell(trial, 1.0)
        except UpdateFinishedTrialError:  # taken for dead meanwhile: the job is (being) done again
            continue
    finished, _ = _refit_state(study, started=float("-inf"))
    wanted = {j.key for j in jobs}
    return {key: (_decode(t.user_attrs["proba"]), dict(t.user_attrs["params"]), int(t.user_attrs["worker"]),
                  t.user_attrs.get("inner_value"))
            for key, t in finished.items() if key in wanted}


def consensus(cfg: RunConfig, bests: list[dict]) -> dict:
    """Per setting: the median over the folds' best values (integers rounded), or the most frequent choice."""
    out = {}
    for name, spec in cfg.tune.space.items():
        values = [b[name] for b in bests if name in b]
        if spec.choices is not None:
            out[name] = Counter(values).most_common(1)[0][0]
        else:
            median = float(np.median(values))
            out[name] = int(round(median)) if spec.integer else median
    return out


# --------------------------------------------------------------------------- the command


@dataclass
class TuneResult:
    run_dir: Path
    classes: list[str]
    folds: list[SearchResult]
    final: dict
    best_config: Path
    summary: pd.DataFrame
    metrics: dict = field(default_factory=dict)  # "tuned" / "default" -> evaluate_run output
    seconds: float = 0.0


def _open_run(run_dir: Path, *, overwrite: bool) -> Path:
    """A new run folder, an unfinished one, or a finished tune run (to continue its studies to more trials)."""
    marker = run_dir / MARKER
    if not overwrite and marker.is_file() and (run_dir / "tune").is_dir() and marker.read_text().strip() == "finished":
        marker.write_text("running\n")
        return run_dir
    return prepare_run_dir(run_dir, overwrite=overwrite)


@dataclass
class WorkerResult:
    """What a worker process (``worker`` > 0) did: the trials of each study, counted over all processes."""

    run_dir: Path
    worker: int
    storage: str
    studies: list[SearchResult]
    seconds: float = 0.0
    refits: list[str] = field(default_factory=list)  # the outer refits this worker ran (job keys)

    def ran(self, study: SearchResult) -> int:
        """Complete or pruned trials of ``study`` that this worker ran."""
        return study.workers.get(str(self.worker), 0)


def run_tune(cfg: RunConfig, run_dir: str | Path, *, trials: int | None = None, timeout_min: float | None = None,
             storage: str | None = None, worker: int = 0, overwrite: bool = False,
             progress: bool = True) -> TuneResult | WorkerResult:
    """The nested search of the module docstring; writes the tune run folder and returns its results.

    ``worker`` 0 is the leader; a ``worker`` N > 0 shares the leader's ``storage``, only runs trials of its
    studies (in ``run_dir``, its own run folder) and returns a :class:`WorkerResult`. ``overwrite`` replaces the
    run folder; the leader's also deletes the studies in the storage, a worker's never does."""
    if cfg.tune is None:
        raise ConfigError("the config has no tune section: add tune.space (the settings to search), e.g. "
                          "tune: {space: {train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}")
    if worker < 0:
        raise ConfigError(f"--worker must be 0 (the leader) or a worker number above 0, got {worker}")
    if worker and not storage:
        raise ConfigError(f"--worker {worker} needs --storage: the URL or journal file of the studies the leader "
                          "(--worker 0) works on; a worker has no studies of its own")
    update = {k: v for k, v in {"trials": trials, "timeout_min": timeout_min}.items() if v is not None}
    if update:
        cfg = cfg.model_copy(update={"tune": cfg.tune.model_validate(cfg.tune.model_dump() | update)})
    started = time.monotonic()
    with ExitStack() as stack:
        shared = stack.enter_context(opened_storage(storage)) if storage else None  # unreachable: fails before any work
        if shared is not None and (worker or not overwrite):
            check_storage(shared, cfg)  # before the run folder is made or its config and stages are rewritten
        run_dir = _open_run(Path(run_dir), overwrite=overwrite)
        (run_dir / "tune").mkdir(exist_ok=True)
        storage_obj = shared
        if shared is None:
            storage_obj = stack.enter_context(opened_storage(f"sqlite:///{(run_dir / 'tune' / 'study.db').resolve()}"))
            if not overwrite:
                check_storage(storage_obj, cfg)
        return _tune(cfg, run_dir, storage_obj, storage, worker=worker, overwrite=overwrite, progress=progress,
                     started=started)


def _tune(cfg: RunConfig, run_dir: Path, storage_obj, storage: str | None, *, worker: int, overwrite: bool,
          progress: bool, started: float) -> TuneResult | WorkerResult:
    """:func:`run_tune` once the storage is open and checked and the run folder is made."""
    import optuna

    tune, run, work = cfg.tune, RunFolder(run_dir), run_dir / "tune"
    dump_config(cfg.resolved(), run.config)
    data = prepare_data(cfg, run_dir, progress=progress)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [f"outer_{k}" for k in range(data.n_folds)] + (["all"] if tune.final == "all" else [])
    if overwrite and not worker:  # all at once, before any process adds trials to a fresh study
        delete_studies(storage_obj, names + [REFITS])
    started_wall = time.time() - (time.monotonic() - started)
    default_by: dict[int, int] = {}
    deadline = started + tune.timeout_min * 60 if tune.timeout_min else None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        results = _search_studies(cfg, data, names, storage_obj, work, bar, worker=worker, deadline=deadline)
        jobs = refit_jobs(cfg, data.n_folds)
        task = bar.add_task("tune: refits on the outer folds", total=len(jobs))
        refits = run_refits(cfg, data, storage_obj, work, jobs, worker=worker, task=task, bar=bar,
                            started=started_wall if not worker else float("-inf"))
        if worker:
            return _finish_worker(run_dir, worker, storage, results, time.monotonic() - started, refits)
    parts: dict[str, list[pd.DataFrame]] = {}
    for job in jobs:
        proba, params, by, value = refits[job.key]
        parts.setdefault(job.procedure, []).append(outer_frame(data, job.fold, proba))
        if job.procedure == "tuned":  # the settings refitted (the study's best when its refit began) and the
            # study's trial counts now: trials other processes finished after this one's search count too
            found = search_result(open_study(f"outer_{job.fold}", storage_obj, cfg, seed=0))
            results[f"outer_{job.fold}"] = replace(found, params=params, value=float(value), refit_by=by)
        else:
            default_by[job.fold] = by
    final = results["all"].params if tune.final == "all" else consensus(cfg, [results[f"outer_{k}"].params
                                                                               for k in range(data.n_folds)])
    best_config = _write_best_config(cfg, final, run_dir)
    metrics, summary = _nested_estimate(cfg, data, parts)
    _write_trials(storage_obj, names, work / "trials.csv")
    result = TuneResult(run_dir, data.classes, [results[n] for n in names if n != "all"], final, best_config, summary,
                        metrics, time.monotonic() - started)
    write_json_atomic(work / "nested.json", {
        "measured_on": f"{data.n_folds} outer folds of the grouped CV (cv.seed {cfg.cv.seed}); trials scored on a "
                       f"grouped inner validation split ({tune.val_fraction:.0%} of each outer training part's groups)"
                       + (f" after at most {tune.trial_epochs} epochs" if tune.trial_epochs else ""),
        "storage": storage_label(storage) if storage else None,
        "final": {"rule": tune.final, "params": final},
        "folds": [vars(r) for r in result.folds] + ([vars(results["all"])] if "all" in results else []),
        "default_refit_by": default_by,
        "metrics": metrics, "seconds": result.seconds})
    write_table_atomic(work / "nested.csv", summary)
    mark_finished(run_dir)
    return result


def _search_studies(cfg: RunConfig, data: RunData, names: list[str], storage, work: Path, bar, *, worker: int,
                    deadline: float | None) -> dict[str, SearchResult]:
    """Every study of ``names`` in turn, with a progress bar of this process's trials and the best value."""
    tune = cfg.tune
    who = f"tune (worker {worker})" if worker else "tune"
    task = bar.add_task(who, total=len(names) * tune.trials)
    results: dict[str, SearchResult] = {}
    for i, name in enumerate(names):
        pool = data.pool if name == "all" else data.outer(int(name.rsplit("_", 1)[1]))[0]
        left = None if deadline is None else max(1.0, (deadline - time.monotonic()) / (len(names) - i))

        def on_trial(study, trial, name=name) -> None:
            bar.advance(task)
            try:
                best = f"{study.best_value:.3f}"
            except ValueError:  # no complete trial yet
                best = "-"
            bar.update(task, description=f"{who} {name}: trial {trial.number} {trial.state.name.lower()}, best {best}")

        bar.update(task, description=f"{who} {name}")
        results[name] = search(name, cfg, data, pool, storage, work, trials=tune.trials, timeout_s=left,
                               seed=tune.seed + i, worker=worker, on_trial=on_trial)
        bar.update(task, completed=(i + 1) * tune.trials)
    return results


def _finish_worker(run_dir: Path, worker: int, storage: str, results: dict[str, SearchResult],
                   seconds: float, refits: dict[str, tuple]) -> WorkerResult:
    mine = sorted(key for key, (_, _, by, _) in refits.items() if by == worker)
    result = WorkerResult(run_dir, worker, storage_label(storage), list(results.values()), seconds, mine)
    write_json_atomic(run_dir / "tune" / "worker.json", {
        "worker": worker, "storage": result.storage, "seconds": seconds, "refits": mine,
        "studies": [{"name": r.name, "ran": result.ran(r), **vars(r), "value": None if np.isnan(r.value) else r.value}
                    for r in result.studies]})
    mark_finished(run_dir)
    return result


def _write_best_config(cfg: RunConfig, params: dict, run_dir: Path) -> Path:
    best = with_parameters(cfg, params).resolved()
    text = yaml_dump(best.model_dump(mode="json", exclude={"tune"}))
    header = (f"# written by cytofuse tune: the settings {json.dumps(params)} (tune.final: {cfg.tune.final}) on the "
              "config's other settings; ready for cytofuse cv / cytofuse train\n")
    return write_text_atomic(run_dir / "best_config.yaml", header + text)


def yaml_dump(raw: dict) -> str:
    import yaml

    return yaml.safe_dump(raw, sort_keys=False)


def _nested_estimate(cfg: RunConfig, data: RunData, parts: dict[str, list[pd.DataFrame]]) -> tuple[dict, pd.DataFrame]:
    from cytofuse.evaluation.metrics import RunMetrics, evaluate_run

    metrics, rows = {}, []
    for proc, frames in parts.items():
        predictions = pd.concat(frames, ignore_index=True)
        metrics[proc] = evaluate_run(predictions, classes=data.classes, method=cfg.cv.aggregate, n_boot=0,
                                     seed=cfg.cv.seed)
        view = RunMetrics({"cv": metrics[proc]}, source=proc)
        for level in ("patch", "image"):
            row = {"procedure": proc, "level": level}
            for metric in ("balanced_accuracy", "auroc_macro", "mcc", "macro_f1"):
                stat = view.stat(metric, level)
                row[f"{metric}_mean"], row[f"{metric}_sd"] = stat.mean, stat.sd
            rows.append(row)
    return metrics, pd.DataFrame(rows)


def _write_trials(storage, names: list[str], path: Path) -> None:
    import optuna

    frames = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration", "user_attrs"))
        frame.insert(0, "study", name)
        worker = frame.pop("user_attrs_worker") if "user_attrs_worker" in frame else pd.Series(pd.NA, index=frame.index)
        frame = frame.drop(columns=[c for c in frame.columns if c.startswith("user_attrs_")])
        frame.insert(2, "worker", worker.astype("Int64"))  # which process ran the trial (0: the leader)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table["duration"] = pd.to_timedelta(table["duration"]).dt.total_seconds()
    write_table_atomic(path, table)


def print_tune_summary(result: TuneResult) -> None:
    """The nested estimate of the tuned procedure beside the defaults', the folds' best settings and the files."""
    from rich.console import Console

    from cytofuse.evaluation.metrics import format_summary_table, to_rich_table

    console = Console()
    for level in ("patch", "image"):
        table = format_summary_table(result.metrics, level=level)
        table = table.drop(columns=[c for c in table.columns if str(c) == "Accuracy"])
        console.print(to_rich_table(table, title=f"nested estimate, {level} level: mean ± sd over the outer folds"))
    for r in result.folds:
        console.print(f"{r.name}: best inner value {r.value:.3f} ({_counts(r)}) with {json.dumps(r.params)}")
    console.print(f"best_config.yaml ({result.best_config}): {json.dumps(result.final)}")
    console.print(f"search took {result.seconds / 60:.1f} min; run folder: {result.run_dir}")


def _counts(r: SearchResult) -> str:
    text = f"{r.complete} complete, {r.pruned} pruned, {r.failed} failed"
    text += f", {r.running} running elsewhere" if r.running else ""
    if len(r.workers) > 1:
        text += "; by worker " + ", ".join(f"{w}: {n}" for w, n in r.workers.items())
    return text


def print_worker_summary(result: WorkerResult) -> None:
    """What a worker did: its trials per study, and who writes the results."""
    from rich.console import Console

    console = Console()
    ran = sum(result.ran(r) for r in result.studies)
    console.print(f"worker {result.worker}: ran {ran} trials on {result.storage} in "
                  f"{result.seconds / 60:.1f} min; run folder: {result.run_dir}")
    for r in result.studies:
        best = "no complete trial yet" if np.isnan(r.value) else f"best inner value {r.value:.3f}"
        console.print(f"{r.name}: {result.ran(r)} of its trials by this worker ({_counts(r)}); {best}")
    console.print(f"outer refits by this worker: {', '.join(result.refits) or 'none'}; the leader (--worker 0) "
                  "collects every refit, prints the nested estimate and writes best_config.yaml")
