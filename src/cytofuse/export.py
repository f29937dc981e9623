"""Model export: ONNX and TorchScript graphs of class probabilities, packaged for bioimage.io.

Both formats take one input, ``patches``: float32 of axes (batch, channel, y, x), the model's
channels in the card's order, y = x = the training patch size, each channel normalised as in
training, ``(raw - low) / max(high - low, 1e-6)`` with ``low``/``high`` the card's percentiles
of the WHOLE image (all z-slices of that channel), computed before the image is cut into patches.

Both return one output, ``probabilities`` (batch, class): class probabilities that sum to 1,
NOT logits: the softmax of the model's output (for late fusion the softmax of its fused
log-probabilities, i.e. the fused probabilities themselves). An ensemble (the fold models of a
model folder) is exported as ONE graph whose output is the mean of the members'
probabilities, the same rule ``cytofuse predict`` uses, so one file gives the folder's answer.

The batch axis is dynamic (named "batch"); y and x are fixed. ONNX graphs come from the
legacy TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, default opset 17);
TorchScript graphs are traced. Every file is written to a temporary name and renamed into place.

``export_model_folder`` writes both beside the model card and, through ``cytofuse.bioimageio``, a
bioimage.io model package (rdf.yaml built and validated with bioimageio.spec, test tensors from a real
patch, cover, README with the CV metrics); see that module for how the normalisation is declared.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cytofuse.errors import CytofuseError, InputError
from cytofuse.runs import atomic_path, check_replaceable, replacing_folder

if TYPE_CHECKING:
    from cytofuse.inference.modelfolder import ModelCard
    from cytofuse.io.readers import Image

INPUT_NAME = "patches"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = 17
MIN_OPSET = 13
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
PARITY_TOLERANCE = 1e-4
_EXTRA_FILE = "cytofuse.json"  # TorchScript extra file with the same metadata as ONNX's metadata_props


class ProbabilityModel(nn.Module):
    """Mean class probabilities of one or more models (an ensemble): (B, C, H, W) -> (B, K).

    Holds copies, so exporting never changes the caller's models, and stays in eval mode
    (exporters switch modes and back; an inference graph must never see training mode).
    ``tta``: each member's probability is its mean over the 8 dihedral transforms of the patch,
    as ``cytofuse predict`` computes it for a card with ``tta``.
    """

    def __init__(self, models: Sequence[nn.Module], *, tta: bool = False) -> None:
        super().__init__()
        from cytofuse.models.tta import DihedralTTA

        self.in_channels, self.num_classes = _shared_shape(models)
        self.tta = tta
        members = (copy.deepcopy(m) for m in models)
        self.members = nn.ModuleList(DihedralTTA(m) if tta else m for m in members)
        self.eval()

    def train(self, mode: bool = True) -> "ProbabilityModel":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [member(x) if self.tta else torch.softmax(member(x), dim=1) for member in self.members]
        return torch.stack(probs, dim=0).mean(dim=0)


def _shared_shape(models: Sequence[nn.Module]) -> tuple[int, int]:
    """(in_channels, num_classes) common to every model; error when they differ or are unknown."""
    shapes = {(getattr(m, "in_channels", None), getattr(m, "num_classes", None)) for m in models}
    if len(shapes) != 1 or None in next(iter(shapes)):
        raise InputError(
            "models must all be cytofuse models with the same in_channels and num_classes, "
            f"got (in_channels, num_classes) {sorted(shapes, key=str)}"
        )
    return next(iter(shapes))


def as_probability_model(model: nn.Module | Sequence[nn.Module], *, tta: bool = False) -> ProbabilityModel:
    """Wrap a model or an ensemble (a list of models) so that it outputs class probabilities
    (with ``tta``: averaged over the 8 dihedral transforms)."""
    if isinstance(model, ProbabilityModel):
        return model
    models = [model] if isinstance(model, nn.Module) else list(model)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise InputError(f"model must be an nn.Module or a non-empty list of them, got {model!r}")
    return ProbabilityModel(models, tta=tta)


def _check_patch_size(patch_size: object) -> int:
    if not isinstance(patch_size, Integral) or isinstance(patch_size, bool) or patch_size < 8:
        raise InputError(f"patch_size must be an int >= 8 (the model's input side in pixels), got {patch_size!r}")
    return int(patch_size)


def _example(wrapped: ProbabilityModel, patch_size: int) -> torch.Tensor:
    """A batch of 2 (not 1, so no size-1 batch can be folded into the graph)."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, wrapped.in_channels, patch_size, patch_size, generator=generator)


