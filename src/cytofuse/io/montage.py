"""Imaging flow cytometry montages cut into one image per cell.

Such exports store cells as montages: a grid of equal tiles, one cell per tile, filled column
by column (or row by row), one file per channel. The tiles after the last cell are padding:
blank, striped, or a copy of another tile.

- :func:`cut_montage`: a (C, Z, Y, X) montage -> its tiles in fill order with their grid positions.
- :func:`padding_kind` / :func:`tile_status`: which tiles are cells, padding or duplicates.
- :func:`parse_channel_map` / :func:`read_counts`: the command's ``--channels`` and ``--counts``.
- :func:`write_montage_cells`: a folder of montages (or one file) -> ``<class>/cell_<i>.ome.tif``
  and a ``cells.csv`` manifest.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cytofuse.errors import InputError, RunFolderError
from cytofuse.io.readers import Image, montage_tiles

MANIFEST = "cells.csv"
SUMMARY = "montage_summary.csv"
_CHANNEL_FILE = re.compile(r"^(?P<channel>Ch\d+)_.+")


@dataclass(frozen=True)
class MontageTiles:
    """The tiles of one montage in fill order, (N, C, Z, tile_y, tile_x), and each tile's grid row and column."""

    tiles: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def cut_montage(
    montage: np.ndarray,
    *,
    tile_size: int | tuple[int, int],
    order: Literal["column", "row"] = "column",
    source: str = "<array>",
) -> MontageTiles:
    """Every tile of a (C, Z, Y, X) montage, in fill order (``column``: down the first column first)."""
    tiles = montage_tiles(montage, tile_size=tile_size, order=order, source=source)
    n_rows = montage.shape[2] // tiles.shape[-2]
    n_cols = montage.shape[3] // tiles.shape[-1]
    index = np.arange(len(tiles))
    if order == "column":
        return MontageTiles(tiles, index % n_rows, index // n_rows)
    return MontageTiles(tiles, index // n_cols, index % n_cols)


def padding_kind(tiles: np.ndarray) -> np.ndarray:
    """Per tile of (N, C, Z, tile_y, tile_x): ``"blank"`` when every channel is constant, ``"stripes"``
    when every channel has all rows (or all columns) identical, else ``""`` (not padding)."""
    def same(reference: np.ndarray) -> np.ndarray:  # (N, C): the channel equals the reference everywhere
        return (tiles == reference).all(axis=(2, 3, 4))

    striped = (same(tiles[..., :1, :]) | same(tiles[..., :, :1])).all(axis=1)
    kind = np.where(striped, "stripes", "")
    kind[same(tiles[..., :1, :1]).all(axis=1)] = "blank"
    return kind.astype("<U7")


def tile_status(tiles: np.ndarray) -> np.ndarray:
    """Per tile of (N, C, Z, tile_y, tile_x): ``"cell"``, ``"blank"``, ``"stripes"`` or ``"duplicate"``
    (a pixel-for-pixel copy, in every channel, of an earlier tile that is not padding)."""
    status = padding_kind(tiles).astype("<U9")
    status[status == ""] = "cell"
    seen: set[bytes] = set()
    for i in np.flatnonzero(status == "cell"):
        key = tiles[i].tobytes()
        if key in seen:
            status[i] = "duplicate"
        seen.add(key)
    return status


def parse_channel_map(text: str | None) -> dict[str, str]:
    """``"Ch3=BF,Ch4=DNA"`` -> ``{"Ch3": "BF", "Ch4": "DNA"}`` (``--channels``)."""
    if not text:
        return {}
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise InputError(f"--channels must be OLD=NEW pairs separated by commas, e.g. Ch3=BF,Ch6=DF; got {text!r}")
    mapping = {old.strip(): new.strip() for old, new in pairs}
    if len(mapping) != len(pairs) or len(set(mapping.values())) != len(mapping):
        raise InputError(f"--channels names a channel twice, old or new; got {text!r}")
    return mapping


def rename_channels(names: Sequence[str], mapping: Mapping[str, str], *, source: str) -> tuple[str, ...]:
    """``names`` with those in ``mapping`` replaced; an unknown old name is an error naming ``source``."""
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise InputError(f"--channels names {unknown}, which {source} does not have; its channels are {list(names)}")
    renamed = tuple(mapping.get(name, name) for name in names)
    if len(set(renamed)) != len(renamed):
        raise InputError(f"--channels gives {source} duplicate channel names {list(renamed)}")
    return renamed


def read_counts(path: str | Path) -> dict[str, int]:
    """Cells per class folder or per montage from YAML (``name: count``) or CSV (columns ``name,count``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--counts file {path} does not exist")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise InputError(f"--counts file {path} must hold a mapping name: count, got {type(raw).__name__}")
    else:
        import pandas as pd

        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if not {"name", "count"} <= set(table.columns):
            raise InputError(f"--counts file {path} needs columns 'name' and 'count'; it has {list(table.columns)}")
        raw = dict(zip(table["name"], table["count"]))
    return {str(name): _positive_int(value, f"--counts file {path}, {name!r}") for name, value in raw.items()}


def _positive_int(value: object, what: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number < 1 or isinstance(value, (bool, float)):
        raise InputError(f"{what}: count must be a positive whole number, got {value!r}")
    return number


# --------------------------------------------------------------------------- montages on disk


@dataclass(frozen=True)
class Montage:
    """One montage to read: its class, its id (relative to the input) and how to read it."""

    label: str
    montage_id: str
    read: Callable[[], Image]


def find_montages(input_path: str | Path) -> list[Montage]:
    """Montages of a folder (one sub-folder per class, read as by ``ImageSet.from_folder``) or of one file
    (its class is its folder's name; a ``Ch<n>_`` file name names its single channel)."""
    from cytofuse.io.imagesets import ImageSet

    path = Path(input_path)
    if path.is_dir():
        image_set = ImageSet.from_folder(path)
        return [Montage(r.label, r.image_id, lambda r=r: image_set.read(r)) for r in image_set]
    if not path.is_file():
        raise InputError(f"montage input {path} does not exist")
    match = _CHANNEL_FILE.match(path.name)
    names = [match["channel"]] if match else None
    return [Montage(path.resolve().parent.name, path.name, lambda: _read_single(path, names))]


def _read_single(path: Path, names: list[str] | None) -> Image:
    from cytofuse.io.readers import probe_image, read_image

    if names is not None and probe_image(path).shape[0] != 1:
        names = None  # a multichannel file keeps the names it stores
    return read_image(path, channel_names=names)


def resolve_counts(
    montages: Sequence[Montage], *, count: int | None = None, counts: Mapping[str, int] | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """Tile limits per montage id and per class: ``count`` applies to every montage, ``counts`` maps a
    class (its folder: first N tiles over its montages in order) or a montage id to its limit."""
    if count is not None and counts is not None:
        raise InputError(f"give --count or --counts, not both; got --count {count} and a --counts file")
    if count is not None:
        return {m.montage_id: _positive_int(count, "--count") for m in montages}, {}
    counts = dict(counts or {})
    labels, ids = {m.label for m in montages}, {m.montage_id for m in montages}
    unknown = sorted(set(counts) - labels - ids)
    if unknown:
        raise InputError(f"--counts names {unknown}, which are neither classes {sorted(labels)} nor montages {sorted(ids)}")
    return {k: v for k, v in counts.items() if k in ids}, {k: v for k, v in counts.items() if k in labels}


@dataclass(frozen=True)
class ClassSummary:
    """What happened to the tiles of one class: ``seen`` are the tiles within the count."""

    label: str
    montages: int
    tiles: int
    ignored: int
    seen: int
    padding: int
    duplicates: int
    cells: int
    cells_after_padding: int


@dataclass(frozen=True)
class _Part:
    """One montage of a class, cut: its first ``used`` tiles are examined, the rest ignored."""

    montage: Montage
    source: str
    grid: MontageTiles
    used: int
    channel_names: tuple[str, ...]
    pixel_size_um: tuple


def _cut_class(montages: Sequence[Montage], *, tile_size: int | tuple[int, int], order: str,
               file_limits: Mapping[str, int], class_limit: int | None, channel_map: Mapping[str, str]) -> list[_Part]:
    parts = []
    for m in montages:
        image = m.read()
        grid = cut_montage(image.data, tile_size=tile_size, order=order, source=image.source)  # type: ignore[arg-type]
        used = _within(file_limits.get(m.montage_id), len(grid.tiles), f"montage {image.source}")
        names = rename_channels(image.channel_names, channel_map, source=image.source)
        parts.append(_Part(m, image.source, grid, used, names, image.pixel_size_um))
    if class_limit is None:
        return parts
    left = _within(class_limit, sum(p.used for p in parts), f"class folder {montages[0].label!r} ({len(parts)} montage(s))")
    trimmed = []
    for part in parts:
        trimmed.append(dataclasses.replace(part, used=min(part.used, left)))
        left -= trimmed[-1].used
    return trimmed


def _within(limit: int | None, available: int, what: str) -> int:
    if limit is not None and limit > available:
        raise InputError(f"count {limit} (--count / --counts) is more than the {available} tiles of {what}")
    return available if limit is None else limit


def _class_summary(label: str, parts: Sequence[_Part], status: np.ndarray) -> ClassSummary:
    after, start = 0, 0
    for part in parts:  # a cell after padding in its own montage hints at the wrong --order
        own = status[start:start + part.used]
        padding = np.flatnonzero((own == "blank") | (own == "stripes"))
        after += int((own[padding[0]:] == "cell").sum()) if len(padding) else 0
        start += part.used
    tiles = sum(len(p.grid.tiles) for p in parts)
    return ClassSummary(
        label, len(parts), tiles, tiles - len(status), len(status), int(np.isin(status, ("blank", "stripes")).sum()),
        int((status == "duplicate").sum()), int((status == "cell").sum()), after)


def _write_class(label: str, parts: Sequence[_Part], out: Path) -> tuple[list[dict], ClassSummary]:
    """Write the cell tiles of one class to ``out/<label>/``; manifest rows and the class summary."""
    from cytofuse.io.readers import write_ome_tiff

    status = tile_status(np.concatenate([p.grid.tiles[: p.used] for p in parts]))
    width = max(4, len(str(sum(len(p.grid.tiles) for p in parts) - 1)))
    (out / label).mkdir(parents=True)
    rows, offset, start = [], 0, 0
    for part in parts:
        for i in np.flatnonzero(status[start:start + part.used] == "cell"):
            name = f"cell_{offset + i:0{width}d}"
            image = Image(np.ascontiguousarray(part.grid.tiles[i]), part.channel_names, part.pixel_size_um,
                          f"{part.source}#{i}")
            write_ome_tiff(out / label / f"{name}.ome.tif", image)
            rows.append({"path": f"{label}/{name}.ome.tif", "label": label, "group": f"{label}/{name}",
                         "montage": part.montage.montage_id, "tile_index": int(i),
                         "tile_row": int(part.grid.rows[i]), "tile_col": int(part.grid.cols[i])})
        offset, start = offset + len(part.grid.tiles), start + part.used
    return rows, _class_summary(label, parts, status)


def write_montage_cells(
    input_path: str | Path,
    out: str | Path,
    *,
    tile_size: int | tuple[int, int],
    order: Literal["column", "row"] = "column",
    count: int | None = None,
    counts: Mapping[str, int] | None = None,
    channels: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> list[ClassSummary]:
    """Cut every montage of ``input_path`` into ``out/<class>/cell_<i>.ome.tif`` (C, 1, tile, tile), with a
    ``cells.csv`` manifest (path, label, group = the cell, montage, tile_index, tile_row, tile_col).

    Padding (blank or striped) and repeated tiles are not written; tiles beyond ``count`` /
    ``counts`` are not looked at. ``channels`` renames channels. ``out`` is written under a
    temporary name and renamed into place; an existing ``out`` is replaced only with
    ``overwrite`` and only when cytofuse made it.
    """
    import pandas as pd

    from cytofuse.runs import replacing_folder

    input_path, out = Path(input_path), Path(out)
    montages = find_montages(input_path)
    file_limits, class_limits = resolve_counts(montages, count=count, counts=counts)
    _check_no_overlap(out, input_path)
    with replacing_folder(out, overwrite=overwrite, what="cell folder") as tmp:
        rows, summary = _write_classes(montages, tmp, tile_size=tile_size, order=order, file_limits=file_limits,
                                       class_limits=class_limits, channel_map=dict(channels or {}))
        pd.DataFrame(rows, columns=["path", "label", "group", "montage", "tile_index", "tile_row", "tile_col"]
                     ).to_csv(tmp / MANIFEST, index=False)
        pd.DataFrame([dataclasses.asdict(s) for s in summary]).to_csv(tmp / SUMMARY, index=False)
    return summary


def _write_classes(montages: Sequence[Montage], tmp: Path, *, tile_size, order, file_limits, class_limits,
                   channel_map) -> tuple[list[dict], list[ClassSummary]]:
    rows, summary, names = [], [], None
    for label in sorted({m.label for m in montages}):
        parts = _cut_class([m for m in montages if m.label == label], tile_size=tile_size, order=order,
                           file_limits=file_limits, class_limit=class_limits.get(label), channel_map=channel_map)
        for part in parts:
            names = names or (part.channel_names, part.source)
            if part.channel_names != names[0]:
                raise InputError(f"montage {part.source} has channels {list(part.channel_names)}, but {names[1]} "
                                 f"has {list(names[0])}; every montage needs the same channels")
        class_rows, class_summary = _write_class(label, parts, tmp)
        rows += class_rows
        summary.append(class_summary)
    return rows, summary


def _check_no_overlap(out: Path, input_path: Path) -> None:
    """Refuse an ``out`` inside the input folder (it would be read as montages) or holding the input."""
    target, source = out.resolve(), input_path.resolve()
    if source.is_relative_to(target) or (source.is_dir() and target.is_relative_to(source)):
        raise RunFolderError(f"--out {out} overlaps the montage input {input_path}; choose a folder outside it")

