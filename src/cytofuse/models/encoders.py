"""Feature encoders: 2D CNNs that map (B, C, H, W) patches to pooled features (B, D).

Every encoder has ``out_features`` (D) and ``last_block()`` (the last convolutional
block, the layer Grad-CAM hooks), so fusion heads and explanations need no special cases.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck, get_inplanes
from torch import nn

from cytofuse.errors import InputError

_RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (ResNetBlock, [2, 2, 2, 2]),
    "resnet34": (ResNetBlock, [3, 4, 6, 3]),
    "resnet50": (ResNetBottleneck, [3, 4, 6, 3]),
}


class ResNetEncoder(ResNet):
    """MONAI 2D ResNet with the ImageNet stem (7x7 conv, stride 2) and no classifier.

    The downsample convolutions have no bias, so the state-dict keys are exactly
    torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) minus ``fc.*``.
    """

    def __init__(self, depth: str, *, in_channels: int) -> None:
        block, layers = _RESNET_LAYOUTS[depth]
        super().__init__(
            block,
            layers,
            get_inplanes(),
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
            bias_downsample=False,
        )
        self.out_features = 512 * block.expansion
        self.in_channels = in_channels

    def last_block(self) -> nn.Module:
        """The last residual stage (``layer4``)."""
        return self.layer4


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _stage(in_channels: int, out_channels: int, depth: int) -> nn.Sequential:
    """``depth`` conv-BN-ReLU blocks, the first changing the width."""
    return nn.Sequential(*(_conv_block(in_channels if i == 0 else out_channels, out_channels) for i in range(depth)))


class SmallCNN(nn.Module):
    """Four stages of ``depth`` conv3x3-BN-ReLU blocks (16 -> 128 channels), 2x max-pool between
    stages, global average pool (~0.29 M parameters for one input channel with depth 2).
    A 64 px patch gives an 8x8 map in the last stage; a 40 px tile a 5x5 map."""

    def __init__(self, *, in_channels: int, widths: tuple[int, ...] = (16, 32, 64, 128), depth: int = 2) -> None:
        super().__init__()
        chans = (in_channels, *widths)
        self.blocks = nn.ModuleList(_stage(a, b, depth) for a, b in zip(chans[:-1], chans[1:]))
        self.pool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.blocks) - 1:
                x = self.pool(x)
        return torch.flatten(self.avgpool(x), 1)

    def last_block(self) -> nn.Module:
        """The last stage."""
        return self.blocks[-1]


def _resnet_builder(depth: str) -> Callable[[int], nn.Module]:
    return lambda in_channels: ResNetEncoder(depth, in_channels=in_channels)


ENCODERS: dict[str, Callable[[int], nn.Module]] = {
    "smallcnn": lambda in_channels: SmallCNN(in_channels=in_channels),
    **{name: _resnet_builder(name) for name in _RESNET_LAYOUTS},
}


def register_encoder(name: str, builder: Callable[[int], nn.Module], *, replace: bool = False) -> None:
    """Make ``builder(in_channels)`` available as encoder ``name`` to ``create_encoder``, ``create_model``
    and configs (``models[].encoder``). The module it returns maps (B, C, H, W) to (B, D) features and
    has ``out_features`` (D) and ``last_block()`` (the conv block Grad-CAM explains)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"register_encoder: name must be an identifier such as 'tinycnn', got {name!r}")
    if name in ENCODERS and not replace:
        raise InputError(f"register_encoder: encoder {name!r} exists; pass replace=True to replace it")
    if not callable(builder):
        raise InputError(f"register_encoder: builder must be callable (in_channels -> module), got {builder!r}")
    ENCODERS[name] = builder


def list_encoders() -> list[str]:
    """Names accepted by ``create_encoder`` and ``create_model(encoder=...)``."""
    return sorted(ENCODERS)


def create_encoder(name: str, *, in_channels: int) -> nn.Module:
    """Build encoder ``name`` for ``in_channels`` input channels (random weights)."""
    if name not in ENCODERS:
        raise InputError(f"encoder must be one of {list_encoders()}, got {name!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise InputError(f"in_channels must be a positive int, got {in_channels!r}")
    return ENCODERS[name](in_channels)