def export_onnx(model: nn.Module | Sequence[nn.Module], path: str | Path, *, patch_size: int,
                opset: int = DEFAULT_OPSET, metadata: Mapping[str, object] | None = None) -> Path:
    """Write an ONNX graph ``patches`` (batch, channel, y, x) -> ``probabilities`` (batch, class).

    model: one model or an ensemble (mean of probabilities). The batch axis is dynamic.
    metadata: stored as the graph's metadata_props (values JSON-encoded unless strings).
    """
    import onnx

    patch_size = _check_patch_size(patch_size)
    if not isinstance(opset, Integral) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise InputError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    wrapped = as_probability_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with torch.no_grad():
            torch.onnx.export(
                wrapped, (_example(wrapped, patch_size),), str(tmp), dynamo=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=int(opset),
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        graph = onnx.load(str(tmp))
        graph.doc_string = "cytofuse: class probabilities (softmax; ensembles: mean over members)"
        onnx.helper.set_model_props(graph, _string_metadata(metadata))
        onnx.save(graph, str(tmp))
    return path


def export_torchscript(model: nn.Module | Sequence[nn.Module], path: str | Path, *, patch_size: int,
                       metadata: Mapping[str, object] | None = None) -> Path:
    """Write a traced TorchScript module (B, C, y, x) -> (B, K) class probabilities, dynamic batch.

    metadata: stored as the extra file ``cytofuse.json`` (``torch.jit.load(..., _extra_files=...)``).
    """
    patch_size = _check_patch_size(patch_size)
    wrapped = as_probability_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with torch.no_grad():
            # torch's own check_trace reruns both graphs; parity is checked by ``max_abs_difference``
            traced = torch.jit.trace(wrapped, (_example(wrapped, patch_size),), check_trace=False)
        extra = {_EXTRA_FILE: json.dumps(dict(metadata or {}))}
        torch.jit.save(traced, str(tmp), _extra_files=extra)
    return path


def _string_metadata(metadata: Mapping[str, object] | None) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


# --------------------------------------------------------------------------- running exported files


def load_exported(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function patches (B, C, y, x) -> class probabilities (B, K) running an exported file.

    ``.onnx`` files run in onnxruntime (CPU), anything else as TorchScript.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"exported model file not found: {path}")
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: _as_batch(x)})[0]
    module = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(_as_batch(x))).numpy()

    return run


