"""What a trained classifier looked at: Grad-CAM per channel encoder, channel ablation, embeddings.

Everything works on a cross-validation run folder (:mod:`cytofuse.workflows.cv`): every test patch
is explained by the model of the fold that held it out, so nothing is explained by a model
that saw it during training. Output of :func:`explain_run` in ``run_dir/explain/<model>/``::

    gradcam_<class>.{png,svg}       correct and wrong test patches, each channel with its CAM
    ablation.csv  ablation_folds.csv  ablation.{png,svg}
    single_channel.csv  single_channel.{png,svg}   (when the run has single-channel models)
    embeddings.parquet  embedding_<method>.{png,svg}  thumbnails_<method>.{png,svg}
    summary.json                    written last; its presence marks the folder as done

Embeddings: features of different folds' models live in different spaces, so each fold's test
patches are projected on their own (t-SNE / UMAP per fold, one row of panels per fold);
coordinates are comparable within a fold, never across folds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytofuse.errors import InputError, RunFolderError
from cytofuse.evaluation.metrics import RunMetrics
from cytofuse.runs import ModelRun, RunFolder, atomic_path, safe_name, write_text_atomic

ABLATION_MODES = ("zero", "shuffle")
EMBEDDING_METHODS = ("tsne", "umap")
_METHOD_LABELS = {"tsne": "t-SNE", "umap": "UMAP"}
_NORMALIZE = ("each", "joint")


# --------------------------------------------------------------------------- Grad-CAM


def _as_batch(x: Any):
    import torch

    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InputError(f"gradcam: x must be (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    return x


def _targets(logits, target_class):
    import torch

    b, k = logits.shape
    if target_class is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(np.asarray(target_class), dtype=torch.long).flatten()
    t = t.expand(b) if t.numel() == 1 else t
    if t.shape != (b,) or (t < 0).any() or (t >= k).any():
        raise InputError(f"gradcam: target_class must be one class index in [0, {k}) or one per patch ({b}), got {target_class!r}")
    return t


def _normalise_cams(cams: dict, normalize: str) -> dict[str, np.ndarray]:
    import torch

    if normalize not in _NORMALIZE:
        raise InputError(f"gradcam: normalize must be one of {list(_NORMALIZE)}, got {normalize!r}")
    peak = {k: c.amax(dim=(1, 2), keepdim=True) for k, c in cams.items()}
    if normalize == "joint":
        joint = torch.stack(list(peak.values())).amax(dim=0)
        peak = {k: joint for k in cams}
    return {k: torch.where(peak[k] > 0, c / peak[k].clamp_min(1e-12), 0.0).numpy().astype(np.float32) for k, c in cams.items()}


def gradcam(model, x: Any, *, target_class: int | Sequence[int] | None = None, normalize: str = "each") -> dict[str, np.ndarray]:
    """Grad-CAM of every encoder of ``model`` for the fused prediction: key -> (B, H, W) in [0, 1].

    Keys are those of ``model.gradcam_layers()`` ("all" for early fusion, "ch0", "ch1", ... for
    per-channel encoders). Implemented with a forward hook on each layer and
    ``torch.autograd.grad`` of the target logit (the model output: log-probability for late
    fusion) with respect to all hooked activations at once, so one forward and one backward pass
    give every encoder's map, and no parameter gradient is accumulated.
    target_class: None (the predicted class), one index, or one index per patch.
    normalize: "each" scales every map of every patch to peak 1; "joint" scales the maps of one
    patch by their common peak, so encoders can be compared (an encoder that did not matter stays dark).
    """
    import torch
    import torch.nn.functional as F

    x = _as_batch(x).detach().requires_grad_(True)
    layers = model.gradcam_layers()
    acts: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, key=key: acts.__setitem__(key, o)) for key, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)
            score = logits.gather(1, _targets(logits, target_class)[:, None]).sum()
            grads = torch.autograd.grad(score, [acts[k] for k in layers], allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    cams = {}
    for key, grad in zip(layers, grads):
        act = acts[key].detach()
        grad = torch.zeros_like(act) if grad is None else grad
        cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
        cams[key] = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    return _normalise_cams(cams, normalize)


def cam_channels(key: str, n_channels: int) -> list[int]:
    """Input channels a Grad-CAM key explains: every channel for "all", channel i for "ch<i>"."""
    return list(range(n_channels)) if key == "all" else [int(key[2:])]


# --------------------------------------------------------------------------- Grad-CAM figures


def select_examples(predictions: pd.DataFrame, classes: Sequence[str], *, n: int) -> pd.DataFrame:
    """Per true class, the ``n`` most confident correct and ``n`` most confident wrong patches.

    Adds columns ``y_pred``, ``confidence`` (probability of the predicted class) and ``correct``.
    """
    if n < 1:
        raise InputError(f"n_examples must be >= 1, got {n}")
    proba = predictions[[f"prob_{c}" for c in classes]].to_numpy()
    table = predictions.assign(y_pred=proba.argmax(axis=1), confidence=proba.max(axis=1))
    table["correct"] = table["y_pred"] == table["y_true"]
    table = table.sort_values(["y_true", "correct", "confidence", "patch_id"], ascending=[True, False, False, True])
    return table.groupby(["y_true", "correct"], sort=False).head(n).reset_index(drop=True)


def _grid(figsize: tuple[float, float], nrows: int, ncols: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, np.asarray(fig.subplots(nrows, ncols, squeeze=False))


def _grey_limits(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [1.0, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def plot_gradcam_grid(patches: np.ndarray, cams: Mapping[str, np.ndarray], *, channel_names: Sequence[str],
                      row_labels: Sequence[str], out: str | Path, title: str = "", alpha: float = 0.6,
                      cmap: str = "viridis") -> tuple[Path, Path]:
    """One row per patch (N, C, H, W), one panel per explained channel: grey image, CAM on top.

    The CAM is drawn with ``cmap`` and opacity ``alpha * cam``, so unimportant regions show the
    channel's own grey levels. cams: key -> (N, H, W) as from :func:`gradcam`.
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable

    from cytofuse.plots import STYLE, save_figure

    patches = np.asarray(patches, dtype=np.float32)
    if patches.ndim != 4 or len(row_labels) != len(patches) or len(channel_names) != patches.shape[1]:
        raise InputError(f"plot_gradcam_grid: patches must be (N, C, H, W) with N row labels and C channel names, "
                         f"got {patches.shape}, {len(row_labels)} labels, {len(channel_names)} names")
    panels = [(key, c) for key in cams for c in cam_channels(key, patches.shape[1])]
    n, m = len(patches), len(panels)
    with matplotlib.rc_context(STYLE):
        fig, axes = _grid((1.6 * m + 1.2, 1.6 * n + 0.6), n, m)
        colour = matplotlib.colormaps[cmap]
        for i in range(n):
            for j, (key, c) in enumerate(panels):
                ax, cam = axes[i, j], np.asarray(cams[key][i])
                lo, hi = _grey_limits(patches[i, c])
                ax.imshow(patches[i, c], cmap="gray", vmin=lo, vmax=hi)
                rgba = colour(cam)
                rgba[..., 3] = np.clip(alpha * cam, 0.0, 1.0)
                ax.imshow(rgba)
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(channel_names[c].replace("_", " "), fontsize=8)
            axes[i, 0].set_ylabel(row_labels[i], fontsize=7)
        joint = any(key == "all" for key in cams)  # one encoder sees every channel: one CAM shown on each
        fig.colorbar(ScalarMappable(cmap=cmap), ax=axes, fraction=0.03, pad=0.02,
                     label="Grad-CAM (one map for all channels)" if joint else "Grad-CAM (each channel's encoder)")
        if title:
            fig.suptitle(title)
        return save_figure(fig, out)


