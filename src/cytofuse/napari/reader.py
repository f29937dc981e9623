"""The npe2 reader: a prediction folder, a heat map, a patch table, or any image cytofuse reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cytofuse.napari.layers import (
    HEATMAP_FILE,
    PATCHES_FILE,
    LayerData,
    heatmap_layers,
    image_layers,
    is_prediction_folder,
    patch_points_layer,
    prediction_folder_layers,
)


def layers_of(path: str | Path) -> list[LayerData]:
    """Layer data of one path (what ``get_reader`` returns a reader for)."""
    path = Path(path)
    if is_prediction_folder(path):
        return prediction_folder_layers(path)
    if path.name == HEATMAP_FILE:
        return heatmap_layers(path)
    if path.name == PATCHES_FILE:
        return [patch_points_layer(path)]
    return image_layers(path)


def readable(path: str | Path) -> bool:
    from cytofuse.io.readers import supported_suffixes

    path = Path(path)
    suffix = ".zarr" if path.name.lower().endswith(".zarr") else path.suffix.lower()
    return is_prediction_folder(path) or path.name == PATCHES_FILE or suffix in supported_suffixes()


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari's reader hook: a function reading ``path`` (or every path of a list), or None when not ours."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(readable(p) for p in paths):
        return None
    return lambda p: [layer for one in ([p] if isinstance(p, (str, Path)) else p) for layer in layers_of(one)]