def _as_batch(patches: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(patches, dtype=np.float32)
    if x.ndim != 4:
        raise InputError(f"patches must be (batch, channel, y, x), got shape {x.shape}")
    return x


def run_exported(path: str | Path, patches: np.ndarray) -> np.ndarray:
    """Class probabilities (B, K) of an exported ``.onnx`` (onnxruntime) or TorchScript file."""
    return load_exported(path)(patches)


def read_exported_metadata(path: str | Path) -> dict[str, object]:
    """The metadata stored by ``export_onnx`` / ``export_torchscript`` (JSON values decoded)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"exported model file not found: {path}")
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return {k: _maybe_json(v) for k, v in props.items()}
    extra = {_EXTRA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[_EXTRA_FILE] or "{}")


def _maybe_json(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value


def max_abs_difference(model: nn.Module | Sequence[nn.Module], path: str | Path, patches: np.ndarray,
                       *, batch_sizes: Sequence[int] | None = None) -> float:
    """Largest |exported - PyTorch| over the class probabilities of ``patches``.

    batch_sizes: run the first n patches for each n (one load of the file); default all at once.
    """
    wrapped, run = as_probability_model(model), load_exported(path)
    x = _as_batch(patches)
    with torch.no_grad():
        want = wrapped(torch.from_numpy(x)).numpy()
    return max(float(np.abs(run(x[:n]) - want[:n]).max()) for n in (batch_sizes or [len(x)]))


# --------------------------------------------------------------------------- hashes


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- a whole model folder


def _check_formats(formats: Sequence[str]) -> list[str]:
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FILE_NAMES]
    if unknown or not formats:
        raise InputError(f"formats must be a non-empty list of {sorted(FILE_NAMES)}, got {formats!r}")
    return list(dict.fromkeys(formats))


def _metadata(card: "ModelCard", patch_size: int) -> dict[str, object]:
    return {
        "class_names": list(card.class_names), "channel_names": list(card.channel_names), "patch_size": patch_size,
        "normalisation": card.recipe.normalisation_summary(), "output": "class probabilities",
        "ensemble_members": max(len(card.weights), 1), "cytofuse_version": card.cytofuse_version,
        "tta": "mean over the 8 dihedral transforms of each patch" if card.tta else "none",
    }


def _verify(wrapped: ProbabilityModel, files: Mapping[str, Path], patch_size: int) -> None:
    """Raise when an exported file disagrees with PyTorch on random patches (batches 1 and 3)."""
    x = np.random.default_rng(0).random((3, wrapped.in_channels, patch_size, patch_size), dtype=np.float32)
    for fmt, file in files.items():
        diff = max_abs_difference(wrapped, file, x, batch_sizes=(1, 3))
        if not diff < PARITY_TOLERANCE:
            raise CytofuseError(
                f"exported {fmt} file {file.name} differs from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE})"
            )


def export_model_folder(model_dir: str | Path, out: str | Path, *, formats: Sequence[str] = ("onnx", "torchscript"),
                        overwrite: bool = False, opset: int = DEFAULT_OPSET, verify: bool = True,
                        model_name: str | None = None, bioimageio: bool = True, cv_run: str | Path | None = None,
                        sample_image: "str | Path | Image | None" = None, authors: Sequence[str] = (),
                        cite: Sequence[str] = (), license: str = "BSD-3-Clause") -> dict[str, Path]:
    """Export a model folder (or a CV run's fold ensemble) to ``out``: model.onnx / model.pt, model.yaml and,
    with ``bioimageio``, a validated bioimage.io package (rdf.yaml, test tensors, cover, README).

    An ensemble becomes one graph returning the mean of its members' probabilities.
    verify: check each file against PyTorch on random patches (max abs difference < 1e-4).
    cv_run: the CV run the model came from (a CV run exported itself is its own): its out-of-fold metrics
        go into the README's Validation section and its first image gives the test patch.
    sample_image: an image file (or ``Image``) to cut the test patch from instead (the kept patch with the
        highest foreground ratio); without either, the test patch is synthetic and the README says so.
    authors: ``"Name;affiliation"``; cite: ``"text;doi"`` (placeholders, marked as such, when empty).
    Returns {format: path} plus "card" (and "rdf" with ``bioimageio``). Written beside ``out`` and swapped
    in; an existing ``out`` is replaced only with ``overwrite`` and only if cytofuse made it.
    """
    import yaml

    from cytofuse.inference.modelfolder import CARD_FILE, load_models

    formats, out, model_dir = _check_formats(formats), Path(out), Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model folder {model_dir} does not exist or is not a folder")
    if bioimageio:
        from cytofuse.bioimageio import parse_author, parse_cite, spec_version

        spec_version()
        for text in authors:  # bad flags fail before any work
            parse_author(text)
        for text in cite:
            parse_cite(text)
    check_replaceable(out, overwrite=overwrite, what="export folder")
    models, card = load_models(model_dir, model_name=model_name)
    patch_size = _check_patch_size(card.recipe.settings.size)
    is_card_folder = (model_dir / CARD_FILE).is_file()
    cv_run = Path(cv_run) if cv_run is not None else (None if is_card_folder else model_dir)
    with replacing_folder(out, overwrite=overwrite, what="export folder") as tmp:
        names = _write_export(tmp, models, card, formats, patch_size=patch_size, opset=opset, verify=verify)
        if is_card_folder:
            shutil.copyfile(model_dir / CARD_FILE, tmp / CARD_FILE)
        else:
            (tmp / CARD_FILE).write_text(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))
        if bioimageio:
            names["rdf"] = _write_package(tmp, card, names, opset=opset, cv_run=cv_run, sample_image=sample_image,
                                          authors=authors, cite=cite, license=license).name
    return {key: out / name for key, name in {**names, "card": CARD_FILE}.items()}


def _write_package(folder: Path, card: "ModelCard", names: Mapping[str, str], *, opset: int, cv_run: Path | None,
                   sample_image, authors: Sequence[str], cite: Sequence[str], license: str) -> Path:
    """The bioimage.io package of the exported files in ``folder`` (see ``cytofuse.bioimageio``)."""
    from cytofuse.bioimageio import run_image, sample_from_image, synthetic_sample, write_package

    image = _sample_image(sample_image) if sample_image is not None else run_image(cv_run) if cv_run else None
    sample = sample_from_image(image, card) if image is not None else synthetic_sample(card)
    weights = {f: folder / names[f] for f in FILE_NAMES if f in names}
    first = weights.get("onnx", weights.get("torchscript"))
    probabilities = run_exported(first, sample.normalised[None])
    for fmt, file in weights.items():  # every weights entry must reproduce the test output
        diff = float(np.abs(run_exported(file, sample.normalised[None]) - probabilities).max())
        if not diff < PARITY_TOLERANCE:
            raise CytofuseError(f"exported {fmt} file {file.name} differs from {first.name} on the test patch by "
                                f"{diff:.2e} (> {PARITY_TOLERANCE})")
    metrics, source = _cv_metrics(cv_run, card)
    return write_package(folder, card, weights, opset=opset, sample=sample, probabilities=probabilities,
                         metrics=metrics, metrics_source=source, authors=authors, cite=cite, license=license)


def _sample_image(sample_image) -> "Image":
    from cytofuse.io.readers import Image, read_image

    return sample_image if isinstance(sample_image, Image) else read_image(sample_image)


def _cv_metrics(cv_run: Path | None, card: "ModelCard"):
    """(RunMetrics, what they are) of the card's model in ``cv_run``, or (None, "")."""
    from cytofuse.evaluation.metrics import RunMetrics
    from cytofuse.runs import RunFolder

    if cv_run is None:
        return None, ""
    name = card.trained_on.get("model_name")
    folder = RunFolder(cv_run)
    candidates = [folder.model(name)] if name else [folder.model(n) for n in _run_models(folder)]
    found = [m.metrics for m in candidates if m.metrics.is_file()]
    if len(found) != 1:
        raise InputError(f"cv_run {cv_run}: expected the metrics.json of model {name or '(the only model)'} in "
                         f"{folder.models}, found {len(found)}; pass the CV run the model came from")
    return RunMetrics.read(found[0]), f"model {found[0].parent.name} in CV run {Path(cv_run).name}"


def _run_models(folder) -> list[str]:
    return sorted(p.name for p in folder.models.iterdir() if p.is_dir()) if folder.models.is_dir() else []


def _write_export(folder: Path, models: list[nn.Module], card: "ModelCard", formats: list[str], *, patch_size: int,
                  opset: int, verify: bool) -> dict[str, str]:
    """Write the exported graphs into ``folder``; their names by format."""
    wrapped, meta = as_probability_model(models, tta=card.tta), _metadata(card, patch_size)
    files = {f: folder / FILE_NAMES[f] for f in formats}
    if "onnx" in files:
        export_onnx(wrapped, files["onnx"], patch_size=patch_size, opset=opset, metadata=meta)
    if "torchscript" in files:
        export_torchscript(wrapped, files["torchscript"], patch_size=patch_size, metadata=meta)
    if verify:
        _verify(wrapped, files, patch_size)
    return {f: FILE_NAMES[f] for f in formats}
