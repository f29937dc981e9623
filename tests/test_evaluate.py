import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cytofuse.evaluation import metrics as ev
from cytofuse.errors import InputError

CLASSES3 = ["MCF7", "MDA-MB-231", "T47D"]


def _softmax_predictions(n: int, k: int, *, signal: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def _one_hot(labels, k: int) -> np.ndarray:
    return np.eye(k)[np.asarray(labels)]


# --------------------------------------------------------------------------- metrics vs scikit-learn


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (6, 2)])
def test_metrics_match_sklearn(k, seed):
    y, p = _softmax_predictions(300, k, seed=seed)
    classes = [f"c{i}" for i in range(k)]
    m = ev.classification_metrics(y, p, classes=classes)
    pred = p.argmax(axis=1)
    assert m["n"] == 300
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    expected_auc = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert m["auroc_macro"] == pytest.approx(expected_auc)
    precision = precision_score(y, pred, average=None, labels=range(k), zero_division=0)
    recall = recall_score(y, pred, average=None, labels=range(k))
    for i, c in enumerate(classes):
        assert m["precision"][c] == pytest.approx(precision[i])
        assert m["recall"][c] == pytest.approx(recall[i])
        assert m["auroc"][c] == pytest.approx(roc_auc_score(y == i, p[:, i]))
    assert np.array_equal(m["confusion_matrix"], pd.crosstab(y, pred).reindex(index=range(k), columns=range(k), fill_value=0))
    assert m["undefined"] == [] and m["notes"] == []


def test_auroc_with_tied_scores_matches_sklearn():
    y, p = _softmax_predictions(500, 4, seed=9)
    p = np.round(p, 1)  # coarse scores: many ties
    p /= p.sum(axis=1, keepdims=True)
    m = ev.classification_metrics(y, p, classes=list("abcd"))
    for i, c in enumerate("abcd"):
        assert m["auroc"][c] == pytest.approx(roc_auc_score(y == i, p[:, i]), abs=1e-12)


def test_binary_auroc_uses_positive_class_probability():
    y = np.array([0, 0, 1, 1, 0, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9, 0.3, 0.8])
    m = ev.classification_metrics(y, np.column_stack([1 - p1, p1]), classes=["neg", "pos"])
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, p1)) == pytest.approx(8 / 9)


def test_perfect_predictions_score_one():
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    m = ev.classification_metrics(y, _one_hot(y, 3), classes=CLASSES3)
    for key in ("balanced_accuracy", "accuracy", "auroc_macro", "mcc", "macro_f1"):
        assert m[key] == 1.0, key
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]


def test_constant_classifier_on_balanced_binary_problem():
    y = np.array([0, 1] * 10)
    proba = np.tile([0.8, 0.2], (20, 1))  # always predicts class 0
    m = ev.classification_metrics(y, proba, classes=["a", "b"])
    assert m["balanced_accuracy"] == 0.5
    assert m["mcc"] == 0.0
    assert m["auroc_macro"] == 0.5
    assert m["precision"]["b"] == 0.0
    assert any("'b' is never predicted" in note for note in m["notes"])
    assert any("MCC denominator is 0" in note for note in m["notes"])


def test_class_never_predicted_raises_no_warning_and_reports_zero_precision():
    # pytest turns warnings into errors, so reaching the asserts proves no warning was raised.
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 1, 1])  # class 2 never predicted
    m = ev.classification_metrics(y, _one_hot(pred, 3) * 0.7 + 0.1, classes=CLASSES3)
    assert m["precision"]["T47D"] == 0.0
    assert m["recall"]["T47D"] == 0.0
    assert m["f1"]["T47D"] == 0.0
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["notes"] == ["class 'T47D' is never predicted: its precision is reported as 0 (0/0)"]
    assert m["undefined"] == []


