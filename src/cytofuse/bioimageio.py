"""bioimage.io model packages: an exported cytofuse model as a validated bioimage.io model description.

The description is built with the ``bioimageio.spec`` classes (``pip install "cytofuse[bioimageio]"``)
and written with its package builder, then loaded back and validated with its IO checks (hashes,
test tensors, sample tensors, cover, documentation), offline: nothing in it is a URL. A package
folder holds::

    rdf.yaml             the model description (format 0.5)
    model.onnx           the original weights entry (ONNX)
    model.pt             TorchScript, ``parent: onnx`` (traced from the same PyTorch model)
    test_input.npy       (1, C, y, x) float32: a real patch of the model's channels (see below)
    test_output.npy      (1, K) float32: the exported model's class probabilities of that patch
    sample_input.tif, sample_output.tif   the same tensors for people (imageio-readable)
    cover.png            the patch beside its class probabilities
    README.md            what the model is, its exact input recipe, and a Validation section
    model.yaml           the cytofuse model card (not part of the description: the recipe is in its config)

**Input normalisation.** cytofuse normalises each channel as ``(raw - low) / max(high - low, 1e-6)``
with no clipping. With dataset or fixed scope, ``low`` and ``high`` are fixed numbers of the recipe,
so the package declares that exact map as ``scale_linear`` along the channel axis (gain
``1 / max(high - low, 1e-6)``, offset ``-low * gain``) and the test input is the RAW patch. With
per-image scope ``low`` and ``high`` are percentiles of the whole image (all z-slices), which no
patch-level operation can reproduce (bioimage.io's ``scale_range`` would take percentiles of the
patch): the input is declared as already normalised, the test input is the normalised patch, and
the recipe is spelled out in the input description and the README.
"""

from __future__ import annotations

import gc
import re
import shutil
import string
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cytofuse.errors import CytofuseError, InputError
from cytofuse.preprocess.patches import NORM_EPS
from cytofuse.runs import atomic_path

if TYPE_CHECKING:
    from cytofuse.evaluation.metrics import RunMetrics
    from cytofuse.inference.modelfolder import ModelCard
    from cytofuse.io.readers import Image

RDF_FILE = "rdf.yaml"
TEST_INPUT, TEST_OUTPUT = "test_input.npy", "test_output.npy"
SAMPLE_INPUT, SAMPLE_OUTPUT = "sample_input.tif", "sample_output.tif"
COVER, README = "cover.png", "README.md"
PLACEHOLDER_AUTHOR = ("cytofuse user (placeholder - pass --author)", "placeholder affiliation")
PLACEHOLDER_CITE = (
    "Yee et al., organelle-aware data fusion, Health Inf Sci Syst 14:37 (2026). Placeholder DOI: pass --cite",
    "10.0000/placeholder",
)
_NAME_CHARS = set(string.ascii_letters + string.digits + "_+- ()")
_METRICS = (("balanced_accuracy", "balanced accuracy"), ("mcc", "MCC"), ("macro_f1", "macro F1"),
            ("auroc_macro", "macro AUROC"))


@contextmanager
def quiet_file_handles() -> Iterator[None]:
    """Run bioimageio.spec calls without their ResourceWarnings: its readers leave files to the garbage
    collector (bioimageio.spec 0.5.12), which is collected here, inside the block, while they are ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            yield
        finally:
            gc.collect()


def spec_version() -> str:
    """The installed bioimageio.spec version; an InputError says how to install it when it is missing."""
    try:
        import bioimageio.spec
    except ImportError:
        raise InputError('bioimage.io packages need bioimageio.spec: pip install "cytofuse[bioimageio]" '
                         "(or export without the package: --no-bioimageio)") from None
    return bioimageio.spec.__version__


# --------------------------------------------------------------------------- authors and citations


def parse_author(text: str) -> tuple[str, str | None]:
    """``"Name;affiliation"`` (affiliation optional) -> (name, affiliation)."""
    name, _, affiliation = str(text).partition(";")
    name, affiliation = name.strip(), affiliation.strip() or None
    if not name or "/" in name or "\\" in name:
        raise InputError(f'--author must be "Name;affiliation" with a name without slashes, got {text!r}')
    return name, affiliation


def parse_cite(text: str) -> tuple[str, str]:
    """``"text;doi"`` -> (text, doi); the DOI must look like 10.NNNN/..."""
    body, _, doi = str(text).rpartition(";")
    body, doi = body.strip(), doi.strip().removeprefix("https://doi.org/")
    if not body or not re.fullmatch(r"10\.[0-9]{4,}/\S+", doi):
        raise InputError(f'--cite must be "text;doi" with a DOI like 10.1234/abcd, got {text!r}')
    return body, doi


# --------------------------------------------------------------------------- the test patch


@dataclass(frozen=True)
class SamplePatch:
    """One patch of the model's channels: raw and as cytofuse feeds it to the model."""

    raw: np.ndarray  # (C, y, x) float32 raw intensities
    normalised: np.ndarray  # (C, y, x) float32: (raw - low) / max(high - low, eps)
    low: np.ndarray  # (C,) the bounds used (the image's percentiles, or the recipe's)
    high: np.ndarray
    source: str  # where the patch comes from, for the README
    origin: tuple[int, int, int] | None = None  # (z, y, x) in the source image


