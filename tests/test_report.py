import base64
import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from cytofuse.errors import InputError, RunFolderError
from cytofuse.evaluation.report import Entry, _figure, _tick_labels, comparison_table, write_report

# --------------------------------------------------------------------------- missing stages (fast)


def _config_only(path):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("cv:\n  n_folds: 2\n")
    return path


def test_a_missing_run_folder_names_the_command(tmp_path):
    with pytest.raises(InputError, match=r"run folder .*nowhere does not exist: run `cytofuse cv CONFIG --out"):
        write_report(tmp_path / "nowhere")


def test_a_folder_without_config_is_no_run_folder(tmp_path):
    with pytest.raises(InputError, match=r"lacks config.yaml"):
        write_report(tmp_path)


def test_a_run_without_the_patch_stage_names_the_files(tmp_path):
    run = _config_only(tmp_path / "run")
    (run / "images.parquet").write_bytes(b"")
    with pytest.raises(InputError, match=r"lacks the patch stage \(patches.parquet\): run `cytofuse cv CONFIG --out"):
        write_report(run)


def test_a_run_without_predictions_names_the_stage_and_command(tmp_path):
    run = _config_only(tmp_path / "run")
    for name in ("patches.parquet", "images.parquet"):
        (run / name).write_bytes(b"")
    with pytest.raises(InputError, match=r"lacks predictions of any model \(models/\*/predictions.parquet\): run `cytofuse cv"):
        write_report(run)
    (run / "models" / "early").mkdir(parents=True)
    (run / "models" / "early" / "predictions.parquet").write_bytes(b"")
    with pytest.raises(InputError, match=r"lacks metrics \(models/\*/metrics.json; the CV stopped early\)"):
        write_report(run)
    assert not (run / "report.html").exists()


def test_an_unfinished_sweep_names_sweep_csv(tmp_path):
    run = _config_only(tmp_path / "run")
    (run / "sweep" / "size_32").mkdir(parents=True)
    with pytest.raises(InputError, match=r"lacks sweep.csv, so its sweep is unfinished"):
        write_report(run)


# --------------------------------------------------------------------------- pieces (fast)


def _metrics(correct: np.ndarray, *, kind: str | None = None, parameters: int | None = None) -> dict:
    """evaluate_run metrics of 2 folds x 4 images x 3 patches; ``correct`` marks the images predicted right."""
    from cytofuse.evaluation.metrics import evaluate_run

    rows = []
    for image, ok in enumerate(correct):
        y = image % 2
        p = 0.9 if ok else 0.1
        for k in range(3):
            rows.append({"patch_id": f"{image}_{k}", "image_id": f"im{image}", "group": f"im{image}", "fold": image // 4,
                         "y_true": y, "prob_a": p if y == 0 else 1 - p, "prob_b": 1 - p if y == 0 else p})
    metrics = {"cv": evaluate_run(pd.DataFrame(rows), classes=["a", "b"], n_boot=50)}
    metrics["model"] = {"kind": kind} if kind else {"parameters": parameters}
    metrics["measured_on"] = "2-fold CV on 8 images"
    return metrics


def test_comparison_table_has_kinds_parameters_and_mean_sd(tmp_path):
    perfect = _metrics(np.ones(8, bool), parameters=1234)
    half = _metrics(np.array([1, 1, 0, 0, 1, 1, 1, 1], bool), kind="probe")  # fold 0: 2 of 4 right, fold 1: all right
    entries = [Entry("early", "model", tmp_path, perfect), Entry("probe:background", "probe", tmp_path, half)]
    table = comparison_table(entries, level="image")
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["rows"]}
    assert table["columns"][:3] == ["classifier", "kind", "parameters"]
    assert rows["early"]["kind"] == "model" and rows["early"]["parameters"] == "1,234"
    assert rows["early"]["Balanced accuracy"] == "1.000 ± 0.000"
    assert rows["probe:background"]["parameters"] == "–"
    assert rows["probe:background"]["Balanced accuracy"] == "0.750 ± 0.354"  # folds 0.5 and 1.0
    assert rows["probe:background"]["Pooled balanced accuracy (95% CI)"].startswith("0.750 [")
    assert rows["early"]["folds"] == 2