def test_fold_with_absent_class_gives_none_auroc_and_kxk_matrix():
    rng = np.random.default_rng(3)
    y = rng.choice([0, 2], size=60)  # class 1 absent from this fold
    proba = rng.dirichlet(np.ones(3), size=60)
    proba[y == 2, 2] += 0.5
    proba /= proba.sum(axis=1, keepdims=True)
    m = ev.classification_metrics(y, proba, classes=CLASSES3)
    assert m["auroc"]["MDA-MB-231"] is None
    assert m["recall"]["MDA-MB-231"] is None
    assert "auroc[MDA-MB-231]" in m["undefined"] and "recall[MDA-MB-231]" in m["undefined"]
    present = [0, 2]
    indicator = np.column_stack([y == k for k in present])  # label_binarize collapses 2 classes to 1 column
    expected = roc_auc_score(indicator, proba[:, present], average="macro")
    assert m["auroc_macro"] == pytest.approx(expected)
    assert np.array(m["confusion_matrix"]).shape == (3, 3)
    assert np.array(m["confusion_matrix"])[1].sum() == 0
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        sk_bacc = balanced_accuracy_score(y, proba.argmax(axis=1))
    assert m["balanced_accuracy"] == pytest.approx(sk_bacc)
    json.dumps(m, allow_nan=False)


def test_single_class_fold_has_undefined_auroc_macro():
    y = np.zeros(5, dtype=int)
    m = ev.classification_metrics(y, np.tile([0.6, 0.3, 0.1], (5, 1)), classes=CLASSES3)
    assert m["auroc_macro"] is None
    assert "auroc_macro" in m["undefined"] and "auroc[MCF7]" in m["undefined"]
    assert m["balanced_accuracy"] == 1.0


@pytest.mark.parametrize(
    "y,proba,match",
    [
        ([0, 1, 3], np.eye(3), r"y_true must be class indices in \[0, 2\], got \[3\]"),
        ([0, 1, 2], np.full((3, 3), 0.5), "proba rows must sum to 1, got row 0 summing to 1.5"),
        ([0, 1], np.eye(3), r"proba must have shape \(n_samples, n_classes\) = \(2, 3\), got \(3, 3\)"),
        ([], np.zeros((0, 3)), "y_true must be a non-empty 1D array"),
        ([0.5, 1, 2], np.eye(3), "y_true must hold integer class indices"),
    ],
)
def test_bad_input_names_the_argument(y, proba, match):
    with pytest.raises(InputError, match=match):
        ev.classification_metrics(y, proba, classes=CLASSES3)


# --------------------------------------------------------------------------- aggregation


def _hand_table() -> pd.DataFrame:
    rows = [
        # patch, image, group, fold, y_true, prob_a, prob_b
        ("p1", "img1", "g1", 0, 0, 0.9, 0.1),
        ("p2", "img1", "g1", 0, 0, 0.4, 0.6),
        ("p3", "img1", "g1", 0, 0, 0.3, 0.7),
        ("p4", "img2", "g2", 0, 1, 0.2, 0.8),
        ("p5", "img2", "g2", 0, 1, 0.6, 0.4),
        ("p6", "img3", "g3", 1, 1, 0.45, 0.55),
    ]
    return pd.DataFrame(rows, columns=["patch_id", "image_id", "group", "fold", "y_true", "prob_a", "prob_b"])


def test_aggregate_by_image_mean():
    out = ev.aggregate_by_image(_hand_table(), classes=["a", "b"], method="mean")
    assert list(out.columns) == ["image_id", "group", "fold", "y_true", "n_patches", "prob_a", "prob_b"]
    assert out["image_id"].tolist() == ["img1", "img2", "img3"]
    assert out["y_true"].tolist() == [0, 1, 1]
    assert out["n_patches"].tolist() == [3, 2, 1]
    assert out["prob_a"].tolist() == pytest.approx([1.6 / 3, 0.4, 0.45])
    assert out["prob_b"].tolist() == pytest.approx([1.4 / 3, 0.6, 0.55])


def test_aggregate_by_image_vote_differs_from_mean():
    out = ev.aggregate_by_image(_hand_table(), classes=["a", "b"], method="vote")
    # img1: mean says a (0.533), but 2 of 3 patches vote b.
    assert out["prob_a"].tolist() == pytest.approx([1 / 3, 0.5, 0.0])
    assert out["prob_b"].tolist() == pytest.approx([2 / 3, 0.5, 1.0])


