"""Handcrafted-feature baseline and shortcut probes, run through the deep models' folds.

The baseline is the paper's comparator (a handcrafted pipeline): per patch and channel,
intensity statistics, texture (grey-level co-occurrence / Haralick, local binary patterns),
morphology of the thresholded objects, and co-localisation of every channel pair, classified
by gradient boosting. The probes train the same classifier on inputs that should carry no
biology, so that a data set whose classes can be told apart by how they were imaged is
flagged:

* ``background``: statistics of the pixels outside the foreground mask only;
* ``intensity``: whole-patch intensity statistics only (no spatial information);
* ``acquisition``: image-level facts (size, bit depth, exposure percentiles, Otsu threshold).

Every feature is computed on raw intensities: the patch cache holds ``(raw - lo) / (hi - lo)``
per image and channel, which hides exactly the acquisition differences the probes look for,
so it is undone with ``lo_<ch>`` / ``hi_<ch>`` of ``images.parquet``. The foreground mask of a
patch is ``raw > thr_<ch>``, the image's own global Otsu threshold. Patches are (C, P, P),
batches (N, C, P, P).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from cytofuse.errors import InputError

PROBES = ("background", "intensity", "acquisition")
GLCM_LEVELS = 16
_BG_QUANTILES = (5, 25, 50, 75, 95)


# --------------------------------------------------------------------------- input checks


def _check_batch(patches: np.ndarray, thresholds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    patches = np.asarray(patches, dtype=np.float32)
    if patches.ndim != 4 or patches.shape[-1] != patches.shape[-2]:
        raise InputError(f"patches must be an (N, C, P, P) batch of square patches, got shape {patches.shape}")
    if thresholds is None:
        return patches, None
    thresholds = np.asarray(thresholds, dtype=np.float32)
    if thresholds.shape != patches.shape[:2]:
        raise InputError(f"thresholds must have shape (N, C) = {patches.shape[:2]}, got {thresholds.shape}")
    return patches, thresholds


def _names(channel_names: Sequence[str] | None, n: int) -> list[str]:
    names = list(channel_names) if channel_names is not None else [f"ch{c}" for c in range(n)]
    if len(names) != n:
        raise InputError(f"channel_names must name the {n} channels of the patches, got {names}")
    return names


# --------------------------------------------------------------------------- feature groups


def intensity_features(patches: np.ndarray, *, channel_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Whole-patch intensity statistics per channel (``cytofuse.preprocess.patchfeatures.intensity_statistics``):
    mean, sd, min, max (float32) and percentiles (float64), as named columns."""
    from cytofuse.preprocess.patchfeatures import INTENSITY_QUANTILES, intensity_statistics

    x, _ = _check_batch(patches)
    names = _names(channel_names, x.shape[1])
    stats = intensity_statistics(x, extremes=True)  # (N, C, 4 + Q)
    cols = {}
    for c, ch in enumerate(names):
        for i, s in enumerate(("mean", "sd", "min", "max")):
            cols[f"{ch}_{s}"] = stats[:, c, i].astype(np.float32)
        for i, p in enumerate(INTENSITY_QUANTILES):
            cols[f"{ch}_p{p:g}"] = stats[:, c, 4 + i]
    return pd.DataFrame(cols)


