"""The per-image stages on a Dask cluster: the patch stage and prediction through a LocalCluster of two
worker processes give the same files as the local path, also when a worker dies in the middle of a task;
bad or unreachable schedulers are refused by name."""

import os
import re
import sys
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest
from typer.testing import CliRunner

from cytofuse.cli import app
from cytofuse.config import validate_config
from cytofuse.errors import ConfigError
from cytofuse.io import distributed
from cytofuse.io.distributed import check_scheduler, cluster_client
from cytofuse.preprocess import patches as patch_module
from cytofuse.workflows.patching import run_patches

pytest.importorskip("distributed")
# The wrappers below that kill a worker live in this module, which the workers cannot import: send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PATCH_FILES = ("patches.parquet", "images.parquet", "attrition.csv")
UUID = re.compile(rb"urn:uuid:[0-9a-f-]{36}")  # tifffile gives every OME-TIFF a fresh UUID


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two phantom classes of three 4-channel images, 2 x 64 x 64."""
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    out = tmp_path_factory.mktemp("distributed") / "data"
    write_synthetic_dataset(out, classes=2, images_per_class=3, shape=(2, 64, 64), seed=3, progress=False)
    return out


def _config(data: Path, scheduler: str | None = None):
    raw = {"data": {"manifest": str(data / "labels.csv")}, "patches": {"size": 32, "stride": 16}}
    return validate_config(raw | ({"scheduler": scheduler} if scheduler else {}))


@pytest.fixture(scope="module")
def local_run(data, tmp_path_factory):
    """The patch stage of ``data`` on the local path."""
    out = tmp_path_factory.mktemp("local") / "run"
    run_patches(_config(data), out, progress=False)
    return out


def _same_files(a: Path, b: Path, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"


def test_check_scheduler_accepts_local_n_and_addresses_and_names_a_bad_value():
    assert check_scheduler(None) is None
    assert check_scheduler("local:2") == "local:2"
    assert check_scheduler(" tcp://10.0.0.5:8786 ") == "tcp://10.0.0.5:8786"
    assert check_scheduler("tls://scheduler.cluster.local:8786") == "tls://scheduler.cluster.local:8786"
    for bad in ("local:0", "local", "local:two", "10.0.0.5:8786", "scheduler", "tcp://", "tcp://host:99999"):
        with pytest.raises(ConfigError, match=rf"^--scheduler .*{re.escape(bad)}"):
            check_scheduler(bad)
    with pytest.raises(ConfigError, match=r"web address .*tcp://h:8786"):
        check_scheduler("http://h:8787/status")
    with pytest.raises(ConfigError, match=r"scheduler: .*scheduler must be local:N .*got 'local:-1'"):
        validate_config({"data": {"images": "x"}, "scheduler": "local:-1"})
    assert "scheduler" not in validate_config({"data": {"images": "x"}}).model_dump()  # no key when unset


def test_an_unreachable_scheduler_is_named_after_a_short_wait(monkeypatch, data, tmp_path):
    monkeypatch.setattr(distributed, "CONNECT_TIMEOUT_S", 1.0)
    with pytest.raises(ConfigError, match=r"--scheduler 'tcp://127\.0\.0\.1:9': no Dask scheduler answered there "
                                          r"within 1 s"):
        with cluster_client("tcp://127.0.0.1:9"):
            pass
    result = CliRunner().invoke(app, ["patches", "--manifest", str(data / "labels.csv"), "--out", str(tmp_path / "r"),
                                      "--size", "32", "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2 and "--scheduler 'tcp://127.0.0.1:9'" in result.output, result.output


def test_cli_refuses_a_bad_scheduler_before_any_work(data, tmp_path):
    for command in (["patches", "--manifest", str(data / "labels.csv")], ["predict", str(tmp_path / "model"),
                                                                          str(data / "labels.csv")]):
        result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "out"), "--scheduler", "local:0"])
        assert result.exit_code == 2, result.output
        assert "--scheduler must be local:N" in result.output and "'local:0'" in result.output
        assert not (tmp_path / "out").exists()


def test_patch_stage_on_two_workers_writes_the_local_files(data, local_run, tmp_path):
    result = CliRunner().invoke(app, ["patches", "--manifest", str(data / "labels.csv"), "--out", str(tmp_path / "run"),
                                      "--size", "32", "--stride", "16", "--scheduler", "local:2"])
    assert result.exit_code == 0, result.output
    _same_files(local_run, tmp_path / "run", PATCH_FILES)
    assert not (tmp_path / "run" / ".patch_parts").exists()  # the workers' part files, cleared once assembled
    assert len(pd.read_parquet(tmp_path / "run" / "patches.parquet")) > 0


def _patch_or_die(record, axes, settings, folder, *, victim: str, marker: Path):
    """patch_record, except that the worker running ``victim`` dies on the first try (``marker`` not yet there)."""
    from cytofuse.preprocess import patches

    if record.image_id == victim and not marker.exists():
        marker.touch()
        os._exit(1)
    return patches.patch_record(record, axes, settings, folder)


def test_a_worker_killed_during_a_task_is_replaced_and_the_files_are_the_same(data, local_run, tmp_path, monkeypatch):
    import functools

    victim = pd.read_csv(data / "labels.csv")["path"].map(lambda p: Path(p).name).iloc[1]
    marker = tmp_path / "killed"
    cfg = _config(data, "local:2")
    from cytofuse.workflows.patching import load_image_set

    victim_id = next(r.image_id for r in load_image_set(cfg.data) if r.path.name == victim)
    monkeypatch.setattr(patch_module, "patch_record", functools.partial(_patch_or_die, victim=victim_id, marker=marker))
    run_patches(cfg, tmp_path / "run", progress=False)
    assert marker.is_file()  # a worker did die
    _same_files(local_run, tmp_path / "run", PATCH_FILES)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained early-fusion smallcnn of three of the phantoms' channels, as a model folder."""
    import torch

    from cytofuse.inference.modelfolder import card_for, write_model_folder
    from cytofuse.models import create_model
    from cytofuse.preprocess.patches import PatchSettings

    torch.manual_seed(0)
    model = create_model("early", in_channels=3, num_classes=2, encoder="smallcnn").eval()
    card = card_for([model], class_names=["control", "fragmented"],
                    channel_names=["mitochondria", "early_endosome", "recycling_endosome"],
                    patches=PatchSettings(size=32, stride=16, min_ratio=0.0))
    return write_model_folder(tmp_path_factory.mktemp("model") / "model", [model], card)


