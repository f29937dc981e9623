"""One self-contained HTML page of a run folder: data, attrition, metrics, figures, explanations.

:func:`write_report` reads a cross-validation run folder (:mod:`cytofuse.workflows.cv`), a sweep
run folder (``sweep.csv`` + ``sweep/<label>/`` sub-runs) or a tune run folder (``tune/nested.json``,
``tune/trials.csv``: :mod:`cytofuse.workflows.tune`), draws the figures the run folder
does not hold yet into ``run_dir/report/figures/`` (PNG and SVG, via :mod:`cytofuse.evaluation.metrics`),
and writes ``run_dir/report.html`` with every figure embedded as a data URI, so the page can be
mailed or archived alone. Explanations (``run_dir/explain/<model>/``) are included when present.

A report is derived data, but like every cytofuse output it is not replaced silently: an
existing ``report.html`` is kept unless ``overwrite=True``. Figures in ``report/figures`` are
redrawn whenever their source table is newer than the figure.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytofuse.errors import InputError, RunFolderError
from cytofuse.evaluation.metrics import RunMetrics
from cytofuse.runs import ModelRun, RunFolder, safe_name, software_versions, write_text_atomic

HEADLINE = ("balanced_accuracy", "auroc_macro", "mcc", "macro_f1")


@dataclass
class Section:
    """A report section added with :func:`register_section`: a title, a paragraph and an optional table."""

    title: str
    text: str = ""
    table: pd.DataFrame | None = None


SECTIONS: list = []  # functions RunFolder -> Section | None, rendered in order after the built-in sections


def register_section(build) -> None:
    """Add ``build(run: RunFolder) -> Section | None`` to every CV report (None: nothing to show for that run)."""
    if not callable(build):
        raise InputError(f"register_section: build must be callable (RunFolder -> Section | None), got {build!r}")
    SECTIONS.append(build)


def extra_sections(run_dir: Path) -> list[dict]:
    """The registered sections of one run, as the template renders them."""
    out = []
    for build in SECTIONS:
        section = build(RunFolder(run_dir))
        if section is None:
            continue
        if not isinstance(section, Section):
            raise InputError(f"report section {getattr(build, '__name__', build)!r} returned {type(section).__name__}, not a Section")
        out.append({"title": section.title, "text": section.text,
                    "table": None if section.table is None else _records(section.table)})
    return out
_LEVEL_TEXT = {"patch": "patch level (every test patch)",
               "image": "image level (patch probabilities per image combined by {method})"}
_VERSIONED = ("cytofuse", "torch", "numpy", "monai", "scikit-learn", "pandas", "matplotlib", "lightning")


@dataclass
class Figure:
    """One embedded figure: a title, what it was measured on, and its image as a data URI."""

    title: str
    caption: str
    src: str
    file: str


@dataclass
class Entry:
    """One evaluated classifier of a run: a deep model, the baseline or a probe."""

    name: str
    kind: str
    folder: Path
    metrics: dict
    figures: list[Figure] = field(default_factory=list)


# --------------------------------------------------------------------------- entry point


def write_report(run_dir: str | Path, *, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the HTML report of ``run_dir`` to ``out`` (default ``run_dir/report.html``); returns its path.

    Raises :class:`InputError` naming the missing file and the command that produces it when
    the run folder lacks a stage, and :class:`RunFolderError` when the report exists and
    ``overwrite`` is false.
    """
    run_dir = Path(run_dir)
    target = Path(out) if out is not None else RunFolder(run_dir).report_page
    if target.exists() and not overwrite:
        raise RunFolderError(f"report {target} exists; pass --overwrite to replace it or choose another --out")
    context = report_context(run_dir)
    html = render_report(context)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(target, html)