def _masked_quantiles(flat: np.ndarray, mask: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles (0-100) of ``flat`` over ``mask`` along the last axis; NaN where the mask is empty."""
    n = mask.sum(-1)
    ordered = np.sort(np.where(mask, flat, np.inf), axis=-1)
    out = np.empty((len(qs), *flat.shape[:-1]), np.float32)
    for i, q in enumerate(qs):
        pos = np.clip(np.round((n - 1) * q / 100.0).astype(np.int64), 0, flat.shape[-1] - 1)
        out[i] = np.take_along_axis(ordered, pos[..., None], -1)[..., 0]
    out[:, n == 0] = np.nan
    return out


def background_features(patches: np.ndarray, thresholds: np.ndarray, *, channel_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Statistics of the background pixels (raw <= threshold) per channel; NaN where there are none."""
    x, thr = _check_batch(patches, thresholds)
    names = _names(channel_names, x.shape[1])
    flat = x.reshape(*x.shape[:2], -1)
    mask = flat <= thr[..., None]
    n = mask.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(mask, flat, 0).sum(-1) / n
        sd = np.sqrt(np.maximum(np.where(mask, flat**2, 0).sum(-1) / n - mean**2, 0))
    q = _masked_quantiles(flat, mask, _BG_QUANTILES)
    cols = {}
    for c, ch in enumerate(names):
        cols[f"{ch}_bg_fraction"] = n[:, c] / flat.shape[-1]
        cols[f"{ch}_bg_mean"], cols[f"{ch}_bg_sd"] = mean[:, c], sd[:, c]
        for i, p in enumerate(_BG_QUANTILES):
            cols[f"{ch}_bg_p{p}"] = q[i, :, c]
    return pd.DataFrame(cols)


def glcm_features(images: np.ndarray, *, levels: int = GLCM_LEVELS) -> dict[str, np.ndarray]:
    """Haralick features of (N, P, P) images, each quantised to ``levels`` between its own min and max.

    The co-occurrence matrix is symmetric, at distance 1, summed over 0, 45, 90 and 135 degrees.
    """
    x = np.asarray(images, dtype=np.float32)
    n = len(x)
    lo, hi = x.min((1, 2), keepdims=True), x.max((1, 2), keepdims=True)
    q = np.clip(((x - lo) / np.maximum(hi - lo, 1e-12) * levels).astype(np.int64), 0, levels - 1)
    base = (np.arange(n) * levels * levels)[:, None, None]
    pairs = ((q[:, :, :-1], q[:, :, 1:]), (q[:, :-1, :], q[:, 1:, :]), (q[:, :-1, :-1], q[:, 1:, 1:]), (q[:, :-1, 1:], q[:, 1:, :-1]))
    counts = np.zeros(n * levels * levels, np.float64)
    for a, b in pairs:
        counts += np.bincount((base + a * levels + b).ravel(), minlength=n * levels * levels)
    m = counts.reshape(n, levels, levels)
    m = m + m.transpose(0, 2, 1)
    p = m / m.sum((1, 2), keepdims=True)
    i, j = np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij")
    mu_i, mu_j = (p * i).sum((1, 2)), (p * j).sum((1, 2))
    sd_i = np.sqrt((p * (i - mu_i[:, None, None]) ** 2).sum((1, 2)))
    sd_j = np.sqrt((p * (j - mu_j[:, None, None]) ** 2).sum((1, 2)))
    cov = (p * (i - mu_i[:, None, None]) * (j - mu_j[:, None, None])).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(sd_i * sd_j > 0, cov / (sd_i * sd_j), 1.0)
    return {
        "glcm_contrast": (p * (i - j) ** 2).sum((1, 2)),
        "glcm_dissimilarity": (p * np.abs(i - j)).sum((1, 2)),
        "glcm_homogeneity": (p / (1.0 + (i - j) ** 2)).sum((1, 2)),
        "glcm_energy": np.sqrt((p**2).sum((1, 2))),
        "glcm_correlation": corr,
        "glcm_entropy": -(p * np.log2(np.where(p > 0, p, 1))).sum((1, 2)),
    }


def _uniform_lbp_table() -> np.ndarray:
    """Rotation-invariant uniform code (0-9) of every 8-bit neighbour pattern ('riu2')."""
    codes = np.arange(256)
    bits = (codes[:, None] >> np.arange(8)) & 1
    transitions = (bits != np.roll(bits, 1, axis=1)).sum(1)
    return np.where(transitions <= 2, bits.sum(1), 9)


_LBP_TABLE = _uniform_lbp_table()


def lbp_histograms(images: np.ndarray) -> np.ndarray:
    """Per (N, P, P) image, the fraction of pixels of each of the 10 uniform LBP codes.

    Local binary patterns over the 8-pixel square ring at radius 1 (edges replicated): a
    neighbour >= the centre sets its bit; codes as scikit-image's ``method="uniform"``.
    """
    x = np.asarray(images, dtype=np.float32)
    n, h, w = x.shape
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    ring = ((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0))
    code = np.zeros(x.shape, np.int64)
    for bit, (dy, dx) in enumerate(ring):
        code |= (pad[:, dy : dy + h, dx : dx + w] >= x).astype(np.int64) << bit
    lbp = _LBP_TABLE[code]
    hist = np.bincount((lbp + 10 * np.arange(n)[:, None, None]).ravel(), minlength=10 * n).reshape(n, 10)
    return hist / float(h * w)


def object_features(masks: np.ndarray) -> dict[str, np.ndarray]:
    """Morphology of the 8-connected objects of (N, P, P) boolean masks, per mask.

    Count, total / mean / max area (pixels), mean eccentricity (of the inertia ellipse, as
    scikit-image's regionprops) and mean / min distance of object centroids to the patch centre
    in units of half the patch side. Means are NaN for a mask without objects.
    """
    masks = np.asarray(masks, dtype=bool)
    n, h, w = masks.shape
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # objects never join across patches
    labels, n_obj = ndimage.label(masks, structure=structure)
    flat = labels.ravel()
    owner_px = np.repeat(np.arange(n), h * w)
    yy, xx = np.broadcast_to(np.arange(h)[:, None], (h, w)), np.broadcast_to(np.arange(w)[None, :], (h, w))
    yy, xx = np.tile(yy.ravel(), n).astype(np.float64), np.tile(xx.ravel(), n).astype(np.float64)
    sums = [np.bincount(flat, weights=v, minlength=n_obj + 1)[1:] for v in (None, yy, xx, yy * yy, xx * xx, yy * xx)]
    area = sums[0]
    sel = flat > 0
    owner = np.zeros(n_obj, np.int64)
    owner[flat[sel] - 1] = owner_px[sel]
    cy, cx = sums[1] / np.maximum(area, 1), sums[2] / np.maximum(area, 1)
    mu20, mu02 = sums[3] / np.maximum(area, 1) - cy**2, sums[4] / np.maximum(area, 1) - cx**2
    mu11 = sums[5] / np.maximum(area, 1) - cy * cx
    half = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    l1, l2 = (mu20 + mu02) / 2 + half, (mu20 + mu02) / 2 - half
    ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1), 0, 1)), 0.0)
    dist = np.hypot(cy - (h - 1) / 2, cx - (w - 1) / 2) / (min(h, w) / 2)
    count = np.bincount(owner, minlength=n).astype(np.float64)
    total = np.bincount(owner, weights=area, minlength=n)
    big, near = np.zeros(n), np.full(n, np.nan)
    np.maximum.at(big, owner, area)
    np.fmin.at(near, owner, dist)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = lambda v: np.bincount(owner, weights=v, minlength=n) / count  # noqa: E731
        return {"obj_count": count, "obj_area_total": total, "obj_area_mean": total / count, "obj_area_max": big,
                "obj_eccentricity_mean": mean(ecc), "obj_centre_distance_mean": mean(dist), "obj_centre_distance_min": near}


