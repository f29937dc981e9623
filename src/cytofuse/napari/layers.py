"""napari layer data (``(data, kwargs, layer_type)`` tuples) from cytofuse files and predictions.

Pure functions on arrays and files, no napari import: the reader and the dock widget turn
these tuples into layers. Coordinates are image pixels (z, y, x); a heat map stored on the
cell grid of ``heatmap_resolution="stride"`` keeps its cells and is placed with the layer's
``scale`` (the cell in image pixels) and ``translate`` (half a cell less half a pixel, so a
cell covers exactly its image pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cytofuse.errors import InputError

if TYPE_CHECKING:
    from cytofuse.inference.modelfolder import ModelCard
    from cytofuse.io.readers import Image
    from cytofuse.preprocess.patches import ImagePatches

LayerData = tuple[Any, dict, str]
HEATMAP_FILE = "heatmap.tif"
SUMMARY_FILE = "summary.csv"
PATCHES_FILE = "patches.parquet"
CYTOFUSE_KEY = "cytofuse"  # layer.metadata[CYTOFUSE_KEY]: where a layer came from


# --------------------------------------------------------------------------- files -> layers


def is_prediction_folder(path: Path) -> bool:
    """A ``cytofuse predict`` output folder: summary.csv beside an images/ folder."""
    return path.is_dir() and (path / SUMMARY_FILE).is_file() and (path / "images").is_dir()


def heatmap_cell(folder: Path, image: str) -> int:
    """Image pixels per heat-map pixel of ``image`` in the prediction ``folder`` (its summary's heatmap_cell_px)."""
    import pandas as pd

    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        raise InputError(f"heat map of image {image!r}: {summary_path} is missing; it holds the heat map's cell size "
                         "(heatmap_cell_px), so open the whole prediction folder written by cytofuse predict")
    summary = pd.read_csv(summary_path, keep_default_na=False)
    rows = summary[summary["image"].astype(str) == image]
    if rows.empty or "heatmap_cell_px" not in summary:
        raise InputError(f"{summary_path} has no heatmap_cell_px row for image {image!r}; images there: "
                         f"{summary['image'].astype(str).tolist()}")
    return int(rows["heatmap_cell_px"].iloc[0])


def cell_placement(cell: int, pixel_scale: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
    """``scale`` and ``translate`` of a (Z, ny, nx) cell grid over an image with ``pixel_scale`` (z, y, x)."""
    sz, sy, sx = pixel_scale
    half = (cell - 1) / 2
    return {"scale": (sz, sy * cell, sx * cell), "translate": (0.0, sy * half, sx * half)}


def heatmap_layers(heatmap: Path, *, cell: int | None = None, decision: str = "") -> list[LayerData]:
    """One image layer per class of a (K, Z, y, x) ``heatmap.tif`` in ``<prediction>/images/<name>/``."""
    import tifffile

    heatmap = Path(heatmap)
    name, folder = heatmap.parent.name, heatmap.parent.parent.parent
    cell = heatmap_cell(folder, name) if cell is None else cell
    with tifffile.TiffFile(heatmap) as tif:
        data = tif.series[0].asarray()
        classes = _ome_channel_names(tif.ome_metadata, len(data))
    if data.ndim != 4 or len(classes) != len(data):
        raise InputError(f"{heatmap}: expected a (classes, Z, y, x) heat map, got shape {data.shape}")
    suffix = f" [{decision}]" if decision else ""
    return [(data[k], {"name": f"{name} {c}{suffix}", "colormap": "inferno", "contrast_limits": (0.0, 1.0),
                       "opacity": 0.6, "blending": "additive",
                       "metadata": {CYTOFUSE_KEY: {"heatmap": str(heatmap), "class": c, "cell": cell}},
                       **cell_placement(cell)}, "image") for k, c in enumerate(classes)]


def _ome_channel_names(xml: str | None, n: int) -> list[str]:
    import re

    names = re.findall(r'<Channel [^>]*Name="([^"]*)"', xml or "")
    return names if len(names) == n else [f"class{k}" for k in range(n)]


def patch_points_layer(table_path: Path) -> LayerData:
    """The per-patch table (``patches.parquet``) as points at the patches' corners (z, y, x), with
    every column (image, prob_<class>) as features and the most probable class as ``predicted``."""
    import pandas as pd

    table = pd.read_parquet(table_path)
    missing = [c for c in ("z", "y", "x") if c not in table]
    probs = [c for c in table if c.startswith("prob_")]
    if missing or not probs:
        raise InputError(f"{table_path}: not a cytofuse patch table, missing columns {missing or ['prob_<class>']}")
    features = table.drop(columns=["z", "y", "x"]).reset_index(drop=True)
    features["predicted"] = pd.Categorical(np.asarray([c[5:] for c in probs])[table[probs].to_numpy().argmax(axis=1)])
    return (table[["z", "y", "x"]].to_numpy(np.float32), {
        "name": "patches", "features": features, "face_color": "predicted", "size": 3, "symbol": "square",
        "metadata": {CYTOFUSE_KEY: {"patches": str(table_path)}}}, "points")


def prediction_folder_layers(folder: Path) -> list[LayerData]:
    """Every image's heat maps (named ``<image> <class> [<decision>]``) and the patch table of a prediction folder."""
    import pandas as pd

    summary = pd.read_csv(folder / SUMMARY_FILE, keep_default_na=False)
    layers = []
    for row in summary.itertuples():
        heatmap = folder / "images" / str(row.image) / HEATMAP_FILE
        if not heatmap.is_file():
            raise InputError(f"{heatmap} is missing (the napari reader opens TIFF heat maps, not OME-Zarr ones)")
        layers += heatmap_layers(heatmap, cell=int(row.heatmap_cell_px), decision=str(row.decision))
    if (folder / PATCHES_FILE).is_file():
        layers.append(patch_points_layer(folder / PATCHES_FILE))
    return layers


def image_layers(path: Path) -> list[LayerData]:
    """Any image cytofuse reads: one (Z, Y, X) layer per channel, named by channel, scaled by the pixel size."""
    from cytofuse.io.readers import read_image

    image = read_image(path, mmap=True)
    scale = tuple(s or 1.0 for s in image.pixel_size_um)
    return [(image.data[c], {"name": name, "scale": scale, "blending": "additive",
                             "metadata": {CYTOFUSE_KEY: {"source": image.source, "channel": name}}}, "image")
            for c, name in enumerate(image.channel_names)]


# --------------------------------------------------------------------------- layers -> an Image


def image_from_layers(selected: Any, layers: Sequence[Any], channel_names: Sequence[str]) -> "Image":
    """The (C, Z, Y, X) ``Image`` of the model's channels: ``selected`` (an image layer) and the layers of the
    same file (or, for layers not read by cytofuse, of the same shape) named by the channels."""
    from cytofuse.io.readers import Image

    own = selected.metadata.get(CYTOFUSE_KEY, {})
    if len(channel_names) == 1:
        picked = {channel_names[0]: selected}
    else:
        same = [l for l in layers if _layer_kind(l) == "image" and _same_source(l, selected, own)]
        picked = {_channel(l): l for l in same}
    missing = [c for c in channel_names if c not in picked]
    if missing:
        raise InputError(f"image layer {selected.name!r}: the model expects channels {list(channel_names)}, found "
                         f"layers {sorted(picked)} beside it; missing {missing} (name the channel layers as the channels)")
    data = np.stack([_zyx(np.asarray(picked[c].data), picked[c].name) for c in channel_names])
    return Image(data, tuple(channel_names), source=own.get("source", selected.name))


def _layer_kind(layer: Any) -> str:
    return type(layer).__name__.lower()


def _channel(layer: Any) -> str:
    return layer.metadata.get(CYTOFUSE_KEY, {}).get("channel", layer.name)


def _same_source(layer: Any, selected: Any, own: dict) -> bool:
    theirs = layer.metadata.get(CYTOFUSE_KEY, {})
    if own.get("source"):
        return theirs.get("source") == own["source"]
    return np.shape(layer.data) == np.shape(selected.data)


def _zyx(data: np.ndarray, name: str) -> np.ndarray:
    if data.ndim == 2:
        return data[None]
    if data.ndim != 3:
        raise InputError(f"image layer {name!r}: expected (Y, X) or (Z, Y, X) data, got shape {data.shape}")
    return data


# --------------------------------------------------------------------------- prediction -> layers


@dataclass
class Prediction:
    """One image predicted in the widget: what the heat-map and Grad-CAM layers are made of."""

    card: "ModelCard"
    models: list
    stack: np.ndarray  # (C, Z, Y, X) the model's channels
    patches: "ImagePatches"
    probabilities: np.ndarray  # (N, K) per kept patch
    name: str

    @property
    def mean(self) -> np.ndarray:
        return self.probabilities.mean(axis=0) if len(self.probabilities) else np.full(len(self.card.class_names), np.nan)

    @property
    def decision(self) -> str:
        return self.card.class_names[int(np.nanargmax(self.mean))] if len(self.probabilities) else ""

    def heatmap(self) -> np.ndarray:
        """(K, Z, Y, X) heat maps at image pixels: the cell grid of ``predict_image`` upsampled."""
        from cytofuse.inference.heatmaps import stitch

        settings = self.card.recipe.prediction_settings()
        return stitch(self.patches.origins, self.probabilities, shape=self.stack.shape[1:], size=settings.size,
                      stride=settings.step).full()


def predict_in_chunks(image: "Image", models: list, card: "ModelCard", *, name: str, chunk: int = 256):
    """Generator of prediction progress: yields (done, total) patches after every ``chunk`` patches and returns
    the ``Prediction``; preprocessing and patch probabilities are ``predict_image``'s."""
    from dataclasses import replace

    from cytofuse.inference.predict import prepare_image, predict_patches

    stack, res = prepare_image(image, card, name=name)
    size = card.recipe.prediction_settings().size
    probs = np.empty((len(res.origins), len(card.class_names)), np.float32)
    for start in range(0, len(res.origins), chunk):
        part = replace(res, origins=res.origins[start:start + chunk], ratios=res.ratios[start:start + chunk])
        probs[start:start + len(part.origins)] = predict_patches(stack, part, models, size=size, workers=0, tta=card.tta)
        yield start + len(part.origins), len(res.origins)
    return Prediction(card, models, stack, res, probs, name)


def prediction_layers(pred: Prediction, scale: Sequence[float] = (1.0, 1.0, 1.0)) -> list[LayerData]:
    """One heat-map layer per class at image pixels, named ``<image> <class> [decision: <class>]``."""
    heat = pred.heatmap()
    title = f"decision: {pred.decision}" if pred.decision else "no decision"
    return [(heat[k], {"name": f"{pred.name} {c} [{title}]", "colormap": "inferno", "contrast_limits": (0.0, 1.0),
                       "opacity": 0.6, "blending": "additive", "scale": tuple(scale),
                       "metadata": {CYTOFUSE_KEY: {"class": c, "decision": pred.decision,
                                                   "mean_probability": float(pred.mean[k])}}}, "image")
            for k, c in enumerate(pred.card.class_names)]


def pick_patch(pred: Prediction, point: Sequence[float] | None = None) -> int:
    """Index of the kept patch under ``point`` (z, y, x image pixels; the most confident one if several
    cover it), or of the most confident patch overall when ``point`` is None."""
    if not len(pred.probabilities):
        raise InputError(f"image {pred.name!r}: no patch passed the sparsity filter, so there is no patch to explain")
    confidence = pred.probabilities.max(axis=1)
    if point is None:
        return int(np.argmax(confidence))
    size = pred.card.recipe.prediction_settings().size
    z, y, x = (int(round(v)) for v in point)
    o = pred.patches.origins
    under = np.flatnonzero((o[:, 0] == z) & (o[:, 1] <= y) & (y < o[:, 1] + size) & (o[:, 2] <= x) & (x < o[:, 2] + size))
    if not len(under):
        raise InputError(f"no kept patch of image {pred.name!r} covers the point (z, y, x) = {(z, y, x)}")
    return int(under[np.argmax(confidence[under])])


def gradcam_layers(pred: Prediction, index: int, scale: Sequence[float] = (1.0, 1.0, 1.0)) -> list[LayerData]:
    """Grad-CAM of patch ``index`` for its predicted class, one (size, size) layer per input channel, placed on
    the patch (the mean over the ensemble's models; ``cytofuse.evaluation.explain.gradcam`` per encoder)."""
    from cytofuse.evaluation.explain import cam_channels, gradcam
    from cytofuse.preprocess.patches import cut_patches

    size = pred.card.recipe.prediction_settings().size
    origin = pred.patches.origins[index]
    x = cut_patches(pred.stack, origin[None], pred.patches.low, pred.patches.high, size=size)
    target = int(np.argmax(pred.probabilities[index]))
    per_channel = np.zeros((len(pred.card.channel_names), size, size), np.float32)
    for model in pred.models:
        for key, cam in gradcam(model, x, target_class=target).items():
            per_channel[cam_channels(key, len(per_channel))] += cam[0] / len(pred.models)
    sy, sx = tuple(scale)[-2:]
    klass = pred.card.class_names[target]
    return [(per_channel[c], {"name": f"Grad-CAM {ch} ({klass}, patch z{origin[0]} y{origin[1]} x{origin[2]})",
                              "colormap": "turbo", "opacity": 0.5, "contrast_limits": (0.0, 1.0), "scale": (sy, sx),
                              "translate": (origin[1] * sy, origin[2] * sx),
                              "metadata": {CYTOFUSE_KEY: {"gradcam": ch, "class": klass, "origin": origin.tolist()}}},
             "image") for c, ch in enumerate(pred.card.channel_names)]
