"""Fusion strategies over per-channel encoders: early, intermediate, late and single-channel.

Every model takes the whole patch batch (B, C, H, W) and has
``forward(x) -> (B, K)`` logits whose softmax is the class probability,
``forward_features(x) -> (B, D)`` (the pre-logit embedding) and ``head`` with
``head(forward_features(x)) == forward(x)``. ``gradcam_layers()`` maps the channel an
encoder sees ("all" for early, "ch0", "ch1", ... otherwise) to its last conv block.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import torch
from torch import nn

from cytofuse.errors import InputError

EncoderFactory = Callable[[int], nn.Module]


def make_head(in_features: int, num_classes: int, *, dropout: float, hidden: int | None) -> nn.Sequential:
    """Dropout + linear classifier, or dropout-linear-ReLU-dropout-linear when ``hidden``."""
    if not hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def channel_slice(x: torch.Tensor, i: int) -> torch.Tensor:
    """Channel ``i`` of a batch as a dense (B, 1, H, W) tensor in the batch's memory format.

    A plain slice of a multi-channel batch is strided; convolutions on it take a slow path.
    """
    last = x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if last else torch.contiguous_format
    return x[:, i : i + 1].contiguous(memory_format=fmt)


class CytofuseModel(nn.Module, abc.ABC):
    """Abstract base: input checks and the shared attributes of every fusion model."""

    fusion: str = ""

    def __init__(self, *, encoder_name: str, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.encoder_name = encoder_name
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.config: dict = {}

    def _check(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            return
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"{self.fusion} model expects x of shape (B, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-logit embedding (B, D) of a batch (B, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K): softmax gives probabilities; train with nn.CrossEntropyLoss."""
        return self.head(self.forward_features(x))

    @abc.abstractmethod
    def gradcam_layers(self) -> dict[str, nn.Module]:
        """The last convolutional block of each encoder, keyed by the channel(s) it sees."""

    def gradcam_layer_names(self) -> dict[str, str]:
        """Dotted module names of ``gradcam_layers()`` (as ``monai.visualize.GradCAM`` takes them)."""
        names = {module: name for name, module in self.named_modules()}
        return {key: names[module] for key, module in self.gradcam_layers().items()}


class EarlyFusion(CytofuseModel):
    """All channels concatenated at the input of one encoder."""

    fusion = "early"

    def __init__(self, make_encoder: EncoderFactory, *, encoder_name: str, in_channels: int,
                 num_classes: int, dropout: float, hidden: int | None = None) -> None:
        super().__init__(encoder_name=encoder_name, in_channels=in_channels, num_classes=num_classes)
        self.encoder = make_encoder(in_channels)
        self.head = make_head(self.encoder.out_features, num_classes, dropout=dropout, hidden=hidden)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of the one encoder (B, D)."""
        self._check(x)
        return self.encoder(x)

    def gradcam_layers(self) -> dict[str, nn.Module]:
        return {"all": self.encoder.last_block()}


class SingleChannel(CytofuseModel):
    """Receives every channel of the patch and classifies from channel ``channel`` alone."""

    fusion = "single"

    def __init__(self, make_encoder: EncoderFactory, *, encoder_name: str, in_channels: int,
                 num_classes: int, channel: int, dropout: float, hidden: int | None = None) -> None:
        super().__init__(encoder_name=encoder_name, in_channels=in_channels, num_classes=num_classes)
        self.channel = channel
        self.encoder = make_encoder(1)
        self.head = make_head(self.encoder.out_features, num_classes, dropout=dropout, hidden=hidden)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of the selected channel (B, D)."""
        self._check(x)
        return self.encoder(channel_slice(x, self.channel))

    def gradcam_layers(self) -> dict[str, nn.Module]:
        return {f"ch{self.channel}": self.encoder.last_block()}