def report_context(run_dir: str | Path) -> dict:
    """Everything the page shows, as plain data; draws missing figures into ``run_dir/report/figures``."""
    run_dir = Path(run_dir)
    _check_run_folder(run_dir)
    run = RunFolder(run_dir)
    figures = run.figures
    context = {"title": run_dir.resolve().name, "run_dir": run_dir.name, "config": run.config.read_text(),
               "state": _run_state(run_dir), "versions": software_versions(_VERSIONED, with_platform=True, missing="not installed"),
               "generated": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    if run.sweep_summary.is_file() or run.sweeps.is_dir():
        context["sweep"] = sweep_context(run_dir, figures)
    elif TuneFiles(run_dir).root.is_dir():
        context["tune"] = tune_context(run_dir, figures / "tune")
    else:
        context["cv"] = cv_context(run_dir, figures)
    return context


def render_report(context: dict) -> str:
    """The HTML page of a :func:`report_context` result."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parents[1] / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    return env.get_template("report.html.j2").render(**context)


# --------------------------------------------------------------------------- checks


def _cv_command(run_dir: Path) -> str:
    return f"run `cytofuse cv CONFIG --out {run_dir}` (an unfinished run resumes)"


def _check_run_folder(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise InputError(f"run folder {run_dir} does not exist: {_cv_command(run_dir)}")
    if not RunFolder(run_dir).config.is_file():
        raise InputError(f"run folder {run_dir} lacks config.yaml, so it is no cytofuse run folder: {_cv_command(run_dir)}")


def _check_cv_folder(run_dir: Path) -> None:
    run = RunFolder(run_dir)
    missing = [p.name for p in (run.patches, run.images) if not p.is_file()]
    if missing:
        raise InputError(f"run folder {run_dir} lacks the patch stage ({', '.join(missing)}): {_cv_command(run_dir)}")
    folders = [ModelRun(p) for base in (run.models, run.probes) for p in sorted(base.glob("*"))]
    found = [m for m in folders if m.predictions.is_file()]
    if not any(m.metrics.is_file() for m in found):
        what = "metrics (models/*/metrics.json; the CV stopped early)" if found else "predictions of any model (models/*/predictions.parquet)"
        raise InputError(f"run folder {run_dir} lacks {what}: {_cv_command(run_dir)}")
    orphans = [str(m.root) for m in folders if m.metrics.is_file() and not m.predictions.is_file()]
    if orphans:
        raise InputError(f"run folder {run_dir}: {orphans} have metrics.json but no predictions.parquet (moved or "
                         f"deleted?), which the report's curves are drawn from; restore it or run the CV again "
                         f"(`cytofuse cv CONFIG --out {run_dir} --overwrite`)")


def _run_state(run_dir: Path) -> str:
    marker = RunFolder(run_dir).marker
    return marker.read_text().strip() if marker.is_file() else "unknown"


# --------------------------------------------------------------------------- one CV run


def cv_context(run_dir: Path, figures: Path) -> dict:
    """Data summary, attrition, comparison tables, per-classifier figures and explanations of one CV run."""
    _check_cv_folder(run_dir)
    entries = run_entries(run_dir)
    classes = RunMetrics(entries[0].metrics, source=str(entries[0].folder)).classes
    attrition = _attrition(run_dir)
    for entry in entries:
        entry.figures = entry_figures(entry, classes, figures / entry.folder.name if entry.kind != "probe"
                                      else figures / f"probe_{entry.folder.name}")
    measured_on = entries[0].metrics.get("measured_on", "")
    return {
        "classes": classes,
        "data": data_summary(run_dir),
        "attrition": _records(attrition),
        "attrition_figure": _attrition_figure(attrition, figures / "attrition", source=RunFolder(run_dir).images),
        "comparison": {level: comparison_table(entries, level=level) for level in ("image", "patch")},
        "test_comparison": comparison_table(entries, level="image", split="test") if any("test" in e.metrics for e in entries) else None,
        "measured_on": measured_on,
        "warnings": _shortcut_warnings(run_dir),
        "entries": entries,
        "explain": explain_context(run_dir, entries),
        "labels": labels_context(run_dir),
        "extras": extras_table(entries),
        "sections": extra_sections(run_dir),
    }


def labels_context(run_dir: Path) -> dict | None:
    """The label rule (mixture, thresholds, counts) and its histogram, when labels came from a channel."""
    run = RunFolder(run_dir)
    rule = json.loads(run.label_rule.read_text()) if run.label_rule.is_file() else None
    if rule is None:
        return None
    mix = rule.get("mixture") or {}
    rows = [[name, _num(mix["means"][i]) if mix else "–", _num(mix["sds"][i]) if mix else "–",
             _num(mix["weights"][i]) if mix else "–", ("below " if i == 0 else "above ") + _num(t, 4),
             rule["counts"].get(name, 0)]
            for i, (name, t) in enumerate(zip(rule["classes"], (rule["low_threshold"], rule["high_threshold"])))]
    rows.append(["discarded (band between)", "–", "–", "–", "–", rule["counts"].get("discarded", 0)])
    base = run.label_histogram
    caption = (f"{rule['statistic']} of channel {rule['channel']} per patch, per condition; the rule's source is "
               f"{rule['source']}, fitted on {rule['n_fit']} patches.")
    return {"channel": rule["channel"], "statistic": rule["statistic"], "notes": rule.get("notes", []),
            "table": {"columns": ["class", "component mean", "component sd", "weight", "threshold", "patches"], "rows": rows},
            "per_condition": rule.get("per_condition", {}),
            "figure": _figure(base, "Labels from a fluorescence channel", caption) if _has_figure(base) else None}


def extras_table(entries: list[Entry]) -> dict | None:
    """Per model: test-time and training-only channels, positive-class F1 (validation threshold) and score correlation."""
    rows = []
    for e in entries:
        model, pos, corr = e.metrics.get("model", {}), e.metrics.get("positive_class"), e.metrics.get("label_correlation")
        if e.kind != "model" or not (model.get("auxiliary_channels") or pos or corr):
            continue
        rows.append([e.name, ", ".join(model.get("input_channels", [])), ", ".join(model.get("auxiliary_channels", [])) or "–",
                     f"{pos['class']}: {_num(pos['f1_tuned']['mean'])} ± {_num(pos['f1_tuned']['sd'])}" if pos else "–",
                     _num(pos["f1_argmax"]["mean"]) if pos else "–",
                     f"r = {_num(corr['r'])} (p = {_num(corr['p'], 2)}, n = {corr['n']})" if corr and corr.get("r") is not None else "–"])
    if not rows:
        return None
    return {"columns": ["classifier", "test-time channels", "training-only channels",
                        "positive-class F1, threshold from validation (mean ± sd over folds)", "F1 at argmax",
                        "Pearson: score vs label channel"], "rows": rows}


def run_entries(run_dir: Path) -> list[Entry]:
    """Every classifier of the run with metrics, in summary.csv order (models, baseline, probes)."""
    names = _summary_names(run_dir)
    run = RunFolder(run_dir)
    folders = {f"{base.name}/{p.name}": ModelRun(p) for base in (run.models, run.probes) for p in base.glob("*")
               if ModelRun(p).metrics.is_file()}
    entries = []
    for key, model in sorted(folders.items(), key=lambda kv: (names[kv[0]][0] if kv[0] in names else len(names), kv[0])):
        folder = model.root
        metrics = json.loads(model.metrics.read_text())
        order_name, kind = names[key][1:] if key in names else (None, None)
        kind = kind or metrics.get("model", {}).get("kind") or ("probe" if key.startswith("probes/") else "model")
        name = order_name or (f"probe:{folder.name}" if key.startswith("probes/") else folder.name)
        entries.append(Entry(name, kind, folder, metrics))
    return entries


def _summary_names(run_dir: Path) -> dict[str, tuple[int, str, str]]:
    """Folder key ("models/<safe>" or "probes/<probe>") -> (order, display name, kind) from summary.csv."""
    summary = RunFolder(run_dir).summary
    if not summary.is_file():
        return {}
    table = pd.read_csv(summary).drop_duplicates("model")
    out = {}
    for i, (name, kind) in enumerate(zip(table["model"], table["kind"])):
        key = f"probes/{name.split(':', 1)[1]}" if kind == "probe" else f"models/{safe_name(name)}"
        out[key] = (i, name, kind)
    return out


def data_summary(run_dir: Path) -> dict:
    """Images and kept patches per class, channels, patch size and images that kept too few patches."""
    from cytofuse.preprocess.patches import read_patch_index

    index = read_patch_index(run_dir)
    images, patches = index.images, index.patches
    per_class = images.groupby("label").agg(images=("image_id", "size"), groups=("group", "nunique"), patches=("n_kept", "sum"))
    shapes = images.groupby("label")[["z", "y", "x"]].median().astype(int)
    per_class["median_shape_zyx"] = [f"{z} x {y} x {x}" for z, y, x in shapes.to_numpy()]
    return {"n_images": len(images), "n_patches": len(patches), "channels": list(index.channel_names),
            "per_class": _records(per_class.reset_index()), "sparse": index.sparse_images}


def _attrition(run_dir: Path) -> pd.DataFrame:
    if RunFolder(run_dir).attrition.is_file():
        return pd.read_csv(RunFolder(run_dir).attrition)
    from cytofuse.preprocess.patches import read_patch_index

    return read_patch_index(run_dir).attrition


def _shortcut_warnings(run_dir: Path) -> dict | None:
    path = RunFolder(run_dir).shortcut_warnings
    return json.loads(path.read_text()) if path.is_file() else None


def _records(frame: pd.DataFrame) -> dict:
    """A table as {"columns": [...], "rows": [[...], ...]} with plain values."""
    frame = frame.astype(object).where(frame.notna(), None)
    return {"columns": [str(c) for c in frame.columns], "rows": frame.to_numpy().tolist()}


# --------------------------------------------------------------------------- tables


def comparison_table(entries: list[Entry], *, level: str, split: str = "cv") -> dict:
    """The paper's Table 1 over every classifier: kind, parameters, metrics as mean ± sd, pooled 95% CI."""
    from cytofuse.evaluation.metrics import METRIC_LABELS, format_summary_table

    chosen = [e for e in entries if split in e.metrics]
    table = format_summary_table({e.name: e.metrics[split] for e in chosen}, level=level)
    table = table[[METRIC_LABELS[m] for m in HEADLINE]]
    table.insert(0, "kind", [e.kind for e in chosen])
    table.insert(1, "parameters", [_params(e) for e in chosen])
    results = [RunMetrics(e.metrics, source=str(e.folder)).result(level, split) for e in chosen]
    table["Pooled balanced accuracy (95% CI)"] = [_pooled(r) for r in results]
    table["folds"] = [r.get("n_folds") for r in results]
    return _records(table.reset_index().rename(columns={"run": "classifier"}))


def _params(entry: Entry) -> str:
    n = entry.metrics.get("model", {}).get("parameters")
    return f"{n:,}" if isinstance(n, int) else "–"


def _pooled(level: dict) -> str:
    ci = level.get("pooled_ci")
    if not ci:
        return "–"
    return f"{ci['estimate']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}" if not float(value).is_integer() else f"{int(value)}"
    return str(value)


# --------------------------------------------------------------------------- figures


def entry_figures(entry: Entry, classes: list[str], out_dir: Path) -> list[Figure]:
    """Confusion (counts, row-normalised), PR and ROC at image and patch level, and training curves."""
    from cytofuse.evaluation.metrics import aggregate_by_image, plot_confusion, plot_pr_curves, plot_roc_curves, prob_columns

    source = ModelRun(entry.folder).predictions
    figures, predictions = [], None
    for level in ("image", "patch"):
        result = RunMetrics(entry.metrics, source=str(entry.folder)).result(level)
        where = (f"Pooled test predictions of all {result['n_folds']} folds, {_LEVEL_TEXT[level].format(method=result.get('method'))}: "
                 f"{result['n']} {'images' if level == 'image' else 'patches'}.")
        for normalize, suffix in ((False, "counts"), (True, "normalised")):
            base = out_dir / f"confusion_{level}_{suffix}"
            if _stale(base, ModelRun(entry.folder).metrics):
                title = f"{level.capitalize()} level, {'normalised' if normalize else 'counts'}"
                plot_confusion(result["confusion_matrix"], classes, normalize=normalize, out=base, title=title)
            figures.append(_figure(base, f"Confusion matrix ({suffix}), {level} level", where))
        for kind, plot in (("pr", plot_pr_curves), ("roc", plot_roc_curves)):
            base = out_dir / f"{kind}_{level}"
            if _stale(base, source):
                if predictions is None:
                    predictions = pd.read_parquet(source)
                table = aggregate_by_image(predictions, classes=classes, method=result.get("method") or "mean") if level == "image" else predictions
                plot(table["y_true"].to_numpy(), table[prob_columns(classes)].to_numpy(), classes, base)
            label = "Precision-recall" if kind == "pr" else "ROC"
            figures.append(_figure(base, f"{label} curves (one-vs-rest), {level} level", where))
    figures += _training_figure(entry, out_dir)
    return figures


def _training_figure(entry: Entry, out_dir: Path) -> list[Figure]:
    """The CV's own training curves, or drawn here from the folds' history.csv when absent."""
    from cytofuse.evaluation.metrics import plot_training_curves

    model = ModelRun(entry.folder)
    base = model.curves
    histories = [f.history for f in model.folds() if f.history.is_file()]
    if not _has_figure(base) and histories:
        base = out_dir / model.curves.name
        if _stale(base, histories[-1]):
            plot_training_curves({int(p.parent.name.split("_")[1]): pd.read_csv(p) for p in histories}, base)
    if not _has_figure(base):
        return []
    where = f"Training split of each fold (loss) and its grouped validation split (loss, balanced accuracy), {len(histories)} folds."
    return [_figure(base, "Training curves per fold", where)]


def _attrition_figure(attrition: pd.DataFrame, base: Path, *, source: Path) -> Figure:
    """Candidate and kept patches per class, attrition in percent above the bars."""
    if _stale(base, source):
        _plot_attrition(attrition, base)
    return _figure(base, "Patch attrition per class", "Every z-slice patch of every image before and after the Otsu sparsity filter and de-duplication.")


def _plot_attrition(attrition: pd.DataFrame, base: Path) -> None:
    import matplotlib

    from cytofuse.plots import STYLE, save_figure
    from cytofuse.plots import figure as new_figure

    x = np.arange(len(attrition))
    with matplotlib.rc_context(STYLE):
        fig, ax = new_figure((1.8 + 0.9 * len(x), 3.2))
        ax.bar(x - 0.2, attrition["candidates"], 0.4, color="0.7", label="candidates")
        bars = ax.bar(x + 0.2, attrition["kept"], 0.4, color="#31688e", label="kept")
        for bar, pct in zip(bars, attrition["attrition_pct"]):
            ax.annotate(f"{pct:.0f}% removed", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, attrition["label"], rotation=30 if len(x) > 4 else 0, ha="right" if len(x) > 4 else "center")
        ax.set(ylabel="Patches", title="Patches before and after filtering")
        ax.margins(y=0.15)
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save_figure(fig, base)


def _stale(base: Path, source: Path) -> bool:
    png = base.with_name(base.name + ".png")
    return not png.is_file() or not base.with_name(base.name + ".svg").is_file() or (
        source.is_file() and png.stat().st_mtime < source.stat().st_mtime)


def _has_figure(base: Path) -> bool:
    return any(base.with_name(base.name + ext).is_file() for ext in (".png", ".svg"))


def _figure(base: Path, title: str, caption: str) -> Figure:
    """Embed the smaller of ``base.svg`` and ``base.png`` (vector line art, raster image grids)."""
    files = [p for p in (base.with_name(base.name + ".svg"), base.with_name(base.name + ".png")) if p.is_file()]
    if not files:
        raise InputError(f"figure {base}.png/.svg is missing")
    path = min(files, key=lambda p: p.stat().st_size)
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    src = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
    return Figure(title, caption, src, path.name)


# --------------------------------------------------------------------------- explanations


def explain_context(run_dir: Path, entries: list[Entry]) -> dict:
    """Figures and the ablation ranking of every model explained in ``run_dir/explain/<model>/``."""
    folder = RunFolder(run_dir).explain
    done = sorted(p.parent for p in folder.glob("*/summary.json"))
    models = []
    for model_dir in done:
        summary = json.loads((model_dir / "summary.json").read_text())
        figures = [_figure(p.with_suffix(""), _explain_title(p.stem), _explain_caption(p.stem, summary))
                   for p in sorted(model_dir.glob("*.png"))]
        ablation = pd.DataFrame(summary.get("ablation") or [])
        models.append({"name": summary.get("model", model_dir.name), "figures": figures,
                       "ablation": _records(ablation) if len(ablation) else None})
    deep = [e.name for e in entries if e.kind == "model"]
    return {"models": models, "missing": not models, "command": f"cytofuse explain {run_dir}", "deep_models": deep}


_EXPLAIN_TITLES = {"gradcam": "Grad-CAM", "ablation": "Channel ablation", "single_channel": "Single-channel models",
                   "embedding": "Embedding", "thumbnails": "Embedding with patch thumbnails"}


def _explain_title(stem: str) -> str:
    for key, title in _EXPLAIN_TITLES.items():
        if stem.startswith(key):
            rest = stem[len(key):].strip("_")
            return f"{title}: {rest}" if rest else title
    return stem


def _explain_caption(stem: str, summary: dict) -> str:
    test = "test patches, each explained by the model of the fold that held it out"
    if stem.startswith("gradcam"):
        return f"Correct and wrong {test}; every channel with its class activation map."
    if stem.startswith("ablation"):
        return "Balanced accuracy per test fold with one channel zeroed or shuffled, against the intact model."
    if stem.startswith("single_channel"):
        return "Balanced accuracy of the run's single-channel models (cross-validated, same folds)."
    n = (summary.get("embeddings") or {}).get("n")
    return f"Penultimate-layer features of {n or 'the'} {test}; projected per fold (coordinates comparable within a fold only)."


# --------------------------------------------------------------------------- sweeps


def sweep_context(run_dir: Path, figures: Path) -> dict:
    """Sweep curve, sweep table, attrition per swept value, and every sub-run's CV sections."""
    run = RunFolder(run_dir)
    if not run.sweep_summary.is_file():
        raise InputError(f"run folder {run_dir} lacks sweep.csv, so its sweep is unfinished: {_cv_command(run_dir)}")
    table = pd.read_csv(run.sweep_summary)
    parameter = table.columns[0]
    subs = []
    for value in pd.unique(table[parameter]):
        label = f"{parameter.split('.')[-1]}={value}"
        sub_dir = run.sweep(label).root
        subs.append({"label": label, "value": value, "dir": sub_dir.name,
                     "cv": cv_context(sub_dir, figures / sub_dir.name)})
    attrition = pd.concat([pd.DataFrame(s["cv"]["attrition"]["rows"], columns=s["cv"]["attrition"]["columns"])
                           .assign(**{parameter: s["value"]}) for s in subs], ignore_index=True)
    attrition = attrition[[parameter, *[c for c in attrition.columns if c != parameter]]]
    return {
        "parameter": parameter,
        "table": _records(_sweep_display(table)),
        "curve": _sweep_figure(table, parameter, figures / "sweep_curve", source=run.sweep_summary),
        "attrition": _records(attrition),
        "attrition_figure": _sweep_attrition_figure(attrition, parameter, figures / "sweep_attrition", source=run.sweep_summary),
        "runs": subs,
    }


def _sweep_display(table: pd.DataFrame) -> pd.DataFrame:
    """sweep.csv with each metric as one "mean ± sd" column."""
    out = table[[table.columns[0], "model", "kind", "level"]].copy()
    for metric in HEADLINE:
        mean, sd = table[f"{metric}_mean"], table[f"{metric}_sd"]
        out[metric] = [("–" if pd.isna(m) else f"{m:.3f}" + ("" if pd.isna(s) else f" ± {s:.3f}")) for m, s in zip(mean, sd)]
    return out


def _positions(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Numeric x for numeric sweep values, else evenly spaced categories; and the tick labels."""
    unique = list(pd.unique(values))
    numeric = pd.to_numeric(pd.Series(unique), errors="coerce")
    if numeric.notna().all():
        lookup = dict(zip(unique, numeric))
        return values.map(lookup).to_numpy(dtype=float), [str(u) for u in unique]
    lookup = {u: i for i, u in enumerate(unique)}
    return values.map(lookup).to_numpy(dtype=float), [str(u) for u in unique]


def _sweep_figure(table: pd.DataFrame, parameter: str, base: Path, *, source: Path) -> Figure:
    if _stale(base, source):
        _plot_sweep(table, parameter, base)
    return _figure(base, f"Balanced accuracy vs {parameter}",
                   "Mean ± sd over the CV folds of each sub-run; image and patch level; probes dotted.")


def _plot_sweep(table: pd.DataFrame, parameter: str, base: Path) -> None:
    import matplotlib

    from cytofuse.plots import STYLE, class_colours, save_figure
    from cytofuse.plots import figure as new_figure

    x_all, ticks = _positions(table[parameter])
    table = table.assign(_x=x_all)
    names = list(pd.unique(table["model"]))
    colours = dict(zip(names, class_colours(len(names))))
    with matplotlib.rc_context(STYLE):
        fig, axes = new_figure((8.4, 3.4), ncols=2)
        for ax, level in zip(axes, ("image", "patch")):
            for name in names:
                part = table[(table["model"] == name) & (table["level"] == level)].sort_values("_x")
                probe = part["kind"].iloc[0] == "probe" if len(part) else False
                ax.errorbar(part["_x"], part["balanced_accuracy_mean"], yerr=part["balanced_accuracy_sd"].fillna(0),
                            color="0.55" if probe else colours[name], ls=":" if probe else "-", marker="o", ms=3,
                            capsize=3, lw=0.9 if probe else 1.4, label=name)
            ax.set_xticks(sorted(set(x_all.tolist())), _tick_labels(x_all, ticks))
            ax.set(xlabel=parameter, ylabel="Balanced accuracy", title=f"{level.capitalize()} level", ylim=(0, 1.02))
            ax.grid(True, lw=0.4, alpha=0.5)
        axes[1].legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        save_figure(fig, base)


def _tick_labels(x: np.ndarray, ticks: list[str]) -> list[str]:
    """Tick labels in the order of the sorted unique positions."""
    order = sorted(set(x.tolist()))
    firsts = {}
    for value in x.tolist():
        firsts.setdefault(value, len(firsts))
    return [ticks[firsts[v]] for v in order]


def _sweep_attrition_figure(attrition: pd.DataFrame, parameter: str, base: Path, *, source: Path) -> Figure:
    if _stale(base, source):
        _plot_sweep_attrition(attrition, parameter, base)
    return _figure(base, f"Patch attrition per class vs {parameter}",
                   "Share of candidate patches removed by the sparsity filter and de-duplication, per class and swept value.")


def _plot_sweep_attrition(attrition: pd.DataFrame, parameter: str, base: Path) -> None:
    import matplotlib

    from cytofuse.plots import STYLE, class_colours, save_figure
    from cytofuse.plots import figure as new_figure

    x_all, ticks = _positions(attrition[parameter])
    attrition = attrition.assign(_x=x_all)
    labels = list(pd.unique(attrition["label"]))
    colours = class_colours(len(labels))
    with matplotlib.rc_context(STYLE):
        fig, ax = new_figure((4.8, 3.2))
        for colour, label in zip(colours, labels):
            part = attrition[attrition["label"] == label].sort_values("_x")
            ax.plot(part["_x"], part["attrition_pct"], marker="o", ms=3, color=colour, label=str(label))
        ax.set_xticks(sorted(set(x_all.tolist())), _tick_labels(x_all, ticks))
        ax.set(xlabel=parameter, ylabel="Patches removed (%)", title="Attrition", ylim=(0, 100))
        ax.grid(True, lw=0.4, alpha=0.5)
        ax.legend(frameon=False)
        save_figure(fig, base)


# --------------------------------------------------------------------------- tune runs


@dataclass(frozen=True)
class TuneFiles:
    """The files of a tune run (``cytofuse tune``) that the report reads."""

    run_dir: Path

    root = property(lambda self: Path(self.run_dir) / "tune")
    nested = property(lambda self: self.root / "nested.json")
    nested_table = property(lambda self: self.root / "nested.csv")
    trials = property(lambda self: self.root / "trials.csv")
    study_db = property(lambda self: self.root / "study.db")
    worker = property(lambda self: self.root / "worker.json")
    best_config = property(lambda self: Path(self.run_dir) / "best_config.yaml")


_STATES = (("COMPLETE", "complete"), ("PRUNED", "pruned"), ("FAIL", "failed"), ("RUNNING", "running"))


def tune_context(run_dir: Path, figures: Path) -> dict:
    """Nested estimate (tuned vs defaults), trial counts, optimisation histories, parameter importances and best
    settings of a tune run, with the data and attrition sections of its patch stage."""
    files = TuneFiles(run_dir)
    _check_tune_folder(run_dir, files)
    nested = json.loads(files.nested.read_text())
    trials = pd.read_csv(files.trials)
    attrition = _attrition(run_dir)
    importances = tune_importances(nested.get("storage"), run_dir, list(pd.unique(trials["study"])))
    figure = _importance_figure(importances, figures / "importances")
    table = importances["table"]
    importances |= {"figure": figure,
                    "table": None if table is None else _records(table.rename_axis("setting").reset_index())}
    return {
        "measured_on": nested.get("measured_on", ""),
        "estimate": _records(_nested_display(pd.read_csv(files.nested_table))),
        "seconds": nested.get("seconds"),
        "counts": _records(trial_counts(trials)),
        "histories": [_history_figure(trials, name, figures / f"history_{safe_name(name)}", source=files.trials)
                      for name in pd.unique(trials["study"])],
        "importances": importances,
        "best": _records(_best_settings(nested)),
        "final_rule": nested.get("final", {}).get("rule"),
        "best_config": files.best_config.read_text() if files.best_config.is_file() else None,
        "classes": nested["metrics"]["tuned"].get("classes", []),
        "data": data_summary(run_dir),
        "labels": labels_context(run_dir),
        "attrition": _records(attrition),
        "attrition_figure": _attrition_figure(attrition, figures / "attrition", source=RunFolder(run_dir).images),
    }


def _tune_command(run_dir: Path) -> str:
    return f"run `cytofuse tune CONFIG --out {run_dir}` (an unfinished search resumes)"


def _check_tune_folder(run_dir: Path, files: TuneFiles) -> None:
    if files.worker.is_file() and not files.nested.is_file():
        storage = json.loads(files.worker.read_text()).get("storage")
        raise InputError(f"run folder {run_dir} is a tune worker's ({files.worker.name}): it ran trials of the "
                         f"studies in {storage} and holds no results; write the report of the leader's run folder "
                         "(--worker 0)")
    missing = [str(p.relative_to(run_dir)) for p in (files.nested, files.nested_table, files.trials)
               if not p.is_file()]
    if missing:
        raise InputError(f"tune run folder {run_dir} lacks {', '.join(missing)} (the search or its refits did not "
                         f"finish): {_tune_command(run_dir)}")
    for path in (RunFolder(run_dir).patches, RunFolder(run_dir).images):
        if not path.is_file():
            raise InputError(f"tune run folder {run_dir} lacks the patch stage ({path.name}): {_tune_command(run_dir)}")


def _nested_display(table: pd.DataFrame) -> pd.DataFrame:
    """nested.csv with each metric as one "mean ± sd" column, image level first."""
    from cytofuse.evaluation.metrics import METRIC_LABELS

    table = table.assign(_level=table["level"].map({"image": 0, "patch": 1})).sort_values(["_level"], kind="stable")
    out = table[["level", "procedure"]].copy()
    for metric in HEADLINE:
        mean, sd = table[f"{metric}_mean"], table[f"{metric}_sd"]
        out[METRIC_LABELS.get(metric, metric)] = [
            "–" if pd.isna(m) else f"{m:.3f}" + ("" if pd.isna(d) else f" ± {d:.3f}") for m, d in zip(mean, sd)]
    return out.reset_index(drop=True)


def trial_counts(trials: pd.DataFrame) -> pd.DataFrame:
    """Per study: complete, pruned, failed and running trials, the total, the trials per worker and the best value."""
    rows = []
    for name, part in trials.groupby("study", sort=False):
        row = {"study": name}
        for state, label in _STATES:
            row[label] = int((part["state"] == state).sum())
        row["total"] = len(part)
        if "worker" in part and part["worker"].notna().any():
            per = part.loc[part["state"].isin(["COMPLETE", "PRUNED"]), "worker"].dropna().astype(int).value_counts()
            row["complete or pruned, by worker"] = ", ".join(f"{w}: {n}" for w, n in sorted(per.items())) or "–"
        done = part.loc[part["state"] == "COMPLETE", "value"]
        row["best value"] = float(done.max()) if len(done) else None
        rows.append(row)
    return pd.DataFrame(rows)


def _history_figure(trials: pd.DataFrame, name: str, base: Path, *, source: Path) -> Figure:
    from cytofuse.plots import plot_optimisation_history

    part = trials[trials["study"] == name]
    if _stale(base, source):
        plot_optimisation_history(part["number"], part["value"], part["state"], base, title=f"Study {name}",
                                  ylabel="Inner validation balanced accuracy")
    where = ("the outer fold's training part" if str(name).startswith("outer_") else "every CV group (the final "
             "search of best_config.yaml)")
    caption = (f"Each trial's balanced accuracy on the grouped inner validation split of {where}, against the trial "
               f"number; pruned trials at their last reported epoch; {len(part)} trials.")
    return _figure(base, f"Optimisation history, {name}", caption)


def _best_settings(nested: dict) -> pd.DataFrame:
    """The best trial's settings per study and the settings of best_config.yaml."""
    def shown(params: dict) -> dict:  # settings such as a learning rate need significant digits, not decimals
        return {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in params.items()}

    rows = [{"study": f["name"], "best inner value": f.get("value"), **shown(f.get("params", {}))}
            for f in nested.get("folds", [])]
    final = nested.get("final", {})
    rows.append({"study": f"best_config.yaml (tune.final: {final.get('rule', '?')})", "best inner value": None,
                 **shown(final.get("params", {}))})
    return pd.DataFrame(rows)


def tune_importances(storage: str | None, run_dir: Path, names: list[str]) -> dict:
    """Parameter importances (fANOVA, seed 0) of each study, read from the tune run's storage: ``table`` (one
    row per parameter, one column per study; None when no study has them) and ``missing`` (why a study, or the
    storage, has none)."""
    where = storage or "tune/study.db"
    opened, reason = _open_tune_storage(storage, run_dir)
    if opened is None:
        return {"table": None, "missing": [f"storage {where}: {reason}"], "storage": where}
    columns, missing = {}, []
    try:
        for name in names:
            found = _study_importances(opened, name)
            if isinstance(found, str):
                missing.append(f"{name}: {found}")
            else:
                columns[name] = found
    finally:
        engine = getattr(opened, "engine", None)
        if engine is not None:
            opened.remove_session()
            engine.dispose()
    table = pd.DataFrame(columns) if columns else None
    return {"table": table, "missing": missing, "storage": where}


def _open_tune_storage(storage: str | None, run_dir: Path):
    """(the Optuna storage of a tune run, None) or (None, why it cannot be read); never creates a storage."""
    import optuna

    if storage is None:
        path = TuneFiles(run_dir).study_db
        if not path.is_file():
            return None, "the file is missing"
        storage = f"sqlite:///{path.resolve()}"
    elif "***@" in storage:
        return None, "the run folder keeps the URL without its password, so the report cannot log in"
    elif "://" not in storage and not Path(storage).is_file():
        return None, "the journal file is missing"
    elif storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        return None, "the database file is missing"
    try:
        if "://" in storage:
            options = {"connect_args": {"connect_timeout": 10}} if storage.startswith(("postgres", "mysql")) else {}
            return optuna.storages.RDBStorage(storage, engine_kwargs=options, skip_table_creation=True), None
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(storage)), None
    except Exception as exc:  # noqa: BLE001 - any driver's error becomes the reason shown in the report
        return None, f"cannot be opened from here ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"


def _study_importances(storage, name: str) -> dict | str:
    """{parameter: importance} of study ``name``, or why it has none."""
    import warnings

    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return "the study is not in the storage"
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return f"{len(done)} complete trial(s); importances need at least 2"
    if len({t.value for t in done}) < 2:
        return (f"all {len(done)} complete trials scored the same ({done[0].value:.3f}), so no setting explains "
                "a difference")
    if all(len({repr(t.params.get(p)) for t in done}) < 2 for p in done[0].params):
        return f"the {len(done)} complete trials share every setting"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError) as exc:
            return f"fANOVA failed ({exc})"
    if caught:
        return f"fANOVA: {caught[0].message}"
    return {param: float(value) for param, value in found.items()}


def _importance_figure(importances: dict, base: Path) -> Figure | None:
    from cytofuse.plots import plot_importances

    table = importances["table"]
    if table is None:
        return None
    plot_importances(table, base, title="Parameter importances per study")  # drawn each time: read live
    return _figure(base, "Parameter importances (fANOVA)",
                   f"Share of the variance of the inner validation score explained by each setting, over each study's "
                   f"complete trials in {importances['storage']} when this report was written.")
