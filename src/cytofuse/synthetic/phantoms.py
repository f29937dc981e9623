"""Synthetic organelle phantoms: the embedded default data set of cytofuse.

Each phantom is a 3D four-channel fluorescence stack (C, Z, Y, X) of cells scattered over a
field with empty regions. Every cell has a nucleus and, in the cytoplasm around it,
mitochondria (curvilinear, branching tubules or short fragments), early endosomes and
recycling endosomes. Imaging is simulated with an anisotropic Gaussian PSF, a camera offset,
autofluorescence, Poisson shot noise, Gaussian read noise and per-image / per-cell brightness
variation drawn from the same distributions for every class, so intensity is not a shortcut.

Classes differ only in the organelle parameters of :data:`CLASS_SPECS`; the nucleus carries no
class information. Which channels separate which class pairs is ground truth in code:
:func:`informative_channels` and :func:`requires_fusion`. Geometry is in voxels at the default
pixel size (0.5, 0.1, 0.1) um; ``pixel_size_um`` is recorded as metadata only.

Random streams are split per channel, so for one seed two classes give bit-identical arrays
in every channel that :func:`informative_channels` does not name.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from cytofuse.errors import InputError
from cytofuse.io.readers import Image, write_ome_tiff
from cytofuse.runs import replacing_folder

CHANNELS = ("nucleus", "mitochondria", "early_endosome", "recycling_endosome")


@dataclass(frozen=True)
class ClassSpec:
    """Organelle parameters of one phantom class (lengths in xy pixels)."""

    name: str
    description: str
    mito_length: float = 35.0
    """Mean length of a mitochondrial segment: ~35 tubular networks, ~2.5 fragmented puncta."""
    mito_branches: float = 1.5
    """Mean number of side branches per mitochondrial segment."""
    ee_perinuclear: float = 0.0
    """Fraction of early endosomes clustered beside the nucleus (rest spread through the cytoplasm)."""
    ee_on_mito: float = 0.0
    """Fraction of the spread early endosomes sitting on the cell's mitochondria. The others sit on
    an unrendered network with the control's mitochondrial statistics, so this fraction changes
    only how the two channels relate, not either channel's own distribution."""
    re_radius: float = 0.15
    """Mean radial position of recycling endosomes: 0 at the nucleus edge, 1 at the cell edge."""


# Which parameters shape which channel on its own, and which relate two channels.
CHANNEL_PARAMETERS = {
    "nucleus": (),
    "mitochondria": ("mito_length", "mito_branches"),
    "early_endosome": ("ee_perinuclear",),
    "recycling_endosome": ("re_radius",),
}
RELATION_PARAMETERS = {"ee_on_mito": ("mitochondria", "early_endosome")}

# Channels that separate each class from the control (class 0); pairs between other classes
# follow from the table, see informative_channels().
#   control vs fragmented      mitochondria only (tubular networks vs fragmented puncta)
#   control vs ee_perinuclear  early_endosome only (clustered beside the nucleus vs dispersed)
#   control vs re_peripheral   recycling_endosome only (perinuclear vs peripheral radius)
#   control vs ee_on_mito      only the mitochondria/early_endosome relation (co-localisation);
#                              each channel alone has the same distribution in both classes
#   control vs combined        mitochondria, early_endosome and recycling_endosome
CLASS_SPECS: tuple[ClassSpec, ...] = (
    ClassSpec("control", "tubular mitochondria, dispersed early and perinuclear recycling endosomes"),
    ClassSpec("fragmented", "mitochondria fragmented into puncta", mito_length=2.5, mito_branches=0.0),
    ClassSpec("ee_perinuclear", "early endosomes clustered beside the nucleus", ee_perinuclear=1.0),
    ClassSpec("re_peripheral", "recycling endosomes at the cell periphery", re_radius=0.8),
    ClassSpec("ee_on_mito", "early endosomes sitting on mitochondria", ee_on_mito=1.0),
    ClassSpec(
        "combined",
        "fragmented mitochondria, clustered early and peripheral recycling endosomes",
        mito_length=2.5,
        mito_branches=0.0,
        ee_perinuclear=1.0,
        re_radius=0.8,
    ),
)
CLASS_NAMES = tuple(spec.name for spec in CLASS_SPECS)

