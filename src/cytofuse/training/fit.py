"""One fit of a cytofuse model: the training recipe, checkpoints and resumption.

The recipe (defaults, each a setting): AdamW with a linear warm-up and a cosine decay to zero
over a fixed budget (epochs or optimiser steps), class-weighted cross-entropy, random dihedral
transforms, an exponential moving average (EMA) of the weights as the evaluated model, and
no early stopping: the model at the end of the budget is the one scored. Early stopping, when
switched on, watches a moving mean of the validation metric after a minimum number of epochs.
On CPUs with native bfloat16 the steps run under bf16 autocast, always in channels_last.

``fit`` drives a :class:`lightning.Trainer`, so the same call trains on a CPU, on a GPU, with
bf16 mixed precision, or across GPUs and nodes with DDP. It writes into ``out_dir``:
``last.ckpt`` (the full state, every ``checkpoint_every_s`` seconds and at the end; an interrupted fit
resumes from it), ``best.ckpt`` (early stopping only; the best epoch's weights), ``best.safetensors``
(the evaluated weights), ``history.csv`` and ``fit.json``. Once the fit is complete the two checkpoints
are deleted (``keep_checkpoints`` keeps them): later calls read the weights, history and ``fit.json``.

Distributed training: from a plain Python call (a script, a notebook, pytest) use
``strategy="ddp_spawn"``; under ``torchrun`` or ``srun`` (one process per device already
started) use ``strategy="ddp"``. On CPU, DDP uses the gloo backend.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import logging
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from cytofuse.training.cache import Augment, EpochSampler, balanced_weights, class_weights as inverse_class_weights, log_prior
from cytofuse.errors import InputError
from cytofuse.models.weights import load_weights, save_weights
from cytofuse.runs import FitFolder, atomic_path, write_json_atomic

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_balanced_accuracy", "lr", "val_smoothed"]


class TrainSettings(BaseModel):
    """Hyper-parameters and hardware of one fit (see the module docstring for the recipe)."""

    model_config = ConfigDict(extra="forbid")

    max_epochs: int = Field(30, ge=1, description="Training budget in epochs: the learning-rate schedule spans it.")
    max_steps: int | None = Field(
        None, ge=1, description="Budget in optimiser steps instead of epochs (the schedule then spans these steps).")
    batch_size: int = Field(32, ge=1, description="Patches per optimiser step (per device under DDP).")
    optimizer: Literal["adam", "adamw"] = Field("adamw", description="AdamW (decoupled weight decay) or Adam (L2).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (reached after the warm-up).")
    weight_decay: float | None = Field(
        None, ge=0, description="Weight decay; default 0.01 with AdamW (decoupled), 0 with Adam (L2).")
    schedule: Literal["cosine", "staircase", "constant"] = Field(
        "cosine", description="'cosine': linear warm-up, then cosine decay to zero at the end of the budget; "
        "'staircase': x decay_rate every decay_steps steps (Yee et al.); 'constant'.")
    warmup_epochs: float = Field(1.0, ge=0, description="Linear learning-rate warm-up, in epochs (cosine schedule).")
    decay_rate: float = Field(0.95, gt=0, le=1, description="Staircase: learning-rate factor every decay_steps steps.")
    decay_steps: int = Field(175, ge=1, description="Staircase: optimiser steps between learning-rate decays.")
    ema: bool = Field(True, description="Evaluate (and save) an exponential moving average of the weights.")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="EMA decay per step; default 1 - 1/steps per epoch (an average over about "
        "the last epoch), within [0.9, 0.999].")
    bn_recalibrate: bool = Field(
        False, description="Re-estimate BatchNorm statistics of the evaluated model on the training patches after the fit.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Training loss only: this share of each target spread evenly over the classes "
        "(for patch labels inherited from their image, where some patches show nothing of their class); a sample "
        "keeps its label's class weight.")
    mixup: float = Field(
        0.0, ge=0, description="Mixup: each training batch is blended with a shuffled copy of itself, inputs and "
        "targets alike, by a weight drawn from Beta(mixup, mixup) (0: off; 0.2-0.4 typical).")
    class_weighting: Literal["inverse", "none", "logit_adjust"] = Field(
        "inverse", description="'inverse': cross-entropy class weights inverse to training class frequency; "
        "'logit_adjust': unweighted cross-entropy of the logits plus the log of the training class frequencies "
        "(Menon et al. 2021), so that the plain logits, as evaluated and predicted, aim at balanced accuracy; 'none'."
    )
    sampler: Literal["none", "weighted"] = Field(
        "none", description="'weighted' draws classes equally often (with replacement) instead of shuffling."
    )
    early_stopping: bool = Field(
        False, description="Stop when the smoothed validation metric stops improving (patience, min_epochs) and "
        "evaluate the best epoch; off: train the whole budget and evaluate the end.")
    monitor: Literal["val_balanced_accuracy", "val_loss"] = Field(
        "val_balanced_accuracy", description="Validation metric of early stopping and of the best epoch.")
    smoothing: int = Field(3, ge=1, description="Early stopping watches the mean of the monitor over this many epochs.")
    min_epochs: int | None = Field(
        None, ge=1, description="Early stopping: never stop before this epoch; default a third of max_epochs.")
    patience: int = Field(15, ge=1, description="Early stopping: epochs without improvement of the smoothed monitor.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change of the monitor that counts as improvement.")
    augment: Augment = Field(
        default_factory=Augment, description="Augmentation of training batches (applied in the loader workers)."
    )
    tta: bool = Field(
        True, description="Evaluate and predict with the mean class probability over the 8 dihedral transforms.")
    distill_weight: float = Field(
        0.5, ge=0, le=1, description="Share of the loss that matches a teacher's softened probabilities when the "
        "training set carries them (auxiliary_mode 'distill'); the rest is the labels' cross-entropy.")
    distill_temperature: float = Field(
        2.0, gt=0, description="Temperature of distillation: teacher and model probabilities are softened by it.")
    aux_weight: float = Field(
        0.5, ge=0, description="Weight of the auxiliary reconstruction loss (auxiliary_mode 'reconstruct'): the mean "
        "squared error of the training-only channels' coarse images predicted from the model's features.")
    aux_grid: int = Field(
        8, ge=1, le=64, description="Auxiliary reconstruction: each training-only channel is predicted as its "
        "aux_grid x aux_grid block means (standardised over the batch).")
    late_branch_loss: float = Field(
        0.0, ge=0, description="Weight of the mean per-branch cross-entropy added to the loss of late-fusion models."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per device.")
    seed: int = Field(0, description="Seed of torch, numpy, python and the loader workers.")
    accelerator: Literal["cpu", "gpu", "auto"] = Field("auto", description="Device type.")
    devices: int | str = Field(1, description="Number of devices per node (or 'auto').")
    strategy: str = Field("auto", description="'auto', 'ddp' (torchrun/srun), 'ddp_spawn' (plain call), 'fsdp', ...")
    num_nodes: int = Field(1, ge=1, description="Number of machines for distributed training.")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="Numeric precision; 'auto': bf16-mixed where the device computes bfloat16 natively "
        "(CPUs with AVX512-BF16 or AMX, recent GPUs), else 32-true.")
    deterministic: bool = Field(False, description="Use only deterministic torch algorithms (needed for bitwise GPU reproducibility).")
    checkpoint_every_s: float = Field(
        60.0, ge=0, description="Seconds between resumable checkpoints (last.ckpt: weights, weight average and optimiser "
        "state), written at an epoch's end once this much time has passed, and always at the end of the fit; 0: "
        "every epoch. An interrupted fit resumes from it to the same result, losing at most this much work.")
    keep_checkpoints: bool = Field(
        False, description="Keep last.ckpt and best.ckpt once the fit is complete. Off: they are deleted then (the "
        "saved weights, history and fit.json are all that later runs read; for resnet50 x3 a checkpoint is ~1 GB).")
    progress: bool = Field(True, description="Show progress bars.")
    verbose: bool = Field(
        False, description="Print Lightning's own lines for every fit (device and precision, tips, the model summary).")

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.01 if self.optimizer == "adamw" else 0.0

    @property
    def select(self) -> Literal["best", "last"]:
        """Which weights a fit returns: the best (smoothed) epoch with early stopping, else the end of the budget."""
        return "best" if self.early_stopping else "last"


def on_gpu(settings: TrainSettings) -> bool:
    """Whether fits of ``settings`` train on a CUDA device (``accelerator`` gpu, or auto with one present)."""
    return settings.accelerator != "cpu" and torch.cuda.is_available()


def eval_device(settings: TrainSettings) -> str:
    """Where a fitted model of ``settings`` is evaluated: the device it trained on ("cuda" or "cpu")."""
    return "cuda" if on_gpu(settings) else "cpu"


def resolve_precision(settings: TrainSettings) -> str:
    """The Lightning precision of ``settings``: 'auto' becomes bf16-mixed where bf16 is native, else 32-true."""
    if settings.precision != "auto":
        return settings.precision
    if settings.accelerator == "gpu" or on_gpu(settings):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    from cytofuse.runtime import bf16_supported

    return "bf16-mixed" if bf16_supported() else "32-true"


@dataclass
class FitResult:
    """What a fit produced; the model passed to ``fit`` holds the best weights afterwards."""

    best_epoch: int
    best_score: float
    history: pd.DataFrame
    weights_path: Path
    stopped_early: bool


class _StepDecay:
    """Staircase exponential decay: factor ``rate ** (step // every)``."""

    def __init__(self, rate: float, every: int) -> None:
        self.rate, self.every = rate, every

    def __call__(self, step: int) -> float:
        return self.rate ** (step // self.every)


class _WarmupCosine:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to 0 at step ``total``."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = max(0, warmup), max(1, total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch of one process: distinct for every (seed, epoch, rank), within 32 bits."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank]).generate_state(1)[0])


