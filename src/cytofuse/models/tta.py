"""Test-time augmentation: class probabilities averaged over the 8 dihedral transforms of a patch.

Microscopy patches have no preferred orientation, so a model trained with random flips and
quarter turns is asked the same question eight times and the answers are averaged. The
transforms are flips and transposes of the last two axes: exact, no interpolation, and
exportable to ONNX and TorchScript.
"""

from __future__ import annotations

import torch
from torch import nn

DIHEDRAL_CODES = tuple(range(8))  # see dihedral


def dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """Transform ``code`` (0..7) of a (..., H, W) tensor: bit 0 flips left-right, bit 1 up-down, bit 2
    transposes; the 8 codes are the 8 symmetries of the square (exact: no interpolation)."""
    if code & 1:
        x = x.flip(-1)
    if code & 2:
        x = x.flip(-2)
    if code & 4:
        x = x.transpose(-2, -1)
    return x


def tta_proba(model: nn.Module, x: torch.Tensor, *, tta: bool = True) -> torch.Tensor:
    """Softmax probabilities (B, K) of ``model`` on ``x`` (B, C, H, W): the mean over the 8 dihedral
    transforms with ``tta`` (square patches only), else one pass."""
    if not tta or x.shape[-1] != x.shape[-2]:
        return torch.softmax(model(x).float(), dim=1)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    total = None
    for code in DIHEDRAL_CODES:
        p = torch.softmax(model(dihedral(x, code).contiguous(memory_format=fmt)).float(), dim=1)
        total = p if total is None else total + p
    return total / len(DIHEDRAL_CODES)


class DihedralTTA(nn.Module):
    """Wraps a classifier: ``forward`` returns class probabilities averaged over the 8 dihedral transforms."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.softmax(self.model(x), dim=1)
        for code in DIHEDRAL_CODES[1:]:
            total = total + torch.softmax(self.model(dihedral(x, code)), dim=1)
        return total / float(len(DIHEDRAL_CODES))
