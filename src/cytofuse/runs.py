"""Output folders: cytofuse replaces only folders it made, and only once the new one is ready.

Every folder cytofuse writes (run, model, filter, export, prediction and synthetic data
folders) carries the marker file :data:`MARKER`. An existing non-empty folder without it is
never replaced or deleted, whatever the flags; one with it is replaced only with
``overwrite``, by building the new folder beside it and swapping (old renamed away, new
renamed in, old deleted), so a failure before the swap leaves the old folder as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cytofuse.errors import RunFolderError

MARKER = ".cytofuse-run"


def made_by_cytofuse(path: str | Path) -> bool:
    """Whether ``path`` is a folder that carries cytofuse's marker."""
    return (Path(path) / MARKER).is_file()


def check_replaceable(path: str | Path, *, overwrite: bool, what: str = "output folder") -> bool:
    """Raise unless ``path`` may be written; True when it holds something that will be replaced.

    ``path`` may be absent or an empty folder; a non-empty folder must carry :data:`MARKER`
    and needs ``overwrite``. ``what`` names the folder in messages ("model folder", ...).
    """
    path = Path(path)
    if not path.exists():
        _check_parent(path, what)
        return False
    if not path.is_dir():
        raise RunFolderError(f"{what} {path} exists and is not a folder; choose a new output path")
    if not any(path.iterdir()):
        return False
    if not made_by_cytofuse(path):
        raise RunFolderError(
            f"{path} exists and is not a cytofuse {what} (it has no {MARKER} marker): cytofuse never replaces or "
            "deletes a folder it did not make; choose a new output path"
        )
    if not overwrite:
        raise RunFolderError(f"{what} {path} exists; pass --overwrite to replace it or choose a new output path")
    return True


def _check_parent(path: Path, what: str) -> None:
    """The nearest existing folder above ``path`` must be a writable folder."""
    above = next(p for p in path.absolute().parents if p.exists())
    if not above.is_dir():
        raise RunFolderError(f"{what} {path} cannot be created: {above} is a file, not a folder; choose another output path")
    if not os.access(above, os.W_OK | os.X_OK):
        raise RunFolderError(f"{what} {path} cannot be created: no permission to write in {above}; choose another output path")


def swap_in(new: str | Path, path: str | Path, *, overwrite: bool, what: str = "output folder") -> Path:
    """Move the finished folder ``new`` to ``path``; an old ``path`` (checked again) is renamed away, then deleted."""
    new, path = Path(new), Path(path)
    check_replaceable(path, overwrite=overwrite, what=what)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(new, path)
    except OSError:
        if old.exists():
            os.replace(old, path)  # put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


@contextmanager
def replacing_folder(path: str | Path, *, overwrite: bool, what: str = "output folder") -> Iterator[Path]:
    """Yield an empty folder beside ``path`` to write into; on success it is marked and swapped in.

    ``path`` is checked first (:func:`check_replaceable`), so a folder that may not be
    replaced is refused before any work; on an error the new folder is removed and ``path``
    is left untouched.
    """
    path = Path(path)
    check_replaceable(path, overwrite=overwrite, what=what)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this process id: cytofuse's own hidden name
    tmp.mkdir(parents=True)
    try:
        yield tmp
        mark_finished(tmp)
        swap_in(tmp, path, overwrite=overwrite, what=what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = True) -> Path:
    """Create ``path`` as a run folder, or reopen an unfinished one.

    A folder that holds anything but a cytofuse run is never touched. A finished run (or any
    run when ``resume`` is false) is replaced only with ``overwrite``: a fresh run folder is
    swapped in for it. Call this when the run starts writing, after its inputs are checked.
    """
    path = Path(path)
    if not check_replaceable(path, overwrite=True, what="run folder"):
        return _start(path)
    finished = (path / MARKER).read_text().strip() == "finished"
    if not overwrite and resume and not finished:
        return _start(path)
    if not overwrite:
        state = "a finished run" if finished else "an unfinished run"
        raise RunFolderError(f"run folder {path} holds {state}; pass --overwrite to replace it or choose a new --out")
    fresh = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    return swap_in(_start(fresh), path, overwrite=True, what="run folder")


def _start(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("running\n")
    return path


def mark_finished(path: str | Path) -> None:
    """Mark ``path`` as a complete folder made by cytofuse."""
    (Path(path) / MARKER).write_text("finished\n")
