"""The run configuration: one YAML file, validated; unknown keys are errors.

Each stage owns its settings (``PatchSettings`` in patches, ``TrainSettings`` in train);
this module composes them with the data, model and cross-validation sections, reads and
writes YAML, and applies ``section.field=value`` overrides from the command line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from cytofuse.errors import ConfigError
from cytofuse.preprocess.patches import PatchSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Strict):
    """Where the images are and how they are labelled."""

    images: Path | None = Field(None, description="Folder with one sub-folder per class.")
    manifest: Path | None = Field(None, description="CSV manifest: path (or path_<channel>), label, optional group.")
    axes: str | None = Field(None, description="Axis order of .npy files, e.g. 'YXC'.")
    label_column: str = Field("label", description="Manifest column with the class label.")
    group_column: str = Field("group", description="Manifest column with the CV group (default: the image).")
    group_pattern: str | None = Field(
        None, description="Regular expression on the file name whose first group (or whole match) is the CV group, "
        "e.g. '^(.*)_(?:live|dead)_' to group crops by their source field. Overrides the group column.",
    )

    @field_validator("group_pattern")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "DataSettings":
        if (self.images is None) == (self.manifest is None):
            raise ValueError("give exactly one of data.images (folder per class) or data.manifest (CSV)")
        return self

    def resolve(self, base: Path) -> "DataSettings":
        """Paths relative to the config file's folder become absolute."""
        fix = lambda p: p if p is None or p.is_absolute() else (base / p).resolve()  # noqa: E731
        return self.model_copy(update={"images": fix(self.images), "manifest": fix(self.manifest)})


BUILTIN_FUSIONS = ("early", "intermediate", "late", "single")
BUILTIN_ENCODERS = ("resnet18", "resnet34", "resnet50", "smallcnn")


def _registered(what: str, value: str, module: str, lister: str, builtin: tuple[str, ...]) -> str:
    """``value`` must be a name of the model registry: its own list once it is imported (names added with
    register_fusion / register_encoder need it imported), else the built-in names, so that validating a
    config for the patch stage does not import torch."""
    loaded = sys.modules.get(module)
    names = list(getattr(loaded, lister)()) if loaded is not None else list(builtin)
    if value not in names:
        raise ValueError(f"{what} must be one of {names}, got {value!r}")
    return value


class ModelSettings(_Strict):
    """One classifier: fusion strategy and encoder."""

    fusion: str = Field("intermediate", description="Fusion strategy: early, intermediate, late, single, or one "
                        "added with cytofuse.models.register_fusion.")
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
    channels: list[str | int] | None = Field(
        None, description="Input channels (names or indices) the model sees at training and test time; default: "
        "every patch channel that is not one of this model's auxiliary channels.",
    )
    auxiliary: list[str | int] = Field(
        default_factory=list, description="Training-only channels: used while training, absent at test time.",
    )
    auxiliary_mode: Literal["dropout", "samples", "distill", "reconstruct"] = Field(
        "dropout", description="'dropout': an extra encoder per auxiliary channel (fusion 'intermediate'), its "
        "features dropped at random in training and absent at test; 'samples': each auxiliary image is an extra "
        "training sample of the same label for a model with one input channel (Russo et al.); 'distill': a teacher "
        "of the same fusion sees inputs and auxiliary channels, and the model learns from the labels and from the "
        "teacher's softened probabilities (train.distill_weight, train.distill_temperature); 'reconstruct': the "
        "model's features also predict the auxiliary channels' coarse images through a training-only head "
        "(train.aux_weight, train.aux_grid), any fusion.",
    )
    auxiliary_p: float = Field(0.5, ge=0, lt=1, description="Modality dropout: probability of dropping the auxiliary features of a sample.")

    @field_validator("fusion")
    @classmethod
    def _known_fusion(cls, value: str) -> str:
        return _registered("fusion", value, "cytofuse.models.registry", "list_models", BUILTIN_FUSIONS)

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        return _registered("encoder", value, "cytofuse.models.encoders", "list_encoders", BUILTIN_ENCODERS)

    @model_validator(mode="after")
    def _check_auxiliary(self) -> "ModelSettings":
        if self.auxiliary and self.auxiliary_mode == "dropout" and self.fusion != "intermediate":
            raise ValueError(f"auxiliary_mode 'dropout' adds an encoder per auxiliary channel and needs fusion "
                             f"'intermediate', got {self.fusion!r} (or use auxiliary_mode 'samples')")
        if self.auxiliary and self.auxiliary_mode == "samples" and self.fusion not in ("early", "single"):
            raise ValueError(f"auxiliary_mode 'samples' feeds auxiliary images as extra one-channel samples and needs "
                             f"fusion 'early' or 'single' with one input channel, got {self.fusion!r}")
        overlap = set(map(str, self.channels or [])) & set(map(str, self.auxiliary))
        if overlap:
            raise ValueError(f"channels {sorted(overlap)} are both inputs and auxiliary")
        return self

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
    positive_class: str | None = Field(
        None, description="A rare or positive class: also report its F1 with the decision threshold chosen on "
        "each training fold's validation split only (one-vs-rest when there are more than two classes).",
    )
    baseline_channels: list[str | int] | None = Field(
        None, description="Channels of the handcrafted baseline and the probes; default: every patch channel that "
        "no model uses as a training-only auxiliary channel (the channels available at test time).",
    )
    probe_far: float = Field(
        0.15, ge=0, le=1, description="Warn when a probe's image-level balanced accuracy exceeds chance by more than this."
    )
    jobs: int = Field(
        1, ge=1, description="Fits (model x fold) run side by side in this many processes, each with an equal share of "
        "torch's threads. Small models gain most (two 1-thread processes train a 64 px smallcnn 1.5x faster than one "
        "2-thread process). Numbers are reproducible for a given jobs value, not across values (thread counts).")

    @field_validator("n_folds")
    @classmethod
    def _check_n_folds(cls, value: int | str) -> int | str:
        if value != "loo" and value < 2:
            raise ValueError(f"n_folds must be >= 2 or 'loo', got {value}")
        return value


