"""Whole-image prediction with a model folder (or a CV run's fold ensemble).

Every image gets exactly the training preprocessing, computed on that image: the card's
channels selected by name, the global Otsu thresholds and the normalisation percentiles of
that stack, the same patch grid and sparsity filter (``cytofuse.preprocess.patches.extract_patches``;
only the training cap ``max_per_image`` is lifted, so every kept position is predicted).
Batches are cut, normalised and run through the model by a few threads side by side (one
per core, each with one intra-op thread), so at most a few batches exist beside the stack.
An ensemble averages class probabilities.

Outputs (``out``)::

    summary.csv, summary.parquet   one row per image: patches, heatmap_cell_px, prob_<class>
                                   (mean of the patch probabilities), decision (the most
                                   probable class), notes
    patches.parquet                one row per kept patch: image, z, y, x, prob_<class>
    images/<name>/heatmap.tif      (classes, Z, y, x) float32 OME-TIFF: each pixel the mean
                                   probability of the patches covering it; NaN where no kept
                                   patch covers it (filtered out, skipped slice, image border)
    images/<name>/heatmap_max.tif  (classes, y, x) maximum over z (NaN-aware)
    images/<name>/overlay.png      the image (max projection) beside each class's heat map
    images/<name>/heatmap.ome.zarr, heatmap_max.ome.zarr
                                   with heatmap_format="ome-zarr", instead of the two TIFFs: the same
                                   values as OME-Zarr (NGFF 0.4) multiscale images, one channel per class

The heat maps are stitched (``cytofuse.inference.heatmaps``) and written (``cytofuse.inference.writers``)
slice by slice while the model runs on later slices; memory holds one slice of heat map per class.
Batches run side by side on the threads of ``cytofuse.inference.threads``.

Heat-map pixels: every value is constant over a stitching cell (the greatest common divisor
of patch size and stride, e.g. 64 x 64 image pixels for non-overlapping 64 px patches), so
by default (``heatmap_resolution="stride"``) one pixel is stored per cell, with the OME pixel
sizes scaled by the cell and the cell in the summary (``heatmap_cell_px``); y, x of the
outputs above are then the cell grid, and ``cytofuse.inference.heatmaps.upsample_cells`` gives image pixels.
``heatmap_resolution="full"`` stores one value per image pixel (y, x = Y, X): the same
values in a file ``cell**2`` times larger (for a 100 x 1364 x 1364 stack and two classes,
1.5 GB instead of 0.4 MB, and writing it took longer than the model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cytofuse.errors import InputError
from cytofuse.inference.threads import background_nice, default_workers, in_order, lower_priority, single_threaded_ops
from cytofuse.inference.writers import (
    HEATMAP_FILES,
    HEATMAP_FORMATS,
    HEATMAP_RESOLUTIONS,
    HeatMapWriter,
    overlay_step,
    write_overlay_png,
)
from cytofuse.runtime import bf16_supported
from cytofuse.preprocess.patches import cut_patches
from cytofuse.runs import atomic_path, replacing_folder

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from cytofuse.io.readers import Image
    from cytofuse.inference.modelfolder import ModelCard
    from cytofuse.preprocess.patches import ImagePatches

SUMMARY_FILE = "summary.csv"


# --------------------------------------------------------------------------- preprocessing


def select_model_channels(image: "Image", channel_names: Sequence[str]) -> np.ndarray:
    """The (C, Z, Y, X) data of the model's channels, picked by name; error listing expected vs found."""
    found, expected = list(image.channel_names), list(channel_names)
    missing = [c for c in expected if c not in found]
    if missing:
        hint = (" (the file stores no channel names: name them with channel_names=...)"
                if all(n == f"ch{i}" for i, n in enumerate(found)) else "")
        raise InputError(
            f"image {image.source or '<array>'}: the model expects channels {expected} but the image has "
            f"{len(found)} channels {found}; missing {missing}{hint}"
        )
    idx = [found.index(c) for c in expected]
    return image.data if idx == list(range(len(found))) else image.data[idx]


