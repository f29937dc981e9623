"""Synthetic 2D cell images for two workflows that learn from one channel what another shows.

**Live/dead fields** (:func:`make_livedead_field`, :func:`write_livedead_set`): bright-field
(BF) fields of adherent cells with a paired propidium-iodide (PI) channel. PI enters dead cells
only and lights their nuclei; patch labels are meant to come from the PI mean, and a model
sees the BF only. Live cells are flat and spread with an irregular outline and a weak phase
halo; dead cells are round, smaller, with a bright rim and a dark centre. ``difficulty``
moves the dead cells' BF appearance toward the live one (1: no BF difference at all). Cell
states follow a smooth random field, so neighbouring cells tend to share a state and a
64-px patch is mostly live or mostly dead.

**Single cells** (:func:`make_single_cell`, :func:`write_single_cell_set`): imaging-flow tiles
of one cell in G1, G2 or M with BF, dark-field (DF) and a DNA stain. DNA carries the class
strongly (G2 and M hold twice the DNA of G1, M in a few condensed blobs); BF carries it
weakly (cell radius grows with DNA content, M is rounder) and DF weakly (granularity).
``difficulty`` shrinks the BF/DF differences only; the DNA channel keeps its 2N/4N signal.

Neither generator leaves an intensity shortcut: background level, gain, noise and
illumination gradient are drawn per image from one distribution, from a random stream that
neither the class nor the dead fraction touches, so one seed gives the same imaging
conditions for every class. Ground truth is in code (:data:`LIVE_LOOK`, :data:`DEAD_LOOK`,
:data:`DNA_CONTENT`, ...) and in the returned truth table / image metadata.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, special

from cytofuse.errors import InputError
from cytofuse.io.readers import Image, write_ome_tiff
from cytofuse.runs import replacing_folder

LIVEDEAD_CHANNELS = ("BF", "PI")
SINGLE_CELL_CHANNELS = ("BF", "DF", "DNA")
CELL_CYCLE_CLASSES = ("G1", "G2", "M")
DNA_CONTENT = {"G1": 1.0, "G2": 2.0, "M": 2.0}
"""DNA per cell relative to G1 (2N = 1, 4N = 2)."""
GRANULARITY = {"G1": 1.0, "G2": 1.2, "M": 1.5}
"""Dark-field granule density relative to G1 at difficulty 0."""


@dataclass(frozen=True)
class BFLook:
    """Bright-field appearance of a cell; contrasts are relative to the local background."""

    radius: float  # px at the default pixel size
    irregularity: float  # amplitude of the outline's harmonics, fraction of the radius
    body: float  # contrast of the cell body (negative: darker)
    halo: float  # bright phase halo just outside the edge
    rim: float  # bright rim just inside the edge
    centre: float  # contrast of the centre (negative: darker)
    texture: float  # amplitude of the granular texture inside the body


LIVE_LOOK = BFLook(radius=14.0, irregularity=0.16, body=-0.04, halo=0.03, rim=0.0, centre=0.0, texture=0.03)
DEAD_LOOK = BFLook(radius=9.5, irregularity=0.03, body=-0.03, halo=0.05, rim=0.10, centre=-0.10, texture=0.01)
# Per-cell spread of each field: log-normal sd for radius, irregularity and texture, normal sd
# for the contrasts (so a live cell may have a faint rim or a dark centre too).
_LOOK_SPREAD = np.array([0.2, 0.3, 0.015, 0.015, 0.05, 0.05, 0.3])
_LOG_NORMAL = np.array([True, True, False, False, False, False, True])
_HARMONICS = np.arange(2, 6)
_CELL_AREA = 1600.0  # field area per cell (px^2) when n_cells is not given
_STATE_SCALE = 16  # px per cell of the coarse grid of the state field
_STATE_NOISE = 0.05  # share of a cell's state variance that is independent of its neighbours


# --------------------------------------------------------------------------- validation


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not 0 <= value <= 1:
        raise InputError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_pixel_size(pixel_size_um) -> tuple[float, float, float]:
    if len(pixel_size_um) != 3 or any(not (isinstance(p, (int, float)) and p > 0) for p in pixel_size_um):
        raise InputError(f"pixel_size_um must be three positive sizes (z, y, x), got {pixel_size_um!r}")
    return tuple(float(p) for p in pixel_size_um)


def _check_field_args(shape, n_cells) -> tuple[tuple[int, int], int]:
    if len(shape) != 2 or any(isinstance(s, bool) or int(s) != s or s < 64 for s in shape):
        raise InputError(f"shape must be (Y, X) integers >= 64, got {shape!r}")
    shape = (int(shape[0]), int(shape[1]))
    if n_cells is None:
        return shape, max(1, round(shape[0] * shape[1] / _CELL_AREA))
    most = shape[0] * shape[1] // 400
    if isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer)) or not 0 <= n_cells <= most:
        raise InputError(f"n_cells must be an int in [0, Y*X/400] = [0, {most}], got {n_cells!r}")
    return shape, int(n_cells)


def _check_folder_name(name, what: str) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name:
        raise InputError(f"{what} must be a non-empty folder name without '/', got {name!r}")
    return name


# --------------------------------------------------------------------------- shared imaging


def _streams(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _expose(rng: np.random.Generator, photons: np.ndarray, *, gain: float, offset: float, read_sd: float) -> np.ndarray:
    """Poisson shot noise, gain, offset and Gaussian read noise; uint16 counts."""
    adu = rng.poisson(np.maximum(photons, 0)).astype(np.float32) * np.float32(gain)
    adu += np.float32(offset) + np.float32(read_sd) * rng.standard_normal(photons.shape, dtype=np.float32)
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def _box(center: np.ndarray, half: float, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The slice of a square box around ``center`` clipped to ``shape`` and its (dy, dx) grids."""
    lo = np.maximum(0, np.floor(center - half)).astype(int)
    hi = np.minimum(shape, np.ceil(center + half) + 1).astype(int)
    dy, dx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1]]
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1])), dy - center[0], dx - center[1]


