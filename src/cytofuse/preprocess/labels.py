"""Patch labels from a fluorescence channel: a two-component Gaussian mixture rule (Pattarone et al.).

Each kept patch gets the mean (or integrated) raw intensity of the label channel over its
area. A two-component mixture is fitted on the values of the patches whose image label
(the condition, e.g. "untreated") is in ``fit_on``; the low component has mean m_lo and
sd s_lo, the high one m_hi and s_hi. Patches with a value below ``m_lo + k*s_lo`` get the
low class, above ``m_hi - k*s_hi`` the high class, and the band between is discarded
(k = 1 in the paper, where the live threshold was 224.5 + 34.5 and the dead one
550.4 - 153.6). Either threshold can be set by hand. When the two thresholds cross (the
components overlap), the midpoint between the means splits the classes and nothing is
discarded; the rule records that.

The label channel is then only the source of labels: the run drops it from the patch
channels, so no model, baseline or probe sees it.

Outputs in ``run_dir/labels/``: ``label_rule.json`` (mixture, thresholds, counts),
``patch_values.parquet`` (every patch's value and derived class, discarded ones included)
and ``histogram.png``/``.svg`` (values, mixture components and thresholds).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cytofuse.errors import InputError
from cytofuse.runs import RunFolder, atomic_path, write_json_atomic

if TYPE_CHECKING:
    import pandas as pd

    from cytofuse.config import LabelSettings
    from cytofuse.preprocess.patches import PatchIndex



@dataclass
class LabelRule:
    """Thresholds that turn a patch's label-channel value into a class (or None: discarded)."""

    channel: str
    statistic: str
    classes: tuple[str, str]
    low_threshold: float
    high_threshold: float
    mixture: dict | None = None  # means, sds, weights of the low and high component
    source: str = "mixture"  # "mixture", "manual" or "mixture+manual"
    n_fit: int = 0
    notes: list[str] = field(default_factory=list)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Class name per value; None inside the discarded band."""
        values = np.asarray(values, dtype=np.float64)
        out = np.full(values.shape, None, dtype=object)
        out[values < self.low_threshold] = self.classes[0]
        out[values > self.high_threshold] = self.classes[1]
        if self.low_threshold == self.high_threshold:
            out[values == self.low_threshold] = self.classes[1]
        return out

    def to_json(self) -> dict:
        return asdict(self) | {"classes": list(self.classes)}


def patch_values(plane_stack: np.ndarray, origins: np.ndarray, *, size: int, statistic: str = "mean") -> np.ndarray:
    """Mean or integrated intensity of a (Z, Y, X) channel over each patch at ``origins`` (z, y, x)."""
    if plane_stack.ndim != 3:
        raise InputError(f"patch_values: the label channel must be (Z, Y, X), got shape {plane_stack.shape}")
    if statistic not in ("mean", "integrated"):
        raise InputError(f"patch_values: statistic must be 'mean' or 'integrated', got {statistic!r}")
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 3)
    out = np.empty(len(origins), np.float64)
    for z in np.unique(origins[:, 0]):
        sel = np.flatnonzero(origins[:, 0] == z)
        sat = np.zeros((plane_stack.shape[1] + 1, plane_stack.shape[2] + 1), np.float64)
        sat[1:, 1:] = np.asarray(plane_stack[z], dtype=np.float64).cumsum(0).cumsum(1)
        y, x = origins[sel, 1], origins[sel, 2]
        out[sel] = sat[y + size, x + size] - sat[y, x + size] - sat[y + size, x] + sat[y, x]
    return out / (size * size) if statistic == "mean" else out


def fit_label_rule(values: np.ndarray, *, channel: str, statistic: str = "mean", classes: Sequence[str] = ("low", "high"),
                   k_sd: float = 1.0, low_threshold: float | None = None, high_threshold: float | None = None,
                   seed: int = 0) -> LabelRule:
    """The two-component mixture rule on ``values`` (the fitting subset); hand-set thresholds win."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    mixture, notes = None, []
    by_hand = low_threshold is not None or high_threshold is not None
    if low_threshold is None or high_threshold is None:
        if len(values) < 10 or np.ptp(values) == 0:
            raise InputError(f"labels: the mixture on channel {channel!r} needs at least 10 distinct patch values, "
                             f"got {len(values)} values with range {np.ptp(values) if len(values) else 0}")
        mixture = _two_components(values, seed=seed)
        lo_auto = mixture["means"][0] + k_sd * mixture["sds"][0]
        hi_auto = mixture["means"][1] - k_sd * mixture["sds"][1]
        low_threshold = lo_auto if low_threshold is None else low_threshold
        high_threshold = hi_auto if high_threshold is None else high_threshold
    if low_threshold > high_threshold:
        mid = float(np.mean(mixture["means"])) if mixture else (low_threshold + high_threshold) / 2
        notes.append(f"the thresholds crossed ({low_threshold:.4g} > {high_threshold:.4g}): the components overlap, so "
                     f"the midpoint {mid:.4g} of the means splits the classes and no band is discarded")
        low_threshold = high_threshold = mid
    source = "manual" if mixture is None else "mixture+manual" if by_hand else "mixture"
    return LabelRule(channel=str(channel), statistic=statistic, classes=(str(classes[0]), str(classes[1])),
                     low_threshold=float(low_threshold), high_threshold=float(high_threshold), mixture=mixture,
                     source=source, n_fit=int(len(values)), notes=notes)