def preprocess(stack: np.ndarray, card: "ModelCard") -> "ImagePatches":
    """Thresholds, percentiles and kept patch origins of one (C, Z, Y, X) stack of the card's channels."""
    from cytofuse.preprocess.patches import extract_patches

    res = extract_patches(stack, channel_names=card.channel_names, settings=card.recipe.prediction_settings())
    bounds = card.recipe.bounds()
    if bounds is not None:  # dataset or fixed scope: the training images' (or the given) range, not this image's
        res.low, res.high = bounds
    return res


# --------------------------------------------------------------------------- inference


def _use_bf16(precision: str, device: str = "cpu") -> bool:
    """Whether the model runs under bf16 autocast: asked for, or ``auto`` where ``device`` computes bf16 natively."""
    if precision not in ("fp32", "bf16", "auto"):
        raise InputError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.is_bf16_supported()
    return bf16_supported()


def resolve_device(device: str, *, here: bool = True) -> str:
    """``device`` checked: "cpu", "cuda" or "cuda:N" (a device torch sees), or "auto" (cuda where there is one).

    here: False only checks the name (a cluster's workers resolve it on their own machines)."""
    import torch

    device = str(device)
    index = device.removeprefix("cuda").removeprefix(":")
    if device not in ("auto", "cpu") and not (device.startswith("cuda") and (index == "" or index.isdigit())):
        raise InputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not here or device == "cpu":
        return device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise InputError(f"device {device!r}: this torch sees no CUDA device (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__}); use device 'cpu' or 'auto'")
    if index and int(index) >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


def prepare_models(models: Sequence["torch.nn.Module"], *, device: str = "cpu") -> list["torch.nn.Module"]:
    """Models in eval mode, channels_last, on ``device``."""
    import torch

    return [m.eval().to(device).to(memory_format=torch.channels_last) for m in models]


def ensemble_proba(models: Sequence["torch.nn.Module"], x: "torch.Tensor", *, bf16: bool = False,
                   tta: bool = False) -> np.ndarray:
    """Mean class probabilities (B, K) of ``models`` on one batch (channels_last, optional bf16 autocast;
    ``tta``: each model's mean over the 8 dihedral transforms)."""
    import torch

    from cytofuse.models.tta import tta_proba

    device = next(models[0].parameters()).device
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        probs = sum(tta_proba(m, x, tta=tta) for m in models) / len(models)
    return probs.cpu().numpy()


def predict_patches(stack: np.ndarray, res: "ImagePatches", models: Sequence["torch.nn.Module"], *, size: int,
                    batch_size: int = 64, bf16: bool = False, workers: int | None = None,
                    on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None, tta: bool = False) -> np.ndarray:
    """Class probabilities (N, K) of the kept patches of one stack, streamed in batches.

    workers: threads that each cut a batch and run the models on it with one intra-op thread
        (default ``default_workers()``; 0: everything in the calling thread with torch's own
        threading). Small CNNs on small patches split poorly over threads within an operation;
        whole batches side by side keep every core busy (on 2 cores about 1.5x the patches per
        second) and leave no thread waiting on another.
    on_batch: called in the calling thread with each batch's origins (B, 3) and probabilities
        (B, K), in patch order."""
    import torch

    workers = default_workers() if workers is None else workers
    n_classes = int(models[0].num_classes)
    out = np.empty((len(res.origins), n_classes), np.float32)
    pin = next(models[0].parameters()).device.type == "cuda"

    def run(start: int) -> tuple[int, np.ndarray]:
        origins = res.origins[start : start + batch_size]
        x = torch.from_numpy(cut_patches(stack, origins, res.low, res.high, size=size, channels_last=True))
        return start, ensemble_proba(models, x.pin_memory() if pin else x, bf16=bf16, tta=tta)

    with single_threaded_ops(workers > 0):
        for start, probs in in_order(run, range(0, len(res.origins), batch_size), workers):
            out[start : start + len(probs)] = probs
            if on_batch is not None:
                on_batch(res.origins[start : start + len(probs)], probs)
    return out


