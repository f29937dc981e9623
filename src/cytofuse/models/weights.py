"""Weights on disk: pretrained encoder weights from a local file, and whole-model safetensors.

Pretrained files are torchvision-layout ResNet state dicts (``.pth`` / ``.pt`` read with
``torch.load(weights_only=True)``) or ``.safetensors`` files. Our ResNet encoders use
torchvision's key names (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...), so
the mapping only strips wrapper prefixes (``module.``, ``model.``, ``backbone.``,
``encoder.``) and drops the classifier (``fc.*``); the first convolution is adapted to the
encoder's number of input channels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cytofuse.errors import InputError
from cytofuse.runs import atomic_path

_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
_CLASSIFIER_PREFIXES = ("fc.",)
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net")
CONFIG_KEY = "cytofuse_config"


@dataclass(frozen=True)
class LoadReport:
    """What ``load_encoder_weights`` did, key by key (encoder key names)."""

    path: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    adapted: tuple[str, ...]
    dropped: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (
            f"{self.path}: loaded {len(self.loaded)} tensors, adapted {list(self.adapted)}, "
            f"missing {list(self.missing)}, unexpected {list(self.unexpected)}, "
            f"dropped {list(self.dropped)}"
        )


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{path}: state dict entries are not tensors: {bad[:5]}")
    return dict(obj)


def _strip_prefixes(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def read_state_dict(path: str | Path, *, strip_prefixes: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``torch.save`` file, wrapper prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, I/O and the many pickle errors of torch.load
        raise InputError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from err
    state = _unwrap(raw, path)
    return {_strip_prefixes(k): v for k, v in state.items()} if strip_prefixes else state


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a (O, C_src, k, k) kernel to ``in_channels``.

    One channel: the sum over source channels (a grey image gives the RGB response).
    Otherwise: source channels tiled and scaled by C_src / in_channels.
    """
    src = weight.shape[1]
    if in_channels == src:
        return weight.clone()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / src)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (src / in_channels)


def _first_conv_key(target: dict[str, torch.Tensor]) -> str | None:
    return next((k for k, v in target.items() if v.ndim == 4), None)


def _match(key: str, value: torch.Tensor, want: torch.Tensor, first_conv: str | None,
           path: Path) -> tuple[torch.Tensor, bool]:
    """The tensor to load for ``key`` and whether it was adapted; raise on other shape mismatches."""
    if value.shape == want.shape:
        return value, False
    if key == first_conv and value.ndim == 4 and value.shape[0] == want.shape[0] \
            and value.shape[2:] == want.shape[2:]:
        return adapt_first_conv(value, want.shape[1]), True
    raise InputError(
        f"{path}: key {key!r} has shape {tuple(value.shape)} in the file but "
        f"{tuple(want.shape)} in the encoder"
    )


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> LoadReport:
    """Load pretrained weights from ``path`` into ``encoder`` (in place) and report per key.

    Raises InputError when no tensor matches or a shape differs other than the first conv.
    """
    path = Path(path)
    source = read_state_dict(path)
    dropped = tuple(sorted(k for k in source if k.startswith(_CLASSIFIER_PREFIXES)))
    source = {k: v for k, v in source.items() if k not in dropped}
    target = encoder.state_dict()
    first_conv = _first_conv_key(target)
    new, adapted = {}, []
    for key in target.keys() & source.keys():
        new[key], was_adapted = _match(key, source[key], target[key], first_conv, path)
        if was_adapted:
            adapted.append(key)
    if not new:
        raise InputError(f"{path}: no tensor matches the encoder's keys (e.g. {next(iter(target))!r})")
    encoder.load_state_dict(new, strict=False)
    order = list(target)
    return LoadReport(
        path=str(path),
        loaded=tuple(k for k in order if k in new),
        missing=tuple(k for k in order if k not in new),
        unexpected=tuple(sorted(source.keys() - target.keys())),
        adapted=tuple(adapted),
        dropped=dropped,
    )


def save_weights(model: nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict to a safetensors file (through ``cytofuse.runs.atomic_path``).

    The model's ``config`` (the ``create_model`` arguments) is stored as metadata beside
    ``metadata`` (string values), so that ``load_model`` rebuilds the model from the file alone.
    """
    path = Path(path)
    # copies: safetensors refuses tensors that share memory (tied or viewed parameters)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = dict(metadata or {}) | {CONFIG_KEY: json.dumps(getattr(model, "config", None) or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_model_config(path: str | Path) -> dict:
    """The ``create_model`` arguments stored by ``save_weights`` ({} when absent)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise InputError(f"cannot read weights file {path}: {err}") from err
    return json.loads(meta.get(CONFIG_KEY, "{}"))


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``save_weights`` file into ``model`` (in place); every key and shape must match."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"model weights must be a .safetensors file, got {path}")
    source = read_state_dict(path, strip_prefixes=False)
    target = model.state_dict()
    missing, unexpected = target.keys() - source.keys(), source.keys() - target.keys()
    if missing or unexpected:
        raise InputError(
            f"{path} does not fit the model: missing keys {sorted(missing)[:10]}, "
            f"unexpected keys {sorted(unexpected)[:10]}"
        )
    for key, want in target.items():
        if source[key].shape != want.shape:
            raise InputError(
                f"{path}: key {key!r} has shape {tuple(source[key].shape)} in the file but "
                f"{tuple(want.shape)} in the model"
            )
    model.load_state_dict(source, strict=True)
    return model
