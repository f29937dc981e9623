"""Writing heat maps and the overlay figure of a prediction.

The heat map is streamed: patches come in z order, so each slice is stitched as soon as the
model has moved past it and written by a background thread into its place in a contiguous,
uncompressed OME-TIFF (``HeatMapWriter``) while the model runs on later slices. Memory holds
one slice of heat map per class, never the whole (classes, Z, Y, X) array. The file is
written under a hidden temporary name and renamed when complete; a writer error is raised
in the caller. With ``heatmap_format="ome-zarr"`` the same slices go into an OME-Zarr
multiscale image instead (``heatmap.ome.zarr``: one channel per class, levels downsampled by 2,
written into a hidden folder and renamed when complete), for viewers that stream. ``write_heatmap_tiff`` writes an in-memory ``HeatMap``; ``write_overlay_png``
draws the image beside each class's heat map.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cytofuse.errors import InputError
from cytofuse.inference.heatmaps import HeatMap, SliceStitcher, sample_cells, upsample_cells
from cytofuse.inference.threads import WRITER_NICE, lower_priority
from cytofuse.preprocess.patches import NORM_EPS as _EPS
from cytofuse.runs import atomic_path

_OVERLAY_PX = 512
HEATMAP_RESOLUTIONS = ("full", "stride")
HEATMAP_FORMATS = ("tiff", "ome-zarr")
HEATMAP_FILES = {"tiff": "heatmap.tif", "ome-zarr": "heatmap.ome.zarr"}
ZARR_MIN_SIDE = 64  # OME-Zarr heat maps: levels halve until the larger side is at most this
_DONE = object()


def _ome_metadata(axes: str, class_names: Sequence[str], pixel_size_um, scale: int = 1) -> dict:
    meta = {"axes": axes, "Channel": {"Name": list(class_names)}}
    _, py, px = pixel_size_um
    if py and px:
        meta |= {"PhysicalSizeY": py * scale, "PhysicalSizeX": px * scale}
    return meta


def max_projection_path(path: Path) -> Path:
    """``heatmap.tif`` -> ``heatmap_max.tif``, ``heatmap.ome.zarr`` -> ``heatmap_max.ome.zarr``."""
    suffix = ".ome.zarr" if path.name.endswith(".ome.zarr") else path.suffix
    return path.with_name(path.name[: len(path.name) - len(suffix)] + "_max" + suffix)


def _write_tiff_atomic(path: Path, data: np.ndarray, **kwargs) -> None:
    """``tifffile.imwrite`` to a hidden temporary name beside ``path``, renamed into place."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)


