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
    for command in (["patches", "--manifest", str(data / "labels.csv")],):
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
