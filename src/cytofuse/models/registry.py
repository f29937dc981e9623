"""One factory for every fusion strategy: ``create_model(name, ...)``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path

from torch import nn

from cytofuse.errors import InputError
from cytofuse.models.encoders import create_encoder, list_encoders
from cytofuse.models.fusion import (
    LATE_WEIGHTS,
    CytofuseModel,
    EarlyFusion,
    IntermediateFusion,
    LateFusion,
    SingleChannel,
)
from cytofuse.models.weights import LoadReport, load_encoder_weights, load_weights, read_model_config

MODELS: dict[str, type[CytofuseModel]] = {
    "early": EarlyFusion,
    "intermediate": IntermediateFusion,
    "late": LateFusion,
    "single": SingleChannel,
}


def register_fusion(name: str, cls: type[CytofuseModel], *, replace: bool = False) -> None:
    """Make fusion strategy ``cls`` available as ``name`` to ``create_model`` and configs (``models[].fusion``).

    ``cls(encoder_factory, *, encoder_name, in_channels, num_classes, dropout, hidden)`` builds its
    encoders with ``encoder_factory(n_channels)`` and implements ``forward_features``, ``head`` and
    ``gradcam_layers`` (see :class:`CytofuseModel`).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"register_fusion: name must be an identifier such as 'gated', got {name!r}")
    if name in MODELS and not replace:
        raise InputError(f"register_fusion: fusion {name!r} exists; pass replace=True to replace it")
    if not (isinstance(cls, type) and issubclass(cls, CytofuseModel)):
        raise InputError(f"register_fusion: cls must be a subclass of CytofuseModel, got {cls!r}")
    MODELS[name] = cls


