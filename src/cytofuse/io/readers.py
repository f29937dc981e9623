"""Readers that turn microscopy files into one canonical layout, and writers.

Every reader returns an :class:`Image`: an array of shape (C, Z, Y, X) plus channel
names and the physical pixel size in micrometres (z, y, x) when the file has them.

- :func:`read_image` / :func:`probe_image`: TIFF (plain, ImageJ, OME), CZI, ND2, PNG/JPEG, .npy, and
  OME-Zarr folders (NGFF 0.4 / 0.5), whose data is a lazy ``cytofuse.io.zarr.ZarrStack``.
- :func:`group_channel_files` / :func:`read_channel_files`: one file per channel.
- :func:`montage_tiles` / :func:`split_montage`: montages of single-cell tiles.
- :func:`write_ome_tiff`.

An image may be a local path or an fsspec URL (``s3://``, ``gs://``, ``https://``, ``file://``,
``memory://``, ...; see :class:`ImageURL`): TIFF, PNG/JPEG and .npy files are read whole through
``fsspec.open``, OME-Zarr stays lazy through zarr's fsspec store. Storage options (credentials,
endpoints) come from fsspec's own configuration and the environment, as fsspec and its drivers read them.
"""

from __future__ import annotations

import io
import logging
import posixpath
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import numpy as np

from cytofuse.errors import InputError
from cytofuse.runs import atomic_path

RGB_NAMES = ("red", "green", "blue")


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
URL_FORMATS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy", ".zarr")  # formats read from a URL


def is_url(value: object) -> bool:
    """Whether ``value`` is a string (not a ``Path``) of the form ``scheme://...``: an fsspec URL."""
    return isinstance(value, str) and bool(_URL.match(value.strip()))


class ImageURL(str):
    """An image addressed by an fsspec URL (``s3://bucket/a.ome.tif``): a string with the parts of a path
    that image sets use (``name``, ``suffix``, ``parent``). ``absolute()`` and ``resolve()`` return it
    unchanged, so it reaches cluster workers as given. ``origin`` says where it was written (a manifest
    row), for error messages."""

    origin: str = ""

    def __new__(cls, url: str, origin: str = "") -> "ImageURL":
        text = str(url).strip()
        if not is_url(text):
            raise InputError(f"{url!r} is not a URL of the form scheme://...")
        out = super().__new__(cls, text)
        out.origin = origin or getattr(url, "origin", "")
        return out

    def __reduce__(self):
        return (type(self), (str(self), self.origin))

    @property
    def protocol(self) -> str:
        return self.split("://", 1)[0].lower()

    @property
    def name(self) -> str:
        return posixpath.basename(urlsplit(str(self)).path.rstrip("/")) or str(self)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> "ImageURL":
        head = str(self).rstrip("/")
        return ImageURL(head.rsplit("/", 1)[0] if head.count("/") > 2 else head, self.origin)

    def joinpath(self, *parts: str) -> "ImageURL":
        return ImageURL("/".join([str(self).rstrip("/"), *(str(p).strip("/") for p in parts)]), self.origin)

    def absolute(self) -> "ImageURL":
        return self

    def resolve(self) -> "ImageURL":
        return self

    def is_relative_to(self, other) -> bool:
        return isinstance(other, ImageURL) and str(self).startswith(str(other).rstrip("/") + "/")

    def filesystem(self):
        """(fsspec filesystem, path within it); an error naming the package when the scheme's driver is missing."""
        return url_filesystem(self)

    def exists(self) -> bool:
        fs, path = self.filesystem()
        return bool(fs.exists(path))

    def where(self) -> str:
        return f" ({self.origin})" if self.origin else ""


def as_image_path(value: "str | Path | ImageURL") -> "Path | ImageURL":
    """A URL string as an :class:`ImageURL`, anything else as a ``Path``."""
    if isinstance(value, ImageURL):
        return value
    return ImageURL(value) if is_url(value) else Path(value)


def url_filesystem(url: str):
    """(fsspec filesystem, path) of ``url``, with storage options from fsspec's configuration and environment."""
    try:
        import fsspec
    except ImportError:
        raise InputError(f"image URL {url} needs fsspec: pip install fsspec") from None
    protocol = str(url).split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as exc:
        from fsspec.registry import known_implementations

        package = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
        hint = f"; pip install {package}" if package and package != "fsspec" else ""
        raise InputError(f"image URL {url}{getattr(url, 'origin', '') and f' ({url.origin})'}: reading "
                         f"{protocol}:// needs a package that is not installed ({exc}){hint}") from None
    except ValueError as exc:
        raise InputError(f"image URL {url}: {protocol}:// is not a storage scheme fsspec knows ({exc})") from None