def _row_label(row: pd.Series, classes: Sequence[str]) -> str:
    verdict = "correct" if row["correct"] else f"wrong: {classes[int(row['y_pred'])]}"
    return f"{verdict}\np={row['confidence']:.2f} f{int(row['fold'])}"


def gradcam_figures(models: Mapping[int, Any], cache, predictions: pd.DataFrame, classes: Sequence[str], *,
                    out_dir: str | Path, n_examples: int = 4, channel_names: Sequence[str] | None = None) -> list[Path]:
    """Per class, a Grad-CAM grid of up to ``n_examples`` correct and wrong test patches.

    Each patch is explained by its own fold's model (``models[fold]``), for its predicted class.
    Returns the PNG paths.
    """
    picks = select_examples(predictions, classes, n=n_examples)
    names = list(channel_names or getattr(cache, "channels", [f"ch{i}" for i in range(np.asarray(cache[[0]]).shape[1])]))
    paths = []
    for k, name in enumerate(classes):
        rows = picks[picks["y_true"] == k]
        if rows.empty:
            continue
        patches = _load(cache, _positions(cache, rows["patch_id"]))
        cams = _cams_by_fold(models, patches, rows)
        labels = [_row_label(r, classes) for _, r in rows.iterrows()]
        png, _ = plot_gradcam_grid(patches, cams, channel_names=names, row_labels=labels,
                                   out=Path(out_dir) / f"gradcam_{safe_name(name)}", title=f"True class: {name}")
        paths.append(png)
    return paths


