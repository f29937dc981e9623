"""Classifier evaluation: metrics, image-level aggregation, fold summaries, intervals, figures.

Input is the predictions table written by cross-validation: one row per test patch with
``patch_id``, ``image_id``, ``group``, ``fold``, ``y_true`` (class index) and one
``prob_<class>`` column per class. Class names are passed separately, in index order.

Conventions, chosen so the numbers can go into a paper as they are:

- A metric that is undefined (0/0) is ``None``, never NaN or 0, and its key is listed in the
  result's ``undefined`` list: AUROC, recall and F1 of a class absent from ``y_true``.
- Precision of a class that is never predicted is reported as 0 (scikit-learn's
  ``zero_division=0``) with a line in ``notes``; MCC is 0 when its denominator is 0.
- Macro averages run over the classes where the per-class value is defined: balanced
  accuracy and macro AUROC over classes present in ``y_true``; macro-F1 over classes that
  are present or predicted (scikit-learn's default label set).
- Confusion matrices are K x K over all classes (rows = true, columns = predicted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytofuse.errors import InputError
from cytofuse.plots import LINESTYLES, STYLE, class_colours, figure, save_figure
from cytofuse.runs import write_text_atomic

SCALAR_METRICS = ("balanced_accuracy", "accuracy", "auroc_macro", "mcc", "macro_f1")
PER_CLASS_METRICS = ("auroc", "precision", "recall", "f1")
METRIC_LABELS = {
    "balanced_accuracy": "Balanced accuracy",
    "accuracy": "Accuracy",
    "auroc_macro": "AUROC",
    "mcc": "MCC",
    "macro_f1": "Macro-F1",
}
_PROB_SUM_TOL = 1e-3


# --------------------------------------------------------------------------- validation


def _check_classes(classes: Sequence[str]) -> list[str]:
    classes = [str(c) for c in classes]
    if len(classes) < 2:
        raise InputError(f"classes must name at least 2 classes, got {classes}")
    if len(set(classes)) != len(classes):
        raise InputError(f"classes must be unique, got {classes}")
    return classes


def _check_labels(y_true: Any, n_classes: int, *, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise InputError(f"{name} must be a non-empty 1D array of class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise InputError(f"{name} must hold integer class indices, got dtype {y.dtype}")
        y = y.astype(np.int64)
    bad = y[(y < 0) | (y >= n_classes)]
    if bad.size:
        raise InputError(f"{name} must be class indices in [0, {n_classes - 1}], got {sorted(set(bad.tolist()))[:5]}")
    return y.astype(np.int64)


def _check_proba(proba: Any, n: int, n_classes: int) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.shape != (n, n_classes):
        raise InputError(f"proba must have shape (n_samples, n_classes) = {(n, n_classes)}, got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise InputError(f"proba must be finite, got {int((~np.isfinite(p)).sum())} NaN/inf values")
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > _PROB_SUM_TOL:
        raise InputError(f"proba rows must sum to 1, got row {worst} summing to {sums[worst]:.6f}")
    return p


def prob_columns(classes: Sequence[str]) -> list[str]:
    """Names of the probability columns of a predictions table, in class order."""
    return [f"prob_{c}" for c in classes]


def _check_predictions(predictions: pd.DataFrame, classes: list[str]) -> None:
    cols = prob_columns(classes)
    missing = [c for c in ("image_id", "fold", "y_true", *cols) if c not in predictions.columns]
    if missing:
        raise InputError(f"predictions lacks columns {missing} for classes {classes}; has {list(predictions.columns)}")
    extra = [c for c in predictions.columns if c.startswith("prob_") and c not in cols]
    if extra:
        raise InputError(f"predictions has probability columns {extra} that are not in classes {classes}")
    if len(predictions) == 0:
        raise InputError("predictions is empty")
    if predictions["fold"].isna().any():
        raise InputError("predictions column 'fold' has missing values")


# --------------------------------------------------------------------------- metrics


def confusion_counts(y_true: Any, y_pred: Any, *, n_classes: int) -> np.ndarray:
    """K x K count matrix over all classes, rows = true class, columns = predicted class."""
    idx = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _balanced_accuracy(cm: np.ndarray) -> float:
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def _mcc(cm: np.ndarray) -> float:
    """Multiclass Matthews correlation (Gorodkin); 0 when the denominator is 0, as scikit-learn."""
    cm = cm.astype(np.float64)
    t, p, n = cm.sum(axis=1), cm.sum(axis=0), cm.sum()
    cov_tp = np.trace(cm) * n - t @ p
    cov_pp = n * n - p @ p
    cov_tt = n * n - t @ t
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_tt * cov_pp))


def _f1_per_class(cm: np.ndarray) -> np.ndarray:
    """Per-class F1 as 2tp / (2tp + fp + fn); NaN where the class is neither true nor predicted."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)