@dataclass(frozen=True)
class Image:
    """A multichannel image stack in (C, Z, Y, X) order."""

    data: np.ndarray
    channel_names: tuple[str, ...]
    pixel_size_um: tuple[float | None, float | None, float | None] = (None, None, None)
    source: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data.ndim != 4:
            raise ValueError(f"Image data must be 4D (C, Z, Y, X), got shape {self.data.shape} from {self.source or '<array>'}")
        if len(self.channel_names) != self.data.shape[0]:
            raise ValueError(
                f"channel_names has {len(self.channel_names)} names but the data of {self.source or '<array>'} "
                f"has {self.data.shape[0]} channels: {self.channel_names}"
            )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def n_channels(self) -> int:
        return self.data.shape[0]


def write_ome_tiff(path: str | Path, image: Image, *, overwrite: bool = False) -> Path:
    """Write ``image`` as OME-TIFF with channel names and pixel sizes.

    The file is written to a temporary name beside ``path`` and renamed into place, so a
    crash never leaves a half-written file under the final name.
    """
    import tifffile

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"write_ome_tiff: {path} exists; pass overwrite=True to replace it")
    metadata: dict = {"axes": "CZYX", "Channel": {"Name": list(image.channel_names)}}
    for axis, size in zip("ZYX", image.pixel_size_um):
        if size is not None:
            metadata[f"PhysicalSize{axis}"] = float(size)
            metadata[f"PhysicalSize{axis}Unit"] = "µm"
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(image.data), ome=True, metadata=metadata, photometric="minisblack")
    return path


@dataclass(frozen=True)
class ImageInfo:
    """What an image file holds, read from its header where the format allows."""

    shape: tuple[int, int, int, int]
    dtype: np.dtype
    channel_names: tuple[str, ...]
    pixel_size_um: tuple[float | None, float | None, float | None]
    path: Path

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


@dataclass(frozen=True)
class _Parsed:
    """One format reader's answer: data (None when probing) and what the file says about it."""

    shape: tuple[int, int, int, int]
    dtype: np.dtype
    data: np.ndarray | None = None
    names: Sequence[str] | None = None
    pixel_size_um: tuple[float | None, float | None, float | None] = (None, None, None)
    metadata: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- public readers


def read_image(
    path: str | Path, *, axes: str | None = None, channel_names: Sequence[str] | None = None, mmap: bool = False
) -> Image:
    """Read one image file into (C, Z, Y, X) with channel names and pixel sizes.

    ``axes`` names the file's dimensions (letters C, Z, Y, X, plus T, S, ...); it is
    required for .npy and overrides the order stored in a TIFF. Channels are ``C`` and
    ``S`` (RGB samples); one other axis longer than 1 (Z, T, I, Q, ...) becomes Z.
    ``channel_names`` replaces the names in the file (default "ch0", "ch1", ...).
    A .npy file is memory-mapped read-only: copy the data before changing it. With ``mmap``
    an uncompressed, contiguous TIFF is memory-mapped read-only too (its pixels are read on
    first use, with no copy); other TIFFs are read into memory as usual.
    """
    path = _check_file(path)
    reader = _FORMATS[path.suffix.lower()]
    remote = isinstance(path, ImageURL)  # a URL is read whole: memory mapping does not apply
    parsed = reader(path, axes, True, mmap=True) if mmap and not remote and reader is _tiff else reader(path, axes, True)
    names = _channel_names(parsed.shape[0], parsed.names, channel_names, path)
    check_finite(parsed.data, path, names)
    return Image(parsed.data, names, parsed.pixel_size_um, str(path), parsed.metadata)


def check_finite(data: np.ndarray, source: str | Path, channel_names: Sequence[str]) -> None:
    """Raise when a floating-point (C, Z, Y, X) stack holds NaN or infinite pixels, counted per channel.

    Checked one plane at a time, so a memory-mapped stack is not loaded whole.
    """
    if data.dtype.kind != "f":
        return
    bad = [sum(int(np.count_nonzero(~np.isfinite(plane))) for plane in channel) for channel in data]
    if any(bad):
        where = ", ".join(f"{name}: {n}" for name, n in zip(channel_names, bad) if n)
        raise InputError(
            f"image file {source} has {sum(bad)} NaN or infinite pixel(s) of {data.size} ({where}); "
            "cytofuse needs finite pixel values: replace them (e.g. with 0) or leave the image out"
        )


