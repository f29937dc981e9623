"""Montages of single-cell tiles: cutting in fill order, padding and duplicate rejection, the
per-cell folder with its manifest, and the ``cytofuse montage`` command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from typer.testing import CliRunner

from cytofuse.cli import app
from cytofuse.io.imagesets import ImageSet
from cytofuse.errors import InputError, RunFolderError
from cytofuse.io.readers import read_image
from cytofuse.io.montage import (
    cut_montage,
    padding_kind,
    parse_channel_map,
    read_counts,
    tile_status,
    write_montage_cells,
)
from cytofuse.runs import MARKER

T, ROWS, COLS = 6, 3, 4  # 6 px tiles, 3 x 4 grid: 12 tiles per montage
N_CELLS = 7  # tiles 0-5 and 7 are cells; 6 repeats 2; 8-11 are padding


def _cell(rng: np.random.Generator, channels: int = 2) -> np.ndarray:
    return rng.integers(100, 4000, size=(channels, T, T), dtype=np.uint16)


def _tiles(seed: int = 0) -> np.ndarray:
    """12 tiles (N, C, T, T) in fill order: 6 cells, a copy of tile 2, a cell, then padding:
    blank (0), stripes along rows, stripes along columns, blank (a constant 300)."""
    rng = np.random.default_rng(seed)
    tiles = [_cell(rng) for _ in range(6)]
    tiles += [tiles[2].copy(), _cell(rng), np.zeros((2, T, T), np.uint16)]
    tiles.append(np.broadcast_to(rng.integers(0, 500, size=(2, 1, T), dtype=np.uint16), (2, T, T)).copy())
    tiles.append(np.broadcast_to(rng.integers(0, 500, size=(2, T, 1), dtype=np.uint16), (2, T, T)).copy())
    tiles.append(np.full((2, T, T), 300, np.uint16))
    return np.stack(tiles)


def _assemble(tiles: np.ndarray, order: str = "column") -> np.ndarray:
    """A (C, ROWS*T, COLS*T) montage with tile k at grid (k % ROWS, k // ROWS) (column) or (k // COLS, k % COLS)."""
    montage = np.zeros((tiles.shape[1], ROWS * T, COLS * T), np.uint16)
    for k, tile in enumerate(tiles):
        r, c = (k % ROWS, k // ROWS) if order == "column" else (k // COLS, k % COLS)
        montage[:, r * T:(r + 1) * T, c * T:(c + 1) * T] = tile
    return montage


def _write_class(folder, montage: np.ndarray, key: str = "A") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, plane in enumerate(montage):
        tifffile.imwrite(folder / f"Ch{i + 3}_{key}.tif", plane)


@pytest.fixture
def montages(tmp_path):
    """Two classes, one montage each (channels Ch3, Ch4, one file per channel), filled column by column."""
    root = tmp_path / "montages"
    _write_class(root / "cycling", _assemble(_tiles(0)))
    _write_class(root / "resting", _assemble(_tiles(1)))
    return root


def _files(root) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("order", ["column", "row"])
def test_cut_montage_follows_the_fill_order_by_content(order):
    tiles = _tiles()
    montage = _assemble(tiles, order)[:, None]
    cut = cut_montage(montage, tile_size=T, order=order)
    assert cut.tiles.shape == (12, 2, 1, T, T)
    np.testing.assert_array_equal(cut.tiles[:, :, 0], tiles)
    # the second tile sits below the first (column order) or to its right (row order)
    r, c = (1, 0) if order == "column" else (0, 1)
    np.testing.assert_array_equal(cut.tiles[1, :, 0], montage[:, 0, r * T:(r + 1) * T, c * T:(c + 1) * T])
    assert (cut.rows[1], cut.cols[1]) == (r, c)
    assert (cut.rows[11], cut.cols[11]) == (ROWS - 1, COLS - 1)


def test_padding_kind_blank_and_striped_tiles():
    kind = padding_kind(_tiles()[:, :, None])
    assert kind.tolist() == [""] * 8 + ["blank", "stripes", "stripes", "blank"]


def test_a_tile_striped_in_one_channel_only_is_a_cell():
    tile = _tiles()[9].copy()
    tile[1] = _cell(np.random.default_rng(5), channels=1)[0]
    assert padding_kind(tile[None, :, None]).tolist() == [""]


def test_tile_status_rejects_padding_and_repeated_tiles():
    tiles = _tiles()
    tiles[10] = tiles[9]  # repeated padding stays padding
    status = tile_status(tiles[:, :, None])
    assert status.tolist() == ["cell"] * 6 + ["duplicate", "cell", "blank", "stripes", "stripes", "blank"]


def test_parse_channel_map():
    assert parse_channel_map("Ch3=BF, Ch4=DNA,Ch6=DF") == {"Ch3": "BF", "Ch4": "DNA", "Ch6": "DF"}
    assert parse_channel_map(None) == {}
    with pytest.raises(InputError, match="OLD=NEW pairs.*'Ch3:BF'"):
        parse_channel_map("Ch3:BF")
    with pytest.raises(InputError, match="twice"):
        parse_channel_map("Ch3=BF,Ch4=BF")


def test_read_counts_yaml_and_csv(tmp_path):
    (tmp_path / "c.yaml").write_text("cycling: 5\nresting/A: 3\n")
    (tmp_path / "c.csv").write_text("name,count\ncycling,5\nresting/A,3\n")
    assert read_counts(tmp_path / "c.yaml") == read_counts(tmp_path / "c.csv") == {"cycling": 5, "resting/A": 3}
    (tmp_path / "bad.yaml").write_text("cycling: -2\n")
    with pytest.raises(InputError, match=r"bad.yaml, 'cycling': count must be a positive whole number, got -2"):
        read_counts(tmp_path / "bad.yaml")
    (tmp_path / "bad.csv").write_text("class,n\ncycling,5\n")
    with pytest.raises(InputError, match="needs columns 'name' and 'count'"):
        read_counts(tmp_path / "bad.csv")


# --------------------------------------------------------------------------- folders


def test_folder_of_montages_to_cells_and_manifest(montages, tmp_path):
    before = _files(montages)
    out = tmp_path / "cells"
    summary = write_montage_cells(montages, out, tile_size=T, channels={"Ch3": "BF", "Ch4": "DF"})
    assert _files(montages) == before  # the input is read only
    assert [(s.label, s.tiles, s.seen, s.cells, s.padding, s.duplicates, s.ignored) for s in summary] == [
        ("cycling", 12, 12, N_CELLS, 4, 1, 0), ("resting", 12, 12, N_CELLS, 4, 1, 0)]
    assert sorted(p.name for p in (out / "cycling").iterdir()) == [f"cell_{i:04d}.ome.tif" for i in (0, 1, 2, 3, 4, 5, 7)]
    cell = read_image(out / "cycling" / "cell_0007.ome.tif")
    assert cell.channel_names == ("BF", "DF") and cell.shape == (2, 1, T, T)
    np.testing.assert_array_equal(cell.data[:, 0], _tiles(0)[7])
    manifest = pd.read_csv(out / "cells.csv")
    assert len(manifest) == 2 * N_CELLS and (out / MARKER).is_file()
    row = manifest.iloc[6].to_dict()
    assert row == {"path": "cycling/cell_0007.ome.tif", "label": "cycling", "group": "cycling/cell_0007",
                   "montage": "cycling/A", "tile_index": 7, "tile_row": 1, "tile_col": 2}
    image_set = ImageSet.from_manifest(out / "cells.csv")
    report = image_set.validate(n_folds=5)
    assert report.groups_per_class == {"cycling": N_CELLS, "resting": N_CELLS} and report.channel_names == ("BF", "DF")


def test_count_per_file_and_counts_per_folder_spanning_montages(montages, tmp_path):
    _write_class(montages / "resting", _assemble(_tiles(2)), key="B")  # resting: montages A then B, 24 tiles
    summary = write_montage_cells(montages, tmp_path / "a", tile_size=T, count=3)
    assert [(s.label, s.seen, s.ignored, s.cells) for s in summary] == [("cycling", 3, 9, 3), ("resting", 6, 18, 6)]
    summary = write_montage_cells(montages, tmp_path / "b", tile_size=T, counts={"resting": 14, "cycling/A": 7})
    assert [(s.label, s.seen, s.cells, s.duplicates, s.padding) for s in summary] == [
        ("cycling", 7, 6, 1, 0), ("resting", 14, 9, 1, 4)]
    names = sorted(p.name for p in (tmp_path / "b" / "resting").iterdir())
    assert names[-2:] == ["cell_0012.ome.tif", "cell_0013.ome.tif"]  # tiles 0 and 1 of montage B
    np.testing.assert_array_equal(read_image(tmp_path / "b" / "resting" / "cell_0013.ome.tif").data[:, 0], _tiles(2)[1])


def test_without_a_count_padding_decides_and_wrong_order_is_reported(montages, tmp_path):
    summary = write_montage_cells(montages, tmp_path / "rows", tile_size=T, order="row")
    # read row by row, the column-filled montage puts padding (grid column 3) between cells
    assert [s.cells_after_padding for s in summary] == [4, 4]
    assert write_montage_cells(montages, tmp_path / "cols", tile_size=T)[0].cells_after_padding == 0


def test_single_montage_file(tmp_path):
    folder = tmp_path / "Anaphase"
    folder.mkdir()
    tifffile.imwrite(folder / "Ch3_X.tif", _assemble(_tiles())[0])
    summary = write_montage_cells(folder / "Ch3_X.tif", tmp_path / "cells", tile_size=T, channels={"Ch3": "BF"})
    assert [(s.label, s.cells, s.padding, s.duplicates) for s in summary] == [("Anaphase", N_CELLS, 4, 1)]
    assert read_image(tmp_path / "cells" / "Anaphase" / "cell_0000.ome.tif").channel_names == ("BF",)


# --------------------------------------------------------------------------- errors and the output folder


def test_errors_name_the_file_and_value(montages, tmp_path):
    out = tmp_path / "cells"
    with pytest.raises(InputError, match=r"Ch3_A.tif of size \(Y, X\) = \(18, 24\) is not a multiple of tile_size \(5, 5\)"):
        write_montage_cells(montages, out, tile_size=5)
    with pytest.raises(InputError, match=r"count 13 \(--count / --counts\) is more than the 12 tiles of montage .*Ch3_A.tif"):
        write_montage_cells(montages, out, tile_size=T, count=13)
    with pytest.raises(InputError, match=r"count 25 .* more than the 12 tiles of class folder 'cycling'"):
        write_montage_cells(montages, out, tile_size=T, counts={"cycling": 25})
    with pytest.raises(InputError, match=r"--channels names \['Ch5'\], which .*Ch3_A.tif does not have; its channels are \['Ch3', 'Ch4'\]"):
        write_montage_cells(montages, out, tile_size=T, channels={"Ch5": "BF"})
    with pytest.raises(InputError, match=r"--counts names \['G1'\], which are neither classes"):
        write_montage_cells(montages, out, tile_size=T, counts={"G1": 3})
    with pytest.raises(InputError, match="give --count or --counts, not both"):
        write_montage_cells(montages, out, tile_size=T, count=3, counts={"cycling": 3})
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["montages"]  # no partial folder left


def test_channels_of_different_shapes(montages, tmp_path):
    tifffile.imwrite(montages / "resting" / "Ch4_A.tif", np.ones((18, 30), np.uint16))
    with pytest.raises(InputError, match=r"resting/Ch4_A.tif has shape \(1, 1, 18, 30\).*Ch3_A.tif has \(1, 1, 18, 24\)"):
        write_montage_cells(montages, tmp_path / "cells", tile_size=T)


def test_existing_output_replaced_only_with_overwrite_and_only_if_cytofuse_made_it(montages, tmp_path):
    out = tmp_path / "cells"
    write_montage_cells(montages, out, tile_size=T)
    with pytest.raises(RunFolderError, match="cell folder .*cells exists; pass --overwrite"):
        write_montage_cells(montages, out, tile_size=T, count=2)
    write_montage_cells(montages, out, tile_size=T, count=2, overwrite=True)
    assert len(pd.read_csv(out / "cells.csv")) == 4 and not (out / "cycling" / "cell_0005.ome.tif").exists()
    with pytest.raises(InputError, match="Ch9"):  # fails while writing: the old folder stays as it was
        write_montage_cells(montages, out, tile_size=T, overwrite=True, channels={"Ch9": "BF"})
    assert len(pd.read_csv(out / "cells.csv")) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["cells", "montages"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(RunFolderError, match=r"mine exists and is not a cytofuse cell folder \(it has no .cytofuse-run marker\)"):
        write_montage_cells(montages, mine, tile_size=T, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(RunFolderError, match="overlaps the montage input"):
        write_montage_cells(montages, montages / "cells", tile_size=T)


def test_cli_montage(montages, tmp_path):
    out = tmp_path / "cells"
    result = CliRunner().invoke(app, ["montage", str(montages), "--out", str(out), "--tile", str(T),
                                      "--channels", "Ch3=BF,Ch4=DF"])
    assert result.exit_code == 0, result.output
    assert f"{2 * N_CELLS} cells written" in result.output
    assert "cycling" in result.output and len(pd.read_csv(out / "cells.csv")) == 2 * N_CELLS
    result = CliRunner().invoke(app, ["montage", str(montages), "--out", str(tmp_path / "x"), "--tile", str(T),
                                      "--channels", "Ch9=BF"])
    assert result.exit_code == 2 and "Ch9" in result.output
    result = CliRunner().invoke(app, ["montage", str(montages), "--out", str(tmp_path / "x"), "--tile", str(T),
                                      "--order", "diagonal"])
    assert result.exit_code == 2 and "--order must be column or row, got 'diagonal'" in result.output


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.realdata
def test_real_jurkat_anaphase_has_15_cells(real_data, tmp_path):
    folder = real_data / "jurkat-cellcycle-ifc" / "Experiment_1" / "Anaphase"
    if not folder.is_dir():
        pytest.skip(f"Jurkat Anaphase montages not found at {folder}")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "Anaphase").symlink_to(folder)
    summary = write_montage_cells(tmp_path / "in", tmp_path / "cells", tile_size=40,
                                  channels={"Ch3": "BF", "Ch4": "DNA", "Ch6": "DF"})
    assert [(s.tiles, s.cells, s.duplicates, s.padding) for s in summary] == [(900, 15, 1, 884)]
    manifest = pd.read_csv(tmp_path / "cells" / "cells.csv")
    assert manifest["tile_index"].tolist() == list(range(15))
    cut = cut_montage(ImageSet.from_folder(tmp_path / "in").read("Anaphase/CP0001").data, tile_size=40)
    np.testing.assert_array_equal(cut.tiles[15], cut.tiles[12])  # the rejected 16th tile repeats the 13th
    cell = read_image(tmp_path / "cells" / "Anaphase" / "cell_0014.ome.tif")
    assert cell.channel_names == ("BF", "DNA", "DF") and cell.shape == (3, 1, 40, 40)