def _macro_f1(cm: np.ndarray) -> float:
    return float(np.nanmean(_f1_per_class(cm)))


def _accuracy(cm: np.ndarray) -> float:
    return float(np.trace(cm) / cm.sum())


def _auroc_per_class(y: np.ndarray, proba: np.ndarray) -> list[float | None]:
    """One-vs-rest AUROC per class; None where the class has no positives or no negatives."""
    return [_auroc_binary(y == k, proba[:, k]) for k in range(proba.shape[1])]


def _auroc_binary(positive: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC as the Mann-Whitney statistic with mid-ranks for ties (equals the ROC trapezoid area)."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = rankdata(score)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auroc_macro(y: np.ndarray, proba: np.ndarray) -> float | None:
    """Binary: AUROC of the positive-class probability. Multiclass: macro one-vs-rest mean."""
    return _macro_auroc_of(_auroc_per_class(y, proba))


def _macro_auroc_of(per_class: list[float | None]) -> float | None:
    return per_class[1] if len(per_class) == 2 else _mean_defined(per_class)


def classification_metrics(y_true: Any, proba: Any, *, classes: Sequence[str]) -> dict:
    """Metrics of one set of predictions (one fold, or a pooled set); plain Python types only.

    The predicted class is the argmax of ``proba`` (ties go to the first class in order).
    """
    classes = _check_classes(classes)
    k = len(classes)
    y = _check_labels(y_true, k)
    p = _check_proba(proba, y.size, k)
    cm = confusion_counts(y, p.argmax(axis=1), n_classes=k)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    auroc = _auroc_per_class(y, p)
    f1 = _f1_per_class(cm)
    auroc_macro = _macro_auroc_of(auroc)
    undefined, notes = _undefined_and_notes(classes, support, predicted, auroc, f1, auroc_macro, cm)
    return {
        "n": int(y.size),
        "classes": classes,
        "support": {c: int(s) for c, s in zip(classes, support)},
        "balanced_accuracy": _balanced_accuracy(cm),
        "accuracy": _accuracy(cm),
        "auroc_macro": auroc_macro,
        "mcc": _mcc(cm),
        "macro_f1": _macro_f1(cm),
        "auroc": dict(zip(classes, auroc)),
        "precision": {c: float(cm[i, i] / predicted[i]) if predicted[i] else 0.0 for i, c in enumerate(classes)},
        "recall": {c: float(cm[i, i] / support[i]) if support[i] else None for i, c in enumerate(classes)},
        "f1": {c: None if np.isnan(v) else float(v) for c, v in zip(classes, f1)},
        "confusion_matrix": cm.tolist(),
        "undefined": undefined,
        "notes": notes,
    }


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _undefined_and_notes(classes, support, predicted, auroc, f1, auroc_macro, cm) -> tuple[list[str], list[str]]:
    undefined: list[str] = []
    notes: list[str] = []
    n = int(support.sum())
    for i, c in enumerate(classes):
        if support[i] == 0:
            undefined += [f"auroc[{c}]", f"recall[{c}]"]
            notes.append(f"class {c!r} is absent from y_true: its AUROC and recall are undefined (None)")
        elif auroc[i] is None:
            undefined.append(f"auroc[{c}]")
            notes.append(f"class {c!r} is the only class in y_true: its AUROC is undefined (None)")
        if np.isnan(f1[i]):
            undefined.append(f"f1[{c}]")
        if predicted[i] == 0:
            notes.append(f"class {c!r} is never predicted: its precision is reported as 0 (0/0)")
    if auroc_macro is None:
        undefined.append("auroc_macro")
    if _mcc_denominator_zero(cm):
        notes.append(f"MCC denominator is 0 (a single class in y_true or in predictions, n={n}): MCC reported as 0")
    return undefined, notes


def _mcc_denominator_zero(cm: np.ndarray) -> bool:
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    return bool(np.count_nonzero(t) <= 1 or np.count_nonzero(p) <= 1)


# --------------------------------------------------------------------------- aggregation


def aggregate_by_image(predictions: pd.DataFrame, *, classes: Sequence[str], method: str = "mean") -> pd.DataFrame:
    """One row per (fold, image): mean patch probabilities, or vote fractions for ``method="vote"``.

    Columns: image_id, group, fold, y_true, n_patches, prob_<class>. An image whose patches
    disagree on ``y_true`` or ``group`` is an error. Vote ties are left in the fractions; the
    image prediction (argmax) then goes to the first tied class in ``classes`` order.
    """
    classes = _check_classes(classes)
    if method not in ("mean", "vote"):
        raise InputError(f"method must be 'mean' or 'vote', got {method!r}")
    _check_predictions(predictions, classes)
    df = predictions if "group" in predictions.columns else predictions.assign(group=predictions["image_id"])
    cols = prob_columns(classes)
    if method == "vote":
        votes = df[cols].to_numpy().argmax(axis=1)
        df = df.assign(**{c: (votes == i).astype(np.float64) for i, c in enumerate(cols)})
    keys = ["fold", "image_id"]
    _check_constant_within_image(df, keys, ("y_true", "group"))
    grouped = df.groupby(keys, sort=True)
    out = grouped[cols].mean()
    out.insert(0, "n_patches", grouped.size())
    out.insert(0, "y_true", grouped["y_true"].first().astype(np.int64))
    out.insert(0, "group", grouped["group"].first())
    out = out.reset_index()
    return out[["image_id", "group", "fold", "y_true", "n_patches", *cols]]


def _check_constant_within_image(df: pd.DataFrame, keys: list[str], columns: Sequence[str]) -> None:
    for column in columns:
        counts = df.groupby(keys, sort=False)[column].nunique(dropna=False)
        bad = counts[counts > 1]
        if len(bad):
            fold, image = bad.index[0]
            raise InputError(f"image {image!r} (fold {fold}) has patches with different {column} values")


# --------------------------------------------------------------------------- fold summaries


def _fold_stats(values: Sequence[float | None]) -> dict:
    """Mean and sd (ddof=1) over the folds where a value is defined, and how many those are."""
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    return {
        "mean": float(defined.mean()) if defined.size else None,
        "sd": float(defined.std(ddof=1)) if defined.size > 1 else None,
        "n_folds_defined": int(defined.size),
        "values": list(values),
    }


def summarize(
    predictions: pd.DataFrame, *, classes: Sequence[str], level: str = "patch", method: str = "mean"
) -> dict:
    """Per-fold metrics, mean ± sd over folds of every metric, and the pooled confusion matrix."""
    classes = _check_classes(classes)
    if level not in ("patch", "image"):
        raise InputError(f"level must be 'patch' or 'image', got {level!r}")
    _check_predictions(predictions, classes)
    table = aggregate_by_image(predictions, classes=classes, method=method) if level == "image" else predictions
    folds = []
    for fold, part in table.groupby("fold", sort=True):
        metrics = classification_metrics(part["y_true"].to_numpy(), part[prob_columns(classes)].to_numpy(), classes=classes)
        folds.append({"fold": _plain(fold), **metrics})
    return {
        "level": level,
        "method": method if level == "image" else None,
        "classes": classes,
        "n": int(len(table)),
        "n_folds": len(folds),
        "summary": {m: _fold_stats([f[m] for f in folds]) for m in SCALAR_METRICS},
        "per_class": {
            m: {c: _fold_stats([f[m][c] for f in folds]) for c in classes} for m in PER_CLASS_METRICS
        },
        "confusion_matrix": np.sum([f["confusion_matrix"] for f in folds], axis=0).astype(int).tolist(),
        "folds": folds,
    }


def evaluate_run(
    predictions: pd.DataFrame, *, classes: Sequence[str], method: str = "mean", n_boot: int = 0, seed: int = 0
) -> dict:
    """Patch- and image-level summaries of one run, ready for ``json.dump`` (no NaN, plain types).

    With ``n_boot > 0`` each level also gets ``pooled_ci``: the balanced accuracy of all folds'
    predictions pooled, with a 95% bootstrap interval that resamples whole groups.
    """
    classes = _check_classes(classes)
    result = {
        "classes": classes,
        "patch": summarize(predictions, classes=classes, level="patch"),
        "image": summarize(predictions, classes=classes, level="image", method=method),
    }
    if n_boot > 0:
        image_table = aggregate_by_image(predictions, classes=classes, method=method)
        for level, table in (("patch", predictions), ("image", image_table)):
            result[level]["pooled_ci"] = _pooled_ci(table, classes, n_boot=n_boot, seed=seed)
    return _plain(result)


def _pooled_ci(table: pd.DataFrame, classes: list[str], *, n_boot: int, seed: int) -> dict:
    group_column = "group" if "group" in table.columns else "image_id"
    y = table["y_true"].to_numpy()
    pred = table[prob_columns(classes)].to_numpy().argmax(axis=1)
    cm = confusion_counts(y, pred, n_classes=len(classes))
    low, high = bootstrap_ci(y, pred, groups=table[group_column].to_numpy(), n_boot=n_boot, seed=seed)
    return {
        "metric": "balanced_accuracy",
        "estimate": _balanced_accuracy(cm),
        "low": low,
        "high": high,
        "level": 0.95,
        "n_boot": int(n_boot),
        "resampled": group_column,
    }


def _plain(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays into Python types and NaN into None."""
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (str, int)) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- bootstrap


_LABEL_METRICS: dict[str, Callable[[np.ndarray], float]] = {
    "balanced_accuracy": _balanced_accuracy,
    "accuracy": _accuracy,
    "mcc": _mcc,
    "macro_f1": _macro_f1,
}


def _bootstrap_statistic(metric: str, y: np.ndarray, scores: np.ndarray, n_classes: int) -> Callable:
    if metric in _LABEL_METRICS:
        pred = scores.argmax(axis=1) if scores.ndim == 2 else scores
        fn = _LABEL_METRICS[metric]
        return lambda idx: fn(confusion_counts(y[idx], pred[idx], n_classes=n_classes))
    if metric == "auroc_macro":
        if scores.ndim != 2:
            raise InputError("metric 'auroc_macro' needs y_pred as class probabilities (n_samples, n_classes)")
        return lambda idx: _auroc_macro(y[idx], scores[idx])
    raise InputError(f"metric must be one of {[*_LABEL_METRICS, 'auroc_macro']}, got {metric!r}")


def _resample_indices(rng: np.random.Generator, members: list[np.ndarray] | None, n: int) -> np.ndarray:
    if members is None:
        return rng.integers(0, n, size=n)
    pick = rng.integers(0, len(members), size=len(members))
    return np.concatenate([members[i] for i in pick])


def bootstrap_ci(
    y_true: Any,
    y_pred: Any,
    *,
    metric: str = "balanced_accuracy",
    groups: Any = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric``; deterministic for a given ``seed``.

    ``y_pred`` is predicted class indices, or class probabilities (n_samples, n_classes)
    (needed for ``auroc_macro``). With ``groups`` (e.g. image ids) whole groups are resampled,
    the honest interval for correlated patches from the same image. Replicates where the
    metric is undefined are dropped.
    """
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level}")
    if int(n_boot) < 1:
        raise InputError(f"n_boot must be >= 1, got {n_boot}")
    scores = np.asarray(y_pred)
    n_classes = scores.shape[1] if scores.ndim == 2 else int(max(np.max(y_true), np.max(scores))) + 1
    y = _check_labels(y_true, n_classes)
    scores = _check_proba(scores, y.size, n_classes) if scores.ndim == 2 else _check_labels(scores, n_classes, name="y_pred")
    if scores.shape[0] != y.size:
        raise InputError(f"y_pred must have {y.size} entries like y_true, got {scores.shape[0]}")
    statistic = _bootstrap_statistic(metric, y, scores, max(n_classes, 2))
    members = _group_members(groups, y.size)
    rng = np.random.default_rng(seed)
    stats = [statistic(_resample_indices(rng, members, y.size)) for _ in range(int(n_boot))]
    stats = np.array([s for s in stats if s is not None], dtype=np.float64)
    if stats.size == 0:
        raise InputError(f"metric {metric!r} is undefined in every bootstrap replicate")
    low, high = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def _group_members(groups: Any, n: int) -> list[np.ndarray] | None:
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.shape != (n,):
        raise InputError(f"groups must have one entry per sample ({n}), got shape {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse))[:-1]
    return np.split(order, bounds)


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class MetricStat:
    """One metric over folds: mean and sd (None when undefined) and in how many folds it was defined."""

    mean: float | None
    sd: float | None
    n_folds_defined: int


class RunMetrics:
    """A typed view of a model's ``metrics.json`` (splits ``cv`` and ``test``, levels ``patch`` and ``image``),
    so readers ask ``stat("mcc", level="image")`` instead of spelling nested keys."""

    def __init__(self, data: Mapping[str, Any], *, source: str = "metrics") -> None:
        if "cv" not in data and "test" not in data:
            raise InputError(f"{source}: not a model's metrics (no 'cv' or 'test' split); keys {sorted(data)}")
        self.data, self.source = dict(data), source

    @classmethod
    def read(cls, path: str | Path) -> "RunMetrics":
        return cls(json.loads(Path(path).read_text()), source=str(path))

    @property
    def splits(self) -> list[str]:
        return [s for s in ("cv", "test") if s in self.data]

    def result(self, level: str = "patch", split: str = "cv") -> dict:
        """The :func:`evaluate_run` block of one split and level (n, n_folds, summary, pooled, ...)."""
        if split not in self.data:
            raise InputError(f"{self.source}: no {split!r} split; it has {self.splits}")
        if level not in ("patch", "image"):
            raise InputError(f"level must be 'patch' or 'image', got {level!r}")
        return self.data[split][level]

    def stat(self, metric: str, level: str = "patch", split: str = "cv") -> MetricStat:
        summary = self.result(level, split)["summary"]
        if metric not in summary:
            raise InputError(f"{self.source}: no metric {metric!r}; it has {sorted(summary)}")
        found = summary[metric]
        return MetricStat(found.get("mean"), found.get("sd"), int(found.get("n_folds_defined", 0)))

    @property
    def classes(self) -> list[str]:
        return list(self.data[self.splits[0]]["classes"])

    @property
    def measured_on(self) -> str:
        return str(self.data.get("measured_on", ""))

    @property
    def model(self) -> dict:
        """The model's settings and parameter count (empty for the baseline and probes)."""
        return dict(self.data.get("model", {}))


def format_summary_table(results: Mapping[str, dict], *, level: str = "patch", digits: int = 3) -> pd.DataFrame:
    """Rows = runs, columns = metrics as "mean ± sd" (like the paper's Table 1).

    ``results`` maps a run name to an :func:`evaluate_run` result (or to a :func:`summarize`
    result). A metric defined in fewer folds than the run has carries "(k/n folds)".
    """
    if level not in ("patch", "image"):
        raise InputError(f"level must be 'patch' or 'image', got {level!r}")
    rows = {}
    for name, result in results.items():
        summary = result[level] if level in result else result
        if "summary" not in summary:
            raise InputError(f"results[{name!r}] is neither an evaluate_run nor a summarize result")
        n_folds = summary["n_folds"]
        rows[name] = {METRIC_LABELS[m]: _mean_sd(summary["summary"][m], n_folds, digits) for m in SCALAR_METRICS}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    return table


def _mean_sd(stats: dict, n_folds: int, digits: int) -> str:
    if stats["mean"] is None:
        return "n/a"
    text = f"{stats['mean']:.{digits}f}"
    if stats["sd"] is not None:
        text += f" ± {stats['sd']:.{digits}f}"
    if stats["n_folds_defined"] < n_folds:
        text += f" ({stats['n_folds_defined']}/{n_folds} folds)"
    return text


def to_rich_table(table: pd.DataFrame, *, title: str | None = None):
    """A :class:`rich.table.Table` of a :func:`format_summary_table` result, for the terminal."""
    from rich.table import Table

    out = Table(title=title)
    width = max([len(str(n)) for n in table.index] + [1])
    out.add_column(table.index.name or "", no_wrap=True, min_width=width)  # names stay whole; numbers may wrap
    for column in table.columns:
        out.add_column(str(column), justify="right")
    for name, row in table.iterrows():
        out.add_row(str(name), *(str(v) for v in row))
    return out


# --------------------------------------------------------------------------- figures

def plot_confusion(
    cm: Any, classes: Sequence[str], *, normalize: bool, out: str | Path, title: str | None = None
) -> tuple[Path, Path]:
    """Annotated confusion matrix (rows = true), as counts or row-normalised fractions."""
    import matplotlib

    classes = _check_classes(classes)
    cm = np.asarray(cm)
    if cm.shape != (len(classes), len(classes)):
        raise InputError(f"cm must be {len(classes)}x{len(classes)} for classes {classes}, got shape {cm.shape}")
    rows = cm.sum(axis=1, keepdims=True)
    values = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0) if normalize else cm
    side = 1.2 + 0.55 * len(classes)
    with matplotlib.rc_context(STYLE):
        fig, ax = figure((side + 1.2, side))
        image = ax.imshow(values, cmap="cividis", vmin=0, vmax=1 if normalize else max(int(cm.max()), 1))
        _annotate_cells(ax, values, image, normalize)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ax.set_title(title or ("Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)"))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="Fraction of true class" if normalize else "Count")
        return save_figure(fig, out)