def test_figure_embeds_the_smaller_file_as_a_data_uri(tmp_path):
    (tmp_path / "f.png").write_bytes(b"\x89PNG" + b"0" * 100)
    (tmp_path / "f.svg").write_bytes(b"<svg/>")
    fig = _figure(tmp_path / "f", "title", "caption")
    assert fig.src == "data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode()
    assert fig.file == "f.svg"
    (tmp_path / "f.svg").write_bytes(b"<svg/>" * 100)
    assert _figure(tmp_path / "f", "t", "c").src.startswith("data:image/png;base64,")
    with pytest.raises(InputError, match=r"figure .*missing.png/.svg is missing"):
        _figure(tmp_path / "missing", "t", "c")


def test_sweep_tick_labels_follow_sorted_positions():
    assert _tick_labels(np.array([64.0, 32.0, 64.0, 128.0]), ["64", "32", "128"]) == ["32", "64", "128"]


# --------------------------------------------------------------------------- a real run (slow)


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, synthetic_set):
    """A finished CV run on tiny synthetic data (1 epoch, smallcnn, 2 folds), as in test_crossval."""
    import torch

    from cytofuse.config import validate_config
    from cytofuse.workflows.cv import run_cv

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    cfg = validate_config({
        "data": {"manifest": str(synthetic_set / "labels.csv")},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}, {"fusion": "single", "channel": "mitochondria", "encoder": "smallcnn"}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2},
    })
    run_cv(cfg, root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def report(cv_run):
    """The report of ``cv_run`` with a stand-in explanation folder for one model."""
    from cytofuse.evaluation.metrics import plot_confusion

    explain = cv_run / "explain" / "early"
    plot_confusion([[3, 1], [0, 4]], ["control", "fragmented"], normalize=False, out=explain / "ablation")
    (explain / "summary.json").write_text(json.dumps({"model": "early", "ablation": [
        {"mode": "zero", "channel": "mitochondria", "drop_mean": 0.25, "rank": 1}]}))
    return write_report(cv_run)


def test_report_shows_every_stage(cv_run, report):
    page = report.read_text()
    assert report == cv_run / "report.html"
    for name in ("early", "single:mitochondria", "handcrafted", "probe:background", "probe:intensity", "probe:acquisition"):
        assert f"<td class=\"text\">{name}</td>" in page
    assert page.count('<span class="tag probe">probe</span>') == 3 and page.count('<span class="tag baseline">') == 1
    measured = json.loads((cv_run / "models" / "early" / "metrics.json").read_text())["measured_on"]
    assert measured in html.unescape(page)
    assert "No shortcut warnings" in page or "Shortcut warning" in page
    assert "exclude_channels:" in page and "torch" in page and "scikit-learn" in page
    assert "<td>mitochondria</td>" in page or 'class="text">mitochondria</td>' in page  # the ablation table
    # 1 attrition + 6 classifiers x 8 evaluation figures + 2 deep models' training curves + 1 explanation figure
    assert page.count("<img ") == 1 + 6 * 8 + 2 + 1
    assert "src=\"file:" not in page and "http" not in page.split("<main>")[1].split("<h2 id=\"config\">")[0]
    figures = cv_run / "report" / "figures"
    assert (figures / "early" / "confusion_image_counts.svg").is_file()
    assert (figures / "probe_background" / "roc_patch.png").is_file()
    assert (figures / "attrition.svg").is_file()


def test_report_is_not_replaced_without_overwrite(cv_run, report):
    before = report.read_text()
    with pytest.raises(RunFolderError, match="--overwrite"):
        write_report(cv_run)
    assert report.read_text() == before
    again = write_report(cv_run, overwrite=True)
    assert again == report and "cytofuse report" in again.read_text()
    other = write_report(cv_run, out=cv_run.parent / "elsewhere" / "page.html")
    assert other.is_file() and not list(cv_run.parent.glob("elsewhere/.*partial"))


def test_report_of_a_run_without_explanations_names_the_command(cv_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(cv_run, copy, ignore=shutil.ignore_patterns("cache", "explain", "report.html", "*.ckpt"))  # figures are reused
    page = write_report(copy).read_text()
    assert f"Run <code>cytofuse explain {copy}</code>" in page


@pytest.mark.slow
def test_sweep_report_has_curve_attrition_per_value_and_sub_runs(synthetic_set, tmp_path):
    import torch

    from cytofuse.config import validate_config
    from cytofuse.workflows.cv import run_sweep

    torch.set_num_threads(1)
    cfg = validate_config({
        "data": {"manifest": str(synthetic_set / "labels.csv")},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "early", "encoder": "smallcnn"}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2, "probes": False},
        "sweep": {"parameter": "patches.size", "values": [24, 32]},
    })
    run_sweep(cfg, tmp_path / "sweep", progress=False)
    page = write_report(tmp_path / "sweep").read_text()
    assert "Sweep over patches.size" in page and "size=24" in page and "size=32" in page
    assert (tmp_path / "sweep" / "report" / "figures" / "sweep_curve.svg").is_file()
    assert (tmp_path / "sweep" / "report" / "figures" / "size_24" / "early" / "roc_image.svg").is_file()
    # sweep curve + sweep attrition + per sub-run: attrition + 2 classifiers x 8 + training curves
    assert page.count("<img ") == 2 + 2 * (1 + 2 * 8 + 1)


