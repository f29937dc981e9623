"""Image-grouped stratified cross-validation of one or more classifiers, and sweeps.

Folds come from scikit-learn's ``StratifiedGroupKFold`` (or ``LeaveOneGroupOut``): all
patches of a group (image, field, well, patient) sit in one fold. The validation split used
for early stopping inside each training fold is grouped the same way, and an optional
held-out test set is split off first, also by group.

Run folder::

    config.yaml  patches.parquet  images.parquet  attrition.csv  folds.csv  cache/
    models/<name>/fold_<k>/{best.safetensors, history.csv, fit.json, recipe.json}
    models/<name>/{predictions.parquet, metrics.json}
    models/handcrafted/{predictions.parquet, metrics.json}     (cv.baseline)
    probes/<probe>/{predictions.parquet, metrics.json}         (cv.probes)
    shortcut_warnings.json  summary.csv

Beside the deep models, the handcrafted-feature baseline and the shortcut probes of
:mod:`cytofuse.evaluation.baseline` run through the same folds; ``summary.csv`` says which row is which
(column ``kind``: model, baseline or probe).

Each fold's ``recipe.json`` is its model's ``PatchRecipe``: the input channels (no training-only
auxiliary channel), the patch settings and the normalisation of that fold's training split only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytofuse.config import ModelSettings, RunConfig, dump_config
from cytofuse.errors import InputError
from cytofuse.preprocess.patches import PatchIndex
from cytofuse.runs import ModelRun, RunFolder, write_json_atomic, write_table_atomic
from cytofuse.training.cache import normalised_view
from cytofuse.workflows.fitting import build_run_cache, fit_model


# --------------------------------------------------------------------------- splits


def outer_folds(labels: np.ndarray, groups: np.ndarray, *, n_folds: int | str, seed: int = 0,
                classes: list[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) position arrays, grouped and stratified; ``"loo"`` leaves one group out."""
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

    if n_folds == "loo":
        splitter = LeaveOneGroupOut()
    else:
        _check_groups_per_class(labels, groups, int(n_folds), what="n_folds", classes=classes)
        splitter = StratifiedGroupKFold(n_splits=int(n_folds), shuffle=True, random_state=seed)
    return [(np.asarray(a), np.asarray(b)) for a, b in splitter.split(np.zeros(len(labels)), labels, groups)]


def inner_split(labels: np.ndarray, groups: np.ndarray, *, fraction: float, seed: int = 0, what: str = "validation") -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (rest, held) with about ``fraction`` of the groups held, grouped and stratified."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1 / fraction)))
    per_class = _groups_by_class(labels, groups)
    thin = {c: n for c, n in per_class.items() if n < 2}
    if thin:
        raise InputError(
            f"cannot hold out a grouped {what} split: class(es) {sorted(thin)} have only "
            f"{list(thin.values())} group(s) in this training split; add images or lower n_folds"
        )
    n_splits = min(n_splits, min(per_class.values()))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, held = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return np.asarray(rest), np.asarray(held)


def _groups_by_class(labels: np.ndarray, groups: np.ndarray) -> dict:
    frame = pd.DataFrame({"label": labels, "group": groups})
    return frame.groupby("label")["group"].nunique().to_dict()


def _check_groups_per_class(labels: np.ndarray, groups: np.ndarray, n_folds: int, *, what: str,
                            classes: list[str] | None = None) -> None:
    if n_folds < 2:
        raise InputError(f"{what} must be >= 2 or 'loo', got {n_folds}")
    few = {c: n for c, n in _groups_by_class(labels, groups).items() if n < n_folds}
    if few:
        detail = ", ".join(f"{classes[c] if classes else c!r}: {n}" for c, n in few.items())
        raise InputError(
            f"{what}={n_folds} but some classes have fewer groups with patches than folds ({detail}); "
            f"lower {what}, add images, or keep more patches (images that kept none are listed in images.parquet)"
        )