def test_aggregate_rejects_mixed_labels_within_image():
    table = _hand_table()
    table.loc[1, "y_true"] = 1
    with pytest.raises(InputError, match="image 'img1' \\(fold 0\\) has patches with different y_true"):
        ev.aggregate_by_image(table, classes=["a", "b"])


def test_aggregate_rejects_unknown_method_and_mismatched_classes():
    with pytest.raises(InputError, match="method must be 'mean' or 'vote', got 'median'"):
        ev.aggregate_by_image(_hand_table(), classes=["a", "b"], method="median")
    with pytest.raises(InputError, match=r"lacks columns \['prob_c'\]"):
        ev.aggregate_by_image(_hand_table(), classes=["a", "c"])
    with pytest.raises(InputError, match=r"probability columns \['prob_b'\] that are not in classes"):
        ev.aggregate_by_image(_hand_table().assign(prob_c=0.0), classes=["a", "c"])


# --------------------------------------------------------------------------- fold summaries


def _cv_table(n_folds: int = 4, images_per_class: int = 4, patches: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(n_folds):
        for c in range(3):
            for i in range(images_per_class):
                image_shift = rng.normal(0, 1.0)
                for j in range(patches):
                    logits = rng.normal(size=3)
                    logits[c] += 1.0 + image_shift
                    prob = np.exp(logits) / np.exp(logits).sum()
                    rows.append((f"f{fold}c{c}i{i}p{j}", f"f{fold}c{c}i{i}", f"f{fold}c{c}i{i}", fold, c, *prob))
    cols = ["patch_id", "image_id", "group", "fold", "y_true", *ev.prob_columns(CLASSES3)]
    return pd.DataFrame(rows, columns=cols)


def test_summarize_mean_sd_matches_numpy():
    table = _cv_table()
    s = ev.summarize(table, classes=CLASSES3, level="patch")
    assert s["n_folds"] == 4 and s["n"] == len(table)
    for metric, sk in [("balanced_accuracy", balanced_accuracy_score), ("mcc", matthews_corrcoef)]:
        per_fold = [
            sk(part["y_true"], part[ev.prob_columns(CLASSES3)].to_numpy().argmax(axis=1))
            for _, part in table.groupby("fold")
        ]
        assert s["summary"][metric]["mean"] == pytest.approx(np.mean(per_fold))
        assert s["summary"][metric]["sd"] == pytest.approx(np.std(per_fold, ddof=1))
        assert s["summary"][metric]["n_folds_defined"] == 4
    pooled = np.sum([f["confusion_matrix"] for f in s["folds"]], axis=0)
    assert s["confusion_matrix"] == pooled.tolist()
    assert np.sum(s["confusion_matrix"]) == len(table)


def test_summarize_averages_undefined_metric_over_defined_folds_only():
    table = _cv_table(n_folds=3)
    # Fold 2 loses class 1: its AUROC for that class is undefined, not 0.
    table = table[~((table["fold"] == 2) & (table["y_true"] == 1))]
    s = ev.summarize(table, classes=CLASSES3, level="patch")
    stats = s["per_class"]["auroc"]["MDA-MB-231"]
    values = [f["auroc"]["MDA-MB-231"] for f in s["folds"]]
    assert values[2] is None and stats["values"][2] is None
    assert stats["n_folds_defined"] == 2
    assert stats["mean"] == pytest.approx(np.mean(values[:2]))
    assert stats["sd"] == pytest.approx(np.std(values[:2], ddof=1))
    assert s["summary"]["auroc_macro"]["n_folds_defined"] == 3
    assert np.array(s["confusion_matrix"]).shape == (3, 3)


def test_summarize_image_level_uses_aggregated_rows():
    table = _cv_table()
    s = ev.summarize(table, classes=CLASSES3, level="image", method="vote")
    assert s["n"] == table["image_id"].nunique()
    assert s["method"] == "vote"
    assert np.sum(s["confusion_matrix"]) == table["image_id"].nunique()


def test_evaluate_run_is_json_ready_without_nan():
    table = _cv_table(n_folds=2)
    table = table[~((table["fold"] == 1) & (table["y_true"] == 2))]
    result = ev.evaluate_run(table, classes=CLASSES3)
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result
    assert result["image"]["folds"][1]["auroc"]["T47D"] is None
    # one defined fold: mean is that value, sd undefined (None), not NaN
    assert result["image"]["per_class"]["auroc"]["T47D"]["sd"] is None
    assert result["patch"]["n"] > result["image"]["n"]


def test_format_summary_table():
    runs = {
        "early": ev.evaluate_run(_cv_table(seed=1), classes=CLASSES3),
        "intermediate": ev.evaluate_run(_cv_table(seed=2), classes=CLASSES3),
    }
    table = ev.format_summary_table(runs, level="image")
    assert table.index.tolist() == ["early", "intermediate"]
    assert table.columns.tolist() == ["Balanced accuracy", "Accuracy", "AUROC", "MCC", "Macro-F1"]
    stats = runs["early"]["image"]["summary"]["mcc"]
    assert table.loc["early", "MCC"] == f"{stats['mean']:.3f} ± {stats['sd']:.3f}"
    rich_table = ev.to_rich_table(table, title="Image level")
    assert rich_table.row_count == 2 and len(rich_table.columns) == 6


def test_format_summary_table_marks_partially_defined_metric():
    summary = {"n_folds": 5, "summary": {m: {"mean": 0.5, "sd": 0.1, "n_folds_defined": 5} for m in ev.SCALAR_METRICS}}
    summary["summary"]["auroc_macro"] = {"mean": 0.8, "sd": None, "n_folds_defined": 1}
    table = ev.format_summary_table({"run": summary})
    assert table.loc["run", "AUROC"] == "0.800 (1/5 folds)"
    assert table.loc["run", "MCC"] == "0.500 ± 0.100"


# --------------------------------------------------------------------------- bootstrap


def _noisy_labels(n: int, seed: int, accuracy: float = 0.8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < accuracy, y, 1 - y)
    return y, pred


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    y, pred = _noisy_labels(400, seed=0)
    point = balanced_accuracy_score(y, pred)
    low, high = ev.bootstrap_ci(y, pred, n_boot=500, seed=7)
    assert low < point < high
    assert (low, high) == ev.bootstrap_ci(y, pred, n_boot=500, seed=7)
    assert (low, high) != ev.bootstrap_ci(y, pred, n_boot=500, seed=8)


def test_bootstrap_ci_narrows_with_more_data():
    small = ev.bootstrap_ci(*_noisy_labels(100, seed=1), n_boot=400)
    large = ev.bootstrap_ci(*_noisy_labels(2500, seed=1), n_boot=400)
    assert large[1] - large[0] < 0.5 * (small[1] - small[0])


def test_group_bootstrap_is_wider_for_correlated_patches():
    # 40 images x 25 patches; whether a patch is right depends mostly on its image.
    rng = np.random.default_rng(2)
    images = np.repeat(np.arange(40), 25)
    y = np.repeat(np.arange(40) % 2, 25)
    image_is_easy = rng.random(40) < 0.75
    right = np.where(rng.random(images.size) < 0.9, image_is_easy[images], ~image_is_easy[images])
    pred = np.where(right, y, 1 - y)
    patch_ci = ev.bootstrap_ci(y, pred, n_boot=400, seed=0)
    group_ci = ev.bootstrap_ci(y, pred, groups=images, n_boot=400, seed=0)
    assert group_ci[1] - group_ci[0] > 2 * (patch_ci[1] - patch_ci[0])


def test_bootstrap_auroc_from_probabilities():
    y, p = _softmax_predictions(300, 3, seed=4)
    low, high = ev.bootstrap_ci(y, p, metric="auroc_macro", n_boot=100)
    assert low < roc_auc_score(y, p, multi_class="ovr") < high
    with pytest.raises(InputError, match="metric 'auroc_macro' needs y_pred as class probabilities"):
        ev.bootstrap_ci(y, p.argmax(axis=1), metric="auroc_macro")
    with pytest.raises(InputError, match="metric must be one of .*, got 'kappa'"):
        ev.bootstrap_ci(y, p, metric="kappa")
    with pytest.raises(InputError, match=r"groups must have one entry per sample \(300\)"):
        ev.bootstrap_ci(y, p, groups=[1, 2])


# --------------------------------------------------------------------------- figures


def _check_figure_files(paths, base):
    png, svg = paths
    assert png == base.with_name(base.name + ".png") and svg == base.with_name(base.name + ".svg")
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.var() > 0
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert not list(base.parent.glob("*.partial"))
    return ET.tostring(root, encoding="unicode")


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion(tmp_path, normalize):
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])  # last class absent: normalised row stays 0
    paths = ev.plot_confusion(cm, CLASSES3, normalize=normalize, out=tmp_path / "figs" / "cm")
    svg = _check_figure_files(paths, tmp_path / "figs" / "cm")
    assert "MDA-MB-231" in svg
    assert ("0.70" in svg) if normalize else (">7<" in svg or "7</text>" in svg)