def probe_image(path: str | Path, *, axes: str | None = None) -> ImageInfo:
    """Describe an image file without decoding its pixels where the format allows.

    TIFF, CZI, ND2 and .npy are read from their headers (a TIFF is also checked for
    truncation); PNG and JPEG are decoded, because whether an RGB file is grey needs pixels.
    """
    path = _check_file(path)
    parsed = _FORMATS[path.suffix.lower()](path, axes, False)
    names = _channel_names(parsed.shape[0], parsed.names, None, path)
    return ImageInfo(parsed.shape, np.dtype(parsed.dtype), names, parsed.pixel_size_um, path)


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits_in_memory(nbytes: int, source: str | Path, shape: Sequence[int], dtype) -> None:
    """Raise before decoding an image whose pixels would not fit in the memory available now."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise InputError(
            f"image file {source} decodes to {nbytes / 2**30:.1f} GiB (shape {tuple(shape)}, {np.dtype(dtype)}) but "
            f"only {free / 2**30:.1f} GiB of memory is available; split it into smaller files or use a larger machine"
        )


def _check_file(path: str | Path) -> Path | ImageURL:
    path = as_image_path(path)
    if isinstance(path, ImageURL):
        return check_url(path)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise InputError(f"unsupported image file {path}: suffix {path.suffix!r} is not one of {', '.join(supported_suffixes())}")
    if not path.exists():
        raise InputError(f"image file {path} does not exist")
    if suffix in FOLDER_FORMATS:
        if not path.is_dir():
            raise InputError(f"image path {path} is not a folder; {suffix} images are folders")
        return path
    if not path.is_file():
        raise InputError(f"image path {path} is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"image file {path} is empty (0 bytes)")
    return path


def check_url(url: ImageURL) -> ImageURL:
    """The URL, when it names an existing file (a folder for OME-Zarr) of a format read from URLs."""
    suffix = url.suffix.lower()
    if suffix not in URL_FORMATS:
        known = f"{suffix!r} files are read from local paths only" if suffix in _FORMATS else \
            f"suffix {suffix!r} is not one of {', '.join(supported_suffixes())}"
        raise InputError(f"image URL {url}{url.where()}: {known}; from a URL cytofuse reads "
                         f"{', '.join(URL_FORMATS)}: copy the file locally (or to shared storage) and give its path")
    fs, where = url.filesystem()
    try:
        info = fs.info(where)
    except FileNotFoundError:
        raise InputError(f"image URL {url}{url.where()} does not exist") from None
    except Exception as exc:  # a driver's own errors: permissions, network, credentials
        raise InputError(f"image URL {url}{url.where()} cannot be reached: {type(exc).__name__}: {exc}") from None
    is_dir = info.get("type") == "directory"
    if suffix in FOLDER_FORMATS:
        if not is_dir:
            raise InputError(f"image URL {url}{url.where()} is not a folder; {suffix} images are folders")
    elif is_dir:
        raise InputError(f"image URL {url}{url.where()} is a folder, not a file")
    elif info.get("size") == 0:
        raise InputError(f"image URL {url}{url.where()} is empty (0 bytes)")
    return url


def _url_bytes(url: ImageURL, what: str) -> io.BytesIO:
    """The whole file behind ``url``, read once into memory."""
    fs, where = url.filesystem()
    size = fs.size(where)
    if size:
        check_fits_in_memory(int(size), url, (int(size),), np.uint8)
    with _reading(url, what), fs.open(where, "rb") as fh:
        return io.BytesIO(fh.read())


def _channel_names(n: int, found: Sequence[str] | None, override: Sequence[str] | None, path: Path) -> tuple[str, ...]:
    """The override (checked), else the file's names when they fit, else ch0, ch1, ..."""
    if override is not None:
        names = tuple(str(name) for name in override)
        if len(names) != n:
            raise InputError(f"channel_names has {len(names)} names but {path} has {n} channels, got channel_names={list(names)}")
        return names
    if found is not None:
        names = tuple(str(name) for name in found)
        if len(names) == n and all(names) and len(set(names)) == n:
            return names
    return tuple(f"ch{i}" for i in range(n))


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn any failure of a third-party reader into an InputError that names the file."""
    try:
        yield
    except (InputError, Warning, MemoryError):
        raise
    except Exception as exc:  # readers raise anything from struct.error to codec errors
        raise InputError(f"cannot read {path} as {what}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- axes


def _axes_plan(shape: tuple[int, ...], axes: str, path: Path | str) -> tuple[tuple[int, ...], tuple[int, int, int, int], str]:
    """Transpose order, (C, Z, Y, X) shape and the axis read as Z, for data with ``axes``.

    C and S (samples) become channels (C major); at most one other axis may be longer than 1
    and becomes Z.
    """
    axes = axes.upper()
    named = [a for a in axes if a not in "QI"]  # tifffile repeats Q and I for unnamed axes
    if len(axes) != len(shape) or len(set(named)) != len(named) or not axes.isalpha() or not {"Y", "X"} <= set(axes):
        raise InputError(
            f"axes must name each of the {len(shape)} dimensions of {path} (shape {tuple(shape)}) once, "
            f"including Y and X, got axes={axes!r}"
        )
    channel = [i for i, a in enumerate(axes) if a in "CS"]
    stack = [i for i, a in enumerate(axes) if a not in "CSYX"]
    long = [i for i in stack if shape[i] > 1]
    if len(long) > 1:
        raise InputError(
            f"{path} has {len(long)} stack axes longer than 1 ({', '.join(f'{axes[i]}={shape[i]}' for i in long)}); "
            f"cytofuse reads one of them as Z: pass axes= to name them, or split the file"
        )
    y, x = axes.index("Y"), axes.index("X")
    order = (*channel, *stack, y, x)
    c = int(np.prod([shape[i] for i in channel], dtype=np.int64))
    z = int(np.prod([shape[i] for i in stack], dtype=np.int64))
    return order, (c, z, shape[y], shape[x]), (axes[long[0]] if long else "Z")


def _to_czyx(data: np.ndarray, axes: str, path: Path) -> np.ndarray:
    order, shape, _ = _axes_plan(data.shape, axes, path)
    return data.transpose(order).reshape(shape)


def _no_axes(axes: str | None, path: Path) -> None:
    if axes is not None:
        raise InputError(f"axes applies only to .tif/.tiff/.npy files, whose order may be unknown; got axes={axes!r} for {path}")


# --------------------------------------------------------------------------- units

_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "å": 1e-4, "pm": 1e-6}


def _length_um(value: object, unit: object = "µm") -> float | None:
    """A length in micrometres, or None when the value or unit is missing or unknown."""
    if value is None:
        return None
    unit = str(unit).strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").replace("\u03bc", "µ").lower()
    try:
        size = float(value) * _UNIT_UM[unit]
    except (KeyError, ValueError, TypeError):
        return None
    return size if np.isfinite(size) and size > 0 else None


# --------------------------------------------------------------------------- TIFF


@contextmanager
def _tifffile_log() -> Iterator[list[str]]:
    """Collect what tifffile logs: it reports corrupt or truncated files there, not by raising."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _tiff(path: Path, axes: str | None, load: bool, *, mmap: bool = False) -> _Parsed:
    import tifffile

    remote = isinstance(path, ImageURL)
    source = _url_source(path, "TIFF", load) if remote else nullcontext(path)
    with source as handle, _tifffile_log() as log, _reading(path, "TIFF"), \
            tifffile.TiffFile(handle, **({"name": path.name} if remote else {})) as tif:
        size = _handle_size(handle)
        len(tif.pages)  # indexes the IFD chain, stopping at a circular reference (tif.series alone loops on one)
        series = tif.series[0]
        _check_tiff_complete(tif, series, path, log, size)
        file_axes = (axes or series.axes).upper()
        _, shape, z_axis = _axes_plan(series.shape, file_axes, path)
        names, pixel = _tiff_metadata(tif, file_axes, shape)
        data = None
        if load and mmap and series.dataoffset is not None:  # uncompressed and contiguous
            raw = np.asarray(tifffile.memmap(path, series=tif.series.index(series), mode="r"))
            data = _to_czyx(raw.reshape(series.shape), file_axes, path)
        elif load:
            check_fits_in_memory(series.nbytes, path, series.shape, series.dtype)
            data = _to_czyx(series.asarray(), file_axes, path)
        _check_tiff_complete(tif, series, path, log, size)
        meta = {"format": "tiff", "axes": file_axes, "z_axis": z_axis, "n_series": len(tif.series)}
    return _Parsed(shape, series.dtype, data, names, pixel, meta)