def sample_from_image(image: "Image", card: "ModelCard") -> SamplePatch:
    """The kept patch of ``image`` with the highest foreground ratio, cut and normalised by the same code
    ``cytofuse predict`` runs (the card's channels, thresholds, grid, filter and bounds)."""
    from cytofuse.inference.predict import prepare_image
    from cytofuse.preprocess.patches import cut_patches

    stack, res = prepare_image(image, card, name=Path(image.source or "image").name)
    if not len(res.origins):
        raise InputError(f"sample image {image.source or '<array>'}: no patch passes the model's sparsity filter; "
                         "choose an image with cells in it")
    best = int(np.argmax(res.ratios.mean(axis=1)))
    z, y, x = (int(v) for v in res.origins[best])
    size = card.recipe.settings.size
    raw = np.asarray(stack[:, z, y : y + size, x : x + size], dtype=np.float32)
    normalised = cut_patches(stack, res.origins[best : best + 1], res.low, res.high, size=size)[0]
    return SamplePatch(raw, normalised, np.asarray(res.low, np.float64), np.asarray(res.high, np.float64),
                       image.source or "<array>", (z, y, x))


def run_image(run_dir: str | Path) -> "Image | None":
    """The first image (by id) of a CV run's patch index that still reads, or None."""
    import pyarrow.parquet as pq
    import yaml

    from cytofuse.config import validate_config
    from cytofuse.io.imagesets import ImageSet
    from cytofuse.runs import RunFolder

    folder = RunFolder(run_dir)
    if not folder.config.is_file() or not folder.patches.is_file():
        return None
    try:
        data = validate_config(yaml.safe_load(folder.config.read_text()) or {}, source=str(folder.config)).data
        image_set = (ImageSet.from_folder(data.images, axes=data.axes) if data.images is not None else
                     ImageSet.from_manifest(data.manifest, label_column=data.label_column,
                                            group_column=data.group_column, axes=data.axes))
        ids = sorted(set(pq.read_table(folder.patches, columns=["image_id"]).column(0).to_pylist()))
        return image_set.read(ids[0]) if ids else None
    except (CytofuseError, OSError, KeyError):  # the run's images moved: the caller falls back
        return None


def synthetic_sample(card: "ModelCard", *, seed: int = 0) -> SamplePatch:
    """A smooth synthetic patch (blobs over a dark field) in the recipe's range, for a model whose
    training images are not at hand."""
    size, n = card.recipe.settings.size, len(card.channel_names)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    normalised = np.zeros((n, size, size), np.float32)
    for c in range(n):
        for cy, cx in rng.uniform(0.2 * size, 0.8 * size, (3, 2)):
            normalised[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 10) ** 2)).astype(np.float32)
    bounds = card.recipe.bounds()
    low, high = bounds if bounds is not None else (np.zeros(n), np.ones(n))
    raw = (normalised * np.maximum(high - low, NORM_EPS)[:, None, None] + low[:, None, None]).astype(np.float32)
    span = np.maximum(np.asarray(high, np.float64) - low, NORM_EPS).astype(np.float32)
    normalised = ((raw - np.asarray(low, np.float32)[:, None, None]) * (1 / span)[:, None, None]).astype(np.float32)
    return SamplePatch(raw, normalised, np.asarray(low, np.float64), np.asarray(high, np.float64),
                       "synthetic (no training image was at hand: export from the CV run, or pass --cv-run or --sample-image)")