def check_fold_classes(labels: np.ndarray, fit_idx: np.ndarray, classes: list[str], *, fold: int) -> None:
    """A training split must contain every class, or its model cannot learn one."""
    missing = sorted(set(range(len(classes))) - set(np.unique(labels[fit_idx]).tolist()))
    if missing:
        names = [classes[i] for i in missing]
        raise InputError(f"fold {fold}: the training split lacks class(es) {names}; use fewer folds or add groups of these classes")


# --------------------------------------------------------------------------- the CV run


@dataclass
class CVResult:
    """Per model: its predictions table and the metrics of ``cytofuse.evaluation.metrics.evaluate_run``."""

    run_dir: Path
    classes: list[str]
    predictions: dict[str, pd.DataFrame]
    metrics: dict[str, dict]
    summary: pd.DataFrame
    kinds: dict[str, str] = field(default_factory=dict)  # name -> "model", "baseline" or "probe"
    shortcut_warnings: list[str] = field(default_factory=list)


def assign_folds(index: PatchIndex, cfg: RunConfig, classes: list[str]) -> pd.DataFrame:
    """Per patch: fold (-1 for the held-out test set) and role inside its training fold per fold."""
    patches = index.patches
    labels = patches["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    groups = patches["group"].to_numpy()
    fold = np.full(len(patches), -1, dtype=np.int64)
    pool = np.arange(len(patches))
    if cfg.cv.test_fraction > 0:
        rest, _ = inner_split(labels, groups, fraction=cfg.cv.test_fraction, seed=cfg.cv.seed, what="test")
        pool = rest
    split = outer_folds(labels[pool], groups[pool], n_folds=cfg.cv.n_folds, seed=cfg.cv.seed, classes=classes)
    for k, (_, test) in enumerate(split):
        fold[pool[test]] = k
    return pd.DataFrame({"patch_id": patches["patch_id"], "image_id": patches["image_id"], "group": groups,
                         "y_true": labels, "fold": fold})


def validated_image_set(cfg: RunConfig):
    """The config's image set, checked as a whole (files, channels, sizes, groups for the folds) before any work."""
    from cytofuse.workflows.patching import load_image_set

    image_set = load_image_set(cfg.data)
    n_folds = None if cfg.cv.n_folds == "loo" else int(cfg.cv.n_folds)
    image_set.validate(n_folds=n_folds, channels=cfg.patches.channels, exclude_channels=cfg.patches.exclude_channels,
                       min_classes=1 if cfg.labels else 2, patch_size=cfg.patches.size)
    return image_set


def patch_stage(cfg: RunConfig, image_set, run_dir: Path, *, progress: bool):
    """Patch index, cache, classes and folds (written to ``folds.csv``) of a CV-style run; resumed stages are read back."""
    from cytofuse.preprocess.patches import build_patch_index

    index = build_patch_index(image_set, cfg.patches, run_dir, workers=cfg.workers, progress=progress,
                              scheduler=cfg.scheduler)
    if index.sparse_images and len(index.sparse_images) == len(index.images):
        raise InputError("no image kept any patch; lower patches.min_ratio or use patches.fallback=top_k")
    cache = build_run_cache(image_set, index, run_dir, progress=progress)
    index = refine_patch_index(cfg, image_set, index, cache, run_dir, progress=progress)
    classes = sorted(index.patches["label"].unique().tolist())
    if cfg.cv.positive_class is not None and cfg.cv.positive_class not in classes:
        raise InputError(f"cv.positive_class must be one of the classes {classes}, got {cfg.cv.positive_class!r}")
    folds = assign_folds(index, cfg, classes)
    write_table_atomic(RunFolder(run_dir).folds, folds)
    return index, cache, classes, folds


def run_cv(cfg: RunConfig, run_dir: str | Path, *, overwrite: bool = False, progress: bool = True) -> CVResult:
    """Patches -> cache -> per model and fold: fit, predict the test fold -> metrics; resumable."""
    from cytofuse.runs import mark_finished, prepare_run_dir

    image_set = validated_image_set(cfg)
    run_dir = prepare_run_dir(run_dir, overwrite=overwrite)
    run = RunFolder(run_dir)
    dump_config(cfg.resolved(), run.config)
    index, cache, classes, folds = patch_stage(cfg, image_set, run_dir, progress=progress)
    predictions, metrics = {}, {}
    n_folds = int(folds["fold"].max()) + 1
    # Lightning draws its own rich progress bar while training; rich allows one live display at a
    # time, so the overall bar is shown only when training bars are off, and lines otherwise.
    bars = progress and cfg.train_settings.progress
    from rich.console import Console
    from rich.progress import Progress

    with Progress(disable=not progress or bars) as bar:
        task = bar.add_task("cross-validation", total=len(cfg.models) * n_folds)
        fitted: dict[tuple[str, int], FoldResult] = {}
        if cfg.cv.jobs > 1:  # every fit first, side by side; then each model's evaluation below
            bar.update(task, description=f"cross-validation: {len(cfg.models)} models x {n_folds} folds in "
                                         f"{cfg.cv.jobs} processes")
            counts = dict.fromkeys((m.display_name for m in cfg.models), 0)

            def fold_done(name: str) -> None:
                counts[name] += 1
                bar.advance(task)
                if bars:
                    Console(stderr=True).print(f"[bold]{name}[/]: {counts[name]}/{n_folds} folds done")

            fitted = _parallel_folds(cfg, cache, index, folds, classes, run, on_fold=fold_done)
        for model_cfg in cfg.models:
            name = model_cfg.display_name
            bar.update(task, description=f"cross-validation: {name}")
            done = iter(range(1, n_folds + 1))

            def on_fold(name=name, done=done) -> None:
                bar.advance(task)
                if bars:
                    Console(stderr=True).print(f"[bold]{name}[/]: fold {next(done)}/{n_folds} done")

            predictions[name], metrics[name] = _cv_model(
                model_cfg, cfg, cache, index, folds, classes, run.model(name),
                progress=progress, on_fold=on_fold,
                fitted={k: fitted[name, k] for k in range(n_folds)} if fitted else None,
            )
    kinds = dict.fromkeys(predictions, "model")
    for name, (kind, pred, metric) in _cv_feature_sets(cfg, cache, index, folds, classes, run_dir, progress=progress).items():
        predictions[name], metrics[name], kinds[name] = pred, metric, kind
    warnings = _shortcut_warnings(cfg, metrics, kinds, classes, run_dir)
    summary = summary_table(metrics, kinds=kinds)
    write_table_atomic(run.summary, summary)
    mark_finished(run_dir)
    return CVResult(run_dir, classes, predictions, metrics, summary, kinds, warnings)


def refine_patch_index(cfg: RunConfig, image_set, index: PatchIndex, cache, run_dir: Path, *, progress: bool) -> PatchIndex:
    """After the foreground filter: the learned empty-patch filter, then labels from a channel (both optional).

    Labels are derived from the patches that survive both filters, as in Pattarone et al.
    """
    if cfg.patches.empty_filter is None and cfg.labels is None:
        return index
    from cytofuse.preprocess.patches import write_patch_index

    if cfg.patches.empty_filter is not None:
        from cytofuse.preprocess.emptyfilter import filter_patch_index

        index = filter_patch_index(index, cache, cfg.patches.empty_filter, progress=progress)
        if index.patches.empty:
            raise InputError(f"the empty-patch filter {cfg.patches.empty_filter} rejected every patch")
    if cfg.labels is not None:
        from cytofuse.preprocess.labels import derive_patch_labels

        index, _ = derive_patch_labels(image_set, index, cfg.labels, run_dir, seed=cfg.cv.seed, progress=progress)
    write_patch_index(index, run_dir)
    return index


def _cv_feature_sets(cfg: RunConfig, cache, index: PatchIndex, folds: pd.DataFrame, classes: list[str], run_dir: Path,
                     *, progress: bool) -> dict[str, tuple[str, pd.DataFrame, dict]]:
    """Baseline and probes through the same folds: name -> (kind, predictions, metrics); finished ones are read back."""
    from cytofuse.evaluation.baseline import PROBES, feature_tables

    run = RunFolder(run_dir)
    targets = {"handcrafted": ("baseline", "handcrafted", run.model("handcrafted"))} if cfg.cv.baseline else {}
    if cfg.cv.probes:
        targets |= {f"probe:{p}": ("probe", p, run.probe(p)) for p in PROBES}
    todo = [t[1] for t in targets.values() if not t[2].metrics.is_file()]
    if todo and progress:
        from rich.console import Console

        Console(stderr=True).print(f"handcrafted features for {', '.join(todo)} ({len(folds)} patches)")
    from cytofuse.config import baseline_channels
    from cytofuse.training.cache import CacheChannels

    keep = baseline_channels(cfg, index.channel_names)
    view = cache if keep == list(range(len(index.channel_names))) else CacheChannels(cache, keep)
    tables = feature_tables(view, index.images, folds["patch_id"].to_numpy(), folds["image_id"].tolist(), which=todo) if todo else {}
    out = {}
    for name, (kind, key, folder) in targets.items():
        if key in tables:
            out[name] = (kind, *_cv_features(tables[key], cfg, folds, classes, folder, kind=kind))
        else:
            out[name] = (kind, pd.read_parquet(folder.predictions), json.loads(folder.metrics.read_text()))
    return out


def _cv_features(features: pd.DataFrame, cfg: RunConfig, folds: pd.DataFrame, classes: list[str], out: ModelRun,
                 *, kind: str) -> tuple[pd.DataFrame, dict]:
    """Gradient boosting on one feature table through the folds; writes predictions and metrics."""
    from cytofuse.evaluation.baseline import cross_validate_features, default_classifier
    from cytofuse.evaluation.metrics import evaluate_run

    out.root.mkdir(parents=True, exist_ok=True)
    predictions, held = cross_validate_features(features, folds, classes, seed=cfg.cv.seed)
    predictions, held = _units(predictions, cfg), None if held is None else _units(held, cfg)
    write_table_atomic(out.predictions, predictions)
    metrics = {"cv": evaluate_run(predictions, classes=classes, method=cfg.cv.aggregate, n_boot=1000, seed=cfg.cv.seed)}
    if held is not None:
        write_table_atomic(out.test_predictions, held)
        metrics["test"] = evaluate_run(held, classes=classes, method=cfg.cv.aggregate, n_boot=1000, seed=cfg.cv.seed)
    metrics["model"] = {"kind": kind, "classifier": type(default_classifier()).__name__, "features": list(features.columns)}
    metrics["measured_on"] = _measured_on(folds, int(folds["fold"].max()) + 1, cfg)
    write_json_atomic(out.metrics, metrics)
    return predictions, metrics


def _shortcut_warnings(cfg: RunConfig, metrics: dict, kinds: dict, classes: list[str], run_dir: Path) -> list[str]:
    """Probe warnings (see :func:`cytofuse.evaluation.baseline.shortcut_warnings`), also written to shortcut_warnings.json."""
    from cytofuse.evaluation.baseline import shortcut_warnings

    found = shortcut_warnings(metrics, kinds, n_classes=len(classes), margin=cfg.cv.probe_margin, far=cfg.cv.probe_far)
    record = {"rule": f"probe 95% CI low > chance and (within {cfg.cv.probe_margin} of the best model "
                      f"or > chance + {cfg.cv.probe_far}), image level", "warnings": found}
    write_json_atomic(RunFolder(run_dir).shortcut_warnings, record)
    return found


@dataclass
class FoldResult:
    """What one fit of a CV (one model, one fold) hands to the model's evaluation."""

    test: pd.DataFrame  # out-of-fold class probabilities of the fold's test patches
    val: pd.DataFrame | None  # of its validation split (positive-class thresholds only)
    held_out: pd.DataFrame | None  # of the held-out test set (cv.test_fraction)
    parameters: int


def fit_fold(model_cfg: ModelSettings, cfg: RunConfig, cache, index: PatchIndex, folds: pd.DataFrame,
             classes: list[str], folder: Path, k: int, settings, *, extras: bool = True) -> FoldResult:
    """Fit ``model_cfg`` on fold ``k``'s training split (normalisation from it alone) into ``folder`` and predict
    its test fold; with ``extras``, also the validation split (``cv.positive_class``) and the held-out set."""
    from cytofuse.config import model_channels
    from cytofuse.models import count_parameters
    from cytofuse.training.fit import eval_device

    rows = cache.positions(folds["patch_id"].to_numpy())
    labels, groups = folds["y_true"].to_numpy(), folds["group"].to_numpy()
    fold = folds["fold"].to_numpy()
    inputs, _ = model_channels(model_cfg, index.channel_names)
    train, test = np.flatnonzero((fold != k) & (fold >= 0)), np.flatnonzero(fold == k)
    fit_rel, val_rel = inner_split(labels[train], groups[train], fraction=cfg.cv.val_fraction, seed=cfg.cv.seed + k)
    fit_idx, val_idx = train[fit_rel], train[val_rel]
    check_fold_classes(labels, fit_idx, classes, fold=k)
    view = normalised_view(cfg.patches, cache, index, rows[train], folder, seed=cfg.cv.seed + k,
                           measured_on=f"the {len(train)} patches of fold {k}'s training split (test fold excluded)",
                           channels=[index.channel_names[i] for i in inputs])
    model = fit_model(model_cfg, view, rows, labels, fit_idx, val_idx, index, classes, settings, folder)
    held = np.flatnonzero(fold == -1)
    how = dict(channels=inputs, tta=settings.tta, device=eval_device(settings))
    result = FoldResult(
        _predict(model, view, rows, folds, test, classes, fold=k, **how),
        _predict(model, view, rows, folds, val_idx, classes, fold=k, **how)
        if extras and cfg.cv.positive_class is not None else None,
        _predict(model, view, rows, folds, held, classes, fold=-1, **how) if extras and len(held) else None,
        count_parameters(model))
    model.cpu()
    return result


def _fold_settings(cfg: RunConfig, *, progress: bool):
    settings = cfg.train_settings
    return settings.model_copy(update={"progress": progress and settings.progress})


def _init_fold_process(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _fold_in_process(model_cfg, cfg, cache, index, folds, classes, out, k) -> FoldResult:
    return fit_fold(model_cfg, cfg, cache, index, folds, classes, out.fold(k).root, k,
                    _fold_settings(cfg, progress=False))


def _parallel_folds(cfg: RunConfig, cache, index: PatchIndex, folds: pd.DataFrame, classes: list[str], run: RunFolder,
                    *, on_fold) -> dict[tuple[str, int], FoldResult]:
    """Every (model, fold) fit of the run in ``cfg.cv.jobs`` spawned processes, each with an equal share of
    torch's threads; ``on_fold(name)`` after each. The first error stops the others and is raised."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    import torch

    n_folds = int(folds["fold"].max()) + 1
    threads = max(1, torch.get_num_threads() // cfg.cv.jobs)
    results: dict[tuple[str, int], FoldResult] = {}
    with ProcessPoolExecutor(max_workers=cfg.cv.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_fold_process, initargs=(threads,)) as pool:
        pending = {}
        for model_cfg in cfg.models:
            name = model_cfg.display_name
            run.model(name).root.mkdir(parents=True, exist_ok=True)
            for k in range(n_folds):
                future = pool.submit(_fold_in_process, model_cfg, cfg, cache, index, folds, classes, run.model(name), k)
                pending[future] = (name, k)
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    key = pending.pop(future)
                    results[key] = future.result()  # raises the fit's own error
                    on_fold(key[0])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def _cv_model(model_cfg: ModelSettings, cfg: RunConfig, cache, index: PatchIndex, folds: pd.DataFrame,
              classes: list[str], out: ModelRun, *, progress: bool, on_fold=lambda: None,
              fitted: dict[int, FoldResult] | None = None) -> tuple[pd.DataFrame, dict]:
    """Every fold of one model (or the given ``fitted`` folds, computed elsewhere), then its metrics."""
    from cytofuse.config import model_channels
    from cytofuse.evaluation.metrics import evaluate_run

    out.root.mkdir(parents=True, exist_ok=True)
    settings = _fold_settings(cfg, progress=progress)
    n_folds = int(folds["fold"].max()) + 1
    results = []
    for k in range(n_folds):
        if fitted is not None:
            results.append(fitted[k])
            continue
        results.append(fit_fold(model_cfg, cfg, cache, index, folds, classes, out.fold(k).root, k, settings))
        on_fold()
    predictions = _units(pd.concat([r.test for r in results], ignore_index=True), cfg)
    write_table_atomic(out.predictions, predictions)
    _plot_curves(out, n_folds)
    metrics = {"cv": evaluate_run(predictions, classes=classes, method=cfg.cv.aggregate, n_boot=1000, seed=cfg.cv.seed)}
    metrics |= _extra_metrics(cfg, predictions, [r.val for r in results if r.val is not None], index, classes)
    test_probs = [r.held_out for r in results if r.held_out is not None]
    if test_probs:
        held = _units(_ensemble(test_probs, classes), cfg)
        write_table_atomic(out.test_predictions, held)
        metrics["test"] = evaluate_run(held, classes=classes, method=cfg.cv.aggregate, n_boot=1000, seed=cfg.cv.seed)
    inputs, aux = model_channels(model_cfg, index.channel_names)
    metrics["model"] = model_cfg.model_dump(mode="json") | {
        "parameters": results[-1].parameters, "input_channels": [index.channel_names[i] for i in inputs],
        "auxiliary_channels": [index.channel_names[i] for i in aux],
        "normalisation": cfg.patches.normalise_scope(index.images)}
    metrics["measured_on"] = _measured_on(folds, n_folds, cfg)
    write_json_atomic(out.metrics, metrics)
    return predictions, metrics


def _plot_curves(out: ModelRun, n_folds: int) -> None:
    """Training curves of every fold in one figure (PNG and SVG)."""
    from cytofuse.evaluation.metrics import plot_training_curves

    files = {k: out.fold(k).history for k in range(n_folds)}
    histories = {k: pd.read_csv(f) for k, f in files.items() if f.is_file()}
    if histories:
        plot_training_curves(histories, out.curves)


def _measured_on(folds: pd.DataFrame, n_folds: int, cfg: RunConfig) -> str:
    cv = folds[folds["fold"] >= 0]
    unit = "patch (each patch its own group)" if cfg.patches.group_by == "patch" else "the image set's group column"
    text = (f"{n_folds}-fold CV grouped by {unit}: "
            f"{len(cv)} test patches from {cv['image_id'].nunique()} images in {cv['group'].nunique()} groups")
    if cfg.labels is not None:
        text += (f"; labels from the {cfg.labels.statistic} of channel {cfg.labels.channel} per patch (mixture rule), "
                 f"each patch its own evaluation unit, groups kept")
    held = folds[folds["fold"] < 0]
    if len(held):
        text += f"; held-out test set: {len(held)} patches from {held['group'].nunique()} groups, fold-model ensemble"
    return text


def _predict(model, cache, rows, folds: pd.DataFrame, idx: np.ndarray, classes: list[str], *, fold: int,
             channels: list[int] | None = None, tta: bool = False, device: str = "cpu") -> pd.DataFrame:
    """Class probabilities of patches ``idx`` from the model's input ``channels`` only (never auxiliary ones)."""
    from cytofuse.training.cache import PatchDataset
    from cytofuse.training.fit import predict_proba

    ds = PatchDataset(cache, rows[idx], folds["y_true"].to_numpy()[idx], channels=channels)
    proba, _ = predict_proba(model, ds, batch_size=128, tta=tta, device=device)
    frame = folds.iloc[idx][["patch_id", "image_id", "group", "y_true"]].reset_index(drop=True)
    frame.insert(3, "fold", fold)
    for c, name in enumerate(classes):
        frame[f"prob_{name}"] = proba[:, c]
    return frame


def _units(predictions: pd.DataFrame, cfg: RunConfig) -> pd.DataFrame:
    """With labels from a channel, patches of one image differ in label: each patch is then its own
    evaluation unit (``image_id`` becomes ``<image>#<patch_id>``, the image kept in ``source_image``);
    CV groups and the bootstrap's resampling units are unchanged."""
    if cfg.labels is None:
        return predictions
    unit = predictions["image_id"].astype(str) + "#" + predictions["patch_id"].astype(str)
    return predictions.assign(source_image=predictions["image_id"], image_id=unit)


def _extra_metrics(cfg: RunConfig, predictions: pd.DataFrame, val_parts: list[pd.DataFrame], index: PatchIndex,
                   classes: list[str]) -> dict:
    """Positive-class F1 with validation-chosen thresholds, and score vs label-channel correlation."""
    out = {}
    if cfg.cv.positive_class is not None:
        from cytofuse.evaluation.metrics import positive_class_report

        out["positive_class"] = positive_class_report(pd.concat(val_parts, ignore_index=True), predictions,
                                                      classes=classes, positive=cfg.cv.positive_class)
    if cfg.labels is not None:
        from cytofuse.preprocess.labels import score_correlation

        values = index.patches.set_index("patch_id")["label_value"]
        out["label_correlation"] = score_correlation(predictions, values, positive=cfg.labels.classes[1]) | {
            "channel": str(cfg.labels.channel), "statistic": cfg.labels.statistic,
            "measured_on": "pooled CV test-fold patches (each predicted by the fold model that held it out)"}
    return out


def _ensemble(parts: list[pd.DataFrame], classes: list[str]) -> pd.DataFrame:
    cols = [f"prob_{c}" for c in classes]
    out = parts[0].copy()
    out[cols] = np.mean([p[cols].to_numpy() for p in parts], axis=0)
    return out


def summary_table(metrics: dict[str, dict], *, split: str = "cv", kinds: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per model and level: mean and sd over folds of the headline metrics; ``kind`` says model, baseline or probe."""
    from cytofuse.evaluation.metrics import RunMetrics

    rows = []
    for name, data in metrics.items():
        m = RunMetrics(data, source=name)
        for level in ("patch", "image"):
            row = {"model": name, "kind": (kinds or {}).get(name, "model"), "level": level,
                   "parameters": m.model.get("parameters")}
            for metric in ("balanced_accuracy", "auroc_macro", "mcc", "macro_f1"):
                stat = m.stat(metric, level, split)
                row[f"{metric}_mean"], row[f"{metric}_sd"] = stat.mean, stat.sd
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- sweeps


def sweep_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """One (label, config) per value of ``cfg.sweep``; each config has no sweep of its own."""
    from cytofuse.config import validate_config

    section, field = cfg.sweep.parameter.split(".")
    out = []
    for value in cfg.sweep.values:
        raw = cfg.model_dump(mode="json", exclude={"sweep"})
        if cfg.sweep.parameter == "model.fusion":
            raw["models"] = [{**m, "fusion": value} for m in raw["models"]]
        else:
            raw[section][field] = value
        label = f"{field}={','.join(map(str, value)) if isinstance(value, list) else value}"
        out.append((label, validate_config(raw, source=f"sweep {label}")))
    return out


def run_sweep(cfg: RunConfig, run_dir: str | Path, *, overwrite: bool = False, progress: bool = True) -> pd.DataFrame:
    """A full CV per swept value in ``run_dir/sweep/<label>``; returns and writes ``sweep.csv``."""
    from cytofuse.runs import mark_finished, prepare_run_dir

    subs = sweep_configs(cfg)  # every swept config is valid before an old run is replaced
    run = RunFolder(prepare_run_dir(run_dir, overwrite=overwrite))
    dump_config(cfg.resolved(), run.config)
    tables = []
    for label, sub in subs:
        result = run_cv(sub, run.sweep(label).root, progress=progress)
        table = result.summary.copy()
        table.insert(0, cfg.sweep.parameter, label.split("=", 1)[1])
        tables.append(table)
    summary = pd.concat(tables, ignore_index=True)
    write_table_atomic(run.sweep_summary, summary)
    mark_finished(run.root)
    return summary