def test_plot_confusion_rejects_wrong_shape(tmp_path):
    with pytest.raises(InputError, match=r"cm must be 3x3 for classes .*, got shape \(2, 2\)"):
        ev.plot_confusion(np.eye(2), CLASSES3, normalize=True, out=tmp_path / "cm")


def test_plot_pr_and_roc_curves(tmp_path):
    y, p = _softmax_predictions(120, 3, seed=5)
    svg = _check_figure_files(ev.plot_pr_curves(y, p, CLASSES3, tmp_path / "pr.png"), tmp_path / "pr")
    ap = __import__("sklearn.metrics", fromlist=["average_precision_score"]).average_precision_score(y == 0, p[:, 0])
    assert f"MCF7 (AP = {ap:.3f})" in svg
    svg = _check_figure_files(ev.plot_roc_curves(y, p, CLASSES3, tmp_path / "roc"), tmp_path / "roc")
    assert f"T47D (AUC = {roc_auc_score(y == 2, p[:, 2]):.3f})" in svg


def test_plot_training_curves(tmp_path):
    epochs = np.arange(1, 6)
    histories = {
        fold: pd.DataFrame(
            {
                "epoch": epochs,
                "train_loss": 1.0 / epochs + fold * 0.05,
                "val_loss": 1.2 / epochs + fold * 0.05,
                "val_balanced_accuracy": 0.5 + 0.08 * epochs - fold * 0.02,
            }
        )
        for fold in range(3)
    }
    svg = _check_figure_files(ev.plot_training_curves(histories, tmp_path / "curves"), tmp_path / "curves")
    assert "fold 2" in svg and "validation" in svg
    with pytest.raises(InputError, match=r"histories\[0\] lacks columns \['val_loss'\]"):
        ev.plot_training_curves({0: histories[0].drop(columns="val_loss")}, tmp_path / "bad")


