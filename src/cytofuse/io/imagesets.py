"""Image sets: a folder per class or a CSV manifest, with labels, groups and validation.

A folder per class::

    root/<class>/<image files>          (one multichannel file per image), or
    root/<class>/Ch3_A.tif Ch4_A.tif    (one file per channel, grouped by a filename pattern)

A manifest (CSV): a ``path`` column (one file per image) or one ``path_<channel>`` column per
channel, a ``label`` column, an optional ``group`` column (default: the image itself) and
any further columns, kept as metadata. Relative paths are resolved against the manifest's
folder.

A path may also be an fsspec URL (``s3://bucket/a.ome.tif``, ``gs://``, ``https://``, ``file://``,
``memory://``): it is kept as given (a ``cytofuse.io.readers.ImageURL``), checked with the filesystem's
``exists``, and read through fsspec. A folder per class may be a URL too, listed with fsspec.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter, defaultdict
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cytofuse.errors import DataSetError
from cytofuse.io.readers import (FOLDER_FORMATS, ImageURL, check_fits_in_memory, check_url, is_url,
                                 supported_suffixes)

CHANNEL_FILE_PATTERN = r"^(?P<channel>Ch\d+)_(?P<key>.+)\.[^.]+$"
_MAX_LISTED = 20


@dataclass(frozen=True)
class ImageRecord:
    """One image of a set: its files, label, CV group and metadata."""

    image_id: str
    label: str
    group: str
    path: Path | ImageURL | None = None
    channel_paths: tuple[tuple[str, Path | ImageURL], ...] = ()
    metadata: dict = field(default_factory=dict, compare=False)

    @property
    def files(self) -> list[Path | ImageURL]:
        return [self.path] if self.path is not None else [p for _, p in self.channel_paths]

    @property
    def display(self) -> str:
        return str(self.path) if self.path is not None else ", ".join(str(p) for p in self.files)


@dataclass
class ValidationReport:
    """What validation found: image count, classes, groups per class, channels, warnings."""

    n_images: int
    classes: list[str]
    images_per_class: dict[str, int]
    groups_per_class: dict[str, int]
    channel_names: tuple[str, ...]
    shapes: dict[str, tuple[int, int, int, int]]
    dtypes: dict[str, str]
    warnings: list[str] = field(default_factory=list)


class ImageSet:
    """An ordered collection of :class:`ImageRecord` with a shared axis convention."""

    def __init__(self, records: Sequence[ImageRecord], *, axes: str | None = None, source: str = "") -> None:
        if not records:
            raise DataSetError(f"image set {source or '<records>'} holds no images")
        self.records = list(records)
        self.axes = axes
        self.source = source
        self._by_id = {r.image_id: r for r in self.records}

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, image_id: str) -> ImageRecord:
        return self._by_id[image_id]

    @property
    def classes(self) -> list[str]:
        return sorted({r.label for r in self.records})

    def with_group_pattern(self, pattern: str) -> "ImageSet":
        """A copy whose CV group is the first group (or whole match) of ``pattern`` searched in each file name.

        E.g. ``'^(.*)_(?:live|dead)_'`` groups crops by their source field. Every image must match.
        """
        regex = re.compile(pattern)
        records, unmatched = [], []
        for r in self.records:
            name = r.files[0].name
            found = regex.search(name)
            if found is None:
                unmatched.append(name)
                continue
            group = found.group(1) if regex.groups else found.group(0)
            records.append(dataclasses.replace(r, group=group))
        if unmatched:
            raise DataSetError(f"image set {self.source}: data.group_pattern {pattern!r} matches no part of "
                               f"{len(unmatched)} file names, e.g. {unmatched[:3]}")
        return type(self)(records, axes=self.axes, source=self.source)

    @classmethod
    def from_folder(
        cls, root: str | Path, *, channel_pattern: str | None = None, axes: str | None = None
    ) -> "ImageSet":
        """One sub-folder per class; files found recursively below each class folder.

        Files whose names all match ``channel_pattern`` (default: ``Ch<n>_<key>.<ext>`` when every
        file of the set matches it) are grouped per key into one multichannel image. ``root`` may be an
        fsspec URL string (``s3://bucket/set``), listed with the filesystem's ``ls`` and ``find``.
        """
        if is_url(root):
            root = ImageURL(root)
            files = _url_folder_files(root)
        else:
            root = Path(root)
            _collapsed_url(root)
            if not root.is_dir():
                raise DataSetError(f"image folder {root} does not exist or is not a folder")
            class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            files = {d.name: sorted(f for f in d.rglob("*") if _is_image(f)) for d in class_dirs}
        if not any(files.values()):
            raise DataSetError(f"image folder {root} has no class sub-folders with images ({', '.join(supported_suffixes())})")
        empty = [str(root.joinpath(k)) for k, v in files.items() if not v]
        if empty:
            raise DataSetError(f"image folder {root}: class folder(s) {empty} hold no image files "
                               f"({', '.join(supported_suffixes())}); add images or move the folder(s) out")
        all_names = [f.name for v in files.values() for f in v]
        pattern = channel_pattern or (CHANNEL_FILE_PATTERN if all(re.match(CHANNEL_FILE_PATTERN, n) for n in all_names) else None)
        records = []
        for label, paths in files.items():
            records += _grouped_records(label, paths, root, pattern) if pattern else [
                ImageRecord(image_id=_rel_id(p, root), label=label, group=_rel_id(p, root), path=p) for p in paths
            ]
        return cls(records, axes=axes, source=str(root))

    @classmethod
    def from_manifest(
        cls,
        csv: str | Path,
        *,
        path_column: str = "path",
        label_column: str = "label",
        group_column: str | None = "group",
        axes: str | None = None,
    ) -> "ImageSet":
        """Read a CSV manifest (see the module docstring for its columns)."""

        csv = Path(csv)
        if not csv.is_file():
            raise DataSetError(f"manifest {csv} does not exist")
        table = _read_manifest(csv)
        if label_column not in table.columns:
            raise DataSetError(f"manifest {csv} has no label column {label_column!r}; columns: {list(table.columns)}")
        channel_cols = [c for c in table.columns if c.startswith(f"{path_column}_")]
        if path_column not in table.columns and not channel_cols:
            raise DataSetError(
                f"manifest {csv} needs a {path_column!r} column or {path_column}_<channel> columns; "
                f"columns: {list(table.columns)}"
            )
        reserved = {path_column, label_column, group_column, *channel_cols}
        records = [
            _manifest_record(row, i, csv, path_column, channel_cols, label_column, group_column, reserved)
            for i, row in enumerate(table.to_dict("records"))
        ]
        return cls(records, axes=axes, source=str(csv))

    def read(self, record: ImageRecord | str):
        """The record's pixels as a :class:`cytofuse.io.readers.Image`."""
        from cytofuse.io.readers import read_channel_files, read_image

        record = self[record] if isinstance(record, str) else record
        if record.path is not None:
            return read_image(record.path, axes=self.axes)
        return read_channel_files(dict(record.channel_paths), axes=self.axes)

    def probe(self, record: ImageRecord):
        """Shape, dtype and channel names of a record from file headers, as ``(shape, dtype, names)``."""
        from cytofuse.io.readers import probe_image

        if record.path is not None:
            info = probe_image(record.path, axes=self.axes)
            return tuple(info.shape), str(info.dtype), tuple(info.channel_names)
        infos = [probe_image(p, axes=self.axes) for _, p in record.channel_paths]
        for (name, path), info in zip(record.channel_paths, infos):
            if info.shape[0] != 1:
                raise DataSetError(f"channel file {path} (channel {name}) has {info.shape[0]} channels, expected 1")
            if info.shape != infos[0].shape:
                raise DataSetError(f"channel file {path} has shape {info.shape}, but {record.channel_paths[0][1]} has {infos[0].shape}")
        shape = (len(infos), *infos[0].shape[1:])
        return shape, str(infos[0].dtype), tuple(n for n, _ in record.channel_paths)

    def validate(
        self,
        *,
        n_folds: int | None = None,
        channels: Sequence[str | int] | None = None,
        exclude_channels: Sequence[str | int] = (),
        min_classes: int = 1,
        patch_size: int | None = None,
    ) -> ValidationReport:
        """Check every file and the set as a whole before any work; raise one error listing all problems.

        ``min_classes``: fewer labels than this is a problem (2 to train a classifier);
        ``patch_size``: every image must be at least that large in Y and X.
        """
        problems = _duplicate_paths(self.records) + _too_few_classes(self.classes, min_classes)
        shapes, dtypes, names = {}, {}, {}
        for record in self.records:
            problems += _check_files(record)
            if any(p.startswith(f"{f}:") for f in record.files for p in problems):
                continue
            try:
                shapes[record.image_id], dtypes[record.image_id], names[record.image_id] = self.probe(record)
                check_fits_in_memory(_nbytes(shapes[record.image_id], dtypes[record.image_id]), record.display,
                                     shapes[record.image_id], dtypes[record.image_id])
            except Exception as exc:  # readers raise InputError naming the file; keep collecting
                problems.append(f"{record.display}: {exc}")
        problems += _channel_consistency(self.records, names)
        problems += _smaller_than_patch(self.records, shapes, patch_size)
        channel_names = next(iter(names.values()), ())
        if channel_names and not problems:
            from cytofuse.io.readers import select_channels

            try:
                select_channels(channel_names, channels=channels, exclude=exclude_channels)
            except Exception as exc:
                problems.append(str(exc))
        groups = _groups_per_class(self.records)
        if n_folds is not None:
            problems += [
                f"class {label!r} has {n} group(s) but n_folds={n_folds} needs at least {n_folds}: "
                "lower n_folds or add images of that class"
                for label, n in groups.items()
                if n < n_folds
            ]
            if min_classes >= 2:  # labels per image: every training split also holds out a grouped validation split
                problems += [
                    f"class {label!r} has {n} group(s): with n_folds={n_folds} a training split keeps as few as "
                    f"{n - math.ceil(n / n_folds)}, and its grouped validation split needs 2 (one to fit, one to "
                    "validate): add images of that class or lower n_folds"
                    for label, n in groups.items()
                    if n_folds <= n < 2 + math.ceil(n / n_folds)
                ]
        if problems:
            listed = "\n  - ".join(problems[:_MAX_LISTED])
            more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise DataSetError(f"image set {self.source} failed validation ({len(problems)} problem(s)):\n  - {listed}{more}")
        report = ValidationReport(
            n_images=len(self.records),
            classes=self.classes,
            images_per_class=dict(Counter(r.label for r in self.records)),
            groups_per_class=groups,
            channel_names=tuple(channel_names),
            shapes=shapes,
            dtypes=dtypes,
        )
        report.warnings = _shortcut_warnings(self.records, shapes, dtypes)
        for message in report.warnings:
            warnings.warn(message, UserWarning, stacklevel=2)
        return report


def _read_manifest(csv: Path):
    """The manifest as a string table; an empty or malformed file is a DataSetError naming it."""
    import pandas as pd

    if csv.stat().st_size == 0:
        raise DataSetError(f"manifest {csv} is empty (0 bytes); it needs a header line (path,label[,group]) and one row per image")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataSetError(f"manifest {csv} is not a readable CSV file: {type(exc).__name__}: {exc}") from None
    if table.empty:
        raise DataSetError(f"manifest {csv} has a header {list(table.columns)} but no rows; add one row per image")
    return table


def _is_image(path: Path) -> bool:
    """An image file, or an image stored as a folder (OME-Zarr) that is not inside another one."""
    name = path.name.lower()
    if name.startswith(".") or not name.endswith(supported_suffixes()):
        return False
    if any(p.suffix.lower() in FOLDER_FORMATS for p in path.parents):
        return False
    return path.is_dir() if path.suffix.lower() in FOLDER_FORMATS else path.is_file()


def _rel_id(path: Path | ImageURL, root: Path | ImageURL) -> str:
    if isinstance(path, ImageURL):
        rel = str(path)[len(str(root).rstrip("/")) + 1 :] if path.is_relative_to(root) else path.name
    else:
        rel = path.relative_to(root).as_posix()
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", path.suffix):
        if suffix and rel.lower().endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def _collapsed_url(root: Path) -> None:
    """Raise when a missing folder is a URL that became a local path (``s3://b/x`` -> ``s3:/b/x``)."""
    found = re.search(r"(?:^|/)([A-Za-z][A-Za-z0-9+.-]*):/", root.as_posix())
    if root.exists() or found is None:
        return
    from fsspec.registry import known_implementations

    if found.group(1).lower() in known_implementations:
        raise DataSetError(f"image folder {root} looks like a {found.group(1)}:// URL read as a local path; a folder "
                           "URL is listed by ImageSet.from_folder('scheme://...') given as a string, and on the "
                           "command line or in a config the images go in a manifest whose path column holds URLs")


def _url_folder_files(root: ImageURL) -> dict[str, list[ImageURL]]:
    """{class: image URLs} below the class folders of a folder URL, listed with fsspec."""
    fs, base = root.filesystem()
    try:
        if not fs.isdir(base):
            raise DataSetError(f"image folder {root} does not exist or is not a folder")
        entries = fs.ls(base, detail=True)
    except DataSetError:
        raise
    except Exception as exc:  # a driver's own errors: permissions, network, credentials
        raise DataSetError(f"image folder {root} cannot be listed: {type(exc).__name__}: {exc}") from None
    base = base.rstrip("/")
    files: dict[str, list[ImageURL]] = {}
    for entry in sorted(entries, key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or name.startswith("."):
            continue
        found = fs.find(entry["name"], withdirs=True, detail=True)
        urls = []
        for where, info in found.items():
            rel = where.rstrip("/")[len(base) + 1 :] if where.startswith(base + "/") else None
            parts = rel.split("/") if rel else []
            if len(parts) < 2 or any(p.startswith(".") for p in parts):
                continue
            if any(p.lower().endswith(FOLDER_FORMATS) for p in parts[:-1]) or not parts[-1].lower().endswith(supported_suffixes()):
                continue  # inside an OME-Zarr folder, or not an image
            is_folder = parts[-1].lower().endswith(FOLDER_FORMATS)
            if is_folder == (info.get("type") == "directory"):
                urls.append(root.joinpath(rel))
        files[name] = sorted(urls)
    return files


def _grouped_records(label: str, paths: list[Path], root: Path, pattern: str) -> list[ImageRecord]:
    by_key: dict[tuple[Path, str], dict[str, Path]] = defaultdict(dict)
    for p in paths:
        m = re.match(pattern, p.name)
        if not m:
            raise DataSetError(f"file {p} does not match the channel file pattern {pattern!r}")
        by_key[(p.parent, m["key"])][m["channel"]] = p
    natural = lambda c: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", c)]  # noqa: E731  Ch2 before Ch10
    channels = sorted({c for chans in by_key.values() for c in chans}, key=natural)
    records = []
    for (parent, key), chans in sorted(by_key.items()):
        missing = [c for c in channels if c not in chans]
        if missing:
            raise DataSetError(f"image {key!r} in {parent} lacks channel file(s) {missing} (found {sorted(chans)})")
        image_id = f"{_rel_id(parent, root)}/{key}"
        records.append(
            ImageRecord(image_id=image_id, label=label, group=image_id, channel_paths=tuple((c, chans[c]) for c in channels))
        )
    return records


def _manifest_record(row, i, csv, path_column, channel_cols, label_column, group_column, reserved) -> ImageRecord:
    line = i + 2  # header is line 1
    label = row[label_column].strip()
    if not label:
        raise DataSetError(f"manifest {csv}, line {line}: empty value in column {label_column!r}")

    def resolve(column: str) -> Path | ImageURL:
        value = row[column].strip()
        if not value:
            raise DataSetError(f"manifest {csv}, line {line}: empty value in column {column!r}")
        if is_url(value):  # kept as given: read through fsspec wherever the image is read
            return ImageURL(value, origin=f"manifest {csv}, line {line}, column {column!r}")
        p = Path(value)
        return p if p.is_absolute() else csv.parent / p

    meta = {k: v for k, v in row.items() if k not in reserved}
    if path_column in row and (row[path_column].strip() or not channel_cols):
        path = resolve(path_column)
        image_id = str(row.get("image_id") or _rel_id(path, csv.parent if path.is_relative_to(csv.parent) else path.parent))
        rec = dict(path=path)
    else:
        chans = tuple((c[len(path_column) + 1 :], resolve(c)) for c in channel_cols)
        image_id = str(row.get("image_id") or _rel_id(chans[0][1], chans[0][1].parent))
        rec = dict(channel_paths=chans)
    group = (row.get(group_column) or "").strip() if group_column else ""
    return ImageRecord(image_id=image_id, label=label, group=group or image_id, metadata=meta, **rec)


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    import numpy as np

    return int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize


def _too_few_classes(classes: list[str], min_classes: int) -> list[str]:
    if len(classes) >= min_classes:
        return []
    return [f"{len(classes)} class(es) {classes} but a classifier needs at least {min_classes}: add images of "
            "another class (a folder per class, or the manifest's label column)"]


def _smaller_than_patch(records: Sequence[ImageRecord], shapes: dict, patch_size: int | None) -> list[str]:
    if patch_size is None:
        return []
    return [f"{r.display}: image is {shapes[r.image_id][2]}x{shapes[r.image_id][3]} px (Y x X), smaller than "
            f"patches.size={patch_size}; lower patches.size or leave the image out"
            for r in records if r.image_id in shapes and min(shapes[r.image_id][2:]) < patch_size]


def _duplicate_paths(records: Sequence[ImageRecord]) -> list[str]:
    seen: dict[Path, str] = {}
    problems = []
    for r in records:
        for f in r.files:
            key = f.resolve()
            if key in seen:
                problems.append(f"{f}: duplicate path (also used by image {seen[key]!r})")
            seen[key] = r.image_id
    ids = Counter(r.image_id for r in records)
    problems += [f"image id {k!r} occurs {n} times" for k, n in ids.items() if n > 1]
    return problems


def _check_files(record: ImageRecord) -> list[str]:
    problems = []
    for f in record.files:
        if isinstance(f, ImageURL):  # the filesystem's exists (and the file's kind and size)
            try:
                check_url(f)
            except Exception as exc:
                problems.append(f"{f}: {exc}")
        elif not f.exists():
            problems.append(f"{f}: file does not exist")
        elif f.suffix.lower() in FOLDER_FORMATS:  # an image stored as a folder: its reader checks it
            continue
        elif not f.is_file():
            problems.append(f"{f}: not a file")
        elif f.stat().st_size == 0:
            problems.append(f"{f}: zero-byte file")
    return problems


def _channel_consistency(records: Sequence[ImageRecord], names: dict[str, tuple[str, ...]]) -> list[str]:
    if not names:
        return []
    ref_id, ref = next(iter(names.items()))
    by_id = {r.image_id: r for r in records}
    problems = []
    for image_id, n in names.items():
        if len(n) != len(ref):
            problems.append(f"{by_id[image_id].display}: {len(n)} channels {list(n)}, but {by_id[ref_id].display} has {len(ref)} {list(ref)}")
        elif n != ref:
            problems.append(f"{by_id[image_id].display}: channel names {list(n)} differ from {list(ref)} of {by_id[ref_id].display}")
    return problems


def _groups_per_class(records: Sequence[ImageRecord]) -> dict[str, int]:
    groups: dict[str, set[str]] = defaultdict(set)
    for r in records:
        groups[r.label].add(r.group)
    return {k: len(v) for k, v in sorted(groups.items())}


def _shortcut_warnings(records: Sequence[ImageRecord], shapes: dict, dtypes: dict) -> list[str]:
    """Warn where image size or bit depth separates classes: a model can learn that instead of biology."""
    out = []
    for what, values in (("image size (Y, X)", {k: v[2:] for k, v in shapes.items()}), ("bit depth", dtypes)):
        per_class: dict[str, set] = defaultdict(set)
        for r in records:
            if r.image_id in values:
                per_class[r.label].add(values[r.image_id])
        sets = list(per_class.values())
        distinct = set().union(*sets) if sets else set()
        if len(per_class) > 1 and len(distinct) > 1 and all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :]):
            detail = "; ".join(f"{k}: {sorted(map(str, v))}" for k, v in per_class.items())
            out.append(f"{what} differs systematically between classes ({detail}); a model can learn this shortcut")
    return out