class _PerChannel(CytofuseModel):
    """One single-channel encoder per input channel."""

    def __init__(self, make_encoder: EncoderFactory, *, encoder_name: str, in_channels: int,
                 num_classes: int) -> None:
        super().__init__(encoder_name=encoder_name, in_channels=in_channels, num_classes=num_classes)
        self.encoders = nn.ModuleList(make_encoder(1) for _ in range(in_channels))

    def branch_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pooled features of each channel's encoder, a list of C tensors (B, D)."""
        self._check(x)
        return [enc(channel_slice(x, i)) for i, enc in enumerate(self.encoders)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel pooled features concatenated in channel order (B, C * D)."""
        return torch.cat(self.branch_features(x), dim=1)

    def gradcam_layers(self) -> dict[str, nn.Module]:
        return {f"ch{i}": enc.last_block() for i, enc in enumerate(self.encoders)}


class IntermediateFusion(_PerChannel):
    """Per-channel encoders; pooled features concatenated into one shared dense head.

    With ``aux_channels > 0`` the model also has one encoder per training-only auxiliary
    channel (modality dropout). Its input is then (B, C) at test time, or (B, C + A) in
    training, the auxiliary channels last. During training each sample's auxiliary features
    are kept with probability ``1 - aux_p`` and zeroed otherwise; when the auxiliary channels
    are absent (always at test time) their features are zero, so the head has learned to
    classify without them.
    """

    fusion = "intermediate"

    def __init__(self, make_encoder: EncoderFactory, *, encoder_name: str, in_channels: int,
                 num_classes: int, dropout: float, hidden: int | None = None,
                 aux_channels: int = 0, aux_p: float = 0.5) -> None:
        super().__init__(make_encoder, encoder_name=encoder_name, in_channels=in_channels,
                         num_classes=num_classes)
        self.aux_channels, self.aux_p = aux_channels, aux_p
        self.aux_encoders = nn.ModuleList(make_encoder(1) for _ in range(aux_channels))
        width = (in_channels + aux_channels) * self.encoders[0].out_features
        self.head = make_head(width, num_classes, dropout=dropout, hidden=hidden)

    def _check(self, x: torch.Tensor) -> None:
        if self.aux_channels and self.training and x.ndim == 4 and x.shape[1] == self.in_channels + self.aux_channels:
            return
        super()._check(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input-channel features, then auxiliary features (zero when absent or dropped)."""
        self._check(x)
        feats = [enc(channel_slice(x, i)) for i, enc in enumerate(self.encoders)]
        if not self.aux_channels:
            return torch.cat(feats, dim=1)
        width = self.encoders[0].out_features
        if x.shape[1] == self.in_channels:  # absent: test time, or training without the auxiliary view
            feats.append(x.new_zeros(x.shape[0], width * self.aux_channels))
            return torch.cat(feats, dim=1)
        keep = (torch.rand(x.shape[0], 1, device=x.device) >= self.aux_p).to(x.dtype)
        for j, enc in enumerate(self.aux_encoders):
            feats.append(enc(channel_slice(x, self.in_channels + j)) * keep)
        return torch.cat(feats, dim=1)


def _normalise_weights(weights: Sequence[float] | torch.Tensor, n: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float32).detach().flatten().cpu()
    if w.numel() != n or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise InputError(
            f"branch weights must be {n} finite non-negative numbers with a positive sum, "
            f"got {w.tolist()}"
        )
    return w / w.sum()


LATE_WEIGHTS = ("learned", "equal", "validation")


def branch_validation_weights(branch_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fusion weights from validation predictions: each branch's balanced accuracy above chance.

    branch_logits: (N, C, K) from ``forward_branches``; targets: (N,) class indices.
    Returns (C,) weights summing to 1 (equal when no branch beats chance).
    """
    n, c, k = branch_logits.shape
    pred = branch_logits.argmax(dim=2)
    present = [cls for cls in range(k) if (targets == cls).any()]
    recall = torch.stack([(pred[targets == cls] == cls).float().mean(dim=0) for cls in present])
    above = (recall.mean(dim=0) - 1.0 / k).clamp_min(0.0).detach().cpu()
    return above / above.sum() if above.sum() > 0 else torch.full((c,), 1.0 / c)


class LateFusionHead(nn.Module):
    """Per-branch classifiers on the split embedding; fused by a weighted mean of probabilities.

    weights: "learned" (softmax of learnable logits, start equal), "equal" (fixed),
    "validation" (fixed, equal until the trainer calls ``set_branch_weights``, e.g. with
    ``branch_validation_weights``), or one fixed weight per branch.

    Returns ``log(sum_i w_i softmax(z_i))``: log-probabilities, so softmax of the output is the
    fused probability and nn.CrossEntropyLoss on it is the NLL of the fused prediction.
    """

    def __init__(self, branch_features: int, num_branches: int, num_classes: int, *,
                 dropout: float, hidden: int | None, weights: str | Sequence[float]) -> None:
        super().__init__()
        self.branch_features = branch_features
        self.classifiers = nn.ModuleList(
            make_head(branch_features, num_classes, dropout=dropout, hidden=hidden)
            for _ in range(num_branches)
        )
        self.learned = isinstance(weights, str) and weights == "learned"
        if isinstance(weights, str) and weights not in LATE_WEIGHTS:
            raise InputError(
                f"late_weights must be one of {list(LATE_WEIGHTS)} or {num_branches} numbers, got {weights!r}"
            )
        init = torch.zeros(num_branches)
        if not isinstance(weights, str):
            init = _normalise_weights(weights, num_branches).clamp_min(1e-12).log()
        if self.learned:
            self.weight_logits = nn.Parameter(init)
        else:
            self.register_buffer("weight_logits", init)

    @property
    def branch_weights(self) -> torch.Tensor:
        """The fusion weights (sum to 1), one per branch."""
        return torch.softmax(self.weight_logits, dim=0)

    def set_branch_weights(self, weights: Sequence[float] | torch.Tensor) -> None:
        """Set the weights (e.g. from per-branch validation accuracy); normalised to sum 1."""
        w = _normalise_weights(weights, len(self.classifiers))
        with torch.no_grad():
            self.weight_logits.copy_(w.clamp_min(1e-12).log())

    def branch_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of each branch classifier, (B, C, K)."""
        chunks = features.split(self.branch_features, dim=1)
        return torch.stack([clf(f) for clf, f in zip(self.classifiers, chunks)], dim=1)

    def fuse(self, branch_logits: torch.Tensor) -> torch.Tensor:
        """Log of the weighted mean of branch probabilities, (B, K)."""
        log_w = torch.log_softmax(self.weight_logits, dim=0).view(1, -1, 1)
        return torch.logsumexp(torch.log_softmax(branch_logits, dim=2) + log_w, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.branch_logits(features))


class LateFusion(_PerChannel):
    """Per-channel encoder and classifier; class probabilities combined with branch weights.

    ``forward`` returns log fused probabilities (see ``LateFusionHead``);
    ``forward_branches`` returns per-branch logits (B, C, K) for per-branch losses.
    """

    fusion = "late"

    def __init__(self, make_encoder: EncoderFactory, *, encoder_name: str, in_channels: int,
                 num_classes: int, dropout: float, hidden: int | None = None,
                 weights: str | Sequence[float] = "learned") -> None:
        super().__init__(make_encoder, encoder_name=encoder_name, in_channels=in_channels,
                         num_classes=num_classes)
        self.head = LateFusionHead(self.encoders[0].out_features, in_channels, num_classes,
                                   dropout=dropout, hidden=hidden, weights=weights)

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """Per-branch logits (B, C, K)."""
        return self.head.branch_logits(self.forward_features(x))

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused output (B, K) and per-branch logits (B, C, K) from one encoder pass."""
        branches = self.forward_branches(x)
        return self.head.fuse(branches), branches

    @property
    def branch_weights(self) -> torch.Tensor:
        return self.head.branch_weights

    def set_branch_weights(self, weights: Sequence[float] | torch.Tensor) -> None:
        """Set fusion weights, one per channel; normalised to sum 1."""
        self.head.set_branch_weights(weights)