def _cams_by_fold(models: Mapping[int, Any], patches: np.ndarray, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    folds, targets = rows["fold"].to_numpy(), rows["y_pred"].to_numpy()
    cams: dict[str, np.ndarray] = {}
    for fold in np.unique(folds):
        sel = np.flatnonzero(folds == fold)
        part = gradcam(_fold_model(models, fold), patches[sel], target_class=targets[sel])
        for key, cam in part.items():
            cams.setdefault(key, np.zeros((len(rows), *cam.shape[1:]), np.float32))[sel] = cam
    return cams


# --------------------------------------------------------------------------- ablation


def _positions(cache, patch_ids) -> np.ndarray:
    ids = np.asarray(patch_ids, dtype=np.int64)
    return cache.positions(ids) if hasattr(cache, "positions") else ids


def _load(cache, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *np.asarray(cache[rows[:1]]).shape[1:]), np.float32)
    out[order] = np.asarray(cache[rows[order]], dtype=np.float32)
    return out


def _fold_model(models: Mapping[int, Any], fold: int):
    if int(fold) not in models:
        raise InputError(f"no model for fold {int(fold)}; models are given for folds {sorted(models)}")
    return models[int(fold)]


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def _predict(model, cache, rows: np.ndarray, *, channel: int | None, mode: str, perm: np.ndarray | None,
             batch_size: int) -> np.ndarray:
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            sl = slice(start, start + batch_size)
            x = _load(cache, rows[sl])
            if channel is not None:
                x[:, channel] = 0.0 if mode == "zero" else _load(cache, rows[perm[sl]])[:, channel]
            preds.append(model(torch.from_numpy(x)).argmax(dim=1).numpy())
    return np.concatenate(preds)