def _two_components(values: np.ndarray, *, seed: int) -> dict:
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(n_components=2, covariance_type="full", random_state=seed, n_init=3)
    gm.fit(values.reshape(-1, 1))
    order = np.argsort(gm.means_.ravel())
    return {
        "means": [float(gm.means_.ravel()[i]) for i in order],
        "sds": [float(np.sqrt(gm.covariances_.ravel()[i])) for i in order],
        "weights": [float(gm.weights_[i]) for i in order],
    }


def derive_patch_labels(image_set, index: "PatchIndex", settings: "LabelSettings", run_dir: str | Path, *,
                        seed: int = 0, progress: bool = True) -> tuple["PatchIndex", LabelRule]:
    """Replace each patch's label by the class of its label-channel value; drop the discarded band.

    The image label moves to the ``condition`` column and the value to ``label_value``.
    """

    from cytofuse.preprocess.patches import PatchIndex

    values = _values_per_patch(image_set, index, settings, progress=progress)
    patches = index.patches.assign(condition=index.patches["label"].astype(str), label_value=values)
    fit_mask = np.ones(len(patches), bool)
    if settings.fit_on is not None:
        unknown = sorted(set(settings.fit_on) - set(patches["condition"]))
        if unknown:
            raise InputError(f"labels.fit_on names image labels {unknown} that no patch has; the image labels are "
                             f"{sorted(patches['condition'].unique())}")
        fit_mask = patches["condition"].isin(settings.fit_on).to_numpy()
    rule = fit_label_rule(values[fit_mask], channel=str(settings.channel), statistic=settings.statistic,
                          classes=settings.classes, k_sd=settings.k_sd, low_threshold=settings.low_threshold,
                          high_threshold=settings.high_threshold, seed=seed)
    derived = rule.apply(values)
    patches["derived"] = derived
    kept = patches[patches["derived"].notna()].copy()
    missing = [c for c in rule.classes if c not in set(kept["derived"])]
    if missing:
        raise InputError(f"labels: no patch falls in class {missing} (thresholds {rule.low_threshold:.4g} / "
                         f"{rule.high_threshold:.4g} on {settings.statistic} of channel {settings.channel!r}); "
                         "set labels.low_threshold / labels.high_threshold by hand")
    kept["label"] = kept.pop("derived").astype(str)
    _write_outputs(RunFolder(run_dir), patches, rule, fit_mask)
    new = PatchIndex(kept.reset_index(drop=True), index.images, index.attrition, index.channel_names, index.sparse_images)
    return new, rule


def _values_per_patch(image_set, index: "PatchIndex", settings: "LabelSettings", *, progress: bool) -> np.ndarray:
    from rich.progress import Progress

    from cytofuse.io.readers import select_channels

    patches = index.patches
    values = np.empty(len(patches), np.float64)
    groups = patches.groupby("image_id", sort=False).indices
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"label channel {settings.channel}", total=len(groups))
        for image_id, rows in groups.items():
            image = image_set.read(image_id)
            try:
                c = select_channels(image.channel_names, channels=[settings.channel])[0]
            except InputError as exc:
                raise InputError(f"{image.source or image_id}: labels.channel {settings.channel!r}: {exc}") from None
            origins = patches.iloc[rows][["z", "y", "x"]].to_numpy()
            size = int(patches["size"].iloc[rows[0]])
            values[rows] = patch_values(np.asarray(image.data[c]), origins, size=size, statistic=settings.statistic)
            bar.advance(task)
    return values


