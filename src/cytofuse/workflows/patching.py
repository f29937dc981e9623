"""The patch stage as a run: the image set a config describes, validated, cut into the patch index of a run folder."""

from __future__ import annotations

from pathlib import Path

from cytofuse.config import DataSettings, RunConfig, dump_config
from cytofuse.io.imagesets import ImageSet
from cytofuse.preprocess.patches import PatchIndex, build_patch_index
from cytofuse.runs import RunFolder, mark_finished, prepare_run_dir


def load_image_set(data: DataSettings) -> ImageSet:
    """The image set a config's data section describes."""
    if data.images is not None:
        image_set = ImageSet.from_folder(data.images, axes=data.axes)
    else:
        image_set = ImageSet.from_manifest(
            data.manifest, label_column=data.label_column, group_column=data.group_column, axes=data.axes
        )
    return image_set if data.group_pattern is None else image_set.with_group_pattern(data.group_pattern)


def run_patches(cfg: RunConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> PatchIndex:
    """Validate the image set, then write the patch stage into the run folder ``out``."""
    image_set = load_image_set(cfg.data)
    image_set.validate(channels=cfg.patches.channels, exclude_channels=cfg.patches.exclude_channels,
                       min_classes=1 if cfg.labels else 2, patch_size=cfg.patches.size)
    out = prepare_run_dir(out, overwrite=overwrite)
    dump_config(cfg, RunFolder(out).config)
    index = build_patch_index(image_set, cfg.patches, out, workers=cfg.workers, progress=progress,
                              scheduler=cfg.scheduler)
    mark_finished(out)
    return index