@contextmanager
def _url_source(url: ImageURL, what: str, load: bool) -> Iterator:
    """A seekable file of ``url``: the whole file in memory to load pixels, else the fsspec file (headers only)."""
    if load:
        yield _url_bytes(url, what)
        return
    fs, where = url.filesystem()
    with _reading(url, what), fs.open(where, "rb") as fh:
        yield fh


def _handle_size(handle) -> int:
    """Bytes in a local path or an open binary file."""
    if isinstance(handle, (str, Path)):
        return Path(handle).stat().st_size
    if isinstance(handle, io.BytesIO):
        return handle.getbuffer().nbytes
    return int(handle.size)


def _check_tiff_complete(tif, series, path: Path, log: list[str], size: int) -> None:
    """Raise when tifffile reported corruption or the image data runs past the end of the file."""
    bad = [m for m in log if re.search(r"invalid|corrupt|truncat|failed", m, re.IGNORECASE)]
    if bad:
        raise InputError(f"image file {path} is truncated or corrupt: {bad[0]}")
    end = series.dataoffset + series.nbytes if series.dataoffset is not None else 0
    for page in series.pages:
        if page is not None and page.dataoffsets:
            end = max(end, max(o + n for o, n in zip(page.dataoffsets, page.databytecounts)))
    if end > size:
        raise InputError(f"image file {path} is truncated: its image data ends at byte {end} but the file has {size} bytes")


