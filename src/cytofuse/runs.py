"""Output folders: cytofuse replaces only folders it made, and only once the new one is ready.

Every folder cytofuse writes (run, model, filter, export, prediction and synthetic data
folders) carries the marker file :data:`MARKER`. An existing non-empty folder without it is
never replaced or deleted, whatever the flags; one with it is replaced only with
``overwrite``, by building the new folder beside it and swapping (old renamed away, new
renamed in, old deleted), so a failure before the swap leaves the old folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cytofuse.errors import RunFolderError

MARKER = ".cytofuse-run"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A hidden temporary name beside ``path`` to write one file to; it is renamed onto ``path`` when
    the block ends without error and removed otherwise, so ``path`` never holds a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_table_atomic(path: str | Path, frame) -> Path:
    """Write a pandas table (without its index) to ``path`` through :func:`atomic_path`: Parquet for a
    ``.parquet`` path, CSV otherwise."""
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
    return Path(path)


def write_json_atomic(path: str | Path, data) -> Path:
    """Write ``data`` as indented JSON to ``path`` through :func:`atomic_path`."""
    return write_text_atomic(path, json.dumps(data, indent=1))


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
    check_replaceable(path, overwrite=overwrite, what=what)
    return replace_folder(new, path)


def replace_folder(new: str | Path, path: str | Path) -> Path:
    """Move folder ``new`` to ``path`` without any check; an old ``path`` is renamed away, then deleted
    (and put back if the move fails). Callers check first (:func:`swap_in`) unless ``path`` is derived
    data inside a folder cytofuse made, such as a run's patch cache."""
    new, path = Path(new), Path(path)
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
    check_replaceable(path, overwrite=overwrite, what=what)
    with building_folder(path) as tmp:
        yield tmp
        mark_finished(tmp)
        check_replaceable(path, overwrite=overwrite, what=what)  # again, just before the swap


@contextmanager
def building_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``path``; when the block ends without error it replaces ``path``
    (:func:`replace_folder`, no check), and it is removed otherwise, leaving ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this process id: cytofuse's own hidden name
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, path)
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


def software_versions(packages: Sequence[str] = ("torch", "numpy", "monai"), *, with_platform: bool = False,
                      missing: str = "absent") -> dict[str, str]:
    """Python (and with ``with_platform`` the platform) and the installed versions of ``packages``, read
    without importing them; ``missing`` stands for a package that is not installed."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    if with_platform:
        out["platform"] = platform.platform(terse=True)
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = missing
    return out


def _start(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("running\n")
    return path


def mark_finished(path: str | Path) -> None:
    """Mark ``path`` as a complete folder made by cytofuse."""
    (Path(path) / MARKER).write_text("finished\n")


def safe_name(name: str) -> str:
    """A display name (model, probe) as a folder name: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


@dataclass(frozen=True)
class FitFolder:
    """The files of one fit (``train.fit``): checkpoints, exported weights, epoch history, resume state, and
    the model's patch recipe."""

    root: Path

    @property
    def last_checkpoint(self) -> Path:
        return self.root / "last.ckpt"

    @property
    def best_checkpoint(self) -> Path:
        return self.root / "best.ckpt"

    @property
    def weights(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def state(self) -> Path:
        return self.root / "fit.json"

    @property
    def recipe(self) -> Path:
        """The ``PatchRecipe`` of this fit's model: its input channels, the patch settings and the
        normalisation of its training split (``cytofuse.preprocess.recipe``)."""
        return self.root / "recipe.json"

    @property
    def normalisation(self) -> Path:
        """The training split's normalisation alone, as runs made before :attr:`recipe` stored it; read
        only as a fallback for those runs, no longer written."""
        return self.root / "normalisation.json"

    @property
    def teacher(self) -> "FitFolder":
        """The teacher's fit of a model distilled from training-only channels."""
        return FitFolder(self.root / "teacher")

    def files(self) -> tuple[Path, ...]:
        """The files a fresh fit replaces."""
        return (self.last_checkpoint, self.best_checkpoint, self.weights, self.history, self.state)


@dataclass(frozen=True)
class ModelRun:
    """One model's (or baseline's, or probe's) folder in a run: pooled predictions, metrics, one fit per fold."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.parquet"

    @property
    def test_predictions(self) -> Path:
        return self.root / "test_predictions.parquet"

    @property
    def curves(self) -> Path:
        """Base name of the training-curve figure (``.png`` and ``.svg``)."""
        return self.root / "training_curves"

    def fold(self, k: int) -> FitFolder:
        return FitFolder(self.root / f"fold_{int(k)}")

    def folds(self) -> list[FitFolder]:
        """The fold folders that exist, in fold order."""
        found = sorted((p for p in self.root.glob("fold_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        return [FitFolder(p) for p in found]


@dataclass(frozen=True)
class RunFolder:
    """Every path of a run folder, spelled in one place.

    Stage artifacts: ``config.yaml`` (the resolved configuration), ``patches.parquet`` and
    ``images.parquet`` (the patch index), ``attrition.csv``, ``cache/`` (the patch cache),
    ``labels/`` (labels from a channel), ``folds.csv``, ``models/<name>/`` and
    ``probes/<name>/`` (:class:`ModelRun`), ``summary.csv``, ``shortcut_warnings.json``,
    ``explain/``, ``report/`` and ``report.html``; a sweep adds ``sweep.csv`` and one run folder
    per swept value in ``sweep/<label>/``. The marker :data:`MARKER` says cytofuse made it.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    marker = property(lambda self: self.root / MARKER)
    config = property(lambda self: self.root / "config.yaml")
    patches = property(lambda self: self.root / "patches.parquet")
    images = property(lambda self: self.root / "images.parquet")
    attrition = property(lambda self: self.root / "attrition.csv")
    cache = property(lambda self: self.root / "cache")
    patch_parts = property(lambda self: self.root / ".patch_parts")  # per-image patching results while patching
    labels = property(lambda self: self.root / "labels")
    label_rule = property(lambda self: self.labels / "label_rule.json")
    label_values = property(lambda self: self.labels / "patch_values.parquet")
    label_histogram = property(lambda self: self.labels / "histogram")  # base name of .png and .svg
    folds = property(lambda self: self.root / "folds.csv")
    models = property(lambda self: self.root / "models")
    probes = property(lambda self: self.root / "probes")
    summary = property(lambda self: self.root / "summary.csv")
    shortcut_warnings = property(lambda self: self.root / "shortcut_warnings.json")
    explain = property(lambda self: self.root / "explain")
    report = property(lambda self: self.root / "report")
    figures = property(lambda self: self.report / "figures")
    report_page = property(lambda self: self.root / "report.html")
    sweeps = property(lambda self: self.root / "sweep")
    sweep_summary = property(lambda self: self.root / "sweep.csv")

    def model(self, name: str) -> ModelRun:
        """The folder of the model (or baseline) called ``name`` (its display name; made folder-safe)."""
        return ModelRun(self.models / safe_name(name))

    def probe(self, name: str) -> ModelRun:
        return ModelRun(self.probes / safe_name(name))

    def sweep(self, label: str) -> "RunFolder":
        """The run folder of one swept value (``label`` such as ``size=64``; made folder-safe)."""
        return RunFolder(self.sweeps / safe_name(label))

    def model_runs(self) -> list[ModelRun]:
        """The model folders that hold metrics, in name order."""
        return [ModelRun(p.parent) for p in sorted(self.models.glob("*/metrics.json"))]
