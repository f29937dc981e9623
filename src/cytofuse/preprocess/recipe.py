"""The patch recipe: how a model's patches are cut and normalised, as one typed object.

A ``PatchRecipe`` holds the ``PatchSettings`` a model was trained with (geometry, Otsu filter,
percentiles, normalisation scope), the model's input channels in order, and for dataset or
fixed scope the ``Normalisation`` measured on the training split. Training builds it once per
model, the model card (``model.yaml``) stores it, and prediction, export and explanations read
it, so a model sees new images exactly as it saw its training patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cytofuse.errors import InputError
from cytofuse.preprocess.patches import PatchSettings


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