class LabelSettings(_Strict):
    """Patch labels from a fluorescence channel through a two-component Gaussian mixture (Pattarone et al.).

    Each patch gets the mean (or integrated) raw intensity of ``channel``. A two-component
    mixture is fitted on the patches of the images whose folder/manifest label is in
    ``fit_on`` (all when unset); patches below ``mean_low + k_sd * sd_low`` get the low class,
    those above ``mean_high - k_sd * sd_high`` the high class, the band between is discarded.
    ``low_threshold``/``high_threshold`` replace the mixture's thresholds. The channel is then
    the label source only: no model, baseline or probe sees it.
    """

    channel: str | int = Field(..., description="The label channel (name or index), e.g. PI for live/dead.")
    statistic: Literal["mean", "integrated"] = Field("mean", description="Per-patch statistic of the label channel.")
    fit_on: list[str] | None = Field(None, description="Image labels (conditions) whose patches fit the mixture; default all.")
    classes: tuple[str, str] = Field(("low", "high"), description="Names of the low and the high class, e.g. [live, dead].")
    k_sd: float = Field(1.0, ge=0, description="Thresholds at mean_low + k_sd*sd_low and mean_high - k_sd*sd_high.")
    low_threshold: float | None = Field(None, description="Set the low-class threshold by hand.")
    high_threshold: float | None = Field(None, description="Set the high-class threshold by hand.")

    @model_validator(mode="after")
    def _check(self) -> "LabelSettings":
        if self.classes[0] == self.classes[1]:
            raise ValueError(f"labels.classes must be two different names, got {list(self.classes)}")
        if None not in (self.low_threshold, self.high_threshold) and self.low_threshold > self.high_threshold:
            raise ValueError(f"labels.low_threshold ({self.low_threshold}) must be <= labels.high_threshold ({self.high_threshold})")
        return self


class SweepSettings(_Strict):
    """One CV per value of one setting, summarised in one table."""

    parameter: Literal["patches.size", "model.fusion", "patches.channels"] = Field(..., description="The swept setting.")
    values: list[Any] = Field(..., min_length=1, description="Values of the swept setting.")


def _train_settings():
    from cytofuse.training.fit import TrainSettings

    return TrainSettings


# Settings a search may change, by section; the rest (hardware, seeds, channels, names) are no hyperparameters.
_NOT_TUNABLE = {
    "train": {"accelerator", "devices", "strategy", "num_nodes", "precision", "deterministic", "progress",
              "num_workers", "seed", "augment"},
    "models": {"name", "channel", "channels", "auxiliary", "pretrained"},
}


# Patch settings that change how a fold sees the cached patches, not the cache itself: searchable without
# cutting the images again.
VIEW_PATCH_SETTINGS = ("patches.normalise",)