_PSF_SIGMA = (0.8, 1.2, 1.2)  # z, y, x in voxels
_MITO_STEP = 0.5
_MITO_WEIGHT = 1.6  # per walk step: tubules peak near half a punctum
_POINT_PEAK = float((2 * np.pi) ** 1.5 * np.prod(_PSF_SIGMA))  # weight of a point whose blur peaks at 1
_REF_CYTOPLASM = np.pi * (46.0**2 - 18.0**2)  # cytoplasm area of a typical cell, px^2
# Imaging is tuned like a confocal field: a dark, quiet background and a diffuse cytoplasmic stain
# that stands several noise sd above it, so a global Otsu threshold falls between empty field and
# cells in every channel (organelles alone are too sparse to pull it out of the noise).
_DIFFUSE = 0.15  # diffuse cytoplasmic stain of the organelle channels, relative to an organelle peak
_AUTO = (0.5, 1.5)  # autofluorescence range, photons per voxel
_READ_SD = (1.0, 2.0)  # read noise sd at difficulty 0 and its increase at difficulty 1
_MITO_DENSITY = 0.25  # mitochondrial length per cytoplasm area, px / px^2
_EE_PER_CELL, _RE_PER_CELL = 100, 80  # endosomes in a cell of typical size
_Z_SPREAD = 0.8  # cell z-centres spread uniformly over this fraction of the stack
_MITO_Z = 0.6  # mitochondria lie within this fraction of the local half thickness