# --------------------------------------------------------------------------- run folder


def test_evaluate_run_pooled_ci_resamples_groups():
    table = _cv_table(n_folds=2)
    result = ev.evaluate_run(table, classes=CLASSES3, n_boot=200)
    ci = result["image"]["pooled_ci"]
    pred = table[ev.prob_columns(CLASSES3)].to_numpy().argmax(axis=1)
    assert result["patch"]["pooled_ci"]["estimate"] == pytest.approx(balanced_accuracy_score(table["y_true"], pred))
    assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["resampled"] == "group"
    json.dumps(result, allow_nan=False)


def test_write_evaluation(tmp_path):
    table = _cv_table(n_folds=2, images_per_class=3, patches=4)
    paths = ev.write_evaluation(table, classes=CLASSES3, out_dir=tmp_path / "eval", n_boot=50)
    assert json.loads(paths["metrics"].read_text())["image"]["n_folds"] == 2
    folds = pd.read_csv(paths["folds_image"])
    assert folds["fold"].tolist() == [0, 1] and folds["n"].tolist() == [9, 9]
    for name in ("confusion_patch_counts", "confusion_image_normalised", "pr_image", "roc_patch"):
        assert paths[name].suffix == ".png" and paths[name].with_suffix(".svg").exists()
    assert sorted(p.name for p in (tmp_path / "eval").iterdir() if p.name.startswith(".")) == []


