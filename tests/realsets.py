"""Builders that turn the shared real data sets into cytofuse image sets (used by slow tests and note runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

JURKAT_COUNTS = {"G1": 900, "S_phase": 900, "G2": 900, "Prophase": 606, "Metaphase": 69, "Telophase": 28, "Anaphase": 15}
JURKAT_CHANNELS = {"Ch3": "BF", "Ch4": "DNA", "Ch6": "DF"}


def jurkat_cells(root: Path, out: Path, *, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """One OME-TIFF per cell (40 x 40, channels BF, DNA, DF) in ``out/<phase>/``; returns ``out``.

    The montages are cut column by column and the first N tiles of each class are examined
    (the folder's documented counts); padding and repeated tiles are rejected as by
    ``cytofuse montage``. ``counts`` can take a random subset per class (seeded) to keep a run short.
    """
    from cytofuse.io.imagesets import ImageSet
    from cytofuse.io.readers import Image, write_ome_tiff
    from cytofuse.io.montage import cut_montage, rename_channels, tile_status

    if (out / ".complete").is_file():
        return out
    image_set = ImageSet.from_folder(root)
    rng = np.random.default_rng(seed)
    for record in image_set:
        montage = image_set.read(record.image_id)
        tiles = cut_montage(montage.data, tile_size=40, source=montage.source).tiles[: JURKAT_COUNTS[record.label]]
        keep = np.flatnonzero(tile_status(tiles) == "cell")
        if counts is not None and counts.get(record.label, len(keep)) < len(keep):
            keep = np.sort(rng.choice(keep, counts[record.label], replace=False))
        folder = out / record.label
        folder.mkdir(parents=True, exist_ok=True)
        names = rename_channels(montage.channel_names, JURKAT_CHANNELS, source=montage.source)
        for i in keep:
            cell = Image(np.ascontiguousarray(tiles[i]), names, montage.pixel_size_um, f"{montage.source}#{i}")
            write_ome_tiff(folder / f"cell_{i:04d}.ome.tif", cell, overwrite=True)
    (out / ".complete").write_text("ok")
    return out


def livedead_manifest(root: Path, out: Path, *, per_class: int | None = None, seed: int = 0) -> Path:
    """A manifest of the live/dead crops with their source field as the group (name before _live_/_dead_)."""
    import pandas as pd

    rows = []
    for label in ("live", "dead"):
        for path in sorted((root / "crops" / label).glob("*.png")):
            field = path.name.split(f"_{label}_")[0]
            rows.append({"path": str(path.resolve()), "label": label, "group": field})
    table = pd.DataFrame(rows)
    if per_class is not None:
        table = table.groupby("label", group_keys=False).apply(
            lambda t: t.sample(min(per_class, len(t)), random_state=seed)).reset_index(drop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    return out


def livedead_crops(root: Path, out: Path, *, per_class: int | None = None, bin_factor: int = 2, seed: int = 0) -> Path:
    """Grey copies of the live/dead crops in ``out/{live,dead}/`` (same names), binned ``bin_factor`` x
    ``bin_factor`` (mean) to keep CPU runs short; ``per_class`` draws a seeded subset of each class."""
    from PIL import Image as PILImage

    if (out / ".complete").is_file():
        return out
    rng = np.random.default_rng(seed)
    for label in ("live", "dead"):
        files = sorted((root / "crops" / label).glob("*.png"))
        if per_class is not None and per_class < len(files):
            files = [files[i] for i in sorted(rng.choice(len(files), per_class, replace=False))]
        (out / label).mkdir(parents=True, exist_ok=True)
        for path in files:
            grey = np.asarray(PILImage.open(path).convert("L"), dtype=np.float32)
            h, w = (s // bin_factor * bin_factor for s in grey.shape)
            binned = grey[:h, :w].reshape(h // bin_factor, bin_factor, w // bin_factor, bin_factor).mean(axis=(1, 3))
            PILImage.fromarray(np.round(binned).astype(np.uint8)).save(out / label / path.name)
    (out / ".complete").write_text("ok")
    return out