# --------------------------------------------------------------------------- the description


def linear_scaling(low: Sequence[float], high: Sequence[float]) -> tuple[list[float], list[float]]:
    """(gain, offset) per channel with ``raw * gain + offset == (raw - low) / max(high - low, eps)``."""
    low = np.asarray(low, np.float64)
    gain = 1.0 / np.maximum(np.asarray(high, np.float64) - low, NORM_EPS)
    return gain.tolist(), (-low * gain).tolist()


def recipe_text(card: "ModelCard") -> str:
    """The exact input recipe in words (README and descriptions)."""
    settings = card.recipe.settings
    lo, hi = (f"{p:g}" for p in settings.percentiles)
    formula = "(raw - low) / max(high - low, 1e-6) per channel, no clipping"
    bounds = card.recipe.bounds()
    if bounds is None:
        return (f"{formula}, where low and high are the {lo}th and {hi}th percentiles of that channel over the "
                "WHOLE image (every z-slice), computed before the image is cut into patches (cytofuse computes "
                f"them from a histogram of up to {settings.hist_samples or 'all'} pixels per channel). Percentiles of "
                "a single patch give different inputs: compute them on the whole image first.")
    norm = card.recipe.normalisation
    pairs = ", ".join(f"{c}: [{a:g}, {b:g}]" for c, a, b in zip(card.channel_names, *bounds))
    return (f"{formula}, with fixed bounds (scope {norm.scope}; {norm.measured_on or 'given'}): {pairs}. "
            "The package's scale_linear preprocessing applies exactly this map to raw intensities.")


def _name(card: "ModelCard") -> str:
    model = card.model
    text = f"cytofuse {model.get('name', 'fusion')} fusion {model.get('encoder', '')} classifier"
    text = "".join(ch if ch in _NAME_CHARS else "-" for ch in re.sub(r"\s+", " ", text)).strip()
    return text[:64]


def _description(card: "ModelCard") -> str:
    model, n = card.model, max(len(card.weights), 1)
    ensemble = f", mean of an ensemble of {n} fold models" if n > 1 else ""
    text = (f"Classifies {card.recipe.settings.size} px z-slice patches of fluorescence microscopy images from "
            f"channels {', '.join(card.channel_names)} into {len(card.class_names)} classes "
            f"({', '.join(card.class_names)}): {model.get('name', '?')} fusion of {model.get('encoder', '?')} "
            f"encoders{ensemble}. Outputs class probabilities; whole-image decisions average the patches kept by "
            "cytofuse's Otsu foreground filter. See README for the exact input normalisation.")
    return text if len(text) <= 512 else text[:509] + "..."


def _tags(card: "ModelCard") -> list[str]:
    encoder = str(card.model.get("encoder", ""))
    network = ["resnet"] if "resnet" in encoder else ["densenet"] if "densenet" in encoder else []
    return ["cytofuse", "image-classification", "classification", "fluorescence-light-microscopy", "2d", "cells",
            "pytorch", "onnx", "torchscript", *network]


def _input_descr(card: "ModelCard", spec, *, raw_input: bool, sample_input: bool):
    m, FileDescr = spec
    size = card.recipe.settings.size
    axes = [m.BatchAxis(), m.ChannelAxis(channel_names=list(card.channel_names)),
            m.SpaceInputAxis(id=m.AxisId("y"), size=size), m.SpaceInputAxis(id=m.AxisId("x"), size=size)]
    if raw_input:
        gain, offset = linear_scaling(*card.recipe.bounds())
        steps = [m.ScaleLinearDescr(kwargs=m.ScaleLinearAlongAxisKwargs(axis=m.AxisId("channel"), gain=gain,
                                                                        offset=offset))]
        what = "raw intensities (float32) of the model's channels; scale_linear = cytofuse's fixed normalisation"
    else:
        lo, hi = (f"{p:g}" for p in card.recipe.settings.percentiles)
        steps = []
        what = f"already normalised: (raw - p{lo}) / (p{hi} - p{lo}) per channel, percentiles of the WHOLE image (README)"
    return m.InputTensorDescr(
        id=m.TensorId("patches"), description=what[:128], axes=axes, data=m.IntervalOrRatioDataDescr(type="float32"),
        test_tensor=FileDescr(source=Path(TEST_INPUT)), preprocessing=steps,
        sample_tensor=FileDescr(source=Path(SAMPLE_INPUT)) if sample_input else None,
    )