def list_models() -> list[str]:
    """Fusion strategies accepted by ``create_model``."""
    return list(MODELS)


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _positive_int(value: object, name: str, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_args(name: str, encoder: str, in_channels: int, num_classes: int,
                channel: int | None, dropout: float, hidden: int | None) -> None:
    if name not in MODELS:
        raise InputError(f"model name must be one of {list_models()}, got {name!r}")
    if encoder not in list_encoders():
        raise InputError(f"encoder must be one of {list_encoders()}, got {encoder!r}")
    _positive_int(in_channels, "in_channels", 1)
    _positive_int(num_classes, "num_classes", 2)
    if not isinstance(dropout, Real) or not 0.0 <= dropout < 1.0:
        raise InputError(f"dropout must be in [0, 1), got {dropout!r}")
    if hidden is not None:
        _positive_int(hidden, "hidden", 1)
    if name == "single":
        if channel is None:
            raise InputError("channel is required for model 'single' (index of the channel to use)")
        if not _is_int(channel) or not 0 <= channel < in_channels:
            raise InputError(f"channel must be an index in [0, {in_channels - 1}], got {channel!r}")
    elif channel is not None:
        raise InputError(f"channel is only used by model 'single', got channel={channel!r} for {name!r}")


def _aux_args(name: str, aux_channels: object, aux_p: object) -> int:
    if not _is_int(aux_channels) or aux_channels < 0:
        raise InputError(f"aux_channels must be an int >= 0, got {aux_channels!r}")
    if aux_channels and name != "intermediate":
        raise InputError(f"training-only auxiliary encoders (aux_channels={aux_channels}) need fusion "
                         f"'intermediate', got {name!r}")
    if not isinstance(aux_p, Real) or not 0.0 <= aux_p < 1.0:
        raise InputError(f"aux_p must be in [0, 1), got {aux_p!r}")
    return int(aux_channels)


def _late_weights_config(late_weights: str | Sequence[float]) -> str | list[float]:
    if isinstance(late_weights, str):
        return late_weights
    try:
        return [float(w) for w in late_weights]
    except (TypeError, ValueError) as err:
        raise InputError(
            f"late_weights must be one of {list(LATE_WEIGHTS)} or numbers, got {late_weights!r}"
        ) from err


def create_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    encoder: str = "resnet18",
    channel: int | None = None,
    dropout: float = 0.4,
    pretrained: str | Path | None = None,
    late_weights: str | Sequence[float] = "learned",
    hidden: int | None = None,
    aux_channels: int = 0,
    aux_p: float = 0.5,
    channel_names: Sequence[str] | None = None,
) -> CytofuseModel:
    """Build a fusion model for patches of ``in_channels`` channels.

    name: "early" | "intermediate" | "late" | "single" (``list_models()``).
    encoder: "smallcnn" | "resnet18" | "resnet34" | "resnet50" (``list_encoders()``).
    channel: the channel index "single" uses (required there, refused elsewhere).
    pretrained: local weight file applied to every encoder (``load_encoder_weights``);
        the reports are kept in ``model.pretrained_reports``.
    late_weights: "learned" (softmax of learnable logits), "equal", "validation" (equal until
        set from validation with ``model.set_branch_weights``), or one weight per channel.
    hidden: width of a hidden dense layer in each head (None: dropout + linear).
    aux_channels: training-only auxiliary channels ("intermediate" only): one extra encoder
        each, fed as the last channels during training, dropped per sample with probability
        ``aux_p`` and absent at test time (the model's input then has ``in_channels``).
    channel_names: names of the input channels, stored in ``model.config`` for the record.
    """
    _check_args(name, encoder, in_channels, num_classes, channel, dropout, hidden)
    in_channels, num_classes = int(in_channels), int(num_classes)
    channel = None if channel is None else int(channel)
    dropout, hidden = float(dropout), None if hidden is None else int(hidden)
    kwargs: dict = {"dropout": dropout, "hidden": hidden}
    if name == "single":
        kwargs["channel"] = channel
    if name == "late":
        kwargs["weights"] = _late_weights_config(late_weights)
    aux_channels = _aux_args(name, aux_channels, aux_p)
    if aux_channels:
        kwargs |= {"aux_channels": aux_channels, "aux_p": float(aux_p)}
    if channel_names is not None and len(channel_names) != in_channels:
        raise InputError(f"channel_names must name the {in_channels} input channels, got {list(channel_names)}")
    model = MODELS[name](
        lambda c: create_encoder(encoder, in_channels=c),
        encoder_name=encoder, in_channels=in_channels, num_classes=num_classes, **kwargs,
    )
    model.config = {
        "name": name, "in_channels": in_channels, "num_classes": num_classes, "encoder": encoder,
        "channel": channel, "dropout": dropout, "hidden": hidden,
        "late_weights": _late_weights_config(late_weights),
    }
    if aux_channels:
        model.config |= {"aux_channels": aux_channels, "aux_p": float(aux_p)}
    if channel_names is not None:
        model.config["channel_names"] = [str(c) for c in channel_names]
    model.pretrained_reports = {} if pretrained is None else apply_pretrained(model, pretrained)
    return model


def apply_pretrained(model: CytofuseModel, path: str | Path) -> dict[str, LoadReport]:
    """Load ``path`` into every encoder of ``model``; warn once when encoder tensors are missing."""
    reports = {key: load_encoder_weights(enc, path) for key, enc in _encoders(model).items()}
    missing = sorted({k for report in reports.values() for k in report.missing})
    if missing:
        warnings.warn(
            f"{path}: {len(missing)} encoder tensors are not in the file and keep their "
            f"random values: {missing[:5]}",
            stacklevel=3,
        )
    return reports


def _encoders(model: CytofuseModel) -> dict[str, nn.Module]:
    if hasattr(model, "encoders"):
        found = {f"ch{i}": enc for i, enc in enumerate(model.encoders)}
        return found | {f"aux{j}": enc for j, enc in enumerate(getattr(model, "aux_encoders", []))}
    return {next(iter(model.gradcam_layers())): model.encoder}


def load_model(path: str | Path) -> CytofuseModel:
    """Rebuild a model from a ``save_weights`` file (its stored config) in eval mode."""
    config = read_model_config(path)
    if not config:
        raise InputError(f"{path} has no stored model config; use create_model + load_weights")
    model = create_model(**config)
    load_weights(model, path)
    return model.eval()


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of parameters (only those with requires_grad when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