def tunable_parameters() -> list[str]:
    """Every setting path a ``tune.space`` may name: ``train.<field>``, ``train.augment.<field>``, ``models.<field>``
    and the patch settings of :data:`VIEW_PATCH_SETTINGS`."""
    from cytofuse.training.cache import Augment

    names = [f"train.{f}" for f in _train_settings().model_fields if f not in _NOT_TUNABLE["train"]]
    names += [f"train.augment.{f}" for f in Augment.model_fields]
    names += [f"models.{f}" for f in ModelSettings.model_fields if f not in _NOT_TUNABLE["models"]]
    return names + list(VIEW_PATCH_SETTINGS)


class TuneRange(_Strict):
    """One searched setting: a numeric range ``{low, high, log, step}`` or a list ``{choices: [...]}``.

    A range whose bounds are both integers is searched over integers."""

    low: int | float | None = Field(None, description="Lowest value of a range.")
    high: int | float | None = Field(None, description="Highest value of a range.")
    log: bool = Field(False, description="Draw the range on a log scale (low must be > 0).")
    step: int | float | None = Field(None, gt=0, description="Spacing of the values of a range (not with log).")
    choices: list[str | int | float | bool | None] | None = Field(None, description="The values of a categorical setting.")

    @model_validator(mode="after")
    def _check(self) -> "TuneRange":
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.step is not None:
                raise ValueError(f"give either choices {self.choices} or a range (low, high, log, step), not both")
            if not self.choices:
                raise ValueError("choices is empty: list at least one value")
            if len({repr(c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices {self.choices} repeat a value")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a range needs both low and high (got low={self.low}, high={self.high}), or give choices")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        return self

    @property
    def integer(self) -> bool:
        return self.choices is None and isinstance(self.low, int) and isinstance(self.high, int) and (
            self.step is None or isinstance(self.step, int))

    def candidates(self) -> list:
        """The values that bound the search: both ends of a range, every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class TuneSettings(_Strict):
    """Nested hyperparameter search (``cytofuse tune``): Optuna's TPE sampler and Hyperband pruner, each trial
    scored on a grouped validation split inside an outer training fold, never on an outer test fold."""

    space: dict[str, TuneRange] = Field(..., description="Setting path -> range or choices, e.g. "
                                        "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}.")
    trials: int = Field(20, ge=1, description="Trials (complete or pruned) per study: one study per outer fold, "
                        "plus one on all data when final is 'all'.")
    timeout_min: float | None = Field(None, gt=0, description="Wall-clock budget of the whole search in minutes, "
                                      "shared equally by its studies; None: no limit.")
    val_fraction: float = Field(0.25, gt=0, lt=1, description="Share of an outer training part's groups that score "
                                "the trials (grouped and stratified as the outer folds).")
    seed: int = Field(0, description="Seed of the TPE sampler and of the inner splits.")
    reduction_factor: int = Field(3, ge=2, description="Hyperband's reduction factor (epochs are its resource).")
    trial_epochs: int | None = Field(
        None, ge=1, description="Training budget of one trial in epochs, and Hyperband's largest resource; None: the "
        "fit's own budget (train.max_epochs or train.max_steps). A shorter budget makes trials cheaper but coarser "
        "estimates: a trial's schedule (warm-up, decay) runs over its budget, and the outer refits train the full one.")
    final: Literal["all", "folds"] = Field(
        "all", description="Parameters of best_config.yaml: 'all' runs one more inner search on every CV group; "
        "'folds' takes each parameter's median (numbers) or most frequent value (choices) over the outer folds' bests.")
    defaults: bool = Field(True, description="Also score the untuned config on the same outer folds.")

    @model_validator(mode="after")
    def _one_budget(self) -> "TuneSettings":
        if self.trial_epochs is not None and "train.max_epochs" in self.space:
            raise ValueError(f"trial_epochs ({self.trial_epochs}) and a searched train.max_epochs both set a trial's "
                             "budget: remove one")
        return self

    @field_validator("space")
    @classmethod
    def _known_names(cls, value: dict) -> dict:
        if not value:
            raise ValueError("empty: name at least one setting to search, e.g. "
                             "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}")
        known = tunable_parameters()
        for name, spec in value.items():
            if name.startswith("patches.") and name not in VIEW_PATCH_SETTINGS:
                raise ValueError(f"{name!r} changes the patch cache and cannot be searched; compare patch settings "
                                 f"with a sweep (sweep.parameter); searchable patch settings: "
                                 f"{', '.join(VIEW_PATCH_SETTINGS)}")
            if name == "patches.normalise":
                allowed = list(get_args(PatchSettings.model_fields["normalise"].annotation))
                if spec.choices is None or not set(spec.choices) <= set(allowed):
                    raise ValueError(f"patches.normalise is searched over choices among {allowed}, got "
                                     f"{spec.choices if spec.choices is not None else 'a numeric range'}")
            if name not in known:
                import difflib

                near = difflib.get_close_matches(name, known, n=3)
                hint = f"did you mean {' or '.join(near)}? " if near else ""
                raise ValueError(f"unknown parameter {name!r}; {hint}searchable settings: {', '.join(known)}")
        return value


def _set_path(raw: dict, name: str, value) -> None:
    """Set setting ``name`` (``train.lr``, ``train.augment.gain``, ``models.dropout``) in a config mapping;
    ``models.*`` sets the field of every model entry."""
    section, *rest = name.split(".")
    if section == "models":
        for entry in raw["models"]:
            entry[rest[0]] = value
        return
    node = raw.setdefault(section, {})
    for part in rest[:-1]:
        node = node.setdefault(part, {})
    node[rest[-1]] = value


def with_parameters(config: "RunConfig", params: dict) -> "RunConfig":
    """``config`` with each searched setting of ``params`` (path -> value) set, validated, without its tune section."""
    raw = config.model_dump(mode="json", exclude={"tune"})
    for name, value in params.items():
        _set_path(raw, name, value)
    return RunConfig.model_validate(raw)


class RunConfig(_Strict):
    """Everything a run needs; saved resolved in the run folder."""

    data: DataSettings = Field(..., description="Where the images are and how they are labelled.")
    patches: PatchSettings = Field(default_factory=PatchSettings, description="Patch extraction and filtering.")
    models: list[ModelSettings] = Field(
        default_factory=lambda: [ModelSettings()], min_length=1, description="Classifiers compared in the run."
    )
    train: dict = Field(default_factory=dict, description="Training settings (see TrainSettings).")
    labels: LabelSettings | None = Field(None, description="Optional: patch labels from a fluorescence channel.")
    cv: CVSettings = Field(default_factory=CVSettings, description="Cross-validation.")
    sweep: SweepSettings | None = Field(None, description="Optional sweep over one setting.")
    tune: TuneSettings | None = Field(None, description="Optional: the search space of `cytofuse tune`.")
    workers: int = Field(1, ge=1, description="Worker processes for patch extraction.")
    scheduler: str | None = Field(
        None, description="Run the patch stage as one Dask task per image: 'local:N' (N worker processes here) or "
        "a running scheduler's address, e.g. tcp://host:8786 (workers must see the images and the run folder); "
        "default none: `workers` processes on this machine. The tables are the same either way.",
    )

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, value: str | None) -> str | None:
        from cytofuse.io.distributed import check_scheduler

        return check_scheduler(value, what="scheduler")

    @model_serializer(mode="wrap")
    def _without_unset_scheduler(self, handler) -> dict:
        """No scheduler, no key: configs and their fingerprints stay as they were without one."""
        data = handler(self)
        if isinstance(data, dict) and data.get("scheduler", 0) is None:
            del data["scheduler"]
        return data

    @model_validator(mode="after")
    def _label_channel_is_no_input(self) -> "RunConfig":
        """The label channel is dropped from the patch channels: it is the label source only."""
        if self.labels is None:
            return self
        ch = self.labels.channel
        if self.patches.channels is not None:
            if ch in self.patches.channels:
                raise ValueError(f"labels.channel {ch!r} is the label source and cannot be one of patches.channels "
                                 f"{self.patches.channels}")
        elif ch not in self.patches.exclude_channels:
            self.patches = self.patches.model_copy(update={"exclude_channels": [*self.patches.exclude_channels, ch]})
        used = [c for m in self.models for c in [*(m.channels or []), *m.auxiliary, m.channel] if c is not None]
        if ch in used:
            raise ValueError(f"labels.channel {ch!r} is the label source and cannot be a model's input or auxiliary channel")
        return self

    @model_validator(mode="after")
    def _distinct_model_names(self) -> "RunConfig":
        """Each model's results live under its display name: two models with one name would overwrite each other."""
        first: dict[str, int] = {}
        for i, m in enumerate(self.models):
            j = first.setdefault(m.display_name, i)
            if j != i:
                raise ValueError(
                    f"models[{j}] and models[{i}] have the same name {m.display_name!r} "
                    f"({_entry(self.models[j])} and {_entry(m)}); give one of them its own name: field"
                )
        return self

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

    @model_validator(mode="after")
    def _jobs_need_single_device_fits(self) -> "RunConfig":
        """cv.jobs runs whole fits side by side; a fit that is itself several processes (DDP) cannot be one."""
        if self.cv.jobs == 1:
            return self
        train = self.train or {}
        spread = {k: train.get(k) for k in ("strategy", "devices", "num_nodes")
                  if train.get(k) not in (None, "auto", 1)}
        if spread:
            raise ValueError(f"cv.jobs {self.cv.jobs} runs fits side by side in processes of their own and cannot be "
                             f"combined with distributed fits ({', '.join(f'train.{k}: {v}' for k, v in spread.items())}); "
                             "set cv.jobs to 1 or train on one device")
        return self

    @model_validator(mode="after")
    def _check_tune(self) -> "RunConfig":
        """Both ends of every searched range, and every choice, must make a valid config."""
        if self.tune is None:
            return self
        if self.sweep is not None:
            raise ValueError("tune and sweep cannot be combined: tune searches settings of one CV, a sweep runs several")
        if len(self.models) != 1:
            names = [m.display_name for m in self.models]
            raise ValueError(f"tune searches the settings of one model; the config has {len(names)} {names}: keep one")
        for name, spec in self.tune.space.items():
            for value in spec.candidates():
                try:
                    with_parameters(self, {name: value})
                except ValidationError as exc:
                    reason = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in exc.errors())
                    raise ValueError(f"tune.space.{name}: value {value!r} is not a valid {name} ({reason})") from None
        return self

    @property
    def train_settings(self):
        return _train_settings().model_validate(self.train)

    def resolved(self) -> "RunConfig":
        """This config with every training default written out (for the run folder)."""
        return self.model_copy(update={"train": self.train_settings.model_dump(mode="json")})


def _entry(model: "ModelSettings") -> dict:
    """A model entry as written in a config: the fields that differ from their defaults."""
    return model.model_dump(mode="json", exclude_defaults=True)


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
        apply_override(raw, item)
    config = validate_config(raw, source=str(path))
    base = path.parent.resolve()
    update = {"data": config.data.resolve(base)}
    flt = config.patches.empty_filter
    if flt is not None and not flt.is_absolute():
        update["patches"] = config.patches.model_copy(update={"empty_filter": (base / flt).resolve()})
    return config.model_copy(update=update)


def validate_config(raw: dict, *, source: str = "<config>") -> RunConfig:
    """Validate a config mapping; errors name the file, the key and the value."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"  # a check across sections has no key
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{where}: {reason}{shown}")
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines)) from None


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override must look like section.field=value, got {item!r}")
    key, value = item.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not plain YAML (numbers, strings, lists, mappings; "
                          f"no tags): {exc}") from None


def dump_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (renamed into place)."""
    from cytofuse.runs import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _pick(names: tuple[str, ...], wanted, what: str) -> list[int]:
    from cytofuse.io.readers import select_channels

    try:
        return select_channels(names, channels=list(wanted))
    except Exception as exc:  # noqa: BLE001 - re-raised with the setting named
        raise ConfigError(f"{what}: {exc}") from None


def model_channels(model: ModelSettings, channel_names: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """Indices into the patch channels of a model's inputs and of its training-only auxiliary channels."""
    name = model.display_name
    aux = _pick(channel_names, model.auxiliary, f"model {name}: auxiliary") if model.auxiliary else []
    if model.channels is not None:
        inputs = _pick(channel_names, model.channels, f"model {name}: channels")
    else:
        inputs = [i for i in range(len(channel_names)) if i not in aux]
    if not inputs:
        raise ConfigError(f"model {name}: no input channel left; patch channels {list(channel_names)}, auxiliary "
                          f"{model.auxiliary}")
    if model.auxiliary and model.auxiliary_mode == "samples" and len(inputs) != 1:
        raise ConfigError(f"model {name}: auxiliary_mode 'samples' needs exactly one input channel, got "
                          f"{[channel_names[i] for i in inputs]} (set models[].channels)")
    return inputs, aux


def baseline_channels(cfg: RunConfig, channel_names: tuple[str, ...]) -> list[int]:
    """The channels of the handcrafted baseline and the probes: those available at test time by default."""
    if cfg.cv.baseline_channels is not None:
        return _pick(channel_names, cfg.cv.baseline_channels, "cv.baseline_channels")
    aux = {i for m in cfg.models for i in model_channels(m, channel_names)[1]}
    return [i for i in range(len(channel_names)) if i not in aux]