def _output_descr(card: "ModelCard", spec):
    m, FileDescr = spec
    return m.OutputTensorDescr(
        id=m.TensorId("probabilities"), description="class probabilities (softmax; ensembles: mean over members)",
        axes=[m.BatchAxis(), m.ChannelAxis(channel_names=list(card.class_names))],
        data=m.IntervalOrRatioDataDescr(type="float32"), test_tensor=FileDescr(source=Path(TEST_OUTPUT)),
        sample_tensor=FileDescr(source=Path(SAMPLE_OUTPUT)),
    )


def _weights_descr(weights: Mapping[str, Path], opset: int, spec):
    import torch

    m, _ = spec
    entries = {}
    if "onnx" in weights:
        entries["onnx"] = m.OnnxWeightsDescr(source=Path(weights["onnx"].name), opset_version=int(opset),
                                             comment="exported from the PyTorch model by torch.onnx (legacy exporter)")
    if "torchscript" in weights:
        parent = "onnx" if "onnx" in weights else None
        entries["torchscript"] = m.TorchscriptWeightsDescr(
            source=Path(weights["torchscript"].name), pytorch_version=m.Version(torch.__version__.split("+")[0]),
            parent=parent, comment="traced from the same PyTorch model as the ONNX graph; both agree within 1e-4")
    return m.WeightsDescr(**entries)


def model_description(folder: Path, card: "ModelCard", weights: Mapping[str, Path], *, opset: int, raw_input: bool,
                      authors: Sequence[tuple[str, str | None]], cite: Sequence[tuple[str, str]],
                      license: str, attachments: Sequence[str] = ()):
    """The ``ModelDescr`` of the files in ``folder`` (validated as it is built, with IO checks)."""
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.common import FileDescr
    from bioimageio.spec.model import v0_5 as m

    spec = (m, FileDescr)
    with ValidationContext(root=folder, perform_io_checks=True):
        return m.ModelDescr(
            name=_name(card), description=_description(card),
            authors=[m.Author(name=n, affiliation=a) for n, a in authors],
            cite=[m.CiteEntry(text=t, doi=m.Doi(d)) for t, d in cite],
            license=license, tags=_tags(card),
            documentation=FileDescr(source=Path(README)), covers=[FileDescr(source=Path(COVER))],
            attachments=[FileDescr(source=Path(a)) for a in attachments],
            inputs=[_input_descr(card, spec, raw_input=raw_input, sample_input=True)],
            outputs=[_output_descr(card, spec)],
            weights=_weights_descr(weights, opset, spec),
            config={"cytofuse": _config(card)},
        )


def _config(card: "ModelCard") -> dict:
    return {"cytofuse_version": card.cytofuse_version, "class_names": list(card.class_names),
            "channel_names": list(card.channel_names), "normalisation": card.recipe.normalisation_summary(),
            "patches": card.recipe.settings.model_dump(mode="json"), "model": dict(card.model),
            "ensemble_members": max(len(card.weights), 1), "tta": card.tta, "trained_on": dict(card.trained_on)}


# --------------------------------------------------------------------------- cover and README