def _tiff_metadata(tif, axes: str, shape: tuple[int, int, int, int]) -> tuple[list[str] | None, tuple]:
    """Channel names and (z, y, x) pixel size from OME-XML, ImageJ metadata or resolution tags."""
    page = tif.pages.first
    if tif.is_ome:
        names, pixel = _ome_metadata(tif.ome_metadata)
    elif tif.is_imagej:
        names, pixel = _imagej_metadata(tif.imagej_metadata or {}, page, shape)
    else:
        names, pixel = None, (None, *_resolution_um(page, None))
    if names is None and "S" in axes and "C" not in axes and shape[0] == 3 and page.photometric == 2:  # RGB
        names = list(RGB_NAMES)
    return names, pixel


def _ome_metadata(xml: str | None) -> tuple[list[str] | None, tuple]:
    import xml.etree.ElementTree as ElementTree

    pixels = ElementTree.fromstring(xml).find(".//{*}Image/{*}Pixels") if xml else None
    if pixels is None:
        return None, (None, None, None)
    names = [channel.get("Name", "") for channel in pixels.findall("{*}Channel")]
    pixel = tuple(_length_um(pixels.get(f"PhysicalSize{a}"), pixels.get(f"PhysicalSize{a}Unit", "µm")) for a in "ZYX")
    return names or None, pixel


def _imagej_metadata(meta: dict, page, shape: tuple[int, int, int, int]) -> tuple[list[str] | None, tuple]:
    """ImageJ slice labels as channel names when they repeat per channel; unit, resolution, spacing."""
    c, z = shape[:2]
    labels = meta.get("Labels")
    names = None
    if isinstance(labels, (list, tuple)) and labels and len(labels) % c == 0:
        if all(label == labels[i % c] for i, label in enumerate(labels)):
            names = list(labels[:c])
    unit = meta.get("unit")
    y, x = _resolution_um(page, unit)
    dz = _length_um(meta.get("spacing"), unit) if z > 1 and unit else None
    return names, (dz, y, x)


def _resolution_um(page, unit: str | None) -> tuple[float | None, float | None]:
    """(y, x) pixel size from the resolution tags: ImageJ's unit, else centimetres; inches are ignored

    (72 dpi is what non-microscopy software writes)."""
    if unit is None:
        if page.tags.get("ResolutionUnit") is None or page.tags["ResolutionUnit"].value != 3:
            return None, None
        unit = "cm"
    sizes = []
    for name in ("YResolution", "XResolution"):
        tag = page.tags.get(name)
        num, den = tag.value if tag is not None else (0, 0)
        sizes.append(_length_um(den / num, unit) if num else None)
    return sizes[0], sizes[1]


# --------------------------------------------------------------------------- CZI, ND2


_CZI_DTYPES = {"Gray8": np.uint8, "Gray16": np.uint16, "Gray32Float": np.float32, "Bgr24": np.uint8, "Bgr48": np.uint16}


def _czi(path: Path, axes: str | None, load: bool) -> _Parsed:
    """CZI through pylibCZIrw (Zeiss's library): the first scene, mosaics composed, BGR -> RGB."""
    _no_axes(axes, path)
    from pylibCZIrw import czi as pyczi

    with _reading(path, "CZI"), pyczi.open_czi(str(path)) as czi:
        box, scenes = czi.total_bounding_box, czi.scenes_bounding_rectangle
        scene = min(scenes) if scenes else None
        roi = scenes[scene] if scenes else czi.total_bounding_rectangle
        (t0, nt), (c0, nc), (z0, nz) = (_start_length(box.get(d, (0, 1))) for d in "TCZ")
        types = [czi.pixel_types.get(c, czi.pixel_types.get(0)) for c in range(c0, c0 + nc)]
        if any(t not in _CZI_DTYPES for t in types):
            raise InputError(f"{path} has CZI pixel types {sorted(set(types))}; supported: {', '.join(_CZI_DTYPES)}")
        ns = 3 if types[0].startswith("Bgr") else 1
        file_shape, order = (nt, nc, nz, roi.h, roi.w, ns), "TCZYXS"
        _, shape, z_axis = _axes_plan(file_shape, order, path)
        dtype = np.result_type(*(_CZI_DTYPES[t] for t in types))
        data = None
        if load:
            data = np.empty(file_shape, dtype)
            for t, c, z in np.ndindex(nt, nc, nz):
                plane = czi.read(roi=roi, plane={"T": t0 + t, "C": c0 + c, "Z": z0 + z}, scene=scene)
                data[t, c, z] = plane[..., ::-1] if ns == 3 else plane
            data = _to_czyx(data, order, path)
        names, pixel = _czi_metadata(czi.metadata)
    if ns == 3 and nc == 1:
        names = list(RGB_NAMES)
    if len(scenes) > 1:
        warnings.warn(f"{path} has {len(scenes)} scenes; reading the first, scene {scene}", stacklevel=3)
    meta = {"format": "czi", "axes": order, "z_axis": z_axis, "n_scenes": max(len(scenes), 1)}
    return _Parsed(shape, dtype, data, names, pixel, meta)