def colocalisation(a: np.ndarray, b: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray) -> dict[str, np.ndarray]:
    """Pearson r of (N, P, P) images a and b, Manders M1/M2 and the Jaccard overlap of their masks.

    M1 is the share of a's foreground intensity that lies in b's foreground (M2 the converse);
    Pearson is 0 where a patch is constant, Manders 0 where a channel has no foreground.
    """
    a, b = (np.asarray(v, dtype=np.float64).reshape(len(v), -1) for v in (a, b))
    ma, mb = (np.asarray(m, dtype=bool).reshape(len(m), -1) for m in (mask_a, mask_b))
    da, db = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    den = np.sqrt((da**2).sum(1) * (db**2).sum(1))
    both = ma & mb
    sa, sb = (a * ma).sum(1), (b * mb).sum(1)
    union = (ma | mb).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "pearson": np.where(den > 0, (da * db).sum(1) / np.where(den > 0, den, 1), 0.0),
            "manders_m1": np.where(sa > 0, (a * both).sum(1) / np.where(sa > 0, sa, 1), 0.0),
            "manders_m2": np.where(sb > 0, (b * both).sum(1) / np.where(sb > 0, sb, 1), 0.0),
            "jaccard": np.where(union > 0, both.sum(1) / np.maximum(union, 1), 0.0),
        }


