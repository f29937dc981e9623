"""The ``cytofuse`` command and its run folders: help, synth, patches, refusal to overwrite."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import cytofuse.training.fit  # noqa: F401  config validation imports it (torch, lightning: seconds); pay that at collection
from cytofuse.cli import app
from cytofuse.errors import RunFolderError
from cytofuse.runs import MARKER, mark_finished, prepare_run_dir
from cytofuse.synthetic.phantoms import CLASS_NAMES

HEAVY = ("torch", "lightning", "monai", "bioio", "tifffile", "skimage", "sklearn", "pandas", "matplotlib")


def _invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def synth_data(small_synthetic_set) -> Path:
    """Two classes of two 4-channel phantoms, 2x64x64, with labels.csv (the session's, conftest.py)."""
    return small_synthetic_set


# --------------------------------------------------------------------------- help and imports


def test_help_lists_the_commands():
    result = _invoke("--help")
    assert result.exit_code == 0
    for command in ("synth", "patches", "demo"):
        assert command in result.output
    assert "Organelle-aware fusion classifiers" in result.output


def test_help_of_patches_lists_its_options():
    result = _invoke("patches", "--help")
    assert result.exit_code == 0
    for option in ("--manifest", "--images", "--out", "--size", "--rule", "--exclude", "--set", "--overwrite"):
        assert option in result.output


def test_cli_help_imports_no_heavy_library():
    code = (
        "import sys, time; t = time.perf_counter(); import cytofuse.cli; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(cytofuse.cli.app, ['--help']); assert r.exit_code == 0, r.output; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert elapsed < 10, f"cytofuse --help took {elapsed:.1f} s"


# --------------------------------------------------------------------------- synth


def test_synth_writes_images_and_manifest(tmp_path):
    out = tmp_path / "syn"
    result = _invoke("synth", out, "--classes", "2", "--images-per-class", "2", "--shape", "2,64,64")
    assert result.exit_code == 0, result.output
    assert "wrote 4 images" in result.output
    names = [f"{c}_{i}.ome.tif" for c in CLASS_NAMES[:2] for i in range(2)]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(names)
    table = pd.read_csv(out / "labels.csv")
    assert list(table.columns) == ["path", "label", "group"]
    assert table["label"].value_counts().to_dict() == {CLASS_NAMES[0]: 2, CLASS_NAMES[1]: 2}
    assert table["path"].tolist() == [f"images/{n}" for n in names]


def test_synth_bad_shape_is_a_clean_error(tmp_path):
    result = _invoke("synth", tmp_path / "syn", "--shape", "64,64")
    assert result.exit_code == 2
    assert "--shape must be Z,Y,X integers, got '64,64'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "syn").exists()


def test_synth_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn" / "keep.txt").write_text("mine")
    result = _invoke("synth", tmp_path / "syn", "--classes", "1", "--images-per-class", "1", "--shape", "1,32,32")
    assert result.exit_code == 2
    assert "is not a cytofuse data folder" in " ".join(result.output.split())
    assert (tmp_path / "syn" / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- patches


def test_patches_writes_the_run_folder_and_refuses_to_overwrite_it(synth_data, tmp_path):
    run = tmp_path / "run"
    result = _invoke("patches", "--manifest", synth_data / "labels.csv", "--out", run, "--size", "32")
    assert result.exit_code == 0, result.output
    for name in ("patches.parquet", "images.parquet", "attrition.csv", "config.yaml"):
        assert (run / name).is_file(), name
    assert (run / MARKER).read_text().strip() == "finished"
    assert "from 4 images written to" in result.output

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["patches"]["size"] == 32
    assert Path(config["data"]["manifest"]) == (synth_data / "labels.csv").resolve()
    images = pd.read_parquet(run / "images.parquet")
    assert len(images) == 4
    attrition = pd.read_csv(run / "attrition.csv")
    assert sorted(attrition["label"]) == sorted(CLASS_NAMES[:2])
    # 2 z-slices x (64 / 32)^2 tiles per image, two images per class
    assert attrition["candidates"].tolist() == [16, 16]
    patches = pd.read_parquet(run / "patches.parquet")
    assert len(patches) == attrition["kept"].sum() > 0

    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    again = _invoke("patches", "--manifest", synth_data / "labels.csv", "--out", run, "--size", "32")
    assert again.exit_code == 2
    assert "--overwrite" in again.output and "finished run" in again.output
    assert "Traceback" not in again.output
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before

    replaced = _invoke("patches", "--manifest", synth_data / "labels.csv", "--out", run, "--size", "64", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert yaml.safe_load((run / "config.yaml").read_text())["patches"]["size"] == 64
    assert pd.read_csv(run / "attrition.csv")["candidates"].tolist() == [4, 4]


def test_patches_refuses_a_folder_that_is_not_a_run(synth_data, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    for extra in ([], ["--overwrite"]):
        result = _invoke("patches", "--manifest", synth_data / "labels.csv", "--out", out, "--size", "32", *extra)
        assert result.exit_code == 2
        assert f"{out} exists and is not a cytofuse run folder" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["thesis.docx"]


def test_patches_bad_rule_is_a_clean_error(synth_data, tmp_path):
    result = _invoke("patches", "--manifest", synth_data / "labels.csv", "--out", tmp_path / "run", "--rule", "most")
    assert result.exit_code == 2
    assert "patches.rule: Input should be 'any', 'all' or 'mean' (got 'most')" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    assert not (tmp_path / "run").exists()


def test_patches_unknown_channel_fails_before_any_work(synth_data, tmp_path):
    result = _invoke(
        "patches", "--manifest", synth_data / "labels.csv", "--out", tmp_path / "run", "--exclude", "dapi"
    )
    assert result.exit_code == 2
    assert "exclude_channels: unknown channel name 'dapi'" in result.output
    assert not (tmp_path / "run").exists()


def test_patches_needs_exactly_one_data_source(tmp_path):
    result = _invoke("patches", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "invalid config command-line flags:\n  data: Field required" in result.output
    both = _invoke("patches", "--images", tmp_path, "--manifest", tmp_path / "m.csv", "--out", tmp_path / "run")
    assert both.exit_code == 2
    assert "give exactly one of data.images (folder per class) or data.manifest (CSV)" in both.output
    assert not (tmp_path / "run").exists()


def test_patches_from_a_config_file_with_set_override(synth_data, tmp_path):
    conf = tmp_path / "conf" / "run.yaml"
    conf.parent.mkdir()
    conf.write_text(yaml.safe_dump({"data": {"manifest": str(synth_data / "labels.csv")}, "patches": {"size": 16}}))
    run = tmp_path / "run"
    result = _invoke("patches", conf, "--out", run, "--set", "patches.exclude_channels=[nucleus]", "--size", "32")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["patches"]["size"] == 32
    assert saved["patches"]["exclude_channels"] == ["nucleus"]
    assert "nucleus" not in pd.read_parquet(run / "images.parquet").columns.str.cat(sep=" ")


def test_patches_bad_config_key_names_it(tmp_path):
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({"data": {"images": "x"}, "pathces": {"size": 32}}))
    result = _invoke("patches", conf, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert f"invalid config {conf}" in result.output
    assert "pathces: unknown key" in result.output


# --------------------------------------------------------------------------- run folders


def test_prepare_run_dir_creates_a_new_folder(tmp_path):
    path = prepare_run_dir(tmp_path / "a" / "run")
    assert path == tmp_path / "a" / "run"
    assert (path / MARKER).read_text() == "running\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (prepare_run_dir(empty) / MARKER).is_file()


def test_prepare_run_dir_resumes_an_unfinished_run(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    (run / "part.parquet").write_text("half")
    assert prepare_run_dir(run) == run
    assert (run / "part.parquet").read_text() == "half"
    with pytest.raises(RunFolderError) as excinfo:
        prepare_run_dir(run, resume=False)
    assert str(excinfo.value) == (
        f"run folder {run} holds an unfinished run; pass --overwrite to replace it or choose a new --out"
    )


def test_prepare_run_dir_refuses_a_finished_run_unless_overwrite(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    (run / "result.csv").write_text("done")
    mark_finished(run)
    with pytest.raises(RunFolderError, match="holds a finished run; pass --overwrite"):
        prepare_run_dir(run)
    assert (run / "result.csv").read_text() == "done"
    assert prepare_run_dir(run, overwrite=True) == run
    assert sorted(p.name for p in run.iterdir()) == [MARKER]
    assert (run / MARKER).read_text() == "running\n"


def test_prepare_run_dir_never_touches_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "data.csv").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match=f"{foreign} exists and is not a cytofuse run folder"):
            prepare_run_dir(foreign, overwrite=overwrite)
    assert sorted(p.name for p in foreign.iterdir()) == ["data.csv"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunFolderError, match=f"run folder {a_file} exists and is not a folder"):
        prepare_run_dir(a_file, overwrite=True)
    assert issubclass(RunFolderError, FileExistsError)


def test_demo_command_runs_end_to_end_on_a_smaller_phantom_set(tmp_path, monkeypatch):
    """The README's first command, through the CLI: the phantoms shrunk (2x64x64, 4 per class) and one epoch."""
    import torch

    import cytofuse.synthetic.phantoms as phantoms
    import cytofuse.workflows.demo as demo

    torch.set_num_threads(1)
    write = phantoms.write_synthetic_dataset
    monkeypatch.setattr(phantoms, "write_synthetic_dataset",
                        lambda out, **kw: write(out, **(kw | {"shape": (2, 64, 64), "images_per_class": 4})))
    config = demo.demo_config

    def small(data_dir):
        raw = config(data_dir)
        raw["patches"] |= {"size": 32}
        raw["train"] |= {"max_epochs": 1}
        raw["cv"] |= {"n_folds": 2, "probes": False}
        return raw

    monkeypatch.setattr(demo, "demo_config", small)
    result = _invoke("demo", "--out", str(tmp_path / "demo"))
    code, output = result.exit_code, result.output
    assert code == 0, output
    for text in ("Patches per class", "image-level metrics", "image-level recall per class", "'ee_on_mito' differs"):
        assert text in output, text
    summary = pd.read_csv(tmp_path / "demo" / "run" / "summary.csv")
    assert {"early", "intermediate", "late", "single:mitochondria"} <= set(summary["model"])


@pytest.mark.parametrize("command", ["cv", "train", "tune"])
def test_verbose_flag_turns_on_lightnings_own_lines(command, tmp_path, monkeypatch):
    """Quiet by default; --verbose sets train.verbose for the command's fits."""
    import cytofuse.workflows.cv as cv_module
    import cytofuse.workflows.final as final_module
    import cytofuse.workflows.tune as tune_module

    seen = []

    class Stop(Exception):
        pass

    def capture(cfg, *args, **kwargs):
        seen.append(cfg.train_settings.verbose)
        raise Stop

    monkeypatch.setattr(cv_module, "run_cv", capture)
    monkeypatch.setattr(final_module, "train_final", capture)
    monkeypatch.setattr(tune_module, "run_tune", capture)
    config = tmp_path / "c.yaml"
    tune = "tune: {space: {train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}\n" if command == "tune" else ""
    config.write_text(f"data: {{images: {tmp_path}}}\nmodels: [{{fusion: early}}]\n{tune}")
    for flags, expected in (([], False), (["--verbose"], True)):
        result = _invoke(command, config, "--out", tmp_path / "out", *flags)
        assert isinstance(result.exception, Stop), result.output
        assert seen[-1] is expected