# --------------------------------------------------------------------------- the command


@dataclass
class ImageResult:
    """What prediction produced for one image (its heat maps are already written)."""

    name: str
    source: str
    probabilities: np.ndarray  # (K,) mean of the patch probabilities; NaN without patches
    decision: str
    patches: "pd.DataFrame"
    heat_max: np.ndarray  # (K, h, w) max over z of the heat maps, every overlay_step-th pixel
    projection: np.ndarray  # (C, h, w) max over z of the image, all its channels, the same pixels
    notes: list[str]
    heatmap_cell: int = 1  # image pixels per heat-map pixel along y and x


def apply_empty_filter(stack: np.ndarray, res: "ImagePatches", filter_dir: Path, *, size: int, name: str,
                       chunk: int = 1024) -> "ImagePatches":
    """Drop the patches the model's learned empty-patch filter calls empty, as training did (in chunks)."""
    from dataclasses import replace

    from cytofuse.preprocess.emptyfilter import EmptyFilter

    if not Path(filter_dir).is_dir():
        raise InputError(f"the model was trained with the empty-patch filter {filter_dir}, which is missing here; "
                         "copy it to that path (the card's recipe.settings.empty_filter) to predict as in training")
    flt = EmptyFilter.load(filter_dir)
    keep = np.ones(len(res.origins), bool)
    for start in range(0, len(keep), chunk):
        part = cut_patches(stack, res.origins[start:start + chunk], res.low, res.high, size=size)
        keep[start:start + chunk] = flt.predict(part, groups=np.full(len(part), name))
    notes = [*res.notes, f"the learned empty-patch filter dropped {int((~keep).sum())} of {len(keep)} patches"]
    return replace(res, origins=res.origins[keep], ratios=res.ratios[keep], notes=notes)


def _z_ordered(res: "ImagePatches") -> "ImagePatches":
    """``res`` with origins in z order (as ``extract_patches`` returns them; streaming relies on it)."""
    from dataclasses import replace

    z = res.origins[:, 0]
    if np.all(z[1:] >= z[:-1]):
        return res
    order = np.argsort(z, kind="stable")
    return replace(res, origins=res.origins[order], ratios=res.ratios[order])


def prepare_image(image: "Image", card: "ModelCard", *, name: str) -> tuple[np.ndarray, "ImagePatches"]:
    """The model's channels of one image and its kept patches in z order, preprocessed as in training."""
    stack = select_model_channels(image, card.channel_names)
    settings = card.recipe.prediction_settings()
    res = _z_ordered(preprocess(stack, card))
    if settings.empty_filter is not None:
        res = apply_empty_filter(stack, res, settings.empty_filter, size=settings.size, name=name)
    return stack, res


def predict_image(image: "Image", models: Sequence["torch.nn.Module"], card: "ModelCard", *, name: str,
                  folder: Path, batch_size: int = 64, bf16: bool = False, workers: int | None = None,
                  heatmap_resolution: str = "stride", heatmap_format: str = "tiff",
                  prepared: tuple[np.ndarray, "ImagePatches"] | None = None) -> ImageResult:
    """Preprocess one image as in training (unless ``prepared`` by ``prepare_image``), predict its
    patches, and stream its heat maps into ``folder``."""
    import pandas as pd

    stack, res = prepared if prepared is not None else prepare_image(image, card, name=name)
    settings = card.recipe.prediction_settings()
    workers = default_workers() if workers is None else workers
    step = overlay_step(stack.shape[2:])  # the overlay needs every step-th pixel only
    if heatmap_format not in HEATMAP_FORMATS:
        raise InputError(f"heatmap_format must be one of {list(HEATMAP_FORMATS)}, got {heatmap_format!r}")
    writer = HeatMapWriter(folder / HEATMAP_FILES[heatmap_format], shape=stack.shape[1:], class_names=card.class_names,
                           size=settings.size, stride=settings.step, pixel_size_um=image.pixel_size_um,
                           resolution=heatmap_resolution, project=image.data[:, :, ::step, ::step],
                           nice=background_nice(workers), heatmap_format=heatmap_format)
    with writer:
        probs = predict_patches(stack, res, models, size=settings.size, batch_size=batch_size, bf16=bf16,
                                workers=workers, on_batch=writer.add, tta=card.tta)
    classes = card.class_names
    table = pd.DataFrame(res.origins, columns=["z", "y", "x"])
    table.insert(0, "image", name)
    for k, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, k]
    notes = list(res.notes)
    if len(probs):
        mean = probs.mean(axis=0)
        decision = classes[int(np.argmax(mean))]
    else:
        mean, decision = np.full(len(classes), np.nan, np.float32), ""
        notes.append("no patch passed the sparsity filter: no decision")
    projection = writer.projection if writer.projection is not None else image.data[:, :, ::step, ::step].max(axis=1)
    return ImageResult(name, image.source, mean, decision, table, writer.sampled_max_projection(step), projection,
                       notes, writer.cell)