def handcrafted_features(patches: np.ndarray, thresholds: np.ndarray, *, channel_names: Sequence[str] | None = None) -> pd.DataFrame:
    """The baseline's feature table of an (N, C, P, P) batch of raw patches, one row per patch."""
    x, thr = _check_batch(patches, thresholds)
    names = _names(channel_names, x.shape[1])
    flat = x.reshape(*x.shape[:2], -1)
    masks = x > thr[..., None, None]
    cols: dict[str, np.ndarray] = {}
    q = np.percentile(flat, (5, 50, 95), axis=-1)
    for c, ch in enumerate(names):
        fg = masks[:, c].reshape(len(x), -1)
        cols[f"{ch}_mean"], cols[f"{ch}_sd"] = flat[:, c].mean(-1), flat[:, c].std(-1)
        cols[f"{ch}_p5"], cols[f"{ch}_p50"], cols[f"{ch}_p95"] = q[0, :, c], q[1, :, c], q[2, :, c]
        cols[f"{ch}_fg_fraction"] = fg.mean(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cols[f"{ch}_fg_mean"] = (flat[:, c] * fg).sum(-1) / fg.sum(-1)
        cols |= {f"{ch}_{k}": v for k, v in glcm_features(x[:, c]).items()}
        cols |= {f"{ch}_lbp{k}": v for k, v in enumerate(lbp_histograms(x[:, c]).T)}
        cols |= {f"{ch}_{k}": v for k, v in object_features(masks[:, c]).items()}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            pair = colocalisation(x[:, i], x[:, j], masks[:, i], masks[:, j])
            cols |= {f"{names[i]}~{names[j]}_{k}": v for k, v in pair.items()}
    return pd.DataFrame(cols)


def acquisition_features(images: pd.DataFrame, image_ids: Sequence[str], *, channel_names: Sequence[str]) -> pd.DataFrame:
    """Image-level acquisition facts per patch (by its image id): size, bit depth, exposure statistics."""
    table = images.drop_duplicates("image_id").set_index("image_id")
    missing = sorted(set(image_ids) - set(table.index))
    if missing:
        raise InputError(f"acquisition_features: images table has no row for image_id {missing[:5]}")
    rows = table.loc[list(image_ids)]
    cols = {k: rows[k].to_numpy(np.float64) for k in ("z", "y", "x") if k in rows}
    if "dtype" in rows:
        kinds = rows["dtype"].map(lambda d: np.dtype(d))
        cols["bit_depth"] = kinds.map(lambda d: 8 * d.itemsize).to_numpy(np.float64)
        cols["is_float"] = kinds.map(lambda d: float(np.issubdtype(d, np.floating))).to_numpy()
    for ch in channel_names:
        for stat in ("lo", "hi", "thr"):
            cols[f"{ch}_{stat}"] = rows[f"{stat}_{ch}"].to_numpy(np.float64)
        cols[f"{ch}_range"] = cols[f"{ch}_hi"] - cols[f"{ch}_lo"]
    return pd.DataFrame(cols)


# --------------------------------------------------------------------------- raw patches


def raw_patches(cache, rows: np.ndarray, images: pd.DataFrame, image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cache rows back to raw intensities, ``patch * (hi - lo) + lo``, and their (N, C) thresholds."""
    channels = list(cache.channels)
    table = images.drop_duplicates("image_id").set_index("image_id").loc[list(image_ids)]
    lo = table[[f"lo_{c}" for c in channels]].to_numpy(np.float32)
    hi = table[[f"hi_{c}" for c in channels]].to_numpy(np.float32)
    thr = table[[f"thr_{c}" for c in channels]].to_numpy(np.float32)
    order = np.argsort(rows)  # memory maps read fastest in order
    x = np.empty((len(rows), len(channels), cache.size, cache.size), np.float32)
    x[order] = np.asarray(cache[np.asarray(rows)[order]], dtype=np.float32)
    scale = np.maximum(hi - lo, 1e-6)  # the cache's own eps
    return x * scale[..., None, None] + lo[..., None, None], thr


def feature_tables(cache, images: pd.DataFrame, patch_ids: np.ndarray, image_ids: Sequence[str], *,
                   which: Sequence[str] = ("handcrafted", *PROBES), chunk: int = 256) -> dict[str, pd.DataFrame]:
    """Feature tables of the given patches (in order) for the baseline and each probe named in ``which``."""
    unknown = sorted(set(which) - {"handcrafted", *PROBES})
    if unknown:
        raise InputError(f"feature_tables: unknown feature set(s) {unknown}; choose from {['handcrafted', *PROBES]}")
    names = list(cache.channels)
    rows = cache.positions(patch_ids)
    image_ids = list(image_ids)
    makers = {"handcrafted": lambda x, t: handcrafted_features(x, t, channel_names=names),
              "background": lambda x, t: background_features(x, t, channel_names=names),
              "intensity": lambda x, t: intensity_features(x, channel_names=names)}
    parts: dict[str, list] = {k: [] for k in which if k in makers}
    for start in range(0, len(rows), chunk):
        if not parts:
            break
        x, thr = raw_patches(cache, rows[start : start + chunk], images, image_ids[start : start + chunk])
        for key in parts:
            parts[key].append(makers[key](x, thr))
    out = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    if "acquisition" in which:
        out["acquisition"] = acquisition_features(images, image_ids, channel_names=names)
    return {k: out[k] for k in which}


# --------------------------------------------------------------------------- grouped CV


def default_classifier(seed: int = 0):
    """Gradient boosting with balanced class weights (no internal early stopping: folds stay grouped)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=150, learning_rate=0.1, class_weight="balanced",
                                          early_stopping=False, random_state=seed)


def cross_validate_features(features: pd.DataFrame | np.ndarray, folds: pd.DataFrame, classes: Sequence[str], *,
                            make_estimator: Callable[[], object] | None = None, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Fit on each training fold, predict its test fold (and the held-out set, fold -1).

    ``features`` has one row per row of ``folds`` (columns patch_id, image_id, group, y_true,
    fold). Returns (CV predictions, held-out predictions averaged over the fold models or None),
    with the deep models' columns, so :func:`cytofuse.evaluation.metrics.evaluate_run` applies unchanged.
    """
    X = np.asarray(features, dtype=np.float64)
    if len(X) != len(folds):
        raise InputError(f"features has {len(X)} rows but folds has {len(folds)}; they must describe the same patches")
    from threadpoolctl import threadpool_limits

    make_estimator = make_estimator or (lambda: default_classifier(seed))
    fold, y = folds["fold"].to_numpy(), folds["y_true"].to_numpy()
    held = np.flatnonzero(fold < 0)
    # One OpenMP thread: on thousands of rows, gradient boosting spends most of its time
    # synchronising threads (20 fits on 650 patches took 145 s with 2 threads).
    with threadpool_limits(limits=_omp_threads(len(X)), user_api="openmp"):
        return _cross_validate(X, y, fold, held, folds, classes, make_estimator)


def _omp_threads(n_rows: int) -> int:
    """OpenMP threads for fitting on ``n_rows`` rows: one below 50,000, where sync costs dominate."""
    import os

    return 1 if n_rows < 50_000 else (os.cpu_count() or 1)


def _cross_validate(X, y, fold, held, folds, classes, make_estimator):
    parts, held_probs = [], []
    for k in range(int(fold.max()) + 1):
        train, test = np.flatnonzero((fold >= 0) & (fold != k)), np.flatnonzero(fold == k)
        missing = sorted(set(range(len(classes))) - set(np.unique(y[train]).tolist()))
        if missing:
            raise InputError(f"fold {k}: the training split lacks class(es) {[classes[i] for i in missing]}")
        est = make_estimator().fit(X[train], y[train])
        parts.append(_prediction_frame(folds, test, _proba(est, X[test], len(classes)), classes, fold=k))
        if len(held):
            held_probs.append(_proba(est, X[held], len(classes)))
    held_frame = _prediction_frame(folds, held, np.mean(held_probs, 0), classes, fold=-1) if held_probs else None
    return pd.concat(parts, ignore_index=True), held_frame


def _proba(est, X: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(X), n_classes))
    out[:, np.asarray(est.classes_, dtype=np.int64)] = est.predict_proba(X)
    return out


def _prediction_frame(folds: pd.DataFrame, idx: np.ndarray, proba: np.ndarray, classes: Sequence[str], *, fold: int) -> pd.DataFrame:
    frame = folds.iloc[idx][["patch_id", "image_id", "group", "y_true"]].reset_index(drop=True)
    frame.insert(3, "fold", fold)
    for c, name in enumerate(classes):
        frame[f"prob_{name}"] = proba[:, c]
    return frame


# --------------------------------------------------------------------------- the shortcut warning


def shortcut_warnings(metrics: dict[str, dict], kinds: dict[str, str], *, n_classes: int,
                      margin: float = 0.05, far: float = 0.15) -> list[str]:
    """Warnings for probes that rival the deep models or sit far above chance (image level, CV).

    A probe is *above chance* when the lower end of its 95% group-bootstrap interval of pooled
    image-level balanced accuracy exceeds chance (1 / n_classes). It warns when it is above
    chance and either its mean balanced accuracy over folds is within ``margin`` of (or above)
    the best deep model's, or it exceeds chance by more than ``far``.
    """
    chance = 1.0 / n_classes
    ba = {name: _image_ba(m) for name, m in metrics.items()}
    deep = [ba[n] for n, k in kinds.items() if k == "model" and ba.get(n) is not None]
    best = max(deep) if deep else None
    out = []
    for name, kind in kinds.items():
        value, low = ba.get(name), _ci_low(metrics.get(name, {}))
        if kind != "probe" or value is None or not (low is None or low > chance):
            continue
        reasons = []
        if best is not None and value >= best:
            reasons.append(f"at or above the best deep model ({best:.3f})")
        elif best is not None and value >= best - margin:
            reasons.append(f"within {margin:.2f} of the best deep model ({best:.3f})")
        if value > chance + far:
            reasons.append(f"more than {far:.2f} above chance ({chance:.3f})")
        if reasons:
            out.append(f"shortcut probe {name!r} reaches image-level balanced accuracy {value:.3f}, "
                       + " and ".join(reasons) + "; the classes may be separable by how they were imaged, "
                       "not by their biology")
    return out


def _image_ba(m: dict) -> float | None:
    return ((m.get("cv", {}).get("image", {}).get("summary", {}).get("balanced_accuracy") or {}).get("mean"))


def _ci_low(m: dict) -> float | None:
    return (m.get("cv", {}).get("image", {}).get("pooled_ci") or {}).get("low")