# --------------------------------------------------------------------------- live/dead fields


def bf_look(dead: bool, difficulty: float) -> BFLook:
    """The mean BF look of a live or dead cell: dead moves toward live by ``difficulty``."""
    if not dead:
        return LIVE_LOOK
    live, far = np.array(astuple(LIVE_LOOK)), np.array(astuple(DEAD_LOOK))
    return BFLook(*(live + (1 - difficulty) * (far - live)).tolist())


def _place(rng: np.random.Generator, shape: tuple[int, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres (n, 2) y, x and per-cell look deviates (n, 7); spacing uses the live radius only."""
    deviates = rng.normal(0, 1, (n, len(_LOOK_SPREAD)))
    reach = LIVE_LOOK.radius * np.exp(_LOOK_SPREAD[0] * deviates[:, 0])
    centres = np.empty((0, 2))
    kept: list[int] = []
    for i in range(n):
        for _ in range(30):
            c = rng.uniform(0, 1, 2) * shape
            if np.all(np.hypot(*(centres - c).T) > 0.9 * (reach[kept] + reach[i])):
                centres = np.vstack([centres, c])
                kept.append(i)
                break
    return centres, deviates[kept]


def _dead_states(rng: np.random.Generator, shape: tuple[int, int], centres: np.ndarray, dead_fraction: float):
    """Dead where a smooth random field (correlation ~80 px) falls below its dead_fraction quantile."""
    coarse = ndimage.gaussian_filter(rng.normal(size=(shape[0] // _STATE_SCALE + 7, shape[1] // _STATE_SCALE + 7)), 3.5)
    coarse = (coarse - coarse[3:-3, 3:-3].mean()) / coarse[3:-3, 3:-3].std()
    field = ndimage.map_coordinates(coarse, (centres / _STATE_SCALE + 3).T, order=1) if len(centres) else np.empty(0)
    own = rng.normal(size=len(centres))
    state = np.sqrt(1 - _STATE_NOISE) * field + np.sqrt(_STATE_NOISE) * own
    return special.ndtr(state) < dead_fraction


def _cell_looks(deviates: np.ndarray, dead: np.ndarray, difficulty: float) -> np.ndarray:
    """(n, 7) per-cell BF parameters: the state's mean look spread by the cell's own deviates."""
    means = np.array([astuple(bf_look(bool(d), difficulty)) for d in dead]).reshape(deviates.shape)
    spread = deviates * _LOOK_SPREAD
    return np.where(_LOG_NORMAL, means * np.exp(spread), means + spread)


def _draw_cell(maps: dict, texture: np.ndarray, centre: np.ndarray, look: np.ndarray, outline: np.ndarray) -> float:
    """Add one cell's BF contrast and PI-relevant masks to ``maps``; returns its nucleus radius."""
    radius, irregular, body, halo, rim, dark, grain = look
    box, dy, dx = _box(centre, 1.6 * radius + 5, maps["bf"].shape)
    rho, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    wobble = np.cos(_HARMONICS[:, None, None] * theta + outline[1][:, None, None])
    edge = radius * (1 + irregular * np.tensordot(outline[0] / np.sqrt(_HARMONICS), wobble, 1))
    depth = edge - rho  # px inside the edge
    inside = _sigmoid(depth / 0.8)
    nucleus = 0.45 * radius
    maps["bf"][box] += (
        inside * (body + grain * texture[box])
        + halo * np.exp(-(((depth + 1.5) / 1.5) ** 2))
        + rim * np.exp(-(((depth - 1.5) / 1.5) ** 2))
        + dark * np.exp(-((rho / nucleus) ** 2))
    )
    maps["body"][box] = np.maximum(maps["body"][box], inside)
    return nucleus


def _pi_photons(rng: np.random.Generator, shape, centres, nuclei, dead, body) -> np.ndarray:
    """PI: bright dead nuclei with a wide faint bleed, weak autofluorescence of every cell."""
    level, auto = 300.0 * rng.lognormal(0, 0.2), rng.uniform(5, 20)
    stain = np.zeros(shape)
    for c, r in zip(centres[dead], nuclei[dead]):
        box, dy, dx = _box(c, r + 4, shape)
        stain[box] += rng.lognormal(0, 0.3) * _sigmoid((r - np.hypot(dy, dx)) / 0.7)
    stain = ndimage.gaussian_filter(stain, 1.0) + 0.2 * ndimage.gaussian_filter(stain, 6.0)
    return level * stain + auto * (1 + 0.15 * body)


def _bf_photons(rng: np.random.Generator, shape, contrast: np.ndarray) -> tuple[np.ndarray, dict]:
    """BF: a random background level with a random linear illumination gradient."""
    level, slope, angle = rng.uniform(400, 3000), rng.uniform(0, 0.2), rng.uniform(-np.pi, np.pi)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    ramp = ((yy - shape[0] / 2) * np.sin(angle) + (xx - shape[1] / 2) * np.cos(angle)) / max(shape)
    photons = level * (1 + slope * ramp) * (1 + ndimage.gaussian_filter(contrast, 0.7))
    return photons, {"bf_level": level, "bf_gradient": slope, "bf_gradient_angle": angle}


def make_livedead_field(
    *,
    shape: tuple[int, int] = (256, 256),
    n_cells: int | None = None,
    dead_fraction: float = 0.3,
    seed: int = 0,
    difficulty: float = 0.3,
    pixel_size_um: tuple[float, float, float] = (1.0, 0.65, 0.65),
) -> tuple[Image, pd.DataFrame]:
    """A 2D (Z = 1) uint16 field with channels ("BF", "PI") and its truth table.

    ``n_cells`` is the number of cells tried (default one per 1600 px^2; fewer when the field
    is crowded); ``dead_fraction`` the expected fraction of dead cells; ``difficulty`` in
    [0, 1] shrinks the BF difference of dead cells (1: none). The truth table has one row per
    cell: x, y, radius (px) and dead. For one seed, the positions, the imaging conditions and
    the state field are the same whatever ``dead_fraction`` and ``difficulty``, so raising the
    dead fraction only turns more cells dead. ``pixel_size_um`` is metadata only.
    """
    shape, n_cells = _check_field_args(shape, n_cells)
    dead_fraction, difficulty = _check_unit("dead_fraction", dead_fraction), _check_unit("difficulty", difficulty)
    pixel_size, seed = _check_pixel_size(pixel_size_um), _check_seed(seed)
    layout, state_rng, outline_rng, bf_rng, pi_rng, bf_noise, pi_noise = _streams(seed, 7)
    centres, deviates = _place(layout, shape, n_cells)
    dead = _dead_states(state_rng, shape, centres, dead_fraction)
    looks = _cell_looks(deviates, dead, difficulty)
    n = len(dead)
    outlines = np.stack([outline_rng.normal(size=(n, 4)), outline_rng.uniform(-np.pi, np.pi, (n, 4))], 1)
    texture = ndimage.gaussian_filter(layout.normal(size=shape), 1.0) * 2.5
    maps = {"bf": np.zeros(shape), "body": np.zeros(shape)}
    nuclei = np.array([_draw_cell(maps, texture, c, lk, o) for c, lk, o in zip(centres, looks, outlines)])
    bf, imaging = _bf_photons(bf_rng, shape, maps["bf"])
    pi = _pi_photons(pi_rng, shape, centres, nuclei.reshape(-1), dead, maps["body"])
    camera = {"gain": bf_rng.uniform(0.5, 2.0), "offset": bf_rng.uniform(50, 300), "read_sd": bf_rng.uniform(2, 10)}
    pi_counts = _expose(pi_noise, pi, gain=1.0, offset=pi_rng.uniform(90, 130), read_sd=2.0)
    data = np.stack([_expose(bf_noise, bf, **camera), pi_counts])
    truth = pd.DataFrame({"x": centres[:, 1], "y": centres[:, 0], "radius": looks[:, 0], "dead": dead.astype(bool)})
    metadata = {"seed": seed, "dead_fraction": dead_fraction, "difficulty": difficulty, "n_cells": n, **imaging, **camera}
    source = f"synthetic_livedead:seed={seed}"
    return Image(data[:, None], LIVEDEAD_CHANNELS, pixel_size, source, metadata), truth


def _item_seed(seed: int, group: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, group, index]).generate_state(1)[0])