def _image_names(images: Sequence) -> list[str]:
    """Unique folder names from the images' file names (a suffix _2, _3, ... on repeats)."""
    names, seen = [], {}
    for item in images:
        source = item.source if hasattr(item, "channel_names") else str(item)
        stem = Path(source).name.split(".")[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _write_overlay(folder: Path, result: ImageResult, class_names: Sequence[str], *, nice: int = 0) -> None:
    lower_priority(nice)
    probs = ", ".join(f"{c} {p:.2f}" for c, p in zip(class_names, result.probabilities))
    with atomic_path(folder / "overlay.png") as tmp:
        write_overlay_png(tmp, result.projection, result.heat_max, class_names,
                          title=f"{result.name}: {result.decision or 'no decision'} ({probs})")


def _summary_row(result: ImageResult, class_names: Sequence[str]) -> dict:
    row = {"image": result.name, "source": result.source, "patches": len(result.patches),
           "heatmap_cell_px": result.heatmap_cell}
    row |= {f"prob_{c}": float(p) for c, p in zip(class_names, result.probabilities)}
    return row | {"decision": result.decision, "notes": "; ".join(result.notes)}


def _read(item, channel_names: Sequence[str] | None, axes: str | None) -> "Image":
    from cytofuse.io.readers import Image, check_finite, read_image

    if isinstance(item, Image):  # files are checked when read; an array handed over is checked here
        check_finite(np.asarray(item.data), item.source or "<array>", item.channel_names)
        return item
    return read_image(item, axes=axes, channel_names=channel_names, mmap=True)


def predict_images(
    model_dir_or_run: str | Path,
    images: Sequence,
    *,
    out: str | Path,
    model_name: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    precision: Literal["fp32", "bf16", "auto"] = "auto",
    channel_names: Sequence[str] | None = None,
    axes: str | None = None,
    device: str = "auto",
    heatmap_resolution: Literal["full", "stride"] = "stride",
    heatmap_format: Literal["tiff", "ome-zarr"] = "tiff",
    read_ahead: bool = False,
    scheduler: str | None = None,
) -> "pd.DataFrame":
    """Predict every image (file path or ``cytofuse.io.readers.Image``) and write the folder ``out``; return the summary.

    model_dir_or_run: a model folder, or a CV run folder (its ``model_name`` folds form an ensemble).
    workers: threads that each cut a batch and run the model on it, one intra-op thread each (default:
        torch's thread count, one per core; 0: one batch at a time with torch's own threading).
    precision: "bf16" autocast, "fp32", or "auto" (bf16 where the device computes it natively).
    device: "auto" (the first CUDA device where torch sees one, else the CPU), "cpu", "cuda" or "cuda:N"; with
        ``scheduler``, every worker's own device of that name.
    channel_names / axes: passed to ``cytofuse.io.readers.read_image`` (names for files that store none).
    heatmap_resolution: "stride" (one pixel per stitching cell, the default) or "full" (image pixels); see
        the module notes.
    heatmap_format: "tiff" (OME-TIFF files) or "ome-zarr" (OME-Zarr multiscale images of the same values).
    read_ahead: read and preprocess the next image while the model runs on the current one (faster on
        folders of images; two images in memory instead of one).
    scheduler: None (every image here, in turn), or a Dask cluster (``local:N`` or an address, see
        ``cytofuse.io.distributed``) that predicts one image per task, each worker with the models loaded
        once and writing its heat maps into ``out`` (shared storage); the outputs are the same.
    The image decision is the class with the highest mean patch probability.
    """
    import pandas as pd

    from cytofuse.inference.modelfolder import load_models
    from cytofuse.io.distributed import check_scheduler

    if not images:
        raise InputError("predict_images: images is empty; give at least one image file")
    if batch_size < 1 or (workers is not None and workers < 0):
        raise InputError(f"batch_size must be >= 1 and workers >= 0, got batch_size={batch_size}, workers={workers}")
    if heatmap_resolution not in HEATMAP_RESOLUTIONS:
        raise InputError(f"heatmap_resolution must be one of {list(HEATMAP_RESOLUTIONS)}, got {heatmap_resolution!r}")
    if heatmap_format not in HEATMAP_FORMATS:
        raise InputError(f"heatmap_format must be one of {list(HEATMAP_FORMATS)}, got {heatmap_format!r}")
    scheduler = check_scheduler(scheduler, what="scheduler")
    _use_bf16(precision)  # checked here; decided where the model runs
    device = resolve_device(device, here=scheduler is None)
    models, card = load_models(model_dir_or_run, model_name=model_name)
    names = _image_names(images)
    options = dict(batch_size=batch_size, workers=workers, precision=precision, channel_names=channel_names, axes=axes,
                   heatmap_resolution=heatmap_resolution, heatmap_format=heatmap_format)
    with replacing_folder(out, overwrite=overwrite, what="prediction folder") as tmp:
        if scheduler is None:
            rows, tables = _predict_here(prepare_models(models, device=device), card, images, names, tmp,
                                         progress=progress, read_ahead=read_ahead, **options)
        else:
            del models  # each worker loads its own
            rows, tables = _predict_on_cluster((str(Path(model_dir_or_run).absolute()), model_name, device), images,
                                               names, tmp, scheduler=scheduler, progress=progress, options=options)
        summary = pd.DataFrame(rows)
        summary.to_csv(tmp / SUMMARY_FILE, index=False)
        summary.to_parquet(tmp / "summary.parquet", index=False)
        pd.concat(tables, ignore_index=True).to_parquet(tmp / "patches.parquet", index=False)
    return summary


def _predict_here(models, card: "ModelCard", images: Sequence, names: list[str], tmp: Path, *, progress: bool,
                  read_ahead: bool, batch_size: int, workers: int | None, precision: str,
                  channel_names: Sequence[str] | None, axes: str | None,
                  heatmap_resolution: str, heatmap_format: str) -> tuple[list[dict], list["pd.DataFrame"]]:
    """Summary rows and patch tables of every image, predicted in this process in turn (heat maps into ``tmp``)."""
    from rich.progress import Progress

    workers = default_workers() if workers is None else workers
    bf16 = _use_bf16(precision, next(models[0].parameters()).device.type)
    rows, tables = [], []

    def load(i: int, nice: int) -> tuple["Image", tuple[np.ndarray, "ImagePatches"]]:
        lower_priority(nice)
        image = _read(images[i], channel_names, axes)
        return image, prepare_image(image, card, name=names[i])

    # Two helper threads (see background_nice for their priority): one reads and preprocesses the
    # next image (read_ahead), one draws the finished image's overlay while the model runs on the next.
    nice = background_nice(workers)
    pool = ThreadPoolExecutor(2, thread_name_prefix="cytofuse-predict")
    ahead, overlay = None, None
    try:
        with Progress(disable=not progress) as bar:
            task = bar.add_task("predicting images", total=len(images))
            for i, name in enumerate(names):
                image, prepared = ahead.result() if ahead is not None else load(i, 0)
                ahead = pool.submit(load, i + 1, nice) if read_ahead and i + 1 < len(images) else None
                folder = tmp / "images" / name
                folder.mkdir(parents=True)
                result = predict_image(image, models, card, name=name, folder=folder, batch_size=batch_size,
                                       bf16=bf16, workers=workers, heatmap_resolution=heatmap_resolution,
                                       heatmap_format=heatmap_format,
                                       prepared=prepared)
                del image, prepared
                if overlay is not None:
                    overlay.result()  # at most one overlay waits
                overlay = pool.submit(_write_overlay, folder, result, card.class_names, nice=nice)
                rows.append(_summary_row(result, card.class_names))
                tables.append(result.patches)
                del result
                bar.advance(task)
            if overlay is not None:
                overlay.result()
    finally:
        for job in (ahead, overlay):
            if job is not None:
                job.cancel()
        pool.shutdown(wait=True)
    return rows, tables


# --------------------------------------------------------------------------- on a Dask cluster

_WORKER_MODELS: dict[tuple, tuple] = {}  # in a cluster worker: the models of the last model folder, loaded once


def _worker_models(path: str, model_name: str | None, device: str) -> tuple[list["torch.nn.Module"], "ModelCard"]:
    """The prepared models and card of a model folder or CV run, loaded once per process (while it stays unchanged)."""
    from cytofuse.inference.modelfolder import load_models

    key = (path, model_name, device, Path(path).stat().st_mtime_ns)
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()
        models, card = load_models(path, model_name=model_name)
        _WORKER_MODELS[key] = (prepare_models(models, device=device), card)
    return _WORKER_MODELS[key]


def predict_file(model: tuple[str, str | None, str], item, name: str, folder: Path,
                 options: dict) -> tuple[dict, "pd.DataFrame"]:
    """One cluster task: predict one image (``item``: an ``Image``, or a file as (absolute path, the path as
    given)) with the models of ``model`` (path, model name, device) and write its heat maps and overlay into
    ``folder``; return its summary row and patch table."""
    from dataclasses import replace

    model = (*model[:2], resolve_device(model[2]))
    models, card = _worker_models(*model)
    if isinstance(item, tuple):
        path, given = item
        image = replace(_read(path, options["channel_names"], options["axes"]), source=given)
    else:
        image = _read(item, options["channel_names"], options["axes"])
    folder.mkdir(parents=True, exist_ok=True)  # a retried task finds it
    result = predict_image(image, models, card, name=name, folder=folder, batch_size=options["batch_size"],
                           bf16=_use_bf16(options["precision"], model[2]), workers=options["workers"],
                           heatmap_resolution=options["heatmap_resolution"], heatmap_format=options["heatmap_format"])
    _write_overlay(folder, result, card.class_names)
    return _summary_row(result, card.class_names), result.patches


def _predict_on_cluster(model: tuple[str, str | None, str], images: Sequence, names: list[str], tmp: Path, *,
                        scheduler: str, progress: bool, options: dict) -> tuple[list[dict], list["pd.DataFrame"]]:
    """Summary rows and patch tables of every image in the images' order, one Dask task per image."""
    from cytofuse.io.distributed import map_images

    calls, labels = [], []
    for item, name in zip(images, names):
        if not hasattr(item, "channel_names"):  # a file (or fsspec URL): read where the task runs, named as given
            from cytofuse.io.readers import as_image_path

            path = as_image_path(item)
            item = (path.absolute(), str(path))
        calls.append((model, item, name, tmp.absolute() / "images" / name, options))
        labels.append(item[1] if isinstance(item, tuple) else (item.source or name))
    done = dict(map_images(predict_file, calls, images=labels, scheduler=scheduler, description="predicting images",
                           progress=progress))
    return [done[i][0] for i in range(len(calls))], [done[i][1] for i in range(len(calls))]