def _write_outputs(run: RunFolder, patches: "pd.DataFrame", rule: LabelRule, fit_mask: np.ndarray) -> None:
    run.labels.mkdir(parents=True, exist_ok=True)
    table = patches[["patch_id", "image_id", "condition", "label_value", "derived"]].rename(columns={"derived": "label"})
    table = table.assign(used_for_fit=fit_mask)
    with atomic_path(run.label_values) as tmp:
        table.to_parquet(tmp, index=False)
    counts = table["label"].fillna("discarded").value_counts().to_dict()
    per_condition = table.assign(label=table["label"].fillna("discarded")).groupby(["condition", "label"]).size()
    record = rule.to_json() | {"counts": {k: int(v) for k, v in counts.items()},
                               "per_condition": {f"{a}/{b}": int(v) for (a, b), v in per_condition.items()}}
    write_json_atomic(run.label_rule, record)
    plot_label_histogram(table["label_value"].to_numpy(), rule, run.label_histogram, fit_mask=fit_mask,
                         conditions=table["condition"].to_numpy())


def plot_label_histogram(values: np.ndarray, rule: LabelRule, path: str | Path, *, fit_mask: np.ndarray | None = None,
                         conditions: np.ndarray | None = None) -> list[Path]:
    """Histogram of the label-channel values per condition, the mixture components and both thresholds."""
    from cytofuse.plots import STYLE, save_figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(values, dtype=np.float64)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.0, 3.6))
        bins = np.histogram_bin_edges(values[np.isfinite(values)], bins=60)
        groups = {"all patches": values} if conditions is None else {
            str(c): values[conditions == c] for c in sorted(set(conditions.tolist()))}
        for name, v in groups.items():
            ax.hist(v, bins=bins, density=True, alpha=0.45, label=name)
        if rule.mixture:
            xs = np.linspace(bins[0], bins[-1], 400)
            for i, name in enumerate(rule.classes):
                m, s, w = rule.mixture["means"][i], rule.mixture["sds"][i], rule.mixture["weights"][i]
                ax.plot(xs, w * np.exp(-0.5 * ((xs - m) / s) ** 2) / (s * np.sqrt(2 * np.pi)), lw=1.5,
                        label=f"component {name}: {m:.3g} ± {s:.3g}")
        ax.axvline(rule.low_threshold, color="k", ls="--", lw=1, label=f"{rule.classes[0]} below {rule.low_threshold:.4g}")
        ax.axvline(rule.high_threshold, color="k", ls=":", lw=1, label=f"{rule.classes[1]} above {rule.high_threshold:.4g}")
        fitted = "" if fit_mask is None or fit_mask.all() else f", mixture fitted on {int(fit_mask.sum())} patches"
        ax.set_xlabel(f"{rule.statistic} {rule.channel} per patch")
        ax.set_ylabel("density")
        ax.set_title(f"Labels from {rule.channel} ({rule.source}{fitted})", fontsize=9)
        ax.legend(fontsize=7)
        return save_figure(fig, Path(path))


def read_label_rule(run_dir: str | Path) -> dict | None:
    """The label rule record of a run, or None when its labels came from folders or a manifest."""
    path = RunFolder(run_dir).label_rule
    return json.loads(path.read_text()) if path.is_file() else None


def score_correlation(predictions: "pd.DataFrame", values: "pd.Series", *, positive: str) -> dict:
    """Pearson r (and p) between the positive-class probability and the label-channel value, per patch."""
    from scipy.stats import pearsonr

    merged = predictions[["patch_id", f"prob_{positive}"]].merge(values.rename("label_value"), left_on="patch_id",
                                                                  right_index=True)
    x, y = merged[f"prob_{positive}"].to_numpy(), merged["label_value"].to_numpy()
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"r": None, "p": None, "n": int(len(x)), "score": f"prob_{positive}"}
    r, p = pearsonr(x, y)
    return {"r": float(r), "p": float(p), "n": int(len(x)), "score": f"prob_{positive}"}
