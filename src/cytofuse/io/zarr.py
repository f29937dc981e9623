"""OME-Zarr (NGFF 0.4 and 0.5) images: lazy (C, Z, Y, X) reading and multiscale writing, with zarr 3.

Reading (:func:`open_ome_zarr`): the first multiscale image of a folder (``image.ome.zarr``, or the
series ``0`` of a bioformats2raw layout), its full-resolution level, as a :class:`ZarrStack`: an
array-like of shape (C, Z, Y, X) whose numpy-style reads decode only the chunks they touch. The
pipeline's stages read an image a z-slice (or a few patches) at a time, so a stack much larger than
memory is patched and predicted with a few decoded z-blocks in memory (a small cache of them). The
NGFF axes ``t``, ``c``, ``z``, ``y``, ``x`` map as the readers' axes do: ``c`` to channels, one stack
axis longer than 1 (``z``, or ``t`` when there is no z) to Z. Channel names come from ``omero``,
pixel sizes from the level's ``scale`` transformations and the axes' units.

Writing (:class:`MultiscaleWriter`, :func:`write_ome_zarr`): a (C, Z, Y, X) image as NGFF 0.4 (zarr
format 2) or 0.5 (zarr format 3), one chunk per plane, with levels downsampled by 2 in y and x (the
mean of the finite pixels of each 2 x 2 block), written plane by plane into a hidden folder beside the
target and renamed into place when complete.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from cytofuse.errors import InputError
from cytofuse.runs import building_folder

NGFF_VERSIONS = ("0.4", "0.5")
CACHE_BYTES = 64 * 2**20  # decoded z-blocks kept per stack (at least two per channel)
_UNIT_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6,
            "angstrom": 1e-4, "picometer": 1e-6}


# --------------------------------------------------------------------------- the lazy stack


class ZarrStack:
    """A (C, Z, Y, X) view of an NGFF image array that reads chunks on demand.

    Supported reads: ``stack[c]`` (a lazy channel), ``stack[[c0, c1]]`` (a lazy channel subset), any
    integer / slice key (a numpy array), integer-array keys over z, y and x with all channels
    (``stack[:, zs, ys, xs]``), iteration over channels, and ``np.asarray(stack)`` (the whole image,
    read z-block by z-block into one array). Decoded blocks of ``chunk z`` slices of one channel are
    cached (least recently used, ``cache_bytes`` in all), so patches of one slice decode it once.
    """

    ndim = 4

    def __init__(self, array, axes: str, *, channels: Sequence[int] | None = None, source: str = "",
                 cache_bytes: int = CACHE_BYTES, _cache: "_BlockCache | None" = None) -> None:
        self.array, self.axes, self.source = array, axes, source
        self._c = axes.find("c")
        stack = [i for i, a in enumerate(axes) if a not in "cyx"]
        long = [i for i in stack if array.shape[i] > 1]
        if len(long) > 1:
            raise InputError(f"{source} has {len(long)} stack axes longer than 1 "
                             f"({', '.join(f'{axes[i]}={array.shape[i]}' for i in long)}); cytofuse reads one of them "
                             "as Z: split the image")
        self._z = long[0] if long else (axes.index("z") if "z" in axes else None)
        n_c = array.shape[self._c] if self._c >= 0 else 1
        self.channels = tuple(range(n_c)) if channels is None else tuple(int(c) for c in channels)
        n_z = array.shape[self._z] if self._z is not None else 1
        self.shape = (len(self.channels), n_z, array.shape[axes.index("y")], array.shape[axes.index("x")])
        self.dtype = np.dtype(array.dtype)
        self.zchunk = array.chunks[self._z] if self._z is not None else 1
        block = self.zchunk * self.shape[2] * self.shape[3] * self.dtype.itemsize
        self._cache = _cache or _BlockCache(max(cache_bytes, 2 * n_c * block))

    def __getstate__(self) -> dict:
        """Pickled (to a worker process) without its cache: the copy starts an empty one."""
        return {**self.__dict__, "_cache": None, "_limit": self._cache.limit}

    def __setstate__(self, state: dict) -> None:
        limit = state.pop("_limit")
        self.__dict__.update(state)
        self._cache = _BlockCache(limit)

    # ----- array protocol
    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator["ZarrChannel"]:
        return (ZarrChannel(self, c) for c in range(self.shape[0]))

    def __repr__(self) -> str:
        return f"ZarrStack(shape={self.shape}, dtype={self.dtype}, source={self.source!r})"

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        for z0 in range(0, self.shape[1], self.zchunk):
            out[:, z0 : z0 + self.zchunk] = self._read(list(range(self.shape[0])), slice(z0, z0 + self.zchunk))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) == 1 and _is_int(key[0]):
            return ZarrChannel(self, _index(key[0], self.shape[0], "channel"))
        if len(key) == 1 and _is_int_list(key[0]):
            picked = [self.channels[_index(c, self.shape[0], "channel")] for c in np.asarray(key[0]).ravel()]
            return ZarrStack(self.array, self.axes, channels=picked, source=self.source, _cache=self._cache)
        key = key + (slice(None),) * (4 - len(key))
        if len(key) != 4:
            raise IndexError(f"too many indices for a (C, Z, Y, X) stack: {key!r}")
        if any(isinstance(k, np.ndarray) or isinstance(k, list) for k in key[1:]):
            return self._gather(key)
        c_key, z_key, y_key, x_key = key
        cs = range(self.shape[0])[c_key] if isinstance(c_key, slice) else [_index(c_key, self.shape[0], "channel")]
        zs = range(self.shape[1])[z_key] if isinstance(z_key, slice) else [_index(z_key, self.shape[1], "z")]
        out = self._read(cs, zs, y_key, x_key)
        return out[tuple(slice(None) if isinstance(k, slice) else 0 for k in (c_key, z_key))]

    # ----- reading
    def _read(self, cs: Sequence[int], zs, y_key=slice(None), x_key=slice(None)) -> np.ndarray:
        """(len(cs), len(zs), y, x) for channel positions ``cs`` and z positions ``zs`` (a sequence or slice)."""
        zs = range(self.shape[1])[zs] if isinstance(zs, slice) else zs
        plane_shape = tuple(len(range(n)[k]) for k, n in zip((y_key, x_key), self.shape[2:]) if isinstance(k, slice))
        out = np.empty((len(cs), len(zs), *plane_shape), self.dtype)
        for i, c in enumerate(cs):
            for j, z in enumerate(zs):
                out[i, j] = self._plane(c, z)[y_key, x_key]
        return out

    def _plane(self, c: int, z: int) -> np.ndarray:
        """(Y, X) plane ``z`` of channel position ``c``, from its cached z-block."""
        stored, block = self.channels[c], z // self.zchunk
        data = self._cache.get((id(self.array), stored, block), lambda: self._decode(stored, block))
        return data[z - block * self.zchunk]

    def _decode(self, stored: int, block: int) -> np.ndarray:
        """(zchunk, Y, X) of one stored channel: one z-block of chunks."""
        z0 = block * self.zchunk
        z1 = min(z0 + self.zchunk, self.shape[1])
        index = []
        for i, a in enumerate(self.axes):
            if i == self._c:
                index.append(stored)
            elif i == self._z:
                index.append(slice(z0, z1))
            elif a in "yx":
                index.append(slice(None))
            else:
                index.append(0)
        data = np.asarray(self.array[tuple(index)])
        return data if self._z is not None else data[None]

    def _gather(self, key) -> np.ndarray:
        """``stack[:, zs, ys, xs]`` with integer arrays zs, ys, xs (broadcast together): one slice at a time."""
        c_key, *rest = key
        if not (isinstance(c_key, slice) and c_key == slice(None)):
            raise IndexError(f"integer-array reads of a ZarrStack take every channel (stack[:, z, y, x]), got {key!r}")
        zs, ys, xs = np.broadcast_arrays(*(np.asarray(k) for k in rest))
        out = np.empty((self.shape[0], *zs.shape), self.dtype)
        for z in np.unique(zs):
            where = zs == z
            for c in range(self.shape[0]):
                out[c][where] = self._plane(c, int(z))[ys[where], xs[where]]
        return out


class ZarrChannel:
    """One channel (Z, Y, X) of a :class:`ZarrStack`, read on demand: ``channel[z]``, slices, iteration over z."""

    ndim = 3

    def __init__(self, stack: ZarrStack, c: int) -> None:
        self.stack, self.c = stack, c
        self.shape, self.dtype = stack.shape[1:], stack.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.stack._plane(self.c, z) for z in range(self.shape[0]))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        return self.stack[(self.c, *key)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.stack[self.c, :]
        return out if dtype is None else out.astype(dtype, copy=False)


class _BlockCache:
    """Least-recently-used decoded blocks, up to ``limit`` bytes; thread-safe (a block may be decoded twice
    when two threads ask at once, never stored twice)."""

    def __init__(self, limit: int) -> None:
        self.limit, self._items, self._bytes = limit, OrderedDict(), 0
        self._lock = threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._bytes += value.nbytes
                while self._bytes > self.limit and len(self._items) > 1:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
            return self._items[key]


def _is_int(key) -> bool:
    return isinstance(key, (int, np.integer)) and not isinstance(key, bool)


def _is_int_list(key) -> bool:
    return isinstance(key, (list, np.ndarray)) and np.asarray(key).dtype.kind in "iu"


def _index(i, n: int, what: str) -> int:
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"{what} index {i} is out of range for size {n}")
    return i % n


# --------------------------------------------------------------------------- NGFF metadata


def _ome_attrs(group, path: Path) -> tuple[dict, str]:
    """(the NGFF attributes, version) of a group: 0.5 under ``ome``, 0.4 at the top."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else None
    meta = ome if ome is not None else attrs
    multiscales = meta.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        raise InputError(f"{path} is not an OME-Zarr image: its attributes have no 'multiscales' "
                         f"(found {sorted(attrs)})")
    version = str((ome or {}).get("version") or multiscales[0].get("version") or "0.4")
    if version not in NGFF_VERSIONS:
        raise InputError(f"{path}: OME-Zarr (NGFF) version {version} is not supported; cytofuse reads "
                         f"{', '.join(NGFF_VERSIONS)}")
    return meta, version