def ema_decay_for(steps_per_epoch: int, given: float | None) -> float:
    """The EMA decay: ``given``, else 1 - 1/steps_per_epoch clipped to [0.9, 0.999]."""
    if given is not None:
        return given
    return float(min(0.999, max(0.9, 1.0 - 1.0 / max(1, steps_per_epoch))))


class ClassifierModule(L.LightningModule):
    """Wraps any cytofuse model: weighted cross-entropy, AdamW with warm-up + cosine, weight EMA, epoch history."""

    def __init__(self, model: nn.Module, *, settings: TrainSettings, class_weight: np.ndarray | None = None,
                 history_path: Path | None = None, aux_targets: int = 0, feature_dim: int = 0,
                 logit_offset: np.ndarray | None = None) -> None:
        super().__init__()
        self.model = model
        # training-only channels as targets: the last aux_targets channels of each training batch, predicted
        # (as coarse images) from the model's features by a head that exists in training only
        self.aux_targets = aux_targets
        self.aux_head = nn.Linear(feature_dim, aux_targets * settings.aux_grid ** 2) if aux_targets else None
        self.settings = settings
        self.history_path = history_path
        weight = None if class_weight is None else torch.as_tensor(np.asarray(class_weight), dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)
        # logit adjustment: added to the logits inside the losses only, never to what is evaluated or predicted
        offset = None if logit_offset is None else torch.as_tensor(np.asarray(logit_offset), dtype=torch.float32)
        self.register_buffer("logit_offset", offset, persistent=False)
        self.ema = _frozen_copy(model) if settings.ema else None
        self._ema_decay = settings.ema_decay or 0.99
        self.loader_batches = 1  # set by fit from the training loader
        self._ema_pairs = None
        self.history: list[dict] = []
        self._late = settings.late_branch_loss > 0 and getattr(model, "fusion", "") == "late"
        self._reset_sums()

    def _reset_sums(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {"train": 0.0, "train_w": 0.0, "val": 0.0, "val_w": 0.0}
        self._confusion: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch on each device (the loader's batches shared over the devices)."""
        return max(1, math.ceil(self.loader_batches / max(1, self.trainer.world_size)))

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated, saved and returned: the EMA when on, else the trained model."""
        return self.ema if self.ema is not None else self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_fit_start(self) -> None:
        for m in (self.model, self.ema):
            if m is not None:
                m.to(memory_format=torch.channels_last)
        self._ema_decay = ema_decay_for(self.steps_per_epoch, self.settings.ema_decay)

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is None:
            return
        step = self.global_step  # optimiser steps taken, this one included
        decay = min(self._ema_decay, (1.0 + step) / (10.0 + step))  # short memory while the weights move fast
        if self._ema_pairs is None:  # (EMA tensors, model tensors): floating ones averaged, the rest copied
            pairs = list(zip([*self.ema.parameters(), *self.ema.buffers()], [*self.model.parameters(), *self.model.buffers()]))
            self._ema_pairs = ([e for e, _ in pairs if e.is_floating_point()], [m.detach() for e, m in pairs if e.is_floating_point()],
                               [(e, m) for e, m in pairs if not e.is_floating_point()])
        averaged, sources, copied = self._ema_pairs
        torch._foreach_lerp_(averaged, sources, 1.0 - decay)  # one multi-tensor kernel for every tensor
        for e, m in copied:
            e.copy_(m)

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits as the losses see them: float32, plus the log class prior under logit adjustment."""
        logits = logits.float()
        return logits if self.logit_offset is None else logits + self.logit_offset

    def _loss_terms(self, logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of weighted per-sample losses and sum of weights (their ratio is the weighted mean)."""
        logits = self._adjusted(logits)
        w = self.class_weight[y] if self.class_weight is not None else torch.ones(len(y), device=logits.device)
        if smoothing:  # each sample weighted by its label's class weight; torch's form would weight the smoothed
            log_p = F.log_softmax(logits, 1)  # share by every class's weight and pull towards the rarest classes
            nll = -log_p.gather(1, y[:, None])[:, 0]
            losses = ((1 - smoothing) * nll - smoothing * log_p.mean(1)) * w
        else:
            losses = F.cross_entropy(logits, y, weight=self.class_weight, reduction="none")
        return losses.sum(), w.sum()

    def _mixed(self, x: torch.Tensor, rest: list) -> tuple[torch.Tensor, list, torch.Tensor | None, float]:
        """Mixup of a training batch with a shuffled copy of itself: inputs (auxiliary channels included) and
        teacher probabilities; returns the permutation and the weight of the unshuffled batch (None, 1: off)."""
        alpha = self.settings.mixup
        if alpha <= 0 or len(x) < 2:
            return x, rest, None, 1.0
        lam = float(torch.distributions.Beta(alpha, alpha).sample())  # draws follow the epoch's seed
        perm = torch.randperm(len(x), device=x.device)
        x = lam * x + (1 - lam) * x[perm]
        return x, [lam * r + (1 - lam) * r[perm] for r in rest], perm, lam

    def _training_loss_terms(self, logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor | None,
                             lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        smoothing = self.settings.label_smoothing
        total, weight = self._loss_terms(logits, y, smoothing)
        if perm is None:
            return total, weight
        total2, weight2 = self._loss_terms(logits, y[perm], smoothing)
        return lam * total + (1 - lam) * total2, lam * weight + (1 - lam) * weight2

    def _branch_loss(self, branches, y: torch.Tensor) -> torch.Tensor:
        if isinstance(branches, torch.Tensor):
            branches = branches.unbind(1)
        terms = [F.cross_entropy(self._adjusted(b), y, weight=self.class_weight) for b in branches]
        return torch.stack(terms).mean()

    def _distill_loss(self, logits: torch.Tensor, soft: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Class-weighted mean of KL(teacher || model) at temperature T, times T^2 (Hinton et al.)."""
        t = self.settings.distill_temperature
        log_p = F.log_softmax(logits.float() / t, dim=1)
        kl = (soft * (soft.clamp_min(1e-12).log() - log_p)).sum(1)
        w = self.class_weight[y] if self.class_weight is not None else torch.ones_like(kl)
        return (kl * w).sum() / w.sum() * t * t

    def _reconstruction_loss(self, features: torch.Tensor, x_aux: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the auxiliary channels' block means, each channel standardised over the batch."""
        target = F.adaptive_avg_pool2d(x_aux.float(), self.settings.aux_grid).flatten(2)  # (B, A, g*g)
        mean = target.mean(dim=(0, 2), keepdim=True)
        std = target.std(dim=(0, 2), keepdim=True).clamp_min(1e-6)
        target = ((target - mean) / std).flatten(1)
        return F.mse_loss(self.aux_head(features.float()), target)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, *rest = batch  # (x, y) or (x, y, teacher probabilities at the distillation temperature)
        if self.settings.augment.enabled:  # here, not in the loader: its draws follow the epoch's seed
            x = self.settings.augment(x)
        x, rest, perm, lam = self._mixed(x, rest)
        x_aux = None
        if self.aux_head is not None:
            x, x_aux = x[:, : -self.aux_targets], x[:, -self.aux_targets :]
        x = x.contiguous(memory_format=torch.channels_last)
        features = None
        if x_aux is not None and not self._late:
            features = self.model.forward_features(x)
            logits = self.model.head(features)
        elif self._late and hasattr(self.model, "forward_all"):
            logits, branches = self.model.forward_all(x)
        elif self._late:
            logits, branches = self.model(x), self.model.forward_branches(x)
        else:
            logits = self.model(x)
        total, weight = self._training_loss_terms(logits, y, perm, lam)
        loss = total / weight
        if rest:
            a = self.settings.distill_weight
            loss = (1 - a) * loss + a * self._distill_loss(logits, rest[0], y)
        self._sums["train"] += total.detach()
        self._sums["train_w"] += weight.detach()
        if self._late:
            branch = self._branch_loss(branches, y)
            if perm is not None:
                branch = lam * branch + (1 - lam) * self._branch_loss(branches, y[perm])
            loss = loss + self.settings.late_branch_loss * branch
        if x_aux is not None:
            if features is None:
                features = self.model.forward_features(x)
            loss = loss + self.settings.aux_weight * self._reconstruction_loss(features, x_aux)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.evaluated(x.contiguous(memory_format=torch.channels_last))
        total, weight = self._loss_terms(logits, y)
        self._sums["val"] += total
        self._sums["val_w"] += weight
        k = logits.shape[1]
        counts = torch.bincount(y * k + logits.argmax(1), minlength=k * k).reshape(k, k)
        self._confusion = counts if self._confusion is None else self._confusion + counts

    def on_train_epoch_start(self) -> None:
        self._reset_sums()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Every draw of an epoch's steps (augmentation, dropout) follows from (seed, epoch, rank) alone, and
        # the order from the EpochSampler, so a fit resumed from an epoch's checkpoint continues exactly as
        # an uninterrupted one. Seeded at the first step: the trainer draws in between when it resumes.
        if batch_idx == 0:
            L.seed_everything(epoch_seed(self.settings.seed, self.current_epoch, self.global_rank), workers=True,
                              verbose=False)

    def _reduced(self, value) -> float:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        return float(self.trainer.strategy.reduce(t, reduce_op="sum"))

    def _smoothed(self, value: float) -> float:
        """Mean of the monitor over the last ``smoothing`` epochs, this one included."""
        past = [r[self.settings.monitor] for r in self.history if r["epoch"] < self.current_epoch]
        window = (past + [value])[-self.settings.smoothing:]
        return float(np.mean(window))

    def on_validation_epoch_end(self) -> None:
        conf = self._confusion
        if conf is None:
            return
        conf = self.trainer.strategy.reduce(conf.to(torch.float64), reduce_op="sum")
        support = conf.sum(1)
        bacc = float((conf.diagonal()[support > 0] / support[support > 0]).mean())
        val_loss = self._reduced(self._sums["val"]) / max(self._reduced(self._sums["val_w"]), 1e-12)
        train_w = self._reduced(self._sums["train_w"])
        train_loss = self._reduced(self._sums["train"]) / train_w if train_w > 0 else float("nan")
        smooth = self._smoothed(bacc if self.settings.monitor == "val_balanced_accuracy" else val_loss)
        self.log_dict({"val_loss": val_loss, "val_balanced_accuracy": bacc, "val_smoothed": smooth}, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        row = {"epoch": self.current_epoch, "train_loss": train_loss, "val_loss": val_loss,
               "val_balanced_accuracy": bacc, "lr": lr, "val_smoothed": smooth}
        self.history = [r for r in self.history if r["epoch"] < self.current_epoch] + [row]
        if self.trainer.is_global_zero and self.history_path is not None:
            _write_csv(pd.DataFrame(self.history, columns=HISTORY_COLUMNS), self.history_path)
        self._confusion = None

    def configure_optimizers(self):
        s = self.settings
        opt_cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
        params = list(self.model.parameters()) + (list(self.aux_head.parameters()) if self.aux_head is not None else [])
        opt = opt_cls(params, lr=s.lr, weight_decay=s.resolved_weight_decay, **_fused_kwargs(params))
        if s.schedule == "staircase":
            factor = _StepDecay(s.decay_rate, s.decay_steps)
        elif s.schedule == "cosine":
            total = int(self.trainer.estimated_stepping_batches)
            factor = _WarmupCosine(int(round(s.warmup_epochs * self.steps_per_epoch)), total)
        else:
            factor = _constant
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cytofuse_history"] = list(self.history)
        score = self.trainer.callback_metrics.get("val_smoothed")
        if score is not None:  # the monitored value of the saved epoch, also in weights-only checkpoints
            checkpoint["cytofuse_score"] = float(score)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("cytofuse_history", []))


def _constant(step: int) -> float:
    return 1.0


def _frozen_copy(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def _fused_kwargs(params: list[torch.Tensor]) -> dict:
    """The fused Adam(W) kernel where torch has one (CPU and CUDA parameters), else multi-tensor ``foreach``."""
    if params and all(p.device.type in ("cpu", "cuda") for p in params):
        return {"fused": True}
    return {"foreach": True}


# --------------------------------------------------------------------------- files


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _checkpoint_state(path: Path, *, prefix: str) -> tuple[dict, int, float]:
    """Model state dict (keys under ``prefix``), epoch and monitored score stored in a Lightning checkpoint.

    Read with ``weights_only=True``: a checkpoint is data, and one that would run code is refused.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    scores = [v["best_model_score"] for k, v in ckpt.get("callbacks", {}).items()
              if k.startswith("ModelCheckpoint") and v.get("monitor")]
    if not scores:  # a weights-only checkpoint (best.ckpt) stores the score of its own epoch
        scores = [ckpt.get("cytofuse_score")]
    score = float(scores[0]) if scores and scores[0] is not None else float("nan")
    return state, int(ckpt["epoch"]), score


# --------------------------------------------------------------------------- fit


def _labels_of(ds: Dataset, name: str) -> np.ndarray:
    labels = getattr(ds, "labels", None)
    if labels is None:
        raise InputError(f"fit: {name} needs a 'labels' array (as PatchDataset has) for class weights or the sampler")
    return np.asarray(labels, dtype=np.int64)


def _imbalance(model: nn.Module, train_ds: Dataset, settings: TrainSettings,
               given) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The loss's class weights and logit offset for ``settings.class_weighting`` (``given`` weights win)."""
    if given is not None:
        return np.asarray(given, dtype=np.float32), None
    if settings.class_weighting == "none":
        return None, None
    labels = _labels_of(train_ds, "train_ds")
    num_classes = int(getattr(model, "num_classes", labels.max() + 1))
    if settings.class_weighting == "logit_adjust":
        return None, log_prior(labels, num_classes)
    return inverse_class_weights(labels, num_classes), None


def _loaders(train_ds: Dataset, val_ds: Dataset, settings: TrainSettings) -> tuple[DataLoader, DataLoader]:
    """Training loader with an epoch-seeded order (augmentation happens in the training step); validation in order."""
    common = {
        "batch_size": settings.batch_size,
        "num_workers": settings.num_workers,
        "persistent_workers": settings.num_workers > 0,
        "pin_memory": on_gpu(settings),
    }
    weights = balanced_weights(_labels_of(train_ds, "train_ds")) if settings.sampler == "weighted" else None
    sampler = EpochSampler(len(train_ds), seed=settings.seed, weights=weights)
    return DataLoader(train_ds, sampler=sampler, **common), DataLoader(val_ds, shuffle=False, **common)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, the full state a fit resumes from: at an epoch's end once ``every_s`` seconds have passed
    since the last save (0: every epoch), and at the end of training (budget spent or early stop)."""

    def __init__(self, out_dir: Path, every_s: float) -> None:
        super().__init__(dirpath=out_dir, filename=FitFolder(out_dir).last_checkpoint.stem, monitor=None,
                         save_top_k=1, enable_version_counter=False)
        self.every_s = every_s
        self._path = FitFolder(out_dir).last_checkpoint
        self._saved_at = time.monotonic()
        self._saved_step = -1

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        if super()._should_skip_saving_checkpoint(trainer):
            return True
        # rank 0's clock decides for every rank: saving is collective under DDP
        return bool(trainer.strategy.broadcast(time.monotonic() - self._saved_at < self.every_s, src=0))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_at, self._saved_step = time.monotonic(), trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self._save_checkpoint(trainer, str(self._path))


def _callbacks(settings: TrainSettings, out_dir: Path, extra: Sequence[L.Callback]) -> list[L.Callback]:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    files = FitFolder(out_dir)  # Lightning adds the .ckpt suffix to each file name
    last = LastCheckpoint(out_dir, settings.checkpoint_every_s)
    if not settings.early_stopping:
        return [*extra, last]
    mode = "max" if settings.monitor == "val_balanced_accuracy" else "min"
    stop = EarlyStopping(monitor="val_smoothed", mode=mode, patience=settings.patience, min_delta=settings.min_delta)
    # the best epoch's weights only: it is evaluated, never resumed from (last.ckpt holds the optimiser state)
    best = ModelCheckpoint(dirpath=out_dir, filename=files.best_checkpoint.stem, monitor="val_smoothed", mode=mode,
                           save_top_k=1, enable_version_counter=False, save_weights_only=True)
    return [*extra, stop, best, last]  # user callbacks see each epoch before the stopping decision


def _min_epochs(settings: TrainSettings) -> int | None:
    if not settings.early_stopping:
        return None
    return settings.min_epochs or max(1, settings.max_epochs // 3)


def _trainer(settings: TrainSettings, out_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        max_epochs=-1 if settings.max_steps else settings.max_epochs,
        max_steps=settings.max_steps or -1,
        min_epochs=_min_epochs(settings),
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy=settings.strategy,
        num_nodes=settings.num_nodes,
        precision=resolve_precision(settings),
        deterministic=settings.deterministic,
        callbacks=callbacks,
        logger=False,
        default_root_dir=out_dir,
        num_sanity_val_steps=0,
        enable_progress_bar=settings.progress,
        enable_model_summary=settings.verbose,
    )


def fit_key(model: nn.Module, train_ds: Dataset, val_ds: Dataset, settings: TrainSettings, *,
            auxiliary_targets: int = 0) -> str:
    """A hash of what a fit's outcome depends on: settings, model layout and the two data sets."""
    ignored = {"progress", "verbose", "num_workers", "checkpoint_every_s", "keep_checkpoints"}
    ignored |= {name for name in ("label_smoothing", "mixup") if not getattr(settings, name)}  # keys of fits before them
    h = hashlib.sha256(settings.model_dump_json(exclude=ignored).encode())
    if auxiliary_targets:
        h.update(f"auxiliary_targets={auxiliary_targets}".encode())
    h.update(type(model).__qualname__.encode())
    for name, value in model.state_dict().items():
        h.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
    for ds in (train_ds, val_ds):
        h.update(f"{type(ds).__qualname__}:{len(ds)}".encode())
        for attr in ("rows", "labels", "soft_targets"):
            if getattr(ds, attr, None) is not None:
                h.update(np.ascontiguousarray(getattr(ds, attr)).tobytes())
        h.update(str(getattr(getattr(ds, "cache", None), "fingerprint", "")).encode())
        h.update(f"views={getattr(ds, 'views', None)}".encode())
    return h.hexdigest()[:32]


def _read_state(out_dir: Path) -> dict:
    path = FitFolder(out_dir).state
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(out_dir: Path, state: dict) -> None:
    write_json_atomic(FitFolder(out_dir).state, state)


def _prepare(out_dir: Path, key: str, resume: bool) -> dict:
    """Decide how to start: the stored state of the same fit when resuming, else clear old outputs."""
    state = _read_state(out_dir)
    if resume and state.get("key") == key:
        return state
    if state.get("key") not in (None, key) and resume:
        warnings.warn(f"fit: {out_dir} holds a fit with other settings, model or data; starting over", stacklevel=3)
    if rank_zero_only.rank == 0:
        for path in FitFolder(out_dir).files():
            path.unlink(missing_ok=True)
        _write_state(out_dir, {"key": key, "completed": False})
    return {}


_NOISE = [
    r".*does not have many workers.*",  # num_workers is the user's explicit choice
    r".*Checkpoint directory .* exists and is not empty.*",  # expected when resuming
    r".*is smaller than the logging interval.*",  # tiny data sets; no logger is attached
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # raised inside lightning by newer torch
    r".*Precision bf16-mixed is not supported by the model summary.*",  # the summary's size estimate only
]


def fit(model: nn.Module, train_ds: Dataset, val_ds: Dataset, *, settings: TrainSettings | None = None,
        out_dir: str | Path, class_weights: np.ndarray | None = None, resume: bool = True,
        callbacks: Sequence[L.Callback] = (), auxiliary_targets: int = 0) -> FitResult:
    """Train ``model`` on ``train_ds``, early-stop on ``val_ds``; the model ends with the best weights.

    ``auxiliary_targets``: the last that many channels of every training patch are training-only
    targets, not inputs: a head on the model's features learns their coarse images (``aux_grid``)
    beside the labels (``aux_weight``); validation patches hold the input channels only.

    Datasets yield ``(x (C, H, W) float tensor, int label)`` and, for class weights or the
    weighted sampler, have a ``labels`` array. ``class_weights`` overrides the weights computed
    from the training labels. With ``resume``, a fit interrupted in ``out_dir`` continues from
    ``last.ckpt`` and a completed one is loaded instead of re-run, when settings, model layout
    and data (see :func:`fit_key`) are the same; otherwise the old outputs are replaced.
    """
    settings = settings or TrainSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise InputError(f"fit: train_ds and val_ds must be non-empty, got {len(train_ds)} and {len(val_ds)} patches")
    if getattr(train_ds, "augment", None) is not None and settings.augment.enabled:
        warnings.warn("fit: train_ds augments its items and settings.augment is enabled too; patches are augmented twice", stacklevel=2)
    feature_dim = _feature_dim(model, train_ds, val_ds, auxiliary_targets) if auxiliary_targets else 0
    key = fit_key(model, train_ds, val_ds, settings, auxiliary_targets=auxiliary_targets)
    state = _prepare(out_dir, key, resume)
    if state.get("completed") and FitFolder(out_dir).weights.is_file():
        return _stored_result(model, out_dir, state)
    weight, offset = _imbalance(model, train_ds, settings, class_weights)
    if settings.class_weighting != "none" and settings.sampler == "weighted" and class_weights is None:
        warnings.warn(f"fit: class_weighting={settings.class_weighting!r} with sampler='weighted' corrects the "
                      "imbalance twice", stacklevel=2)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    module = ClassifierModule(model, settings=settings, class_weight=weight, history_path=FitFolder(out_dir).history,
                              aux_targets=auxiliary_targets, feature_dim=feature_dim, logit_offset=offset)
    train_loader, val_loader = _loaders(train_ds, val_ds, settings)
    module.loader_batches = len(train_loader)
    last = FitFolder(out_dir).last_checkpoint
    with warnings.catch_warnings(), _quiet(not settings.verbose):
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        trainer = _trainer(settings, out_dir, _callbacks(settings, out_dir, callbacks))
        trainer.fit(module, train_loader, val_loader, ckpt_path=last if state and last.is_file() else None,
                    weights_only=True)
    return _finish(model, module, trainer, out_dir, settings, key, train_loader)


@torch.no_grad()
def _feature_dim(model: nn.Module, train_ds: Dataset, val_ds: Dataset, auxiliary_targets: int) -> int:
    """Width of the model's features, from one validation patch; checks the training patches carry the targets."""
    if auxiliary_targets < 0:
        raise InputError(f"fit: auxiliary_targets must be >= 0, got {auxiliary_targets}")
    x_train, x_val = train_ds[0][0], val_ds[0][0]
    if x_train.shape[0] != x_val.shape[0] + auxiliary_targets:
        raise InputError(f"fit: with auxiliary_targets={auxiliary_targets} the training patches need that many channels "
                         f"more than the validation patches, got {x_train.shape[0]} and {x_val.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        return int(model.forward_features(x_val[None].float()).shape[1])
    finally:
        model.train(was_training)


@contextmanager
def _quiet(enabled: bool):
    """Silence lightning's informational log lines (device summary, tips) when asked."""
    names = ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric")
    logs = [logging.getLogger(name) for name in names]
    levels = [log.level for log in logs]
    for log in logs if enabled else ():
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _finish(model: nn.Module, module: ClassifierModule, trainer: L.Trainer, out_dir: Path, settings: TrainSettings,
            key: str, train_loader: DataLoader) -> FitResult:
    """Load the evaluated weights (EMA or model; end of budget or best epoch), save them and the history."""
    if trainer.interrupted:
        raise RuntimeError(f"fit: training in {out_dir} was interrupted; call fit again to resume from last.ckpt")
    prefix = "ema." if settings.ema else "model."
    files = FitFolder(out_dir)
    source = files.best_checkpoint if settings.select == "best" else files.last_checkpoint
    state, best_epoch, best_score = _checkpoint_state(source, prefix=prefix)
    model.load_state_dict(state)
    history = pd.DataFrame(module.history, columns=HISTORY_COLUMNS)
    if history.empty or history["epoch"].max() < best_epoch:  # spawned workers kept the module's history
        history = pd.read_csv(files.history)
    if settings.select == "last" and not history.empty:  # the end of the budget: the last validated epoch
        best_epoch, best_score = int(history["epoch"].iloc[-1]), float(history["val_smoothed"].iloc[-1])
    if settings.bn_recalibrate:
        recalibrate_batchnorm(model.to(eval_device(settings)), train_loader)
        model.cpu()
    stopped_early = settings.early_stopping and _early_stopped(files.last_checkpoint)
    result = FitResult(best_epoch, best_score, history, files.weights, stopped_early)
    _warn_if_chance(history, model, out_dir)
    if trainer.is_global_zero:
        completed = _completed(out_dir, history, settings, stopped_early)
        _save_result(model, result, out_dir, settings, key=key, completed=completed)
        if completed and not settings.keep_checkpoints:  # only an unfinished fit resumes from them
            files.last_checkpoint.unlink(missing_ok=True)
            files.best_checkpoint.unlink(missing_ok=True)
    return result


def _completed(out_dir: Path, history: pd.DataFrame, settings: TrainSettings, stopped_early: bool) -> bool:
    """Whether the budget was spent (or early stopping ended the fit); else a later call resumes it."""
    if stopped_early:
        return True
    if settings.max_steps:
        ckpt = torch.load(FitFolder(out_dir).last_checkpoint, map_location="cpu", weights_only=True)
        return int(ckpt.get("global_step", 0)) >= settings.max_steps
    return int(history["epoch"].max()) + 1 >= settings.max_epochs


def _warn_if_chance(history: pd.DataFrame, model: nn.Module, out_dir: Path) -> None:
    """A fit whose last validation epochs sit at chance is worth a word, not a silent number."""
    k = int(getattr(model, "num_classes", 0) or 0)
    if len(history) < 3 or k < 2:
        return
    final = float(history["val_smoothed"].iloc[-1]) if "val_smoothed" in history else float("nan")
    if history["val_balanced_accuracy"].notna().any() and final <= 1.0 / k + 0.02:
        warnings.warn(f"fit: the validation balanced accuracy at the end of training in {out_dir} is {final:.3f}, "
                      f"at chance (1/{k}); the model may have learned nothing (more epochs, more data, other lr?)",
                      ChanceLevelWarning, stacklevel=3)


class ChanceLevelWarning(UserWarning):
    """A fit ended with its validation metric at chance level."""


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, *, max_batches: int = 200) -> nn.Module:
    """Re-estimate every BatchNorm layer's running mean and variance on ``loader`` (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, (x, *_) in enumerate(loader):
        if i >= max_batches:
            break
        model(x.to(next(model.parameters()).device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return model


def _early_stopped(last: Path) -> bool:
    """Whether EarlyStopping ended the fit (read from the checkpoint, so it also works for spawned workers)."""
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    states = [v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("EarlyStopping")]
    return bool(states) and int(states[0].get("stopped_epoch", 0)) > 0


def _save_result(model: nn.Module, result: FitResult, out_dir: Path, settings: TrainSettings, *, key: str,
                 completed: bool) -> None:
    """Best weights, history and ``fit.json`` (a fit not marked completed resumes on the next call)."""
    meta = {"key": key, "completed": completed, "best_epoch": result.best_epoch, "best_score": result.best_score,
            "monitor": settings.monitor, "stopped_early": result.stopped_early, "selected": settings.select,
            "ema": settings.ema}
    save_weights(model, result.weights_path, metadata={k: str(v) for k, v in meta.items()})
    _write_csv(result.history, FitFolder(out_dir).history)
    _write_state(out_dir, meta)


def _stored_result(model: nn.Module, out_dir: Path, done: dict) -> FitResult:
    files = FitFolder(out_dir)
    load_weights(model, files.weights)
    history = pd.read_csv(files.history)
    return FitResult(int(done["best_epoch"]), float(done["best_score"]), history, files.weights,
                     bool(done["stopped_early"]))


# --------------------------------------------------------------------------- inference


@torch.no_grad()
def predict_proba(model: nn.Module, ds: Dataset, *, batch_size: int = 64, num_workers: int = 0,
                  return_features: bool = False, device: str | torch.device = "cpu",
                  tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (N, K) float32 for every item of ``ds``, and the embeddings when asked.

    ``tta``: the mean probability over the 8 dihedral transforms of each patch (embeddings stay
    those of the untransformed patch).
    """
    from cytofuse.models.tta import tta_proba

    if len(ds) == 0:
        raise InputError("predict_proba: ds is empty")
    was_training = model.training
    model.eval().to(device)
    model.to(memory_format=torch.channels_last)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    probs, feats = [], []
    try:
        for batch in loader:
            x = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device).contiguous(memory_format=torch.channels_last)
            if return_features:
                feats.append(model.forward_features(x).float().cpu())
            probs.append(tta_proba(model, x, tta=tta).cpu())
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    proba = torch.cat(probs).numpy().astype(np.float32)
    return proba, (torch.cat(feats).numpy() if return_features else None)