def class_index(label: int | str) -> int:
    """Index into CLASS_SPECS of a class given by index or name."""
    if isinstance(label, str):
        if label not in CLASS_NAMES:
            raise InputError(f"label must be one of {CLASS_NAMES}, got {label!r}")
        return CLASS_NAMES.index(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < len(CLASS_SPECS):
        raise InputError(f"label must be an int in [0, {len(CLASS_SPECS) - 1}] or a class name, got {label!r}")
    return int(label)


def informative_channels(class_a: int | str, class_b: int | str) -> set[str]:
    """Channels that must be seen (alone or together) to tell two classes apart.

    A channel is named when its own parameters differ, or when it takes part in a
    channel relation (co-localisation) that differs. The nucleus is never named.
    """
    a, b = CLASS_SPECS[class_index(class_a)], CLASS_SPECS[class_index(class_b)]
    out = {ch for ch, params in CHANNEL_PARAMETERS.items() if any(getattr(a, p) != getattr(b, p) for p in params)}
    for param, channels in RELATION_PARAMETERS.items():
        if getattr(a, param) != getattr(b, param):
            out.update(channels)
    return out


def separating_channels(class_a: int | str, class_b: int | str) -> set[str]:
    """Channels whose own distribution differs between two classes (each one alone separates)."""
    a, b = CLASS_SPECS[class_index(class_a)], CLASS_SPECS[class_index(class_b)]
    return {ch for ch, params in CHANNEL_PARAMETERS.items() if any(getattr(a, p) != getattr(b, p) for p in params)}


def requires_fusion(class_a: int | str, class_b: int | str) -> bool:
    """True when two classes differ but no single channel separates them (only a relation does)."""
    return bool(informative_channels(class_a, class_b)) and not separating_channels(class_a, class_b)


def class_table() -> list[dict]:
    """One row per class: index, name, description, parameters and the channels that tell it
    from the control (for reports and the demo)."""
    rows = []
    for k, spec in enumerate(CLASS_SPECS):
        params = {f.name: getattr(spec, f.name) for f in fields(spec)}
        vs_control = sorted(informative_channels(0, k), key=CHANNELS.index)
        rows.append({"index": k, **params, "vs_control": vs_control, "requires_fusion": requires_fusion(0, k)})
    return rows


def _at_difficulty(spec: ClassSpec, difficulty: float) -> ClassSpec:
    """Move a class toward the control class: a fraction difficulty**2 of the way.

    The quadratic keeps the default 0.5 (a quarter of the way) clearly separable; 1 gives
    every class the control's parameters exactly.
    """
    anchor, keep = CLASS_SPECS[0], 1.0 - difficulty**2
    names = [f.name for f in fields(spec) if isinstance(getattr(spec, f.name), float)]
    values = {n: getattr(anchor, n) + keep * (getattr(spec, n) - getattr(anchor, n)) for n in names}
    log_a = np.log(anchor.mito_length)
    values["mito_length"] = float(np.exp(log_a + keep * (np.log(spec.mito_length) - log_a)))
    return replace(spec, **values)


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class _Cells:
    """Per-cell geometry: local frame u maps to image (y, x) = center + u @ frame.T."""

    center: np.ndarray  # (n, 2) y, x
    frame: np.ndarray  # (n, 2, 2)
    r_nuc: np.ndarray  # (n,)
    r_cell: np.ndarray  # (n,)
    z_center: np.ndarray  # (n,)
    half_thick: np.ndarray  # (n,) z half thickness at the nucleus, in slices
    nuc_half_z: np.ndarray  # (n,)
    cluster_angle: np.ndarray  # (n,) side where perinuclear endosomes gather
    brightness: np.ndarray  # (n, 4) per cell and channel

    def __len__(self) -> int:
        return len(self.center)


def _place_cells(rng: np.random.Generator, shape: tuple[int, int, int], density: float) -> _Cells:
    """Cells at random, with a smooth random density field that leaves large empty regions."""
    z, y, x = shape
    coarse = ndimage.gaussian_filter(rng.normal(size=(y // 32 + 3, x // 32 + 3)), 1.0)
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-9)
    empty_level = rng.uniform(-0.8, 0.3)
    mean_area = np.pi * 46.0**2
    n_target = max(1, rng.poisson(density * rng.lognormal(0.0, 0.35) * y * x / mean_area))
    centers, radii = [], []
    for _ in range(40 * n_target):
        if len(centers) >= n_target:
            break
        c = rng.uniform(0, 1, 2) * (y, x)
        rc = rng.uniform(38, 54)
        weight = np.clip(coarse[int(c[0] / 32) + 1, int(c[1] / 32) + 1] - empty_level, 0, 1)
        free = all(np.hypot(*(c - o)) > 0.85 * (rc + r) for o, r in zip(centers, radii))
        if free and rng.random() < weight:
            centers.append(c)
            radii.append(rc)
    if not centers:  # every image shows at least one cell
        centers, radii = [np.array([y, x]) * rng.uniform(0.3, 0.7, 2)], [rng.uniform(38, 54)]
    n = len(centers)
    theta, aspect = rng.uniform(0, np.pi, n), np.sqrt(rng.uniform(1.0, 1.5, n))
    rot = np.stack([np.stack([np.cos(theta), -np.sin(theta)], -1), np.stack([np.sin(theta), np.cos(theta)], -1)], -2)
    frame = rot * np.stack([aspect, 1 / aspect], -1)[:, None, :]
    return _Cells(
        center=np.array(centers),
        frame=frame,
        r_nuc=rng.uniform(15, 21, n),
        r_cell=np.array(radii),
        z_center=(z - 1) / 2 + rng.normal(0, 0.4, n) + (z - 1) * _Z_SPREAD * rng.uniform(-0.5, 0.5, n),
        half_thick=rng.uniform(3.0, 4.0, n),
        nuc_half_z=rng.uniform(2.2, 2.8, n),
        cluster_angle=rng.uniform(-np.pi, np.pi, n),
        brightness=rng.lognormal(0.0, 0.25, (n, 4)),
    )


def _to_image(cells: _Cells, cell: np.ndarray, local: np.ndarray, zoff: np.ndarray) -> np.ndarray:
    """(n, 3) image coordinates of local points; zoff in [-1, 1] of the local half thickness."""
    yx = cells.center[cell] + np.einsum("nij,nj->ni", cells.frame[cell], local)
    frac = np.clip((np.hypot(*local.T) - cells.r_nuc[cell]) / (cells.r_cell[cell] - cells.r_nuc[cell]), 0, 1)
    z = cells.z_center[cell] + zoff * cells.half_thick[cell] * (1 - 0.65 * frac)
    return np.column_stack([z, yx])


def _radial_points(cells: _Cells, cell: np.ndarray, frac: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Local points at radial fraction ``frac`` (0 nucleus edge, 1 cell edge) and angle."""
    rho = cells.r_nuc[cell] + frac * (cells.r_cell[cell] - cells.r_nuc[cell])
    return rho[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])


def _uniform_in_cytoplasm(rng: np.random.Generator, cells: _Cells, cell: np.ndarray) -> np.ndarray:
    inner, outer = 1.05 * cells.r_nuc[cell], 0.95 * cells.r_cell[cell]
    rho = np.sqrt(rng.uniform(0, 1, len(cell)) * (outer**2 - inner**2) + inner**2)
    angle = rng.uniform(-np.pi, np.pi, len(cell))
    return rho[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])


def _cytoplasm_area(cells: _Cells) -> np.ndarray:
    return np.pi * (cells.r_cell**2 - cells.r_nuc**2)


# --------------------------------------------------------------------------- mitochondria


def _walk(
    rng: np.random.Generator, cells: _Cells, cell: np.ndarray, start: np.ndarray, angle: np.ndarray, n_steps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Persistent random walks kept inside the cytoplasm; returns points, angles, owner index."""
    inner, outer = 1.05 * cells.r_nuc[cell], 0.95 * cells.r_cell[cell]
    pos, ang = start.copy(), angle.copy()
    n_max = int(n_steps.max(initial=0))
    pts, angs = np.empty((n_max, len(cell), 2)), np.empty((n_max, len(cell)))
    for t in range(n_max):
        pts[t], angs[t] = pos, ang
        ang = ang + rng.normal(0, 0.12, len(cell))
        d = np.column_stack([np.cos(ang), np.sin(ang)])
        new = pos + _MITO_STEP * d
        rho = np.hypot(*new.T)
        radial = np.einsum("ni,ni->n", d, new) / rho
        bounce = ((rho > outer) & (radial > 0)) | ((rho < inner) & (radial < 0))
        if bounce.any():
            normal = new[bounce] / rho[bounce, None]
            d[bounce] -= 2 * radial[bounce, None] * normal
            ang[bounce] = np.arctan2(d[bounce, 1], d[bounce, 0])
            new = pos + _MITO_STEP * d
        pos = new
    keep = np.arange(n_max)[None, :] < n_steps[:, None]  # segment-major order
    owner = np.broadcast_to(np.arange(len(cell))[:, None], keep.shape)
    return pts.transpose(1, 0, 2)[keep], angs.T[keep], owner[keep]


def _swelling(spec: ClassSpec) -> float:
    """Brightness per length of a mitochondrion: short fragments are swollen (fewer, brighter)."""
    return float((CLASS_SPECS[0].mito_length / spec.mito_length) ** 0.4)


def _mito_network(rng: np.random.Generator, cells: _Cells, spec: ClassSpec) -> tuple[np.ndarray, np.ndarray]:
    """3D points (n, 3) of every cell's mitochondria and the cell of each point, sorted by cell.

    Segments are persistent random walks of mean length ``mito_length`` with side branches;
    the total mass per cell (length times swelling) depends on its cytoplasm area only.
    """
    per_segment = spec.mito_length * (1 + 0.5 * spec.mito_branches) * _swelling(spec)
    n_seg = rng.poisson(_MITO_DENSITY * _cytoplasm_area(cells) / per_segment)
    cell = np.repeat(np.arange(len(cells)), n_seg)
    start = _uniform_in_cytoplasm(rng, cells, cell)
    steps = np.maximum(1, rng.gamma(4.0, spec.mito_length / 4.0, len(cell)) / _MITO_STEP).astype(int)
    pts, angs, owner = _walk(rng, cells, cell, start, rng.uniform(-np.pi, np.pi, len(cell)), steps)
    n_branch = rng.poisson(spec.mito_branches, len(cell))
    b_seg = np.repeat(np.arange(len(cell)), n_branch)
    zoff_seg = rng.uniform(-_MITO_Z, _MITO_Z, len(cell))
    if len(b_seg):
        seg_first = np.searchsorted(owner, b_seg)
        at = seg_first + (rng.uniform(0, 1, len(b_seg)) * steps[b_seg]).astype(int)
        turn = rng.choice([-1, 1], len(b_seg)) * rng.uniform(0.5, 1.3, len(b_seg))
        b_steps = np.maximum(1, rng.gamma(4.0, spec.mito_length / 8.0, len(b_seg)) / _MITO_STEP).astype(int)
        b_pts, _, b_owner = _walk(rng, cells, cell[b_seg], pts[at], angs[at] + turn, b_steps)
        pts, owner = np.concatenate([pts, b_pts]), np.concatenate([owner, b_seg[b_owner]])
    order = np.argsort(cell[owner], kind="stable")  # cell by cell, as _sample_network expects
    return _to_image(cells, cell[owner], pts, zoff_seg[owner])[order], cell[owner][order]


# --------------------------------------------------------------------------- endosomes


def _early_endosomes(
    rng: np.random.Generator, cells: _Cells, spec: ClassSpec, mito: tuple, ghost: tuple
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points, weights and cells of early endosomes; ``mito`` / ``ghost`` are (points, cell).

    Perinuclear ones gather on one side of the nucleus; the others sit on the real network
    (fraction ``ee_on_mito``) or on the unrendered ``ghost`` network of the same statistics.
    """
    n = rng.poisson(_EE_PER_CELL * _cytoplasm_area(cells) / _REF_CYTOPLASM)
    cell = np.repeat(np.arange(len(cells)), n)
    mode, pick, jitter = rng.uniform(0, 1, len(cell)), rng.uniform(0, 1, len(cell)), rng.normal(0, 1, (len(cell), 3))
    peri_frac = np.abs(rng.normal(0, 0.15, len(cell)))
    peri_angle = cells.cluster_angle[cell] + rng.vonmises(0, 1.5, len(cell))
    peri_z = rng.uniform(-0.8, 0.8, len(cell))
    weight = _POINT_PEAK * rng.lognormal(0.0, 0.4, len(cell))
    peri = mode < spec.ee_perinuclear
    on_mito = ~peri & (rng.uniform(0, 1, len(cell)) < spec.ee_on_mito)
    pts = np.empty((len(cell), 3))
    local = _radial_points(cells, cell[peri], np.minimum(peri_frac[peri], 0.9), peri_angle[peri])
    pts[peri] = _to_image(cells, cell[peri], local, peri_z[peri])
    for sel, (net_pts, net_cell) in ((on_mito, mito), (~peri & ~on_mito, ghost)):
        pts[sel] = _sample_network(cell[sel], pick[sel], net_pts, net_cell)
    pts += jitter * (0.2, 0.7, 0.7)
    return pts, weight, cell


def _sample_network(cell: np.ndarray, pick: np.ndarray, net_pts: np.ndarray, net_cell: np.ndarray) -> np.ndarray:
    """One point of each entry's cell network, chosen by the uniform number ``pick``.

    ``net_cell`` is sorted (points are generated cell by cell). Entries whose cell has no
    network get NaN and are not drawn.
    """
    first = np.searchsorted(net_cell, cell, side="left")
    count = np.searchsorted(net_cell, cell, side="right") - first
    out = np.full((len(cell), 3), np.nan)
    has = count > 0
    out[has] = net_pts[first[has] + (pick[has] * count[has]).astype(int)]
    return out


def _recycling_endosomes(
    rng: np.random.Generator, cells: _Cells, spec: ClassSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points, weights and cells of recycling endosomes at radius ``re_radius``."""
    n = rng.poisson(_RE_PER_CELL * _cytoplasm_area(cells) / _REF_CYTOPLASM)
    cell = np.repeat(np.arange(len(cells)), n)
    frac = np.clip(rng.normal(spec.re_radius, 0.12, len(cell)), 0.02, 0.98)
    local = _radial_points(cells, cell, frac, rng.uniform(-np.pi, np.pi, len(cell)))
    pts = _to_image(cells, cell, local, rng.uniform(-0.8, 0.8, len(cell)))
    return pts, _POINT_PEAK * rng.lognormal(0.0, 0.4, len(cell)), cell


# --------------------------------------------------------------------------- rendering


def _splat(volume: np.ndarray, pts: np.ndarray, weight: np.ndarray) -> None:
    """Add points to ``volume`` in place with trilinear weights."""
    ok = np.isfinite(pts).all(1)
    pts, weight = pts[ok], weight[ok]
    base = np.floor(pts).astype(int)
    frac = pts - base
    flat, w = [], []
    for corner in np.ndindex(2, 2, 2):
        idx = base + corner
        inside = ((idx >= 0) & (idx < volume.shape)).all(1)
        flat.append(np.ravel_multi_index(idx[inside].T, volume.shape))
        w.append((weight * np.prod(np.where(corner, frac, 1 - frac), axis=1))[inside])
    volume.ravel()[:] += np.bincount(np.concatenate(flat), np.concatenate(w), volume.size).astype(volume.dtype)


def _cell_bodies(rng: np.random.Generator, cells: _Cells, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus volume (textured ellipsoids) and soft cytoplasm mask."""
    zz = np.arange(shape[0], dtype=np.float32)[:, None, None]
    texture = ndimage.gaussian_filter(rng.normal(size=shape[1:]), 2.5)
    texture = (1 + 0.3 * texture / (texture.std() + 1e-9)).astype(np.float32)
    nucleus, cytoplasm = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for i in range(len(cells)):
        reach = cells.r_cell[i] * 1.3 + 3
        lo = np.maximum(0, np.floor(cells.center[i] - reach)).astype(int)
        hi = np.minimum(shape[1:], np.ceil(cells.center[i] + reach)).astype(int)
        if (hi <= lo).any():
            continue
        yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]].astype(np.float32)
        offsets = np.stack([yy.ravel() - cells.center[i][0], xx.ravel() - cells.center[i][1]])
        local = np.linalg.solve(cells.frame[i], offsets)
        rho = np.hypot(*local).reshape(yy.shape)[None]
        dz = np.abs(zz - cells.z_center[i])
        q = np.sqrt((rho / cells.r_nuc[i]) ** 2 + (dz / cells.nuc_half_z[i]) ** 2)
        nuc = _sigmoid((1 - q) / 0.07) * texture[lo[0] : hi[0], lo[1] : hi[1]]
        frac = np.clip((rho - cells.r_nuc[i]) / (cells.r_cell[i] - cells.r_nuc[i]), 0, 1)
        thickness = cells.half_thick[i] * (1 - 0.65 * frac)
        body = _sigmoid((cells.r_cell[i] - rho) / 1.5) * _sigmoid((thickness - dz) / 0.4)
        box = (slice(None), slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        nucleus[box] += cells.brightness[i, 0] * nuc
        cytoplasm[box] = np.maximum(cytoplasm[box], body)
    return nucleus, cytoplasm


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1 + np.tanh(0.5 * x))).astype(np.float32)


def _camera(
    rng: np.random.Generator,
    signal: np.ndarray,
    *,
    photons: float,
    offset: float,
    auto: float,
    gain: float,
    read_sd: float,
) -> np.ndarray:
    """Shot noise, gain, offset and read noise; returns uint16 counts (``signal`` is overwritten)."""
    signal *= photons
    signal += auto
    adu = rng.poisson(np.maximum(signal, 0, out=signal)).astype(np.float32)
    adu *= gain
    adu += offset
    adu += read_sd * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.clip(np.rint(adu, out=adu), 0, 65535, out=adu).astype(np.uint16)


# --------------------------------------------------------------------------- public API


def _organelles(streams: list, cells: _Cells, spec: ClassSpec, control: ClassSpec, shape: tuple) -> np.ndarray:
    """Unblurred (C, Z, Y, X) fluorophore density; one random stream per structure."""
    nuc_rng, mito_rng, ghost_rng, ee_rng, re_rng = streams
    nucleus, cytoplasm = _cell_bodies(nuc_rng, cells, shape)
    mito = _mito_network(mito_rng, cells, spec)
    ghost = _mito_network(ghost_rng, cells, control)
    ee_pts, ee_w, ee_cell = _early_endosomes(ee_rng, cells, spec, mito, ghost)
    re_pts, re_w, re_cell = _recycling_endosomes(re_rng, cells, spec)
    volume = np.zeros((4, *shape), np.float32)
    volume[0] = 0.6 * nucleus + 0.03 * cytoplasm
    _splat(volume[1], mito[0], _MITO_WEIGHT * _swelling(spec) * cells.brightness[mito[1], 1])
    _splat(volume[2], ee_pts, ee_w * cells.brightness[ee_cell, 2])
    _splat(volume[3], re_pts, re_w * cells.brightness[re_cell, 3])
    volume[1:] += _DIFFUSE * cytoplasm  # faint diffuse stain outlines the cells
    return volume


def _check_args(shape, difficulty, cell_density=0.35, pixel_size_um=(1.0, 1.0, 1.0)) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) != s for s in shape) or shape[0] < 1 or min(shape[1:]) < 32:
        raise InputError(f"shape must be (Z, Y, X) integers with Z >= 1 and Y, X >= 32, got {shape}")
    if not 0.0 <= difficulty <= 1.0:
        raise InputError(f"difficulty must be in [0, 1], got {difficulty}")
    if not 0.0 < cell_density <= 1.0:
        raise InputError(f"cell_density must be in (0, 1], got {cell_density}")
    if len(pixel_size_um) != 3 or any(not p > 0 for p in pixel_size_um):
        raise InputError(f"pixel_size_um must be three positive sizes (z, y, x), got {pixel_size_um}")
    return tuple(int(s) for s in shape)


def _shortcut_factors(shortcut: dict | None, label: int) -> dict[str, float]:
    """Factors planted for this label: {'background': f, 'brightness': f}."""
    out = {"background": 1.0, "brightness": 1.0}
    for kind, per_class in (shortcut or {}).items():
        if kind not in out or not isinstance(per_class, dict):
            raise InputError(f"shortcut must map 'background' or 'brightness' to {{class: factor}}, got {shortcut!r}")
        for cls, factor in per_class.items():
            if not factor > 0:
                raise InputError(f"shortcut {kind} factor for class {cls!r} must be > 0, got {factor}")
            if class_index(cls) == label:
                out[kind] = float(factor)
    return out


def make_phantom(
    label: int | str,
    *,
    shape: tuple[int, int, int] = (8, 256, 256),
    seed: int,
    difficulty: float = 0.5,
    pixel_size_um: tuple[float, float, float] = (0.5, 0.1, 0.1),
    cell_density: float = 0.35,
    shortcut: dict | None = None,
) -> Image:
    """A 4-channel uint16 phantom stack of class ``label`` (index or name in CLASS_SPECS).

    ``difficulty`` moves every class's parameters a fraction ``difficulty**2`` of the way toward
    the control class and lowers the signal-to-noise ratio; at 1 every class gives the same
    array for one seed (a null data set).
    ``cell_density`` is the mean fraction of the field covered by cells (varies per image).
    ``shortcut`` deliberately plants an unrealistic cue, for tests that must detect one:
    ``{"background": {class: factor}}`` scales camera offset and autofluorescence,
    ``{"brightness": {class: factor}}`` scales the signal. Same seed, same array.
    """
    index = class_index(label)
    shape = _check_args(shape, difficulty, cell_density, pixel_size_um)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    factors = _shortcut_factors(shortcut, index)
    spec = _at_difficulty(CLASS_SPECS[index], difficulty)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(10)]
    layout, noise = streams[0], streams[6:]  # one noise stream per channel

    cells = _place_cells(layout, shape, cell_density)
    brightness = layout.lognormal(0.0, 0.3, 4) * factors["brightness"]
    offset = layout.uniform(90, 130, 4) * factors["background"]
    auto = layout.uniform(*_AUTO, 4) * factors["background"]
    gain = layout.uniform(0.8, 1.2)
    volume = _organelles(streams[1:6], cells, spec, _at_difficulty(CLASS_SPECS[0], difficulty), shape)

    photons, read_sd = 150.0 * (1 - 0.6 * difficulty), _READ_SD[0] + _READ_SD[1] * difficulty
    data = np.empty(volume.shape, np.uint16)
    for c in range(4):
        signal = ndimage.gaussian_filter(volume[c], _PSF_SIGMA, mode="constant", truncate=3.0) * brightness[c]
        camera = {"photons": photons, "offset": offset[c], "auto": auto[c], "gain": gain, "read_sd": read_sd}
        data[c] = _camera(noise[c], signal, **camera)
    metadata = {
        "label": spec.name,
        "class_index": index,
        "seed": seed,
        "difficulty": difficulty,
        "n_cells": len(cells),
        "cell_centers_yx": np.round(cells.center, 1).tolist(),
    }
    if shortcut:
        metadata["shortcut"] = factors  # planted on purpose: not a realistic image
    pixel_size = tuple(float(p) for p in pixel_size_um)
    return Image(data, CHANNELS, pixel_size, f"synthetic:{spec.name}:seed={seed}", metadata)


def image_seed(seed: int, label: int, index: int) -> int:
    """Seed of image ``index`` of class ``label`` in a data set drawn with ``seed``."""
    return int(np.random.SeedSequence([seed, label, index]).generate_state(1)[0])


def write_synthetic_dataset(
    out: str | Path,
    *,
    classes: int = 6,
    images_per_class: int = 4,
    shape: tuple[int, int, int] = (8, 256, 256),
    seed: int = 0,
    difficulty: float = 0.5,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write phantoms as ``out/images/<class>_<i>.ome.tif`` and a manifest ``out/labels.csv``.

    The manifest has columns ``path`` (relative to ``out``), ``label`` (class name) and
    ``group`` (image id). The folder is built under a temporary name and renamed into place;
    an existing one is replaced only with ``overwrite`` and only if cytofuse made it.
    """
    from tqdm import tqdm

    out = Path(out)
    if not 1 <= classes <= len(CLASS_SPECS):
        raise InputError(f"classes must be in [1, {len(CLASS_SPECS)}], got {classes}")
    if images_per_class < 1:
        raise InputError(f"images_per_class must be >= 1, got {images_per_class}")
    _check_args(shape, difficulty)
    rows = []
    jobs = [(label, i) for label in range(classes) for i in range(images_per_class)]
    with replacing_folder(out, overwrite=overwrite, what="data folder") as tmp:
        (tmp / "images").mkdir()
        for label, i in tqdm(jobs, desc="synthetic images", disable=not progress):
            name = f"{CLASS_NAMES[label]}_{i}"
            image = make_phantom(label, shape=shape, seed=image_seed(seed, label, i), difficulty=difficulty)
            write_ome_tiff(tmp / "images" / f"{name}.ome.tif", image)
            rows.append({"path": f"images/{name}.ome.tif", "label": CLASS_NAMES[label], "group": name})
        with open(tmp / "labels.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "label", "group"])
            writer.writeheader()
            writer.writerows(rows)
    return out