def _annotate_cells(ax, values: np.ndarray, image, normalize: bool) -> None:
    size = max(6, 10 - values.shape[0] // 4)
    for (i, j), v in np.ndenumerate(values):
        r, g, b, _ = image.cmap(image.norm(v))
        colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", color=colour, fontsize=size)


def _one_vs_rest(y_true: Any, proba: Any, classes: Sequence[str]):
    classes = _check_classes(classes)
    y = _check_labels(y_true, len(classes))
    p = _check_proba(proba, y.size, len(classes))
    for k, name in enumerate(classes):
        pos = y == k
        if 0 < pos.sum() < y.size:
            yield k, name, pos, p[:, k]


def plot_pr_curves(y_true: Any, proba: Any, classes: Sequence[str], out: str | Path) -> tuple[Path, Path]:
    """One-vs-rest precision-recall curve per class, average precision (AP) in the legend."""
    import matplotlib
    from sklearn.metrics import average_precision_score, precision_recall_curve

    colours = class_colours(len(classes))
    with matplotlib.rc_context(STYLE):
        fig, ax = figure((4.8, 4.2))
        for k, name, pos, score in _one_vs_rest(y_true, proba, classes):
            precision, recall, _ = precision_recall_curve(pos, score)
            ap = average_precision_score(pos, score)
            ax.step(recall, precision, where="post", color=colours[k], ls=LINESTYLES[k % 4], label=f"{name} (AP = {ap:.3f})")
        _finish_curve_axes(ax, "Recall", "Precision", "Precision-recall (one-vs-rest)", "lower left")
        return save_figure(fig, out)


def plot_roc_curves(y_true: Any, proba: Any, classes: Sequence[str], out: str | Path) -> tuple[Path, Path]:
    """One-vs-rest ROC curve per class, AUC in the legend, chance diagonal."""
    import matplotlib
    from sklearn.metrics import roc_auc_score, roc_curve

    colours = class_colours(len(classes))
    with matplotlib.rc_context(STYLE):
        fig, ax = figure((4.8, 4.2))
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":", label="Chance")
        for k, name, pos, score in _one_vs_rest(y_true, proba, classes):
            fpr, tpr, _ = roc_curve(pos, score)
            auc = roc_auc_score(pos, score)
            ax.plot(fpr, tpr, color=colours[k], ls=LINESTYLES[k % 4], label=f"{name} (AUC = {auc:.3f})")
        _finish_curve_axes(ax, "False positive rate", "True positive rate", "ROC (one-vs-rest)", "lower right")
        return save_figure(fig, out)