def _images(data: Path) -> list[str]:
    return sorted(str(p) for p in (data / "images").glob("*.ome.tif"))


@pytest.fixture(scope="module")
def local_prediction(model_dir, data, tmp_path_factory):
    from cytofuse.inference.predict import predict_images

    out = tmp_path_factory.mktemp("pred") / "local"
    predict_images(model_dir, _images(data), out=out, progress=False, precision="fp32")
    return out


def _same_prediction(a: Path, b: Path) -> None:
    """Every file of two prediction folders byte for byte; OME-TIFF heat maps up to their fresh UUID."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert {f.name for f in files} >= {"summary.csv", "summary.parquet", "patches.parquet", "heatmap.tif",
                                       "heatmap_max.tif", "overlay.png"}
    for f in files:
        one, two = (a / f).read_bytes(), (b / f).read_bytes()
        if f.suffix == ".tif":
            one, two = UUID.sub(b"urn:uuid:-", one), UUID.sub(b"urn:uuid:-", two)
        assert one == two, f"{f} differs"


def test_prediction_on_two_workers_writes_the_local_files(model_dir, data, local_prediction, tmp_path):
    from cytofuse.inference.predict import predict_images

    summary = predict_images(model_dir, _images(data), out=tmp_path / "pred", progress=False, precision="fp32",
                             scheduler="local:2")
    _same_prediction(local_prediction, tmp_path / "pred")
    assert summary["image"].tolist() == [Path(p).name.split(".")[0] for p in _images(data)]


def _predict_or_die(model, item, name, folder, options, *, victim: str, marker: Path):
    """predict_file, except that the worker predicting ``victim`` dies half-way on the first try."""
    from cytofuse.inference import predict

    if name == victim and not marker.exists():
        marker.touch()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "heatmap.tif").write_bytes(b"half a heat map")  # what a dying worker may leave
        os._exit(1)
    return predict.predict_file(model, item, name, folder, options)


def test_a_worker_killed_during_prediction_is_replaced_and_the_files_are_the_same(model_dir, data, local_prediction,
                                                                                  tmp_path, monkeypatch):
    import functools

    from cytofuse.inference import predict

    marker = tmp_path / "killed"
    victim = Path(_images(data)[2]).name.split(".")[0]
    monkeypatch.setattr(predict, "predict_file", functools.partial(_predict_or_die, victim=victim, marker=marker))
    predict.predict_images(model_dir, _images(data), out=tmp_path / "pred", progress=False, precision="fp32",
                           scheduler="local:2")
    assert marker.is_file()
    _same_prediction(local_prediction, tmp_path / "pred")


def test_a_bad_image_on_a_worker_names_the_image_and_the_worker(model_dir, data, tmp_path):
    from cytofuse.errors import InputError
    from cytofuse.inference.predict import predict_images

    bad = tmp_path / "empty.ome.tif"
    bad.write_bytes(b"")
    with pytest.raises(InputError, match=r"image file .*empty\.ome\.tif is empty .*\(image .*empty\.ome\.tif, on "
                                         r"worker tcp://127\.0\.0\.1:\d+\)"):
        predict_images(model_dir, [*_images(data)[:1], str(bad)], out=tmp_path / "pred", progress=False,
                       scheduler="local:1")
    assert not (tmp_path / "pred").exists()


def _flaky(value: int, marker: Path) -> int:
    """Raises on the first call for a marker that is not there yet, then squares."""
    if value < 0:
        raise ZeroDivisionError(f"no square of {value}")
    if not marker.exists():
        marker.touch()
        raise OSError("the shared storage hiccupped")
    return value * value


def test_a_task_that_raises_is_retried_and_one_that_keeps_raising_names_image_and_worker(tmp_path):
    from cytofuse.io.distributed import TaskError, map_images

    calls = [(3, tmp_path / "a"), (4, tmp_path / "b")]
    done = dict(map_images(_flaky, calls, images=["a.tif", "b.tif"], scheduler="local:1", progress=False))
    assert done == {0: 9, 1: 16}
    with pytest.raises(TaskError, match=r"image c\.tif failed on worker tcp://127\.0\.0\.1:\d+: ZeroDivisionError: "
                                        r"no square of -1 \(at .*test_distributed\.py:\d+\); tried 3 times"):
        list(map_images(_flaky, [(-1, tmp_path / "c")], images=["c.tif"], scheduler="local:1", progress=False))


def _striped_set(root: Path) -> Path:
    """Two classes of four 2-channel stacks (3 x 96 x 96): stripes in channel a and noise in b, or the reverse.
    Rotation-invariant (the recipe's flips, quarter turns and TTA keep it), and learned in a few epochs."""
    import numpy as np

    from cytofuse.io.readers import Image, write_ome_tiff

    (root / "images").mkdir(parents=True)
    rows = []
    for k, label in enumerate(["a_striped", "b_striped"]):
        for i in range(4):
            rng = np.random.default_rng(100 * k + i)
            rows_y = np.arange(96)[:, None] * np.ones(96)

            def plane(striped: bool):
                noise = 200 + rng.normal(0, 60, (96, 96))
                return noise + (800 * (np.sin(2 * np.pi * (rows_y / 8 + rng.uniform())) > 0) if striped else 0)

            data = np.stack([np.stack([plane(c == k) for _ in range(3)]) for c in range(2)]).clip(0, 4000)
            write_ome_tiff(root / "images" / f"{label}_{i}.ome.tif", Image(data.astype(np.uint16), ("a", "b")))
            rows.append({"path": f"images/{label}_{i}.ome.tif", "label": label})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def _cytofuse_cv(config: Path, out: Path) -> str:
    """``cytofuse cv CONFIG --out OUT`` in a new process, as a user runs it; its output."""
    import shutil
    import subprocess

    exe = shutil.which("cytofuse", path=str(Path(sys.executable).parent)) or shutil.which("cytofuse")
    command = [exe] if exe else [sys.executable, "-m", "cytofuse.cli"]
    proc = subprocess.run([*command, "cv", str(config), "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_through_the_cv_command_matches_one_process(tmp_path):
    """``cytofuse cv`` with ``train: {strategy: ddp_spawn, devices: 2, accelerator: cpu}`` (DDP over gloo)
    against the same config on one process, the per-device batch halved (8 instead of 16) so that both take
    the same optimiser steps on batches of 16 patches.

    Tolerance: the fold means of patch- and image-level balanced accuracy and AUROC agree within 0.1, and
    both runs score at least 0.9 (chance: 0.5). The two fits are not the same computation: each process
    normalises its own half-batch in batch norm and draws its own augmentation, and the averaged gradient
    of two weighted half-batch losses differs from the weighted loss of the whole batch, so the weights
    follow another path; on this separable set both reach the same answer (1.0 when measured), and 0.1
    leaves room for a few borderline test patches, not for a DDP fit that learned less or scored wrongly.
    Runs about 2 minutes on 2 CPU cores (each fold's fit starts two processes)."""
    import json

    import yaml

    manifest = _striped_set(tmp_path / "data")
    base = {"data": {"manifest": str(manifest)}, "patches": {"size": 32, "min_ratio": 0.0},
            "models": [{"fusion": "early", "encoder": "smallcnn"}],
            "train": {"max_epochs": 10, "batch_size": 16, "lr": 0.005, "progress": False, "accelerator": "cpu"},
            "cv": {"n_folds": 2, "probes": False, "baseline": False}}
    ddp = base | {"train": base["train"] | {"batch_size": 8, "strategy": "ddp_spawn", "devices": 2, "verbose": True}}
    scores = {}
    for name, cfg in (("single", base), ("ddp", ddp)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        output = _cytofuse_cv(tmp_path / f"{name}.yaml", tmp_path / name)
        if name == "ddp":
            assert "MEMBER: 2/2" in output and "distributed_backend=gloo" in output, output[-3000:]
        metrics = json.loads((tmp_path / name / "models" / "early" / "metrics.json").read_text())["cv"]
        scores[name] = {(level, m): metrics[level]["summary"][m]["mean"] for level in ("patch", "image")
                        for m in ("balanced_accuracy", "auroc_macro")}
    for key, single in scores["single"].items():
        assert single >= 0.9 and scores["ddp"][key] >= 0.9, scores
        assert abs(scores["ddp"][key] - single) <= 0.1, (key, scores)


def test_file_urls_predicted_on_two_workers_through_the_cli_give_the_local_outputs(model_dir, data, local_prediction,
                                                                                   tmp_path):
    """Images named by fsspec URLs reach the workers as URLs (not mangled into local paths)."""
    from typer.testing import CliRunner

    from cytofuse.cli import app

    urls = [Path(p).absolute().as_uri() for p in _images(data)]
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", str(model_dir), *urls, "--out", str(out), "--precision", "fp32",
                                      "--scheduler", "local:2"])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_parquet(local_prediction / "patches.parquet"),
                                  pd.read_parquet(out / "patches.parquet"))
    summary = pd.read_parquet(out / "summary.parquet")
    assert [str(s) for s in summary["source"]] == urls
    local = pd.read_parquet(local_prediction / "summary.parquet")
    pd.testing.assert_frame_equal(local.drop(columns="source"), summary.drop(columns="source"))
    for name in summary["image"]:
        one = (local_prediction / "images" / name / "heatmap.tif").read_bytes()
        two = (out / "images" / name / "heatmap.tif").read_bytes()
        assert UUID.sub(b"urn:uuid:-", one) == UUID.sub(b"urn:uuid:-", two)