def channel_ablation(model, cache, rows: np.ndarray, labels: np.ndarray, *, mode: str = "zero", seed: int = 0,
                     batch_size: int = 64, channel_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Balanced accuracy of ``model`` on patches ``rows`` of ``cache`` with each channel ablated.

    mode: "zero" sets the channel to 0 (the normalised background); "shuffle" replaces it by the
    same channel of another patch of ``rows`` (one random permutation per channel), which keeps
    its intensity distribution but breaks its link to the label and to the other channels.
    Returns one row per channel: channel, mode, intact, balanced_accuracy, drop (intact - ablated).
    """
    if mode not in ABLATION_MODES:
        raise InputError(f"channel_ablation: mode must be one of {list(ABLATION_MODES)}, got {mode!r}")
    rows, labels = np.asarray(rows, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if rows.ndim != 1 or rows.shape != labels.shape or len(rows) == 0:
        raise InputError(f"channel_ablation: rows and labels must be 1D, non-empty and of equal length, got {rows.shape} and {labels.shape}")
    n_channels = np.asarray(cache[rows[:1]]).shape[1]
    names = list(channel_names or getattr(cache, "channels", None) or [f"ch{i}" for i in range(n_channels)])
    rng = np.random.default_rng(seed)
    intact = balanced_accuracy(labels, _predict(model, cache, rows, channel=None, mode=mode, perm=None, batch_size=batch_size))
    out = []
    for c in range(n_channels):
        perm = rng.permutation(len(rows))
        pred = _predict(model, cache, rows, channel=c, mode=mode, perm=perm, batch_size=batch_size)
        ba = balanced_accuracy(labels, pred)
        out.append({"channel": names[c], "mode": mode, "intact": intact, "balanced_accuracy": ba, "drop": intact - ba})
    return pd.DataFrame(out)


def fold_ablation(models: Mapping[int, Any], cache, predictions: pd.DataFrame, *, mode: str = "zero", seed: int = 0,
                  batch_size: int = 64, channel_names: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`channel_ablation` on each fold's test patches (``predictions``) with that fold's model."""
    parts = []
    for fold, rows in predictions.groupby("fold", sort=True):
        table = channel_ablation(_fold_model(models, fold), cache, _positions(cache, rows["patch_id"]),
                                 rows["y_true"].to_numpy(), mode=mode, seed=seed + int(fold),
                                 batch_size=batch_size, channel_names=channel_names)
        parts.append(table.assign(fold=int(fold), n=len(rows)))
    return pd.concat(parts, ignore_index=True)


def summarize_ablation(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over folds per mode and channel, ranked by mean drop (largest first)."""
    stats = per_fold.groupby(["mode", "channel"], sort=False).agg(
        balanced_accuracy_mean=("balanced_accuracy", "mean"), balanced_accuracy_sd=("balanced_accuracy", "std"),
        drop_mean=("drop", "mean"), drop_sd=("drop", "std"), intact_mean=("intact", "mean"), n_folds=("fold", "nunique"),
    ).reset_index()
    stats = stats.sort_values(["mode", "drop_mean"], ascending=[True, False], kind="stable")
    stats["rank"] = stats.groupby("mode").cumcount() + 1
    return stats.reset_index(drop=True)


def plot_ablation(summary: pd.DataFrame, *, out: str | Path, title: str = "Channel ablation") -> tuple[Path, Path]:
    """Bars: drop in balanced accuracy per channel (mean ± sd over folds), one bar per mode."""
    import matplotlib

    from cytofuse.plots import STYLE, class_colours, figure, save_figure

    channels = list(dict.fromkeys(summary["channel"]))
    modes = list(dict.fromkeys(summary["mode"]))
    width = 0.8 / len(modes)
    with matplotlib.rc_context(STYLE):
        fig, ax = figure((1.2 + 1.1 * len(channels), 3.2))
        for i, (mode, colour) in enumerate(zip(modes, class_colours(len(modes)))):
            part = summary[summary["mode"] == mode].set_index("channel").reindex(channels)
            x = np.arange(len(channels)) + (i - (len(modes) - 1) / 2) * width
            ax.bar(x, part["drop_mean"], width, yerr=part["drop_sd"].fillna(0), color=colour, label=mode, capsize=3)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(range(len(channels)), channels, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_ylabel("Drop in balanced accuracy")
        ax.set_title(title)
        ax.legend(title="ablation", loc="best")
        return save_figure(fig, out)


def single_channel_table(run_dir: str | Path, *, level: str = "patch") -> pd.DataFrame:
    """Balanced accuracy (mean, sd over folds) of every single-channel model of a run folder."""
    rows = []
    for model in RunFolder(run_dir).model_runs():
        metrics = RunMetrics.read(model.metrics)
        if metrics.model.get("fusion") != "single":
            continue
        stat = metrics.stat("balanced_accuracy", level)
        rows.append({"model": model.name, "channel": str(metrics.model.get("channel")),
                     "balanced_accuracy_mean": stat.mean, "balanced_accuracy_sd": stat.sd})
    table = pd.DataFrame(rows, columns=["model", "channel", "balanced_accuracy_mean", "balanced_accuracy_sd"])
    return table.sort_values("balanced_accuracy_mean", ascending=False, kind="stable").reset_index(drop=True)


def plot_single_channel(table: pd.DataFrame, *, out: str | Path) -> tuple[Path, Path]:
    """Bars: balanced accuracy of each single-channel classifier (mean ± sd over folds)."""
    import matplotlib

    from cytofuse.plots import STYLE, class_colours, figure, save_figure

    with matplotlib.rc_context(STYLE):
        fig, ax = figure((1.2 + 1.0 * len(table), 3.2))
        ax.bar(range(len(table)), table["balanced_accuracy_mean"], yerr=table["balanced_accuracy_sd"].fillna(0),
               color=class_colours(len(table)), capsize=3)
        ax.set_xticks(range(len(table)), table["channel"], rotation=30, ha="right", rotation_mode="anchor")
        ax.set_ylim(0, 1)
        ax.set_ylabel("Balanced accuracy")
        ax.set_title("Single-channel classifiers")
        return save_figure(fig, out)


# --------------------------------------------------------------------------- embeddings


def extract_features(model, cache, rows: np.ndarray, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit features (N, D) (``forward_features``) and class probabilities (N, K)."""
    import torch

    model.eval()
    feats, probs = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            f = model.forward_features(torch.from_numpy(_load(cache, rows[start:start + batch_size])))
            feats.append(f.numpy())
            probs.append(torch.softmax(model.head(f), dim=1).numpy())
    return np.concatenate(feats).astype(np.float32), np.concatenate(probs).astype(np.float32)


def project(features: np.ndarray, *, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2D projection (N, 2) of standardised features by t-SNE (scikit-learn) or UMAP (umap-learn)."""
    import warnings

    if method not in EMBEDDING_METHODS:
        raise InputError(f"project: method must be one of {list(EMBEDDING_METHODS)}, got {method!r}")
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) < 5:
        raise InputError(f"project: features must be (N, D) with N >= 5, got shape {features.shape}")
    z = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (len(z) - 1) / 3))
        return TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(z).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)  # umap announces at import that ParametricUMAP needs TensorFlow
        import umap
    reducer = umap.UMAP(n_neighbors=min(15, len(z) - 1), random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(z), dtype=np.float32)


def embeddings(models: Mapping[int, Any], cache, predictions: pd.DataFrame, *, methods: Sequence[str] = EMBEDDING_METHODS,
               max_per_fold: int = 1000, seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """Per fold, the test patches' features from that fold's model, projected per fold.

    Returns patch_id, fold, y_true, y_pred and ``<method>_x``, ``<method>_y`` per method; at most
    ``max_per_fold`` random patches per fold. Coordinates are comparable only within a fold.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for fold, rows in predictions.groupby("fold", sort=True):
        if len(rows) > max_per_fold:
            rows = rows.iloc[np.sort(rng.choice(len(rows), max_per_fold, replace=False))]
        feats, proba = extract_features(_fold_model(models, fold), cache, _positions(cache, rows["patch_id"]), batch_size=batch_size)
        part = pd.DataFrame({"patch_id": rows["patch_id"].to_numpy(), "fold": int(fold), "y_true": rows["y_true"].to_numpy(),
                             "y_pred": proba.argmax(axis=1)})
        for method in methods:
            part[[f"{method}_x", f"{method}_y"]] = project(feats, method=method, seed=seed)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def plot_embedding(table: pd.DataFrame, classes: Sequence[str], *, method: str, out: str | Path) -> tuple[Path, Path]:
    """One row per fold: the projection coloured by true class (left) and predicted class (right)."""
    import matplotlib

    from cytofuse.plots import STYLE, class_colours, save_figure

    folds = sorted(table["fold"].unique())
    colours = class_colours(len(classes))
    with matplotlib.rc_context(STYLE):
        fig, axes = _grid((7.0, 3.0 * len(folds)), len(folds), 2)
        for i, fold in enumerate(folds):
            part = table[table["fold"] == fold]
            for j, column in enumerate(("y_true", "y_pred")):
                ax = axes[i, j]
                for k, name in enumerate(classes):
                    sel = part[column] == k
                    ax.scatter(part.loc[sel, f"{method}_x"], part.loc[sel, f"{method}_y"], s=8, color=colours[k], label=name, lw=0)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(f"fold {fold}: {'true' if j == 0 else 'predicted'} class", fontsize=9)
        axes[0, 1].legend(loc="best", markerscale=2)
        fig.suptitle(f"{_METHOD_LABELS[method]} of test-patch features (per fold)")
        return save_figure(fig, out)


def plot_thumbnails(coords: np.ndarray, patches: np.ndarray, *, out: str | Path, channel: int = 0,
                    title: str = "", zoom: float | None = None) -> tuple[Path, Path]:
    """Each patch's channel ``channel`` as a small grey image at its embedding position.

    One grey scale for all thumbnails (percentiles over them), so empty patches stay dark.
    """
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    from cytofuse.plots import STYLE, figure, save_figure

    coords, patches = np.asarray(coords, dtype=np.float32), np.asarray(patches, dtype=np.float32)
    if coords.shape != (len(patches), 2) or patches.ndim != 4:
        raise InputError(f"plot_thumbnails: coords must be (N, 2) for patches (N, C, H, W), got {coords.shape} and {patches.shape}")
    zoom = zoom or 20.0 / patches.shape[-1]
    with matplotlib.rc_context(STYLE):
        fig, ax = figure((7.0, 7.0))
        ax.scatter(coords[:, 0], coords[:, 1], s=1, alpha=0)
        lo, hi = _grey_limits(patches[:, channel])
        for (x, y), patch in zip(coords, patches[:, channel]):
            box = OffsetImage(np.clip((patch - lo) / (hi - lo), 0, 1), cmap="gray", norm=Normalize(0, 1), zoom=zoom)
            ax.add_artist(AnnotationBbox(box, (x, y), frameon=False, pad=0.0))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(title)
        return save_figure(fig, out)


# --------------------------------------------------------------------------- run folder


def run_models(run_dir: str | Path) -> list[str]:
    """Folder names of the network models of a run: a predictions table and fold weights.

    Baselines (handcrafted features, probes) have predictions but no network to explain.
    """
    models = (ModelRun(p) for p in RunFolder(run_dir).models.glob("*"))
    return sorted(m.name for m in models if m.predictions.is_file() and any(f.weights.is_file() for f in m.folds()))


def unfinished_models(run_dir: str | Path) -> list[str]:
    """Folder names of the run's configured network models that have nothing to explain yet."""
    from cytofuse.inference.modelfolder import cv_model_names

    if not RunFolder(run_dir).config.is_file():
        return []
    done = set(run_models(run_dir))
    return [safe_name(n) for n in cv_model_names(run_dir) if safe_name(n) not in done]


def load_fold_models(model_dir: str | Path) -> dict[int, Any]:
    """fold -> model rebuilt from ``fold_<k>/best.safetensors``."""
    from cytofuse.models import load_model

    folds = [f for f in ModelRun(Path(model_dir)).folds() if f.weights.is_file()]
    if not folds:
        raise RunFolderError(f"{model_dir} has no fold_<k>/best.safetensors; run cross-validation first")
    return {int(f.root.name.split("_")[1]): load_model(f.weights) for f in folds}


def _classes(predictions: pd.DataFrame) -> list[str]:
    return [c[len("prob_"):] for c in predictions.columns if c.startswith("prob_")]


def _write_csv(table: pd.DataFrame, path: Path) -> Path:
    return write_text_atomic(path, table.to_csv(index=False))


def _write_parquet(table: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path


def _step_gradcam(ctx: dict) -> dict:
    paths = gradcam_figures(ctx["models"], ctx["cache"], ctx["pred"], ctx["classes"], out_dir=ctx["out"], n_examples=ctx["n_examples"])
    return {"gradcam": [p.name for p in paths]}


def _step_ablation(ctx: dict) -> dict:
    out = ctx["out"]
    per_fold = pd.concat([fold_ablation(ctx["models"], ctx["cache"], ctx["pred"], mode=m, seed=ctx["seed"]) for m in ctx["modes"]],
                         ignore_index=True)
    summary = summarize_ablation(per_fold)
    _write_csv(per_fold, out / "ablation_folds.csv")
    _write_csv(summary, out / "ablation.csv")
    plot_ablation(summary, out=out / "ablation", title=f"Channel ablation: {ctx['name']}")
    return {"ablation": json.loads(summary.to_json(orient="records"))}


def _step_single(ctx: dict) -> dict:
    table = single_channel_table(ctx["run_dir"])
    if not table.empty:
        _write_csv(table, ctx["out"] / "single_channel.csv")
        plot_single_channel(table, out=ctx["out"] / "single_channel")
    return {"single_channel": json.loads(table.to_json(orient="records"))}


def _step_embeddings(ctx: dict) -> dict:
    out, cache = ctx["out"], ctx["cache"]
    table = embeddings(ctx["models"], cache, ctx["pred"], methods=ctx["methods"], max_per_fold=ctx["max_points"], seed=ctx["seed"])
    _write_parquet(table, out / "embeddings.parquet")
    for method in ctx["methods"]:
        plot_embedding(table, ctx["classes"], method=method, out=out / f"embedding_{method}")
        if ctx["thumbnails"]:
            part = table[table["fold"] == table["fold"].min()].head(ctx["n_thumbnails"])
            channel = getattr(next(iter(ctx["models"].values())), "channel", 0)  # a single-channel model's own channel
            plot_thumbnails(part[[f"{method}_x", f"{method}_y"]].to_numpy(), _load(cache, _positions(cache, part["patch_id"])),
                            channel=channel, out=out / f"thumbnails_{method}",
                            title=f"{_METHOD_LABELS[method]}, fold {int(part['fold'].iloc[0])}: {cache.channels[channel]}")
    return {"embeddings": {"methods": list(ctx["methods"]), "n": len(table), "projected": "per fold"}}


_STEPS = {"gradcam": _step_gradcam, "ablation": _step_ablation, "single_channel": _step_single, "embeddings": _step_embeddings}


def model_view(run_dir: Path, name: str, cache):
    """The patch cache as the model's folds saw it, by their patch recipe (``inference.modelfolder.cv_recipe``):
    the model's input channels only (no training-only auxiliary channel), with dataset (or fixed)
    normalisation the mean of the folds' ranges (they differ only by which training split they were taken
    from); the cache itself for a model of every channel with per-image normalisation."""
    from cytofuse.training.cache import CacheChannels, NormalisedCache, cache_image_ids
    from cytofuse.inference.modelfolder import cv_recipe
    from cytofuse.preprocess.patches import read_patch_index

    folds = [f for f in RunFolder(run_dir).model(name).folds() if f.weights.is_file()]
    if not folds:
        return cache
    recipe = cv_recipe(run_dir, folds)
    view, have = cache, list(cache.channels)
    if recipe.channels != have:
        missing = [c for c in recipe.channels if c not in have]
        if missing:
            raise InputError(f"explain: model {name!r} takes channels {missing}, which the patch cache "
                             f"{RunFolder(run_dir).cache} (channels {have}) lacks")
        view = CacheChannels(cache, [have.index(c) for c in recipe.channels])
    if recipe.normalisation is None:
        return view
    index = read_patch_index(run_dir)
    return NormalisedCache(view, cache_image_ids(cache, index), index.images, recipe.normalisation.select(recipe.channels))


def explain_model(run_dir: str | Path, name: str, *, out: str | Path, n_examples: int = 4,
                  modes: Sequence[str] = ABLATION_MODES, methods: Sequence[str] = EMBEDDING_METHODS,
                  thumbnails: bool = True, max_points: int = 1000, seed: int = 0, on_step=lambda step: None) -> Path:
    """All explanations of one model of a run folder into ``out``; finished steps are kept (resumable)."""
    from cytofuse.training.cache import PatchCache

    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        if mode not in ABLATION_MODES:
            raise InputError(f"explain: modes must be among {list(ABLATION_MODES)}, got {mode!r}")
    for method in methods:
        if method not in EMBEDDING_METHODS:
            raise InputError(f"explain: methods must be among {list(EMBEDDING_METHODS)}, got {method!r}")
    run = RunFolder(run_dir)
    pred = pd.read_parquet(run.model(name).predictions)
    ctx = {"run_dir": run_dir, "name": name, "out": out, "pred": pred, "classes": _classes(pred),
           "cache": model_view(run_dir, name, PatchCache.open(run.cache)),
           "models": load_fold_models(run.model(name).root),
           "n_examples": n_examples, "modes": list(modes), "methods": list(methods), "thumbnails": thumbnails,
           "n_thumbnails": 150, "max_points": max_points, "seed": seed}
    for step, run in _STEPS.items():
        done = out / f".{step}.json"
        if not done.is_file():
            write_text_atomic(done, json.dumps(run(ctx), indent=1))
        on_step(step)
    summary = {"model": name, "classes": ctx["classes"], "channels": list(ctx["cache"].channels)}
    for step in _STEPS:
        summary |= json.loads((out / f".{step}.json").read_text())
    return write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))


def explain_run(run_dir: str | Path, *, model: str | Sequence[str] | None = None, out: str | Path | None = None,
                n_examples: int = 4, modes: Sequence[str] = ABLATION_MODES, methods: Sequence[str] = EMBEDDING_METHODS,
                thumbnails: bool = True, max_points: int = 1000, seed: int = 0, progress: bool = True) -> dict[str, Path]:
    """Grad-CAM grids, channel ablation, single-channel table and embeddings of a CV run folder.

    model: one model folder name or several (default: every model of the run). Writes
    ``<out or run_dir/explain>/<model>/``; a model whose ``summary.json`` exists is skipped, and
    an interrupted model resumes after its last finished step. Returns model -> summary.json.
    """
    from rich.progress import Progress

    run_dir = Path(run_dir)
    available = run_models(run_dir)
    unfinished = unfinished_models(run_dir)
    names = available if model is None else [model] if isinstance(model, str) else list(model)
    unknown = [m for m in names if m not in available]
    if not available and not unfinished:
        raise InputError(f"explain_run: {run_dir} holds no trained model (no models/<name>/predictions.parquet with "
                         "fold weights); give a CV run folder (`cytofuse cv CONFIG --out RUN`)")
    if unknown or not names:
        raise InputError(f"explain_run: model {unknown or names} not found in {RunFolder(run_dir).models}; run models are "
                         f"{available}" + (f"; {unfinished} have no predictions yet (their CV did not finish: "
                                           "run `cytofuse cv` again to finish it)" if unfinished else ""))
    if model is None and unfinished:
        import warnings

        warnings.warn(f"explain_run: models {unfinished} of {run_dir} have no predictions.parquet with fold weights "
                      "(their CV did not finish) and are not explained; run `cytofuse cv` again to finish them",
                      UserWarning, stacklevel=2)
    base = Path(out) if out is not None else RunFolder(run_dir).explain
    result = {}
    with Progress(disable=not progress) as bar:
        task = bar.add_task("explain", total=len(names) * len(_STEPS))
        for name in names:
            target = base / safe_name(name)
            if (target / "summary.json").is_file():
                bar.advance(task, len(_STEPS))
                result[name] = target / "summary.json"
                continue
            bar.update(task, description=f"explain: {name}")
            result[name] = explain_model(run_dir, name, out=target, n_examples=n_examples, modes=modes, methods=methods,
                                         thumbnails=thumbnails, max_points=max_points, seed=seed,
                                         on_step=lambda step: bar.advance(task))
    return result