def write_livedead_set(
    out: str | Path,
    *,
    conditions: dict[str, float] | None = None,
    n_fields: int = 6,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    difficulty: float = 0.3,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write ``out/<condition>/field_<i>.ome.tif`` (BF and PI) and ``out/cells.csv``.

    ``conditions`` maps a condition name to its dead fraction (default untreated 0.2, treated
    0.7). ``cells.csv`` is the truth of every cell with columns path (relative to ``out``),
    condition, field, x, y, radius, dead; it is returned. The folder is built under a
    temporary name and renamed into place.
    """
    conditions = {"untreated": 0.2, "treated": 0.7} if conditions is None else conditions
    if not isinstance(conditions, dict) or not conditions:
        raise InputError(f"conditions must be a non-empty {{name: dead_fraction}} dict, got {conditions!r}")
    for name, fraction in conditions.items():
        _check_folder_name(name, "condition name")
        _check_unit(f"dead fraction of condition {name!r}", fraction)
    if isinstance(n_fields, bool) or not isinstance(n_fields, (int, np.integer)) or n_fields < 1:
        raise InputError(f"n_fields must be an int >= 1, got {n_fields!r}")
    _check_field_args(shape, None)
    _check_unit("difficulty", difficulty)
    tables = []
    with replacing_folder(out, overwrite=overwrite, what="data folder") as tmp:
        for k, (name, fraction) in enumerate(conditions.items()):
            (tmp / name).mkdir()
            for i in range(n_fields):
                image, truth = make_livedead_field(
                    shape=shape, dead_fraction=fraction, seed=_item_seed(seed, k, i), difficulty=difficulty
                )
                write_ome_tiff(tmp / name / f"field_{i}.ome.tif", image)
                tables.append(truth.assign(path=f"{name}/field_{i}.ome.tif", condition=name, field=f"{name}_{i}"))
        table = pd.concat(tables, ignore_index=True)[["path", "condition", "field", "x", "y", "radius", "dead"]]
        table.to_csv(tmp / "cells.csv", index=False)
    return table


# --------------------------------------------------------------------------- single cells


def _class_name(label) -> str:
    if isinstance(label, str) and label in CELL_CYCLE_CLASSES:
        return label
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(CELL_CYCLE_CLASSES):
        return CELL_CYCLE_CLASSES[int(label)]
    raise InputError(f"label must be one of {CELL_CYCLE_CLASSES} or its index, got {label!r}")


@dataclass(frozen=True)
class _CellShape:
    centre: np.ndarray  # y, x
    radius: float
    aspect: float
    angle: float
    dna: float  # relative to G1

    def coords(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Elliptic radius in px (1 at the edge) and signed px depth inside the edge."""
        yy, xx = np.mgrid[:size, :size].astype(float)
        dy, dx = yy - self.centre[0], xx - self.centre[1]
        u = (dx * np.cos(self.angle) + dy * np.sin(self.angle)) / np.sqrt(self.aspect)
        v = (-dx * np.sin(self.angle) + dy * np.cos(self.angle)) * np.sqrt(self.aspect)
        rho = np.hypot(u, v)
        return rho / self.radius, self.radius - rho


def _single_cell_shape(rng: np.random.Generator, name: str, size: int, difficulty: float) -> _CellShape:
    """Radius grows as DNA**((1 - difficulty) / 3); M cells are rounder, less so with difficulty."""
    dna = DNA_CONTENT[name] * rng.lognormal(0, 0.05)
    u_radius, u_aspect = rng.lognormal(0, 0.12), abs(rng.normal(0, 0.15))
    roundness = 0.15 + 0.85 * difficulty if name == "M" else 1.0
    return _CellShape(
        centre=size / 2 - 0.5 + rng.uniform(-2, 2, 2),
        radius=size * 0.22 * u_radius * DNA_CONTENT[name] ** ((1 - difficulty) / 3),
        aspect=1 + u_aspect * roundness,
        angle=rng.uniform(-np.pi, np.pi),
        dna=dna,
    )


def _dna_density(rng: np.random.Generator, name: str, cell: _CellShape, size: int) -> np.ndarray:
    """DNA per pixel summing to the cell's DNA content: a textured nucleus, or M's chromosome blobs."""
    density = np.zeros((size, size))
    if name == "M":
        n = rng.integers(3, 7)
        along = rng.uniform(-0.45, 0.45, n) * cell.radius
        across = rng.normal(0, 0.08, n) * cell.radius
        plate = rng.uniform(-np.pi, np.pi)
        ys = cell.centre[0] + along * np.sin(plate) + across * np.cos(plate)
        xs = cell.centre[1] + along * np.cos(plate) - across * np.sin(plate)
        ok = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        density[np.rint(ys[ok]).astype(int), np.rint(xs[ok]).astype(int)] += rng.dirichlet(np.ones(ok.sum()) * 3)
        density = ndimage.gaussian_filter(density, 1.2)
    else:
        s, _ = _scaled(cell, 0.6 * rng.lognormal(0, 0.06)).coords(size)
        grain = 1 + 0.25 * ndimage.gaussian_filter(rng.normal(size=(size, size)), 1.0) * 3
        density = np.sqrt(np.clip(1 - s**2, 0, None)) * np.clip(grain, 0, None)
    return cell.dna * density / density.sum()


def _scaled(cell: _CellShape, factor: float) -> _CellShape:
    """The same cell shape scaled by ``factor`` about its centre (its nucleus, say)."""
    return _CellShape(cell.centre, cell.radius * factor, cell.aspect, cell.angle, cell.dna)


def _df_photons(rng: np.random.Generator, name: str, cell: _CellShape, size: int, difficulty: float) -> np.ndarray:
    """DF: scattering from the membrane and from granules, whose density depends on the class."""
    s, depth = cell.coords(size)
    density = (1 + (1 - difficulty) * (GRANULARITY[name] - 1)) * rng.lognormal(0, 0.3)
    n = rng.poisson(0.06 * density * np.pi * cell.radius**2)
    granules = np.zeros((size, size))
    r = cell.radius * np.sqrt(rng.uniform(0, 0.9, n))
    a = rng.uniform(-np.pi, np.pi, n)
    ys, xs = np.rint(cell.centre[0] + r * np.sin(a)).astype(int), np.rint(cell.centre[1] + r * np.cos(a)).astype(int)
    np.add.at(granules, (np.clip(ys, 0, size - 1), np.clip(xs, 0, size - 1)), rng.exponential(1.0, n))
    granules = ndimage.gaussian_filter(granules, 0.8) * 2 * np.pi * 0.64
    return 30.0 * granules + 12.0 * np.exp(-((depth / 1.2) ** 2)) + 3.0 * _sigmoid(depth)


def _bf_cell(rng: np.random.Generator, cell: _CellShape, size: int) -> np.ndarray:
    """BF contrast of a round cell: darker body, dark edge, bright halo outside, faint texture."""
    _, depth = cell.coords(size)
    inside = _sigmoid(depth / 0.8)
    texture = ndimage.gaussian_filter(rng.normal(size=(size, size)), 1.0) * 2.5
    return (
        inside * (-0.06 + 0.02 * texture)
        - 0.12 * np.exp(-((depth / 1.0) ** 2))
        + 0.05 * np.exp(-(((depth + 2.0) / 1.5) ** 2))
    )


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 32 <= size <= 512:
        raise InputError(f"size must be an int in [32, 512], got {size!r}")
    return int(size)


def make_single_cell(label: int | str, *, size: int = 48, seed: int, difficulty: float = 0.3) -> Image:
    """One cell in G1, G2 or M as a uint16 (3, 1, size, size) image with channels BF, DF, DNA.

    For one seed the imaging conditions (gain, background, noise) are the same for every
    class. Metadata holds the truth: label, relative DNA content, radius and aspect in px.
    """
    name, seed = _class_name(label), _check_seed(seed)
    difficulty = _check_unit("difficulty", difficulty)
    size = _check_size(size)
    imaging, shape_rng, dna_rng, df_rng, bf_rng, *noise = _streams(seed, 8)
    gains = imaging.lognormal(0, [0.2, 0.2, 0.08])
    offsets = imaging.uniform(80, 200, 3)
    backgrounds = (imaging.uniform(500, 2000), imaging.uniform(2, 6), imaging.uniform(2, 8))
    cell = _single_cell_shape(shape_rng, name, size, difficulty)
    photons = [
        backgrounds[0] * (1 + ndimage.gaussian_filter(_bf_cell(bf_rng, cell, size), 0.7)),
        backgrounds[1] + _df_photons(df_rng, name, cell, size, difficulty),
        backgrounds[2] + 60000.0 * ndimage.gaussian_filter(_dna_density(dna_rng, name, cell, size), 1.0),
    ]
    read_sd = (4.0, 2.0, 2.0)
    camera = [{"gain": gains[c], "offset": offsets[c], "read_sd": read_sd[c]} for c in range(3)]
    data = np.stack([_expose(noise[c], photons[c], **camera[c]) for c in range(3)])
    metadata = {
        "label": name, "seed": seed, "difficulty": difficulty, "dna_content": cell.dna,
        "radius_px": cell.radius, "aspect": cell.aspect, "gain": gains.tolist(), "offset": offsets.tolist(),
    }
    return Image(data[:, None], SINGLE_CELL_CHANNELS, (1.0, 0.33, 0.33), f"synthetic_cell:{name}:seed={seed}", metadata)


def dna_content(image: Image) -> float:
    """Integrated DNA-channel counts above the background (median of the one-pixel border)."""
    if "DNA" not in image.channel_names:
        raise InputError(f"image must have a 'DNA' channel, got channels {image.channel_names}")
    dna = image.data[image.channel_names.index("DNA")].astype(np.float64).max(axis=0)
    border = np.concatenate([dna[0], dna[-1], dna[1:-1, 0], dna[1:-1, -1]])
    return float((dna - np.median(border)).sum())


def write_single_cell_set(
    out: str | Path,
    *,
    counts: dict[str, int] | None = None,
    size: int = 48,
    seed: int = 0,
    difficulty: float = 0.3,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write ``out/<class>/cell_<i>.ome.tif`` and a manifest ``out/cells.csv`` (path, label, seed).

    ``counts`` maps a class to its number of cells (default G1 40, G2 30, M 8: M is rare).
    Returns the manifest; the folder is built under a temporary name and renamed into place.
    """
    counts = {"G1": 40, "G2": 30, "M": 8} if counts is None else counts
    if not isinstance(counts, dict) or not counts:
        raise InputError(f"counts must be a non-empty {{class: count}} dict, got {counts!r}")
    for name, n in counts.items():
        if name not in CELL_CYCLE_CLASSES:
            raise InputError(f"counts keys must be classes {CELL_CYCLE_CLASSES}, got {name!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InputError(f"count of class {name!r} must be an int >= 0, got {n!r}")
    _check_size(size)
    _check_unit("difficulty", difficulty)
    rows = []
    with replacing_folder(out, overwrite=overwrite, what="data folder") as tmp:
        for name, n in counts.items():
            (tmp / name).mkdir()
            for i in range(n):
                cell_seed = _item_seed(seed, CELL_CYCLE_CLASSES.index(name), i)
                image = make_single_cell(name, size=size, seed=cell_seed, difficulty=difficulty)
                write_ome_tiff(tmp / name / f"cell_{i}.ome.tif", image)
                rows.append({"path": f"{name}/cell_{i}.ome.tif", "label": name, "seed": cell_seed})
        table = pd.DataFrame(rows, columns=["path", "label", "seed"])
        table.to_csv(tmp / "cells.csv", index=False)
    return table