def _finish_curve_axes(ax, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, lw=0.4, alpha=0.5)
    ax.legend(loc=legend_loc, frameon=False)


_HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_balanced_accuracy")


def plot_training_curves(histories: Mapping[Any, pd.DataFrame], out: str | Path) -> tuple[Path, Path]:
    """Loss (train solid, validation dashed) and validation balanced accuracy per epoch, per fold."""
    import matplotlib

    if not histories:
        raise InputError("histories must hold at least one fold, got none")
    for fold, history in histories.items():
        missing = [c for c in _HISTORY_COLUMNS if c not in history.columns]
        if missing:
            raise InputError(f"histories[{fold!r}] lacks columns {missing}; has {list(history.columns)}")
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    colours = class_colours(len(histories))
    with matplotlib.rc_context(STYLE):
        fig, (loss_ax, acc_ax) = figure((8.0, 3.4), ncols=2)
        for colour, (fold, h) in zip(colours, histories.items()):
            loss_ax.plot(h["epoch"], h["train_loss"], color=colour, ls="-")
            loss_ax.plot(h["epoch"], h["val_loss"], color=colour, ls="--")
            acc_ax.plot(h["epoch"], h["val_balanced_accuracy"], color=colour, marker="o", ms=3, label=f"fold {fold}")
        loss_ax.set(xlabel="Epoch", ylabel="Loss", title="Training and validation loss")
        acc_ax.set(xlabel="Epoch", ylabel="Balanced accuracy", title="Validation balanced accuracy", ylim=(0, 1.01))
        styles = [Line2D([], [], color="0.2", ls="-"), Line2D([], [], color="0.2", ls="--")]
        loss_ax.legend(styles, ["train", "validation"], frameon=False)
        acc_ax.legend(frameon=False, ncol=2 if len(histories) > 3 else 1, loc="lower right")
        for ax in (loss_ax, acc_ax):
            ax.grid(True, lw=0.4, alpha=0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return save_figure(fig, out)


# --------------------------------------------------------------------------- run folder


def folds_table(summary: dict) -> pd.DataFrame:
    """One row per fold of a :func:`summarize` result: fold, n and the scalar metrics (NaN = undefined)."""
    rows = [{"fold": f["fold"], "n": f["n"], **{m: f[m] for m in SCALAR_METRICS}} for f in summary["folds"]]
    return pd.DataFrame(rows, columns=["fold", "n", *SCALAR_METRICS]).astype({m: float for m in SCALAR_METRICS})


def write_evaluation(
    predictions: pd.DataFrame,
    *,
    classes: Sequence[str],
    out_dir: str | Path,
    method: str = "mean",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write metrics.json, per-fold CSVs and all figures of one run into ``out_dir``.

    Curves and confusion matrices pool the test predictions of all folds. Returns name -> path.
    """
    classes = _check_classes(classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate_run(predictions, classes=classes, method=method, n_boot=n_boot, seed=seed)
    paths = {"metrics": write_text_atomic(out_dir / "metrics.json", json.dumps(result, indent=2, allow_nan=False))}
    tables = {"patch": predictions, "image": aggregate_by_image(predictions, classes=classes, method=method)}
    for level, table in tables.items():
        csv = folds_table(result[level]).to_csv(index=False, na_rep="")
        paths[f"folds_{level}"] = write_text_atomic(out_dir / f"folds_{level}.csv", csv)
        cm = result[level]["confusion_matrix"]
        for normalize, suffix in ((False, "counts"), (True, "normalised")):
            name = f"confusion_{level}_{suffix}"
            paths[name] = plot_confusion(cm, classes, normalize=normalize, out=out_dir / name)[0]
        y, proba = table["y_true"].to_numpy(), table[prob_columns(classes)].to_numpy()
        paths[f"pr_{level}"] = plot_pr_curves(y, proba, classes, out_dir / f"pr_{level}")[0]
        paths[f"roc_{level}"] = plot_roc_curves(y, proba, classes, out_dir / f"roc_{level}")[0]
    return paths


# --------------------------------------------------------------------------- rare / positive class


def best_f1_threshold(positive: Any, score: Any) -> float:
    """The score threshold (predict positive when ``score >= t``) that maximises F1 on these data.

    The threshold is the midpoint between the best cut's score and the next lower one, so it
    generalises rather than sitting on a training value; 0.5 when there is no positive.
    """
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise InputError(f"best_f1_threshold: positive and score must be 1D of equal length, got {y.shape} and {s.shape}")
    if not y.any():
        return 0.5
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s) - 1]  # cut after each distinct score
    f1 = 2 * tp[last] / (2 * tp[last] + fp[last] + (y.sum() - tp[last]))
    best = int(last[int(np.argmax(f1))])
    below = s_sorted[best + 1] if best + 1 < len(s) else s_sorted[best] - 1e-6
    return float((s_sorted[best] + below) / 2)


def _f1_at(positive: np.ndarray, predicted: np.ndarray) -> dict:
    tp = int((positive & predicted).sum())
    fp, fn = int((~positive & predicted).sum()), int((positive & ~predicted).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}


def positive_class_report(validation: pd.DataFrame, test: pd.DataFrame, *, classes: Sequence[str], positive: str) -> dict:
    """F1 of ``positive`` per fold with the threshold chosen on that fold's validation predictions only.

    Both tables are patch-level predictions with ``fold`` columns (validation: the early-stopping
    split inside each training fold). The score is the positive class's probability (one vs rest).
    Also reported: F1 of the plain argmax decision, and both pooled over folds.
    """
    classes = _check_classes(classes)
    if positive not in classes:
        raise InputError(f"cv.positive_class must be one of the classes {classes}, got {positive!r}")
    k, col = classes.index(positive), f"prob_{positive}"
    folds, tuned_all, argmax_all, truth_all = [], [], [], []
    for fold, part in test.groupby("fold", sort=True):
        val = validation[validation["fold"] == fold]
        if not len(val):
            raise InputError(f"positive_class_report: fold {fold} has no validation predictions")
        thr = best_f1_threshold(val["y_true"].to_numpy() == k, val[col].to_numpy())
        truth = part["y_true"].to_numpy() == k
        tuned = part[col].to_numpy() >= thr
        argmax = part[prob_columns(classes)].to_numpy().argmax(axis=1) == k
        folds.append({"fold": _plain(fold), "threshold": thr, "tuned": _f1_at(truth, tuned), "argmax": _f1_at(truth, argmax),
                      "n_positive": int(truth.sum()), "n": int(len(truth))})
        tuned_all.append(tuned), argmax_all.append(argmax), truth_all.append(truth)
    truth, tuned, argmax = (np.concatenate(a) for a in (truth_all, tuned_all, argmax_all))
    return _plain({
        "class": positive,
        "level": "patch",
        "threshold_rule": "per fold, the F1-maximising threshold on the fold's validation split (never its test fold)",
        "f1_tuned": _fold_stats([f["tuned"]["f1"] for f in folds]),
        "f1_argmax": _fold_stats([f["argmax"]["f1"] for f in folds]),
        "pooled": {"tuned": _f1_at(truth, tuned), "argmax": _f1_at(truth, argmax)},
        "folds": folds,
    })
