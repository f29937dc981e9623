"""Pascal-VOC box annotations of whole fields: the annotation file, the fields that have one, the field image.

A field is an image file (``name.png``, ``.jpg``, ``.tif``) with its boxes in ``name.xml`` beside
it; ``cytofuse.preprocess.emptyfilter.patches_from_voc_fields`` cuts labelled patches from them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from cytofuse.errors import InputError


def read_voc_boxes(xml_path: str | Path) -> list[tuple[str, float, float, float, float]]:
    """(name, xmin, ymin, xmax, ymax) of every object in a Pascal-VOC annotation file."""
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise InputError(f"{xml_path}: not a readable Pascal-VOC XML file: {err}") from err
    boxes = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            raise InputError(f"{xml_path}: an object has no bndbox")
        coords = [float(box.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")]
        if not np.isfinite(coords).all():
            raise InputError(f"{xml_path}: bndbox needs xmin, ymin, xmax, ymax, got {coords}")
        boxes.append((obj.findtext("name", ""), *coords))
    return boxes


def voc_fields(folder: Path) -> list[Path]:
    """The image files of ``folder`` that have a Pascal-VOC ``.xml`` of the same name beside them, sorted."""
    if not folder.is_dir():
        raise InputError(f"patches_from_voc_fields: {folder} is not a folder")
    pngs = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
    pngs = [p for p in pngs if p.with_suffix(".xml").is_file()]
    if not pngs:
        raise InputError(f"{folder}: no image files with a Pascal-VOC .xml beside them")
    return pngs


def read_grey_field(png: Path) -> np.ndarray:
    """(1, Y, X) float32: the first z-slice of a field image, its channels (colour) averaged to grey."""
    from cytofuse.io.readers import read_image

    image = read_image(png)
    field = image.data[:, 0].astype(np.float32)
    if field.shape[0] > 1:  # colour bright-field: its mean is the grey image
        field = field.mean(axis=0, keepdims=True)
    return field