def _start_length(span: tuple[int, int]) -> tuple[int, int]:
    return int(span[0]), int(span[1] - span[0])


def _czi_metadata(meta: dict) -> tuple[list[str] | None, tuple]:
    """Channel names and (z, y, x) pixel size (CZI stores metres) from the parsed CZI XML."""
    doc = (meta or {}).get("ImageDocument", {}).get("Metadata", {})
    try:
        channels = doc["Information"]["Image"]["Dimensions"]["Channels"]["Channel"]
        channels = [channels] if isinstance(channels, dict) else channels
        names = [ch.get("@Name") or ch.get("@Id", "") for ch in channels]
    except (KeyError, TypeError):
        names = None
    try:
        items = doc["Scaling"]["Items"]["Distance"]
        items = [items] if isinstance(items, dict) else items
        scale = {item["@Id"]: _length_um(item.get("Value"), "m") for item in items}
    except (KeyError, TypeError):
        scale = {}
    return names, (scale.get("Z"), scale.get("Y"), scale.get("X"))


def _nd2(path: Path, axes: str | None, load: bool) -> _Parsed:
    _no_axes(axes, path)
    import nd2

    with _reading(path, "ND2"), nd2.ND2File(path) as f:
        sizes = dict(f.sizes)
        data = f.asarray() if load else None
        n_pos = sizes.get("P", 1)
        if "P" in sizes:  # multipoint positions are separate fields: keep the first
            data = None if data is None else np.take(data, 0, axis=list(sizes).index("P"))
            del sizes["P"]
        order = "".join(sizes)
        _, shape, z_axis = _axes_plan(tuple(sizes.values()), order, path)
        data = None if data is None else _to_czyx(data, order, path)
        names = [ch.channel.name for ch in (f.metadata.channels or [])]
        voxel = f.voxel_size()
        pixel = (_length_um(voxel.z), _length_um(voxel.y), _length_um(voxel.x))
        dtype = f.dtype
    if n_pos > 1:
        warnings.warn(f"{path} has {n_pos} positions; reading the first", stacklevel=3)
    meta = {"format": "nd2", "axes": order, "z_axis": z_axis, "n_positions": n_pos}
    return _Parsed(shape, dtype, data, names, pixel, meta)


# --------------------------------------------------------------------------- PNG / JPEG, .npy