# --------------------------------------------------------------------------- in a browser (slow)

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
          "--disable-component-update", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]

# Injected first into a copy of the page: records script errors, opens every <details>, and
# writes each image's decode state and page position into the DOM for --dump-dom to return.
_PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || "resource failed: " + (e.target && e.target.tagName))), true);
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.join(" ")); __consoleError(...args); };
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => { d.open = true; });
  const images = [...document.images].map(i => { const r = i.getBoundingClientRect();
    return {ok: i.complete && i.naturalWidth > 0, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height}; });
  const out = document.createElement("pre");
  out.id = "__check";
  out.textContent = JSON.stringify({images, errors: window.__errors, height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="session")
def chromium():
    """Path of a headless Chromium; installed once with apt-get when running as root (CYTOFUSE_INSTALL_BROWSER=0 stops that)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and os.environ.get("CYTOFUSE_INSTALL_BROWSER", "1") != "0" and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], env=env, capture_output=True, timeout=1200)
        found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless Chromium not found and not installable here (needs root and apt-get; "
                    "install Debian packages chromium and chromium-driver, or unset CYTOFUSE_INSTALL_BROWSER=0)")
    return found


def _browse(chromium: str, page, *args: str, height: int) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *_FLAGS, f"--window-size=1280,{height}", "--virtual-time-budget=15000", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=180)


def test_report_renders_every_figure_in_headless_chromium(chromium, report, tmp_path):
    from PIL import Image

    page = tmp_path / "check.html"
    page.write_text(report.read_text().replace("<head>", "<head>" + _PROBE, 1))
    dom = _browse(chromium, page, "--dump-dom", height=2000)
    found = re.search(r'<pre id="__check">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the page did not finish loading in Chromium: {dom.stderr[-2000:]}"
    check = json.loads(html.unescape(found.group(1)))
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert check["errors"] == [] and console == []
    assert len(check["images"]) == report.read_text().count("<img ")
    assert all(image["ok"] for image in check["images"]), [i for i, image in enumerate(check["images"]) if not image["ok"]]
    shot = tmp_path / "page.png"
    _browse(chromium, page, f"--screenshot={shot}", height=int(check["height"]))
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape[1] == 1280 and pixels.shape[0] >= check["height"] - 10
    for i, image in enumerate(check["images"]):
        assert image["w"] > 100 and image["h"] > 100, f"image {i} is drawn {image['w']:.0f} x {image['h']:.0f} px"
        y0, x0 = int(image["y"]), int(image["x"])
        crop = pixels[y0 + 2 : y0 + int(image["h"]) - 2, x0 + 2 : x0 + int(image["w"]) - 2]
        dark = (crop < 200).mean()
        assert crop.std() > 10 and dark > 0.005, f"image {i} looks blank on the screenshot (sd {crop.std():.1f}, dark {dark:.4f})"