# --------------------------------------------------------------------------- positive / rare class


def test_best_f1_threshold_known_answers():
    from cytofuse.evaluation.metrics import best_f1_threshold

    assert best_f1_threshold(np.array([0, 0, 1, 1]), np.array([.1, .2, .8, .9])) == pytest.approx(0.5)
    # cuts: after .9 F1 2/3, after .8 1/2, after .2 4/5 (best), after .1 2/3 -> midpoint of .2 and .1
    assert best_f1_threshold(np.array([0, 1, 0, 1]), np.array([.1, .2, .8, .9])) == pytest.approx(0.15)
    assert best_f1_threshold(np.zeros(3), np.array([.1, .2, .3])) == 0.5


def test_positive_class_report_uses_validation_thresholds_only():
    from cytofuse.evaluation.metrics import positive_class_report

    classes = ["common", "rare"]
    # validation says the rare class starts above 0.25; at 0.5 (argmax) the test fold's rare patches are missed
    val = pd.DataFrame({"fold": 0, "y_true": [0, 0, 1, 1], "prob_common": [.9, .8, .7, .6], "prob_rare": [.1, .2, .3, .4]})
    test = pd.DataFrame({"fold": 0, "y_true": [0, 0, 1, 1], "prob_common": [.95, .9, .65, .6], "prob_rare": [.05, .1, .35, .4]})
    report = positive_class_report(val, test, classes=classes, positive="rare")
    assert report["folds"][0]["threshold"] == pytest.approx(0.25)
    assert report["f1_tuned"]["mean"] == pytest.approx(1.0)
    assert report["f1_argmax"]["mean"] is None or report["f1_argmax"]["mean"] == 0.0
    assert report["pooled"]["argmax"]["tp"] == 0 and report["pooled"]["tuned"]["tp"] == 2
    with pytest.raises(InputError, match="positive_class must be one of the classes"):
        positive_class_report(val, test, classes=classes, positive="other")


def test_run_metrics_reads_stats_without_nested_keys():
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.4, 0.6], [0.7, 0.3], [0.45, 0.55], [0.3, 0.7], [0.1, 0.9]])
    frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(8)], "y_true": y, "fold": [0, 0, 1, 1, 0, 0, 1, 1],
                          "prob_a": p[:, 0], "prob_b": p[:, 1]})
    data = {"cv": ev.evaluate_run(frame, classes=["a", "b"], n_boot=50), "model": {"parameters": 12}, "measured_on": "x"}
    m = ev.RunMetrics(data)
    stat = m.stat("balanced_accuracy", "patch")
    assert stat.mean == pytest.approx(data["cv"]["patch"]["summary"]["balanced_accuracy"]["mean"])
    assert stat.n_folds_defined == 2 and m.classes == ["a", "b"] and m.model["parameters"] == 12 and m.splits == ["cv"]
    # fold 0 (patches 0, 1, 4, 5) is all right; fold 1 misreads patch 6 (a as b): balanced accuracy 1.0 and 0.75
    assert stat.mean == pytest.approx(0.875) and stat.sd == pytest.approx(np.std([1.0, 0.75], ddof=1))
    assert m.measured_on == "x"
    with pytest.raises(InputError, match="no 'test' split; it has \\['cv'\\]"):
        m.stat("mcc", split="test")
    with pytest.raises(InputError, match="no metric 'f2'"):
        m.stat("f2")
    with pytest.raises(InputError, match="not a model's metrics"):
        ev.RunMetrics({"patch": {}})