def _pillow(path: Path, axes: str | None, load: bool) -> _Parsed:
    """Grey -> one channel; RGB(A) with equal colour planes -> one channel; else red, green, blue."""
    _no_axes(axes, path)
    from PIL import Image as PILImage

    source = _url_bytes(path, "PNG/JPEG image") if isinstance(path, ImageURL) else path
    with _reading(path, "PNG/JPEG image"), PILImage.open(source) as pil:
        pil.load()
        mode = pil.mode
        array = _pillow_array(pil)
    names = None
    if array.ndim == 3:
        rgb = array[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            array = rgb[..., 0]
        else:
            array, names = np.moveaxis(rgb, -1, 0), list(RGB_NAMES)
    data = np.ascontiguousarray(array.reshape((-1, 1, *array.shape[-2:])))
    meta = {"format": path.suffix.lower().lstrip("."), "mode": mode}
    return _Parsed(data.shape, data.dtype, data, names, (None, None, None), meta)


def _pillow_array(pil) -> np.ndarray:
    if pil.mode in ("L", "I", "F", "I;16", "I;16B", "I;16L"):
        return np.asarray(pil)
    if pil.mode in ("1", "LA", "La"):
        return np.asarray(pil.convert("L"))
    return np.asarray(pil.convert("RGBA"))[..., :3]


def _npy(path: Path, axes: str | None, load: bool) -> _Parsed:
    if axes is None:
        raise InputError(f"{path}: a .npy file stores no axis order; pass axes= (e.g. 'YXC', 'CZYX', 'ZCYX' or 'YX')")
    with _reading(path, "NumPy .npy"):
        if isinstance(path, ImageURL):
            array = np.load(_url_bytes(path, "NumPy .npy"), allow_pickle=False)
        else:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.dtype.kind not in "biuf":
        raise InputError(f"{path} holds dtype {array.dtype}; images need integer, float or bool pixels")
    order, shape, z_axis = _axes_plan(array.shape, axes, path)
    data = _to_czyx(array, axes, path) if load else None
    return _Parsed(shape, array.dtype, data, None, (None, None, None), {"format": "npy", "axes": axes.upper(), "z_axis": z_axis})


def _ome_zarr(path: Path, axes: str | None, load: bool) -> _Parsed:
    """OME-Zarr (NGFF 0.4 / 0.5): a lazy stack that reads chunks on demand (``cytofuse.io.zarr``)."""
    _no_axes(axes, path)
    from cytofuse.io.zarr import open_ome_zarr

    with _reading(path, "OME-Zarr"):
        stack, names, pixel, meta = open_ome_zarr(path)
    return _Parsed(stack.shape, stack.dtype, stack if load else None, names, pixel, meta)


_FORMATS = {
    ".zarr": _ome_zarr,
    ".tif": _tiff,
    ".tiff": _tiff,
    ".czi": _czi,
    ".nd2": _nd2,
    ".png": _pillow,
    ".jpg": _pillow,
    ".jpeg": _pillow,
    ".npy": _npy,
}


FOLDER_FORMATS = (".zarr",)  # images stored as folders (OME-Zarr: ``name.ome.zarr``)


def supported_suffixes() -> tuple[str, ...]:
    """File suffixes :func:`read_image` reads (lower case, with the dot), registered readers included."""
    return tuple(_FORMATS)


def register_reader(suffix: str, read: Callable[[Path, str | None], Image], *, replace: bool = False) -> None:
    """Read files ending in ``suffix`` with ``read(path, axes) -> Image`` (data in (C, Z, Y, X)).

    The reader then serves :func:`read_image`, :func:`probe_image`, image folders and manifests;
    cytofuse still checks the array (4-D, finite pixels) and the channel names.
    """
    if not isinstance(suffix, str) or not re.fullmatch(r"\.[a-z0-9][a-z0-9._-]*", suffix.lower()):
        raise InputError(f"register_reader: suffix must look like '.xyz', got {suffix!r}")
    suffix = suffix.lower()
    if suffix in _FORMATS and not replace:
        raise InputError(f"register_reader: {suffix} files are read already; pass replace=True to replace that reader")
    if not callable(read):
        raise InputError(f"register_reader: read must be callable (path, axes) -> Image, got {read!r}")

    def parse(path: Path, axes: str | None, load: bool) -> _Parsed:
        image = read(path, axes)
        data = np.asarray(getattr(image, "data", None))
        if data.ndim != 4:
            raise InputError(f"{path}: the reader registered for {suffix} returned {data.ndim}-D data of shape "
                             f"{data.shape}; readers return (C, Z, Y, X) arrays in an Image")
        return _Parsed(tuple(data.shape), data.dtype, data if load else None, list(image.channel_names),
                       tuple(image.pixel_size_um), dict(image.metadata or {}))

    _FORMATS[suffix] = parse


# --------------------------------------------------------------------------- one file per channel


def _natural_key(text: str) -> list:
    """Sort key that puts Ch2 before Ch10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def group_channel_files(
    paths: Iterable[str | Path], *, pattern: str = r"^(?P<channel>[^_]+)_(?P<key>.+)\.[^.]+$"
) -> dict[str, dict[str, Path]]:
    """Group one-file-per-channel images by key: {key: {channel: path}}, both in natural order.

    ``pattern`` is matched against each file name and must have the named groups
    ``channel`` and ``key``; every key must have every channel that any key has.
    Group the files of one folder at a time when keys repeat across folders.
    """
    regex = re.compile(pattern)
    if not {"channel", "key"} <= set(regex.groupindex):
        raise InputError(f"pattern must have named groups 'channel' and 'key', got pattern={pattern!r}")
    groups: dict[str, dict[str, Path]] = {}
    for path in map(Path, paths):
        match = regex.match(path.name)
        if match is None:
            raise InputError(f"file name of {path} does not match pattern={pattern!r}")
        slot = groups.setdefault(match["key"], {})
        if match["channel"] in slot:
            raise InputError(f"{slot[match['channel']]} and {path} both give channel {match['channel']!r} of key {match['key']!r}")
        slot[match["channel"]] = path
    if not groups:
        raise InputError("group_channel_files got no paths")
    channels = sorted(set().union(*groups.values()), key=_natural_key)
    for key, slot in groups.items():
        missing = [channel for channel in channels if channel not in slot]
        if missing:
            raise InputError(f"key {key!r} lacks channel(s) {missing} that other files have; its files: {[str(p) for p in slot.values()]}")
    return {key: {channel: groups[key][channel] for channel in channels} for key in sorted(groups, key=_natural_key)}


def read_channel_files(channel_paths: Mapping[str, str | Path], *, axes: str | None = None) -> Image:
    """Stack single-channel files, one per channel, into one Image named by the mapping's keys."""
    if not channel_paths:
        raise InputError("channel_paths is empty; give at least one {channel: path}")
    images = [read_image(path, axes=axes) for path in channel_paths.values()]
    first = images[0]
    for image in images:
        if image.n_channels != 1:
            raise InputError(f"{image.source} holds {image.n_channels} channels; one file per channel needs single-channel files")
        if image.shape != first.shape or image.data.dtype != first.data.dtype:
            raise InputError(
                f"{image.source} has shape {image.shape} and dtype {image.data.dtype}, but {first.source} "
                f"has {first.shape} and {first.data.dtype}; channel files must match"
            )
    sizes = {image.pixel_size_um for image in images}
    if len(sizes) > 1:
        warnings.warn(f"channel files of {first.source} disagree on pixel size {sorted(map(str, sizes))}; using the first", stacklevel=2)
    data = np.stack([image.data[0] for image in images])
    meta = {**first.metadata, "channel_files": {name: image.source for name, image in zip(channel_paths, images)}}
    return Image(data, tuple(channel_paths), first.pixel_size_um, first.source, meta)


# --------------------------------------------------------------------------- montages


def _tile_shape(tile_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (tile_size, tile_size) if isinstance(tile_size, (int, np.integer)) else tuple(tile_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size):
        raise InputError(f"tile_size must be a positive int or a pair of them, got tile_size={tile_size!r}")
    return int(size[0]), int(size[1])


def montage_tiles(
    data: np.ndarray,
    *,
    tile_size: int | tuple[int, int],
    order: Literal["column", "row"] = "column",
    n_tiles: int | None = None,
    source: str = "<array>",
) -> np.ndarray:
    """Cut a (C, Z, Y, X) montage into tiles of shape (N, C, Z, tile_y, tile_x).

    ``order="column"`` runs down the first column of tiles, then the next (imaging flow
    cytometry exports); ``"row"`` runs along rows. ``n_tiles`` keeps the first N tiles;
    padding tiles are not detected here.
    """
    th, tw = _tile_shape(tile_size)
    c, z, y, x = data.shape
    if y % th or x % tw:
        raise InputError(f"montage {source} of size (Y, X) = {(y, x)} is not a multiple of tile_size {(th, tw)}")
    if order not in ("column", "row"):
        raise InputError(f"order must be 'column' or 'row', got order={order!r}")
    ny, nx = y // th, x // tw
    if n_tiles is not None and not (isinstance(n_tiles, (int, np.integer)) and 0 < n_tiles <= ny * nx):
        raise InputError(f"n_tiles must be between 1 and the {ny * nx} tiles of {source}, got n_tiles={n_tiles!r}")
    grid = data.reshape(c, z, ny, th, nx, tw)
    tiles = grid.transpose(4, 2, 0, 1, 3, 5) if order == "column" else grid.transpose(2, 4, 0, 1, 3, 5)
    tiles = tiles.reshape(ny * nx, c, z, th, tw)
    return tiles if n_tiles is None else tiles[: int(n_tiles)]


def split_montage(
    image: Image,
    *,
    tile_size: int | tuple[int, int],
    order: Literal["column", "row"] = "column",
    n_tiles: int | None = None,
) -> list[Image]:
    """Cut a montage of single-cell tiles into one Image per tile (see :func:`montage_tiles`).

    Each tile's source is ``"<montage source>#<index>"`` and its metadata holds
    ``tile_index``, ``tile_row`` and ``tile_col`` in the montage grid.
    """
    tiles = montage_tiles(image.data, tile_size=tile_size, order=order, n_tiles=n_tiles, source=image.source)
    th, tw = _tile_shape(tile_size)
    ny, nx = image.shape[2] // th, image.shape[3] // tw
    out = []
    for i, tile in enumerate(tiles):
        row, col = (i % ny, i // ny) if order == "column" else (i // nx, i % nx)
        meta = {**image.metadata, "montage": image.source, "tile_index": i, "tile_row": row, "tile_col": col}
        out.append(Image(tile, image.channel_names, image.pixel_size_um, f"{image.source}#{i}", meta))
    return out


def select_channels(
    names: Sequence[str], *, channels: Sequence[str | int] | None = None, exclude: Sequence[str | int] = ()
) -> list[int]:
    """Indices of the channels to use, given names or indices to keep and to exclude."""
    names = list(names)

    def index(ch: str | int, arg: str) -> int:
        if isinstance(ch, int) or (isinstance(ch, str) and ch.isdigit() and ch not in names):
            i = int(ch)
            if not 0 <= i < len(names):
                raise InputError(f"{arg}: channel index {i} out of range for channels {names}")
            return i
        if ch not in names:
            raise InputError(f"{arg}: unknown channel name {ch!r}; the images have channels {names}")
        return names.index(ch)

    keep = [index(c, "channels") for c in channels] if channels else list(range(len(names)))
    drop = {index(c, "exclude_channels") for c in exclude}
    selected = [i for i in keep if i not in drop]
    if not selected:
        raise InputError(f"no channel left after channels={channels} and exclude_channels={list(exclude)} of {names}")
    return selected