def write_cover(path: Path, patch: np.ndarray, probabilities: Sequence[float], class_names: Sequence[str]) -> Path:
    """A 2:1 PNG: the model-input patch (up to three channels in colour) beside a bar per class."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    side = 256
    colours = [(1, 0, 1), (0, 1, 0), (0, 0.6, 1)] if len(patch) > 1 else [(1, 1, 1)]
    rgb = np.zeros((*patch.shape[1:], 3), np.float32)
    for channel, colour in zip(patch, colours):
        rgb += np.clip(channel, 0, 1)[..., None] * np.asarray(colour, np.float32)
    tile = PILImage.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)).resize((side, side), PILImage.NEAREST)
    canvas = PILImage.new("RGB", (2 * side, side), "white")
    canvas.paste(tile, (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=13)
    rows = max(len(class_names), 1)
    height = min(28, (side - 20) // rows)
    for i, (name, p) in enumerate(zip(class_names, probabilities)):
        y = 10 + i * height
        draw.rectangle([side + 10, y, side + 10 + round(float(p) * (side - 80)), y + height - 6], fill=(230, 120, 40))
        draw.text((side + 14, y + (height - 6) / 2), f"{name} {float(p):.2f}", fill="black", font=font, anchor="lm")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def metrics_section(metrics: "RunMetrics | None", source: str) -> str:
    """The README's Validation section: the CV metrics of the run the model came from, and what they were
    measured on."""
    lines = ["## Validation", ""]
    if metrics is None:
        return "\n".join(lines + [
            "No cross-validation metrics were at hand when this package was exported. Export from the CV run, or "
            "with `--cv-run RUN` (the CV run of the same configuration), to report them here. To validate the "
            "model on your own data, run `cytofuse predict` on labelled images that played no part in training "
            "and compare the image decisions with the labels.", ""])
    lines += [f"Out-of-fold metrics of {source}: each fold's model scored the images of its test fold, which it "
              f"never saw in training. Measured on: {metrics.measured_on or 'see the run'}.", ""]
    for level in ("image", "patch"):
        if "cv" not in metrics.splits:
            break
        result = metrics.result(level)
        lines += [f"**{level} level** ({result.get('n', '?')} {level}{'es' if level == 'patch' else 's'}, "
                  f"{result.get('n_folds', '?')} folds; "
                  "mean ± sd over folds):", "", "| metric | value |", "|---|---|"]
        for key, label in _METRICS:
            try:
                stat = metrics.stat(key, level=level)
            except InputError:
                continue
            value = "undefined" if stat.mean is None else f"{stat.mean:.3f} ± {stat.sd or 0:.3f}"
            lines.append(f"| {label} | {value} |")
        lines.append("")
    lines += ["A model trained on all images (`cytofuse train`) has no held-out estimate of its own: these "
              "numbers estimate how the procedure that made it performs on unseen images of the same kind.", ""]
    return "\n".join(lines)


def readme_text(card: "ModelCard", sample: SamplePatch, probabilities: Sequence[float], *, raw_input: bool,
                validation: str, authors: Sequence[tuple[str, str | None]], cite: Sequence[tuple[str, str]]) -> str:
    """The package's documentation (Markdown)."""
    settings = card.recipe.settings
    where = f" at (z, y, x) = {sample.origin}" if sample.origin is not None else ""
    probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(card.class_names, probabilities))
    given = ("RAW intensities as float32; the declared `scale_linear` preprocessing normalises them" if raw_input
             else "ALREADY NORMALISED patches (per-image percentiles cannot be computed from one patch)")
    filter_note = (" The model was trained on patches that a learned empty-patch filter kept as well."
                   if settings.empty_filter is not None else "")
    placeholder = any(name == PLACEHOLDER_AUTHOR[0] for name, _ in authors) or any(
        d == PLACEHOLDER_CITE[1] for _, d in cite)
    return "\n".join([
        f"# {_name(card)}", "", _description(card), "",
        "## Input", "",
        f"`patches`: float32 (batch, channel, y, x) with channels {', '.join(card.channel_names)} in that order and "
        f"y = x = {settings.size} px, one z-slice of a (C, Z, Y, X) stack. The package takes {given}.", "",
        f"Normalisation: {recipe_text(card)}", "",
        f"How cytofuse cuts patches: a {settings.size} px grid with stride {settings.step} px on the z-slices "
        f"0, {settings.z_step}, {2 * settings.z_step}, ...; a patch is kept when its foreground ratio over a global Otsu threshold per "
        f"channel (rule `{settings.rule}`) reaches {settings.min_ratio:g}.{filter_note}", "",
        "## Output", "",
        f"`probabilities`: (batch, class) class probabilities in the order {', '.join(card.class_names)}; they sum "
        "to 1. " + ("Each is the mean over the 8 dihedral transforms of the patch (test-time augmentation). "
                    if card.tta else ""), "",
        "## Test tensors", "",
        f"`{TEST_INPUT}` is a patch of {sample.source}{where}, per-channel bounds low {np.round(sample.low, 4).tolist()}, "
        f"high {np.round(sample.high, 4).tolist()}; `{TEST_OUTPUT}` is what the exported ONNX graph returns for it "
        f"({probs}).", "",
        validation,
        "## Citation and authors", "",
        *[f"- {text} (doi:{doi})" for text, doi in cite],
        *[f"- author: {name}{f', {aff}' if aff else ''}" for name, aff in authors], "",
        *(["The author and/or citation above are PLACEHOLDERS: export again with `--author \"Name;affiliation\"` "
           "and `--cite \"text;doi\"`.", ""] if placeholder else []),
        f"Made with cytofuse {card.cytofuse_version}.", "",
    ])


