"""Model export: ONNX and TorchScript graphs of class probabilities, and a bioimage.io-style rdf.yaml.

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
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml
from torch import nn

from cytofuse.errors import CytofuseError, InputError
from cytofuse.runs import atomic_path, check_replaceable, replacing_folder, write_text_atomic

if TYPE_CHECKING:
    from cytofuse.inference.modelfolder import ModelCard

INPUT_NAME = "patches"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = 17
MIN_OPSET = 13
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
RDF_FILE = "rdf.yaml"
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


# --------------------------------------------------------------------------- rdf.yaml


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _card(card: object) -> "ModelCard":
    """A ModelCard, or a mapping read as one (either card layout)."""
    from pydantic import ValidationError

    from cytofuse.inference.modelfolder import ModelCard

    if isinstance(card, ModelCard):
        return card
    if not isinstance(card, Mapping) or not {"class_names", "channel_names"} <= card.keys():
        raise InputError(
            f"card must be a ModelCard or a mapping with class_names, channel_names and patches (or recipe), got {card!r}"
        )
    try:
        return ModelCard.model_validate(dict(card))
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise InputError("card must be a ModelCard or a mapping that is a valid model card:\n  "
                         + "\n  ".join(lines)) from None


def _preprocessing_note(low: float, high: float) -> str:
    return (
        f"Per image and channel: (raw - p{low:g}) / max(p{high:g} - p{low:g}, 1e-6), where p{low:g} and "
        f"p{high:g} are the {low:g}th and {high:g}th intensity percentiles of that channel over the WHOLE "
        "image (every z-slice), computed before the image is cut into patches. Percentiles of a single "
        "patch give different inputs and wrong predictions: compute them on the whole image first."
    )


def _input_spec(card: "ModelCard") -> dict:
    size = card.recipe.settings.size
    low, high = (float(p) for p in card.recipe.settings.percentiles)
    return {
        "id": INPUT_NAME,
        "description": "z-slice patches of the model's channels, normalised per image: "
        + _preprocessing_note(low, high),
        "axes": [
            {"type": "batch"},
            {"type": "channel", "channel_names": list(card.channel_names)},
            {"type": "space", "id": "y", "size": size},
            {"type": "space", "id": "x", "size": size},
        ],
        "data": {"type": "float32"},
        "preprocessing": [{
            "id": "scale_range",
            "kwargs": {"axes": ["y", "x"], "min_percentile": low, "max_percentile": high, "eps": 1e-6},
            "description": _preprocessing_note(low, high),
        }],
    }


def _output_spec(card: "ModelCard") -> dict:
    return {
        "id": OUTPUT_NAME,
        "description": "class probabilities (softmax; an ensemble outputs the mean over its members)",
        "axes": [{"type": "batch"}, {"type": "channel", "channel_names": list(card.class_names)}],
        "data": {"type": "float32"},
    }


def _weights_spec(files: Mapping[str, str | Path], folder: Path, opset: int) -> dict:
    unknown = sorted(set(files) - set(FILE_NAMES))
    if unknown or not files:
        raise InputError(f"files must map formats {sorted(FILE_NAMES)} to exported files, got {dict(files)!r}")
    out = {}
    for fmt, file in files.items():
        file = Path(file)
        if not file.is_file():
            raise InputError(f"write_rdf: {fmt} file not found: {file}")
        entry = {"source": os.path.relpath(file, folder), "sha256": sha256(file)}
        if fmt == "onnx":
            entry["opset_version"] = opset
        else:
            entry["pytorch_version"] = torch.__version__.split("+")[0]
        out[fmt] = entry
    return out


def rdf_dict(card: object, files: Mapping[str, str | Path], *, folder: str | Path, opset: int = DEFAULT_OPSET) -> dict:
    """The bioimage.io-style resource description of exported ``files`` ({format: path}) for ``card``."""
    card = _card(card)
    model = card.model
    n_members = max(len(card.weights), 1)
    what = f"{model.get('name', '?')} fusion over {model.get('encoder', '?')} encoders"
    return {
        "type": "model",
        "format_version": "0.5.3",
        "name": f"cytofuse {model.get('name', 'model')} classifier: {', '.join(card.class_names)}",
        "description": (
            f"Patch classifier ({what}{f', ensemble of {n_members} fold models' if n_members > 1 else ''}) "
            f"of {len(card.class_names)} classes from channels {', '.join(card.channel_names)}. "
            "Outputs class probabilities per patch; whole-image predictions average the patches kept by "
            "cytofuse's Otsu sparsity filter."
        ),
        "tags": ["cytofuse", "classification", "fluorescence-light-microscopy", "2d"],
        "license": "BSD-3-Clause",
        "inputs": [_input_spec(card)],
        "outputs": [_output_spec(card)],
        "weights": _weights_spec(files, Path(folder), opset),
        "config": {"cytofuse": {
            "cytofuse_version": card.cytofuse_version, "class_names": list(card.class_names),
            "channel_names": list(card.channel_names), "normalisation": card.recipe.normalisation_summary(),
            "patches": card.recipe.settings.model_dump(mode="json"), "model": model, "ensemble_members": n_members,
            "trained_on": card.trained_on,
        }},
    }


def write_rdf(path: str | Path, card: object, files: Mapping[str, str | Path], *, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``rdf.yaml`` describing ``files`` ({"onnx": ..., "torchscript": ...}) beside them.

    Weight sources are written relative to the rdf's folder, each with its sha256.
    """
    path = Path(path)
    text = yaml.safe_dump(rdf_dict(card, files, folder=path.parent, opset=opset), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text)


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
                        overwrite: bool = False, opset: int = DEFAULT_OPSET, verify: bool = True) -> dict[str, Path]:
    """Export a model folder to ``out``: model.onnx / model.pt, rdf.yaml and a copy of model.yaml.

    An ensemble becomes one graph returning the mean of its members' probabilities.
    verify: check each file against PyTorch on random patches (max abs difference < 1e-4).
    Returns {format: path} plus "rdf" and "card". Written beside ``out`` and swapped in; an existing
    ``out`` is replaced only with ``overwrite`` and only if cytofuse made it.
    """
    from cytofuse.inference.modelfolder import CARD_FILE, read_model_folder

    formats, out, model_dir = _check_formats(formats), Path(out), Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model folder {model_dir} does not exist or is not a folder")
    check_replaceable(out, overwrite=overwrite, what="export folder")
    models, card = read_model_folder(model_dir)
    patch_size = _check_patch_size(card.recipe.settings.size)
    with replacing_folder(out, overwrite=overwrite, what="export folder") as tmp:
        names = _write_export(tmp, models, card, formats, patch_size=patch_size, opset=opset, verify=verify)
        shutil.copyfile(model_dir / CARD_FILE, tmp / CARD_FILE)
    return {key: out / name for key, name in {**names, "card": CARD_FILE}.items()}


def _write_export(folder: Path, models: list[nn.Module], card: "ModelCard", formats: list[str], *, patch_size: int,
                  opset: int, verify: bool) -> dict[str, str]:
    """Write the exported graphs and rdf.yaml into ``folder``; their names by format (and "rdf")."""
    wrapped, meta = as_probability_model(models, tta=card.tta), _metadata(card, patch_size)
    files = {f: folder / FILE_NAMES[f] for f in formats}
    if "onnx" in files:
        export_onnx(wrapped, files["onnx"], patch_size=patch_size, opset=opset, metadata=meta)
    if "torchscript" in files:
        export_torchscript(wrapped, files["torchscript"], patch_size=patch_size, metadata=meta)
    if verify:
        _verify(wrapped, files, patch_size)
    write_rdf(folder / RDF_FILE, card, files, opset=opset)
    return {**{f: FILE_NAMES[f] for f in formats}, "rdf": RDF_FILE}
