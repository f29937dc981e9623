"""Run folders: one folder per run, never overwritten without an explicit flag."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import RunFolderError

MARKER = ".cytofuse-run"


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = True) -> Path:
    """Create ``path`` as a run folder, or reopen an unfinished one.

    A folder that holds anything but a cytofuse run is never touched. A finished run (or any
    run when ``resume`` is false) is replaced only with ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"run folder {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise RunFolderError(f"{path} exists and is not a cytofuse run folder; choose a new --out")
        finished = (path / MARKER).read_text().strip() == "finished"
        if overwrite:
            shutil.rmtree(path)
        elif finished or not resume:
            state = "a finished run" if finished else "an unfinished run"
            raise RunFolderError(f"run folder {path} holds {state}; pass --overwrite to replace it or choose a new --out")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("running\n")
    return path


def mark_finished(path: str | Path) -> None:
    (Path(path) / MARKER).write_text("finished\n")