# --------------------------------------------------------------------------- the package


def write_package(folder: Path, card: "ModelCard", weights: Mapping[str, Path], *, opset: int, sample: SamplePatch,
                  probabilities: np.ndarray, metrics: "RunMetrics | None" = None, metrics_source: str = "",
                  authors: Sequence[str] = (), cite: Sequence[str] = (), license: str = "BSD-3-Clause",
                  attachments: Sequence[str] = ()) -> Path:
    """Write the test tensors, cover and README beside ``weights`` in ``folder``, build the description
    with bioimageio.spec, write ``rdf.yaml`` with its package builder and validate the folder; return rdf.yaml.

    authors: ``"Name;affiliation"`` strings; cite: ``"text;doi"`` strings (placeholders, marked as such,
    when empty). probabilities: (1, K) output of the exported model for ``sample``.
    """
    spec_version()
    from bioimageio.spec import save_bioimageio_package_as_folder

    people = [parse_author(a) for a in authors] or [PLACEHOLDER_AUTHOR]
    refs = [parse_cite(c) for c in cite] or [PLACEHOLDER_CITE]
    raw_input = card.recipe.bounds() is not None
    tensor = (sample.raw if raw_input else sample.normalised)[None].astype(np.float32)
    probabilities = np.asarray(probabilities, np.float32).reshape(1, len(card.class_names))
    stage = folder / ".bioimageio-files"
    stage.mkdir()
    try:
        for name in weights.values():
            shutil.move(str(folder / Path(name).name), stage / Path(name).name)
        for name in attachments:
            shutil.copyfile(folder / name, stage / name)
        _write_tensors(stage, tensor, probabilities)
        write_cover(stage / COVER, sample.normalised, probabilities[0], card.class_names)
        validation = metrics_section(metrics, metrics_source)
        (stage / README).write_text(readme_text(card, sample, probabilities[0], raw_input=raw_input,
                                                validation=validation, authors=people, cite=refs), encoding="utf-8")
        with quiet_file_handles():
            descr = model_description(stage.resolve(), card, {k: stage / Path(v).name for k, v in weights.items()},
                                      opset=opset, raw_input=raw_input, authors=people, cite=refs, license=license,
                                      attachments=attachments)
            save_bioimageio_package_as_folder(descr, output_path=folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    check_package(folder / RDF_FILE)
    return folder / RDF_FILE


def _write_tensors(folder: Path, tensor: np.ndarray, probabilities: np.ndarray) -> None:
    import tifffile

    np.save(folder / TEST_INPUT, tensor, allow_pickle=False)
    np.save(folder / TEST_OUTPUT, probabilities, allow_pickle=False)
    tifffile.imwrite(folder / SAMPLE_INPUT, tensor[0], photometric="minisblack")
    tifffile.imwrite(folder / SAMPLE_OUTPUT, probabilities, photometric="minisblack")


def check_package(rdf: str | Path):
    """Load a package with bioimageio.spec (format and IO checks) and return its description; a
    CytofuseError carries the validation summary when it fails."""
    from bioimageio.spec import InvalidDescr, load_description

    with quiet_file_handles():
        descr = load_description(Path(rdf), perform_io_checks=True)
    status = descr.validation_summary.status
    if isinstance(descr, InvalidDescr) or status == "failed":
        raise CytofuseError(f"the bioimage.io package {rdf} does not validate ({status}):\n"
                            f"{descr.validation_summary.format()}")
    return descr