def _image_group(path: Path):
    """The zarr group of the first image: the folder itself, or series 0 of a bioformats2raw layout.

    A URL (an ``ImageURL``) opens through zarr's ``FsspecStore``, with fsspec's configured storage options."""
    import zarr

    if hasattr(path, "filesystem"):  # an ImageURL: a missing fsspec driver is named before zarr reports it
        path.filesystem()
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises many kinds for a folder that is not a group
        raise InputError(f"cannot read {path} as OME-Zarr: {type(exc).__name__}: {exc}") from None
    attrs = dict(group.attrs)
    if "bioformats2raw.layout" in attrs or "bioformats2raw.layout" in (attrs.get("ome") or {}):
        if "0" not in group:
            raise InputError(f"{path}: a bioformats2raw layout without its first series '0'")
        return group["0"], (f"{str(path).rstrip('/')}/0" if isinstance(path, str) else path / "0")
    return group, path


def _pixel_size(multiscale: dict, axes: list[dict], dataset: dict) -> tuple[float | None, float | None, float | None]:
    """(z, y, x) micrometres from the level's scale (times the multiscale's own scale) and the axes' units."""
    scale = np.ones(len(axes))
    for transforms in (dataset.get("coordinateTransformations") or [], multiscale.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and len(t.get("scale") or []) == len(axes):
                scale = scale * np.asarray(t["scale"], float)
    out = {}
    for axis, s in zip(axes, scale):
        factor = _UNIT_UM.get(str(axis.get("unit", "")).lower())
        if axis.get("type") == "space" and factor is not None and np.isfinite(s) and s > 0:
            out[axis["name"]] = float(s) * factor
    return out.get("z"), out.get("y"), out.get("x")


def open_ome_zarr(path: str | Path) -> tuple[ZarrStack, list[str] | None, tuple, dict]:
    """(lazy (C, Z, Y, X) stack of the full-resolution level, channel names or None, (z, y, x) pixel size in
    micrometres, metadata) of an OME-Zarr image folder: a local path, or an fsspec URL (``s3://...``,
    ``memory://...``, e.g. a ``cytofuse.io.readers.ImageURL``) read through zarr's fsspec store, chunk by chunk."""
    path = path if isinstance(path, str) and "://" in path else Path(path)  # a URL stays a string
    group, where = _image_group(path)
    meta, version = _ome_attrs(group, where)
    multiscale = meta["multiscales"][0]
    axes = multiscale.get("axes")
    if version == "0.4" and axes and isinstance(axes[0], str):
        axes = [{"name": a} for a in axes]
    if not axes or not multiscale.get("datasets"):
        raise InputError(f"{path}: its multiscales entry lacks axes or datasets")
    names = "".join(str(a.get("name", "?"))[:1].lower() for a in axes)
    if "y" not in names or "x" not in names or len(set(names)) != len(names):
        raise InputError(f"{path}: OME-Zarr axes must name y and x once each, got {[a.get('name') for a in axes]}")
    dataset = multiscale["datasets"][0]
    try:
        array = group[dataset["path"]]
    except KeyError:
        raise InputError(f"{path}: the level {dataset['path']!r} named in multiscales is missing") from None
    if array.ndim != len(axes):
        raise InputError(f"{path}: level {dataset['path']!r} has {array.ndim} dimensions but {len(axes)} axes")
    stack = ZarrStack(array, names, source=str(path))
    omero = meta.get("omero") or {}
    labels = [str(ch.get("label", "")) for ch in omero.get("channels") or []] or None
    info = {"format": "ome-zarr", "ngff_version": version, "axes": names.upper(), "level": dataset["path"],
            "levels": len(multiscale["datasets"]), "chunks": list(array.chunks)}
    return stack, labels, _pixel_size(multiscale, axes, dataset), info


# --------------------------------------------------------------------------- writing


def downsample2(plane: np.ndarray) -> np.ndarray:
    """(ceil(Y/2), ceil(X/2)): the mean of the finite pixels of each 2 x 2 block (NaN where none is)."""
    y, x = plane.shape
    padded = np.full((y + y % 2, x + x % 2), np.nan)
    padded[:y, :x] = plane
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2)
    finite = np.isfinite(blocks)
    count = finite.sum(axis=(1, 3))
    total = np.where(finite, blocks, 0.0).sum(axis=(1, 3))
    mean = np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)
    if plane.dtype.kind in "iu":
        return np.rint(np.nan_to_num(mean)).astype(plane.dtype)
    return mean.astype(plane.dtype)


