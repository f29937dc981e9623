"""The run configuration: one YAML file, validated; unknown keys are errors.

Each stage owns its settings (``PatchSettings`` in patches, ``TrainSettings`` in train);
this module composes them with the data, model and cross-validation sections, reads and
writes YAML, and applies ``section.field=value`` overrides from the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .patches import PatchSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Strict):
    """Where the images are and how they are labelled."""

    images: Path | None = Field(None, description="Folder with one sub-folder per class.")
    manifest: Path | None = Field(None, description="CSV manifest: path (or path_<channel>), label, optional group.")
    axes: str | None = Field(None, description="Axis order of .npy files, e.g. 'YXC'.")
    label_column: str = Field("label", description="Manifest column with the class label.")
    group_column: str = Field("group", description="Manifest column with the CV group (default: the image).")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSettings":
        if (self.images is None) == (self.manifest is None):
            raise ValueError("give exactly one of data.images (folder per class) or data.manifest (CSV)")
        return self

    def resolve(self, base: Path) -> "DataSettings":
        """Paths relative to the config file's folder become absolute."""
        fix = lambda p: p if p is None or p.is_absolute() else (base / p).resolve()  # noqa: E731
        return self.model_copy(update={"images": fix(self.images), "manifest": fix(self.manifest)})


class ModelSettings(_Strict):
    """One classifier: fusion strategy and encoder."""

    fusion: Literal["early", "intermediate", "late", "single"] = Field("intermediate", description="Fusion strategy.")
    encoder: str = Field("smallcnn", description="Encoder: smallcnn, resnet18, resnet34 or resnet50.")
    channel: str | int | None = Field(None, description="The channel of a single-channel classifier (name or index).")
    dropout: float = Field(0.4, ge=0, lt=1, description="Dropout before the classification head.")
    hidden: int | None = Field(
        None, gt=0, description="Width of a hidden dense layer in each head (None: dropout + linear). With "
        "resnet50, hidden=256 gives ~24 M (early) and ~72 M (intermediate/late) parameters, the paper's scale.",
    )
    pretrained: Path | None = Field(None, description="Local weights file (torchvision ResNet .pth or safetensors).")
    late_weights: Literal["learned", "equal", "validation"] = Field(
        "learned", description="How late fusion combines branch probabilities."
    )
    name: str | None = Field(None, description="Display name; default: fusion and channel.")

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        return f"single:{self.channel}" if self.fusion == "single" else self.fusion


class CVSettings(_Strict):
    """Image-grouped stratified cross-validation."""

    n_folds: int | Literal["loo"] = Field(5, description="Number of folds, or 'loo' for leave-one-group-out.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each training fold's groups used for early stopping.")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="Share of groups held out as a final test set (0: none).")
    aggregate: Literal["mean", "vote"] = Field("mean", description="Image-level aggregation of patch probabilities.")
    seed: int = Field(0, description="Seed of the fold assignment.")
    baseline: bool = Field(
        True, description="Also cross-validate the handcrafted-feature baseline (gradient boosting) on the same folds."
    )
    probes: bool = Field(
        True, description="Also cross-validate shortcut probes (background pixels, whole-patch intensity, "
        "image acquisition facts) on the same folds, and warn when one rivals the models.",
    )
    probe_margin: float = Field(
        0.05, ge=0, le=1, description="Warn when a probe's image-level balanced accuracy is within this of the best model's."
    )
    probe_far: float = Field(
        0.15, ge=0, le=1, description="Warn when a probe's image-level balanced accuracy exceeds chance by more than this."
    )


class SweepSettings(_Strict):
    """One CV per value of one setting, summarised in one table."""

    parameter: Literal["patches.size", "model.fusion", "patches.channels"] = Field(..., description="The swept setting.")
    values: list[Any] = Field(..., min_length=1, description="Values of the swept setting.")


def _train_settings():
    from .train import TrainSettings

    return TrainSettings


class RunConfig(_Strict):
    """Everything a run needs; saved resolved in the run folder."""

    data: DataSettings = Field(..., description="Where the images are and how they are labelled.")
    patches: PatchSettings = Field(default_factory=PatchSettings, description="Patch extraction and filtering.")
    models: list[ModelSettings] = Field(
        default_factory=lambda: [ModelSettings()], min_length=1, description="Classifiers compared in the run."
    )
    train: dict = Field(default_factory=dict, description="Training settings (see TrainSettings).")
    cv: CVSettings = Field(default_factory=CVSettings, description="Cross-validation.")
    sweep: SweepSettings | None = Field(None, description="Optional sweep over one setting.")
    workers: int = Field(1, ge=1, description="Worker processes for patch extraction.")

    @model_validator(mode="after")
    def _check_train(self) -> "RunConfig":
        if not self.train:  # defaults: nothing to check, and the patch stage need not import torch
            return self
        try:
            self.train = _train_settings().model_validate(self.train).model_dump(mode="json")
        except ValidationError as exc:  # keep the section in each error's location: train.lr, not lr
            details = [{k: e[k] for k in ("type", "input", "ctx") if k in e} | {"loc": ("train", *e["loc"])} for e in exc.errors()]
            raise ValidationError.from_exception_data(type(self).__name__, details) from None
        return self

    @property
    def train_settings(self):
        return _train_settings().model_validate(self.train)

    def resolved(self) -> "RunConfig":
        """This config with every training default written out (for the run folder)."""
        return self.model_copy(update={"train": self.train_settings.model_dump(mode="json")})


def load_config(path: str | Path, *, overrides: list[str] = ()) -> RunConfig:
    """Read and validate a YAML config; ``overrides`` are ``section.field=value`` strings (YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    config = validate_config(raw, source=str(path))
    return config.model_copy(update={"data": config.data.resolve(path.parent.resolve())})


def validate_config(raw: dict, *, source: str = "<config>") -> RunConfig:
    """Validate a config mapping; errors name the file, the key and the value."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{where}: {reason}{shown}")
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines)) from None


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override must look like section.field=value, got {item!r}")
    key, value = item.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def dump_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
    return path