class HeatMapWriter:
    """Stitch and write one image's heat maps slice by slice in a background thread.

    ``add`` patches (in z order) as the model produces them; each finished z-slice is stitched
    and written into its place in ``path``, a contiguous (K, Z, Y, X) float32 OME-TIFF created
    at full size under a hidden temporary name. ``close`` finishes the last slices, renames
    the file into place, and writes ``<stem>_max.tif`` (K, Y, X), the NaN-aware max over z.
    An exception in the thread is raised by the next ``add`` or by ``close``; ``abort`` (or
    leaving the ``with`` block by an exception) removes the temporary file.

    resolution: "full" (image pixels) or "stride" (one pixel per stitching cell).
    heatmap_format: "tiff" (the file above) or "ome-zarr" (``path`` is an OME-Zarr folder, NGFF 0.4, and the
        max projection ``<stem>_max.ome.zarr``).
    project: optional (C, Z, Y, X) stack whose max over z is kept as ``projection`` on the way.
    nice: the writer thread's nice value (see ``cytofuse.inference.threads.background_nice``).
    """

    def __init__(self, path: str | Path, *, shape: tuple[int, int, int], class_names: Sequence[str], size: int,
                 stride: int, pixel_size_um=(None, None, None), resolution: str = "full",
                 project: np.ndarray | None = None, max_pending: int = 1024, nice: int = WRITER_NICE,
                 heatmap_format: str = "tiff") -> None:
        if resolution not in HEATMAP_RESOLUTIONS:
            raise InputError(f"heatmap_resolution must be one of {list(HEATMAP_RESOLUTIONS)}, got {resolution!r}")
        if heatmap_format not in HEATMAP_FORMATS:
            raise InputError(f"heatmap_format must be one of {list(HEATMAP_FORMATS)}, got {heatmap_format!r}")
        self.path, self.class_names, self.resolution = Path(path), list(class_names), resolution
        self.format = heatmap_format
        self.stitcher = SliceStitcher(shape, len(class_names), size=size, stride=stride)
        scale = self.cell = 1 if resolution == "full" else self.stitcher.block  # image pixels per stored pixel
        self._plane_shape = tuple(shape[1:]) if resolution == "full" else self.stitcher.cells_shape
        self._meta = lambda axes: _ome_metadata(axes, class_names, pixel_size_um, scale)
        pz, py, px = pixel_size_um
        self._zarr_pixel = (pz or 1.0, (py or 1.0) * scale, (px or 1.0) * scale)  # unknown sizes: image pixels
        full_shape = (len(class_names), shape[0], *self._plane_shape)
        self._file = self._zarr = None
        if heatmap_format == "ome-zarr":
            from cytofuse.io.zarr import MultiscaleWriter

            self._zarr = MultiscaleWriter(self.path, shape=full_shape, dtype=np.float32, channel_names=class_names,
                                          pixel_size_um=self._zarr_pixel, min_side=ZARR_MIN_SIDE, fill_value=np.nan)
        else:
            import tifffile

            # written under the hidden name of atomic_path: close renames it onto path, abort removes it
            self._output = atomic_path(self.path)
            self._tmp = self._output.__enter__()
            self._offset, _ = tifffile.imwrite(self._tmp, shape=full_shape, dtype=np.float32, ome=True,
                                               photometric="minisblack", metadata=self._meta("CZYX"), returnoffset=True)
            self._file = open(self._tmp, "r+b", buffering=0)
        self._project, self._nice = project, nice
        self.projection = None if project is None or not project.shape[1] else project[:, 0].copy()
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="heatmap-writer", daemon=True)
        self._thread.start()

    # ----- caller side
    def add(self, origins: np.ndarray, probs: np.ndarray) -> None:
        """Queue patches (origins (N, 3) z, y, x in z order; probs (N, K)) for stitching."""
        self._raise_error()
        self._queue.put((np.array(origins), np.array(probs)))

    def close(self) -> None:
        """Finish every slice, rename the heat map into place and write its max projection."""
        if self._closed:
            return
        self._join()
        if self._error is not None:
            self._discard()
            self._raise_error()
        if self._zarr is not None:
            from cytofuse.io.zarr import write_ome_zarr

            self._zarr.close()
            write_ome_zarr(max_projection_path(self.path), self.max_projection(full=False)[:, None],
                           channel_names=self.class_names, pixel_size_um=self._zarr_pixel, min_side=ZARR_MIN_SIDE)
            return
        self._output.__exit__(None, None, None)
        _write_tiff_atomic(max_projection_path(self.path), self.max_projection(full=False),
                           ome=True, photometric="minisblack", metadata=self._meta("CYX"))

    def abort(self) -> None:
        """Stop the thread and remove the temporary file (nothing is left under ``path``)."""
        if self._closed:
            return
        self._stop.set()
        self._join()
        self._discard()

    def max_projection(self, *, full: bool = True) -> np.ndarray:
        """(K, Y, X) max over z at image resolution (``full``) or at the stored resolution."""
        cells, block = self.stitcher.max_cells, self.stitcher.block
        if not full and self.resolution == "stride":
            return cells.copy()
        return np.stack([upsample_cells(c, block, self.stitcher.shape[1:]) for c in cells])

    def sampled_max_projection(self, step: int) -> np.ndarray:
        """``max_projection()[:, ::step, ::step]``, computed from the cells (for the overlay)."""
        block, shape = self.stitcher.block, self.stitcher.shape[1:]
        return np.stack([sample_cells(c, block, shape, step) for c in self.stitcher.max_cells])

    def __enter__(self) -> "HeatMapWriter":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _join(self) -> None:
        self._closed = True
        self._queue.put(_DONE)
        self._thread.join()
        if self._file is not None:
            self._file.close()

    def _discard(self) -> None:
        if self._zarr is not None:
            self._zarr.abort()
            return
        aborted = RuntimeError(f"heat map {self.path} discarded")
        self._output.__exit__(RuntimeError, aborted, None)  # removes the file, never renames it

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            err.add_note(f"raised while writing the heat map {self.path}")
            raise err

    # ----- writer thread
    def _run(self) -> None:
        lower_priority(self._nice)
        try:
            while (item := self._queue.get()) is not _DONE:
                if self._stop.is_set():
                    continue
                for z, cells in self.stitcher.add(*item):
                    self._write_slice(z, cells)
            if not self._stop.is_set():
                for z, cells in self.stitcher.finish():
                    self._write_slice(z, cells)
        except BaseException as err:  # handed to the caller by add() / close()
            self._error = err
            while self._queue.get() is not _DONE:  # keep draining so add() never blocks
                pass

    def _write_slice(self, z: int, cells: np.ndarray) -> None:
        n_z = self.stitcher.shape[0]
        for k, values in enumerate(cells):
            plane = upsample_cells(values, self.stitcher.block, self.stitcher.shape[1:]) if self.resolution == "full" else values
            if self._zarr is not None:
                self._zarr.write(k, z, plane)
                continue
            self._file.seek(self._offset + (k * n_z + z) * plane.nbytes)
            view = memoryview(np.ascontiguousarray(plane)).cast("B")
            while view:
                view = view[self._file.write(view):]
        if self._project is not None:
            np.maximum(self.projection, self._project[:, z], out=self.projection)


