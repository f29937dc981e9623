"""Same config and seed, same numbers; a CV killed in the middle of a fold and resumed ends as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    root = tmp_path_factory.mktemp("repro")
    write_synthetic_dataset(root / "data", classes=2, images_per_class=4, shape=(1, 64, 64), seed=5, progress=False)
    raw = {"data": {"manifest": str(root / "data" / "labels.csv")},
           "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
           "models": [{"fusion": "early", "name": "a"}, {"fusion": "intermediate", "name": "b"}],
           "train": {"max_epochs": 6, "batch_size": 8, "progress": False, "accelerator": "cpu",
                     "checkpoint_every_s": 0,  # a resumable checkpoint every epoch, so the kill lands mid-fold
                     "augment": {"crop_scale": 0.9, "gain": 0.1}},
           "cv": {"n_folds": 2, "baseline": False, "probes": False, "val_fraction": 0.34}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cv(config, out, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", CYTOFUSE_INSTALL_BROWSER="0")
    return subprocess.Popen([sys.executable, "-m", "cytofuse.cli", "cv", str(config), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def _run(config, out) -> None:
    proc = _cv(config, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]


def _results(run) -> dict:
    out = {}
    for name in ("a", "b"):
        out[name] = (json.loads((run / "models" / name / "metrics.json").read_text())["cv"],
                     pd.read_parquet(run / "models" / name / "predictions.parquet"))
    return out


def _assert_same(x: dict, y: dict) -> None:
    for name in x:
        assert x[name][0] == y[name][0], name  # every metric, to the last digit
        pd.testing.assert_frame_equal(x[name][1], y[name][1], check_exact=True)


def _wait_for(path, proc, timeout: float = 300) -> None:
    start = time.time()
    while not path.is_file():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.05)


def test_same_seed_same_numbers_and_killed_run_resumes_identically(config, tmp_path):
    _run(config, tmp_path / "one")
    first = _results(tmp_path / "one")

    # SIGKILL in the middle of fold 1 of the second model (after its first epoch checkpoint), then resume
    proc = _cv(config, tmp_path / "killed")
    _wait_for(tmp_path / "killed" / "models" / "b" / "fold_1" / "last.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (tmp_path / "killed" / "models" / "b" / "metrics.json").exists()
    _run(config, tmp_path / "killed")
    _assert_same(first, _results(tmp_path / "killed"))

    # SIGINT: a message says what was kept and how to resume; the resumed run is identical too (three runs
    # of one config and seed, two of them interrupted, give the same numbers to the last digit)
    proc = _cv(config, tmp_path / "interrupted")
    _wait_for(tmp_path / "interrupted" / "models" / "a" / "fold_0" / "last.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted" in err.decode() and "resume" in err.decode()
    _run(config, tmp_path / "interrupted")
    _assert_same(first, _results(tmp_path / "interrupted"))
    assert np.isfinite(first["a"][0]["patch"]["summary"]["balanced_accuracy"]["mean"])
