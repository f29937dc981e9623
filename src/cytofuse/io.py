"""Readers that turn microscopy files into one canonical layout, and writers.

Every reader returns an :class:`Image`: an array of shape (C, Z, Y, X) plus channel
names and the physical pixel size in micrometres (z, y, x) when the file has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Image:
    """A multichannel image stack in (C, Z, Y, X) order."""

    data: np.ndarray
    channel_names: tuple[str, ...]
    pixel_size_um: tuple[float | None, float | None, float | None] = (None, None, None)
    source: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data.ndim != 4:
            raise ValueError(f"Image data must be 4D (C, Z, Y, X), got shape {self.data.shape} from {self.source or '<array>'}")
        if len(self.channel_names) != self.data.shape[0]:
            raise ValueError(
                f"channel_names has {len(self.channel_names)} names but the data of {self.source or '<array>'} "
                f"has {self.data.shape[0]} channels: {self.channel_names}"
            )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def n_channels(self) -> int:
        return self.data.shape[0]