def write_heatmap_tiff(path: Path, heat: HeatMap, class_names: Sequence[str], pixel_size_um=(None, None, None)) -> None:
    """(K, Z, Y, X) float32 OME-TIFF of an in-memory ``HeatMap``, and its (K, Y, X) max projection beside it."""
    import tifffile

    k, (n_z, n_y, n_x) = len(class_names), heat.shape
    planes = (heat.plane(c, z) for c in range(k) for z in range(n_z))
    # one strip per plane: from an iterator, tifffile's default strips write ~7x slower
    tifffile.imwrite(path, planes, shape=(k, n_z, n_y, n_x), dtype=np.float32, ome=True, photometric="minisblack",
                     metadata=_ome_metadata("CZYX", class_names, pixel_size_um), rowsperstrip=n_y)
    tifffile.imwrite(path.with_name(path.stem + "_max.tif"), heat.max_projection(), ome=True, photometric="minisblack",
                     metadata=_ome_metadata("CYX", class_names, pixel_size_um))


def _composite(projection: np.ndarray) -> np.ndarray:
    """RGB (Y, X, 3) of up to three channels of a (C, Y, X) projection, each stretched to its 1-99.8 %."""
    rgb = np.zeros((*projection.shape[1:], 3), np.float32)
    colours = [(1, 0, 1), (0, 1, 0), (0, 0.6, 1)] if len(projection) > 1 else [(1, 1, 1)]
    for channel, colour in zip(projection, colours):
        lo, hi = np.percentile(channel[::4, ::4], (1, 99.8))
        norm = np.clip((channel - lo) / max(hi - lo, _EPS), 0, 1)
        rgb += norm[..., None] * np.asarray(colour, np.float32)
    return np.clip(rgb, 0, 1)


def overlay_step(shape_yx: Sequence[int]) -> int:
    """Pixel step that samples an image of ``shape_yx`` down to overlay panels of about ``_OVERLAY_PX`` px."""
    return max(1, math.ceil(max(shape_yx) / _OVERLAY_PX))



@functools.cache
def _inferno() -> np.ndarray:
    """The 256 RGB colours (0-1) of matplotlib's perceptually uniform "inferno" map."""
    import matplotlib

    return matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3].astype(np.float32)


def write_overlay_png(path: Path, projection: np.ndarray, heat: np.ndarray, class_names: Sequence[str],
                      *, title: str) -> None:
    """A PNG for people: the image (max projection, up to three channels in colour) beside one panel
    per class with its heat map (inferno, 60 % opaque) over the grey image, and a colour bar.

    projection (C, h, w) and heat (K, h, w) are at display resolution (``overlay_step``); NaN heat
    (no kept patch) shows the image alone. Drawn with Pillow: a fraction of matplotlib's time."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    zoom = max(1, 256 // max(projection.shape[1:]))  # small images: panels of at least ~256 px
    rgb = _composite(projection).repeat(zoom, 0).repeat(zoom, 1)
    grey = rgb.mean(axis=2, keepdims=True)
    panels = [rgb]
    for values in heat.repeat(zoom, 1).repeat(zoom, 2):
        alpha = 0.6 * np.isfinite(values)[..., None]
        colour = _inferno()[np.clip(np.nan_to_num(values) * 255 + 0.5, 0, 255).astype(np.uint8)]
        panels.append(grey * (1 - alpha) + colour * alpha)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    h, w = rgb.shape[:2]
    pad, top, bar = 10, 48, 14
    canvas = PILImage.new("RGB", (pad + len(panels) * (w + pad) + bar + 48, top + h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((canvas.width / 2, 4), title, fill="black", font=font, anchor="ma")
    labels = ["image (max over z)", *(f"P({name})" for name in class_names)]
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x = pad + i * (w + pad)
        canvas.paste(PILImage.fromarray((np.clip(panel, 0, 1) * 255 + 0.5).astype(np.uint8)), (x, top))
        draw.text((x + w / 2, top - 4), label, fill="black", font=small, anchor="md")
    x = pad + len(panels) * (w + pad)
    ramp = _inferno()[np.linspace(255, 0, h).astype(int)][:, None, :].repeat(bar, 1)
    canvas.paste(PILImage.fromarray((ramp * 255 + 0.5).astype(np.uint8)), (x, top))
    for value in (0.0, 0.5, 1.0):
        y = top + round((1 - value) * (h - 1))
        draw.line([(x + bar, y), (x + bar + 3, y)], fill="black")
        draw.text((x + bar + 5, y), f"{value:g}", fill="black", font=small, anchor="lm")
    draw.text((x + bar / 2, top - 4), "prob.", fill="black", font=small, anchor="md")
    canvas.save(path, format="PNG", compress_level=1)