def level_shapes(shape_yx: Sequence[int], *, min_side: int = 256) -> list[tuple[int, int]]:
    """(Y, X) of each level: halved (rounding up) while the larger side of the last level exceeds ``min_side``."""
    shapes = [tuple(int(s) for s in shape_yx)]
    while max(shapes[-1]) > min_side and min(shapes[-1]) > 1:
        shapes.append(tuple((s + 1) // 2 for s in shapes[-1]))
    return shapes


class MultiscaleWriter:
    """Write a (C, Z, Y, X) image plane by plane as an OME-Zarr multiscale image.

    ``write(c, z, plane)`` stores a full-resolution (Y, X) plane and its downsampled levels; ``close``
    renames the hidden folder onto ``path`` (replacing what was there), ``abort`` removes it. Planes may
    be written in any order, each once. pixel_size_um: (z, y, x) of the full-resolution level.
    """

    def __init__(self, path: str | Path, *, shape: Sequence[int], dtype, channel_names: Sequence[str],
                 pixel_size_um=(None, None, None), version: str = "0.4", min_side: int = 256,
                 fill_value: float | int = 0, name: str = "") -> None:
        import zarr

        if version not in NGFF_VERSIONS:
            raise InputError(f"version must be one of {list(NGFF_VERSIONS)}, got {version!r}")
        if len(shape) != 4 or len(channel_names) != shape[0]:
            raise InputError(f"shape must be (C, Z, Y, X) with one channel name per channel, got shape {tuple(shape)} "
                             f"and {len(channel_names)} names")
        self.path, self.shape, self.version = Path(path), tuple(int(s) for s in shape), version
        self._building = building_folder(self.path)
        self._tmp = self._building.__enter__()
        fmt = 2 if version == "0.4" else 3
        group = zarr.open_group(str(self._tmp), mode="w", zarr_format=fmt)
        self.levels = level_shapes(self.shape[2:], min_side=min_side)
        self.arrays = []
        for i, (ny, nx) in enumerate(self.levels):
            extra = {"dimension_names": list("czyx")} if fmt == 3 else {}
            self.arrays.append(group.create_array(str(i), shape=(*self.shape[:2], ny, nx), chunks=(1, 1, ny, nx),
                                                  dtype=np.dtype(dtype), fill_value=fill_value, **extra))
        group.attrs.update(_ngff_attrs(self.levels, channel_names, pixel_size_um, version, name or self.path.name))
        self._done = False

    def write(self, c: int, z: int, plane: np.ndarray) -> None:
        """Store plane (Y, X) at channel ``c``, slice ``z`` in every level."""
        for i, array in enumerate(self.arrays):
            if i:
                plane = downsample2(plane)
            array[c, z] = plane

    def close(self) -> Path:
        if not self._done:
            self._done = True
            self._building.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._building.__exit__(RuntimeError, RuntimeError(f"{self.path} discarded"), None)

    def __enter__(self) -> "MultiscaleWriter":
        return self

    def __exit__(self, kind, err, tb) -> None:
        self.close() if kind is None else self.abort()


def _ngff_attrs(levels: list[tuple[int, int]], channel_names: Sequence[str], pixel_size_um, version: str,
                name: str) -> dict:
    pz, py, px = (float(s) if s else 1.0 for s in pixel_size_um)
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    base = levels[0]
    datasets = [{"path": str(i), "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, pz, py * base[0] / ny, px * base[1] / nx]}]} for i, (ny, nx) in enumerate(levels)]
    multiscale = {"name": name, "axes": axes, "datasets": datasets}
    omero = {"channels": [{"label": str(n), "active": True} for n in channel_names]}
    if version == "0.4":
        return {"multiscales": [{"version": "0.4", **multiscale}], "omero": omero}
    return {"ome": {"version": "0.5", "multiscales": [multiscale], "omero": omero}}


def write_ome_zarr(path: str | Path, data: np.ndarray, *, channel_names: Sequence[str],
                   pixel_size_um=(None, None, None), version: str = "0.4", min_side: int = 256) -> Path:
    """Write a (C, Z, Y, X) array as an OME-Zarr multiscale image (see :class:`MultiscaleWriter`)."""
    data = np.asarray(data) if not hasattr(data, "shape") else data
    with MultiscaleWriter(path, shape=data.shape, dtype=data.dtype, channel_names=channel_names,
                          pixel_size_um=pixel_size_um, version=version, min_side=min_side) as writer:
        for c in range(data.shape[0]):
            for z in range(data.shape[1]):
                writer.write(c, z, np.asarray(data[c, z]))
    return Path(path)
