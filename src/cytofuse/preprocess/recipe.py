"""The patch recipe: how a model's patches are cut and normalised, as one typed object.

A ``PatchRecipe`` holds the ``PatchSettings`` a model was trained with (geometry, Otsu filter,
percentiles, normalisation scope), the model's input channels in order, and for dataset or
fixed scope the ``Normalisation`` measured on the training split. Training builds it once per
model and writes it beside the model's weights (``fold_<k>/recipe.json``); the model card
(``model.yaml``) stores it (a fold ensemble's: :meth:`PatchRecipe.ensemble`), and prediction,
export and explanations read it, so a model sees new images exactly as it saw its training patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cytofuse.errors import InputError
from cytofuse.preprocess.patches import PatchSettings
from cytofuse.runs import write_text_atomic


class Normalisation(BaseModel):
    """How raw intensities become model inputs: ``(raw - low) / max(high - low, eps)`` per channel.

    scope 'image': each image's own percentiles (``low``/``high`` unset: the patch cache holds
    them already); 'dataset': percentiles of the training images' patch pixels; 'fixed': given.
    """

    model_config = ConfigDict(extra="forbid")

    scope: Literal["image", "dataset", "fixed"] = Field("image", description="Where low and high come from.")
    percentiles: tuple[float, float] = Field((1.0, 99.8), description="Percentiles mapped to 0 and 1.")
    channels: list[str] = Field(default_factory=list, description="Channel of each low / high entry.")
    low: list[float] | None = Field(None, description="Per channel (dataset and fixed scopes).")
    high: list[float] | None = Field(None, description="Per channel (dataset and fixed scopes).")
    measured_on: str = Field("", description="What the dataset percentiles were computed from.")

    @model_validator(mode="after")
    def _check(self) -> "Normalisation":
        if self.scope != "image":
            n = len(self.channels)
            if not n or len(self.low or []) != n or len(self.high or []) != n:
                raise ValueError(f"normalisation with scope {self.scope!r} needs channels, low and high of equal "
                                 f"length, got channels {self.channels}, low {self.low}, high {self.high}")
        return self

    def select(self, channels: Sequence[str]) -> "Normalisation":
        """This normalisation for ``channels`` only, in that order; an InputError names channels it does not list."""
        if self.scope == "image":
            return self.model_copy(update={"channels": list(channels)})
        where = {c: i for i, c in enumerate(self.channels)}
        missing = [c for c in channels if c not in where]
        if missing:
            raise InputError(f"normalisation lists channels {self.channels}, not {missing}")
        return self.model_copy(update={"channels": list(channels), "low": [self.low[where[c]] for c in channels],
                                       "high": [self.high[where[c]] for c in channels]})


def mean_normalisation(norms: Sequence[Normalisation | None]) -> Normalisation | None:
    """The normalisation of an ensemble of models: the mean of their ranges (for dataset scope, each
    measured on its own training split); None when they normalise per image.

    The models must agree on scope, percentiles and channels (folds of one run do).
    """
    if not norms or norms[0] is None or norms[0].scope == "image":
        if any(n is not None and n.scope != "image" for n in norms):
            raise InputError("mean_normalisation: some models normalise per image, others do not")
        return None
    first = norms[0]
    for n in norms[1:]:
        if n is None or (n.scope, tuple(n.percentiles), n.channels) != (first.scope, tuple(first.percentiles), first.channels):
            found = None if n is None else (n.scope, list(n.percentiles), n.channels)
            raise InputError(f"mean_normalisation: the models' normalisations differ: {found} vs "
                             f"{(first.scope, list(first.percentiles), first.channels)}")
    update = {"low": np.mean([n.low for n in norms], axis=0).tolist(), "high": np.mean([n.high for n in norms], axis=0).tolist()}
    if first.scope == "dataset":
        update["measured_on"] = f"mean over {len(norms)} folds of each fold's training-split percentiles"
    return first.model_copy(update=update)


class PatchRecipe(BaseModel):
    """Patch settings, the model's input channels in order, and (dataset / fixed scope) the normalisation."""

    model_config = ConfigDict(extra="forbid")

    settings: PatchSettings = Field(default_factory=PatchSettings, description="The PatchSettings of training.")
    channels: list[str] = Field(..., min_length=1, description="The model's input channels, in order, by name.")
    normalisation: Normalisation | None = Field(
        None, description="Dataset or fixed normalisation (low and high per channel); None: each image's own "
        "percentiles (settings.percentiles).",
    )

    @model_validator(mode="after")
    def _check(self) -> "PatchRecipe":
        norm = self.normalisation
        if norm is None:
            return self
        if tuple(norm.percentiles) != tuple(self.settings.percentiles):
            raise ValueError(f"normalisation percentiles {list(norm.percentiles)} disagree with the patch settings' "
                             f"{list(self.settings.percentiles)}")
        missing = [c for c in self.channels if c not in norm.channels]
        if norm.scope != "image" and missing:
            raise ValueError(f"normalisation lists channels {norm.channels}, not the model's {missing}")
        return self

    @classmethod
    def build(cls, settings: PatchSettings, channels: Sequence[str], normalisation: Normalisation | None = None,
              ) -> "PatchRecipe":
        """The recipe of a model trained with ``settings`` on ``channels`` and ``normalisation``.

        A per-image normalisation is stored as None (the settings' percentiles say it all); a fixed
        one takes the settings' percentiles (they do not enter a fixed range).
        """
        if normalisation is not None and normalisation.scope == "image":
            normalisation = None
        if normalisation is not None and normalisation.scope == "fixed":
            normalisation = normalisation.model_copy(update={"percentiles": tuple(settings.percentiles)})
        return cls(settings=settings, channels=list(channels), normalisation=normalisation)

    @classmethod
    def ensemble(cls, recipes: Sequence["PatchRecipe"]) -> "PatchRecipe":
        """The recipe of an ensemble of models (the folds of a CV run): the settings and input channels
        they share, with the mean of their normalisation ranges (:func:`mean_normalisation`)."""
        if not recipes:
            raise InputError("PatchRecipe.ensemble: no recipe given")
        first = recipes[0]
        for r in recipes[1:]:
            if r.channels != first.channels:
                raise InputError(f"the ensemble's models take different channels: {r.channels} vs {first.channels}")
            if r.settings != first.settings:
                raise InputError("the ensemble's models were trained with different patch settings: "
                                 f"{r.settings.model_dump(mode='json')} vs {first.settings.model_dump(mode='json')}")
        return first.model_copy(update={"normalisation": mean_normalisation([r.normalisation for r in recipes])})

    def write(self, path: str | Path) -> Path:
        """Write this recipe as JSON to ``path``, atomically."""
        return write_text_atomic(path, self.model_dump_json(indent=1))

    @classmethod
    def read(cls, path: str | Path) -> "PatchRecipe":
        """The recipe :meth:`write` wrote to ``path``; an InputError names a missing or invalid file."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"patch recipe {path} does not exist")
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise InputError(f"invalid patch recipe {path}: {problems}") from None

    @property
    def scope(self) -> str:
        """'image', 'dataset' or 'fixed'."""
        return "image" if self.normalisation is None else self.normalisation.scope

    def bounds(self, channels: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(low, high) per channel of ``channels`` (default: the model's) for dataset / fixed scope, None
        for per-image percentiles; an InputError names channels the normalisation does not list."""
        norm = self.normalisation
        if norm is None or norm.scope == "image":
            return None
        channels = self.channels if channels is None else list(channels)
        where = {c: i for i, c in enumerate(norm.channels)}
        missing = [c for c in channels if c not in where]
        if missing:
            raise InputError(f"patch recipe: normalisation lists channels {norm.channels}, not {missing}")
        idx = [where[c] for c in channels]
        return np.asarray(norm.low, np.float64)[idx], np.asarray(norm.high, np.float64)[idx]

    def prediction_settings(self) -> PatchSettings:
        """The training PatchSettings for prediction: the model's channels (selected by the caller), every
        patch (no per-image cap)."""
        return self.settings.model_copy(update={"channels": None, "exclude_channels": [], "max_per_image": None})

    def with_empty_filter(self, folder: str | Path | None) -> "PatchRecipe":
        """This recipe with the learned empty-patch filter at ``folder``."""
        settings = self.settings.model_copy(update={"empty_filter": None if folder is None else Path(folder)})
        return self.model_copy(update={"settings": settings})

    def normalisation_summary(self) -> dict:
        """The normalisation as exported files describe it: method, percentiles and, for dataset / fixed
        scope, scope, channels, low, high and measured_on."""
        out = {"method": "percentile", "percentiles": list(self.settings.percentiles)}
        norm = self.normalisation
        if norm is not None and norm.scope != "image":
            out |= {"scope": norm.scope, "channels": list(norm.channels), "low": list(norm.low),
                    "high": list(norm.high), "measured_on": norm.measured_on}
        return out

    @classmethod
    def from_card_v1(cls, patches: dict, normalisation: dict, channels: Sequence[str]) -> "PatchRecipe":
        """The recipe of a format_version 1 model card: its ``patches`` and ``normalisation`` dicts."""
        norm = dict(normalisation)
        if norm.get("method") != "percentile" or len(norm.get("percentiles") or ()) != 2:
            raise ValueError(f"normalisation must be {{method: percentile, percentiles: [low, high]}}, got {norm}")
        scope = norm.get("scope", "image")
        if scope not in ("image", "dataset", "fixed"):
            raise ValueError(f"normalisation.scope must be image, dataset or fixed, got {scope!r}")
        settings = PatchSettings.model_validate(dict(patches) | {"percentiles": tuple(norm["percentiles"])})
        stats = None
        if scope != "image":
            stats = Normalisation(scope=scope, percentiles=tuple(norm["percentiles"]), channels=norm.get("channels") or [],
                                  low=norm.get("low"), high=norm.get("high"), measured_on=norm.get("measured_on", ""))
        return cls(settings=settings, channels=list(channels), normalisation=stats)
