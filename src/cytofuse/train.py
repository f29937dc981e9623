"""One fit of a cytofuse model: weighted loss, step-decayed optimiser, early stopping, checkpoints.

``fit`` drives a :class:`lightning.Trainer`, so the same call trains on a CPU, on a GPU, with
bf16 mixed precision, or across GPUs and nodes with DDP. It writes into ``out_dir``:
``last.ckpt`` (every epoch; an interrupted fit resumes from it), ``best.ckpt``,
``best.safetensors`` (the best epoch's weights), ``history.csv`` and ``fit.json``.

Distributed training: from a plain Python call (a script, a notebook, pytest) use
``strategy="ddp_spawn"``; under ``torchrun`` or ``srun`` (one process per device already
started) use ``strategy="ddp"``. On CPU, DDP uses the gloo backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from cytofuse.data import Augment, AugmentCollate, class_weights as inverse_class_weights, make_sampler
from cytofuse.errors import InputError

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_balanced_accuracy", "lr"]


class TrainSettings(BaseModel):
    """Hyper-parameters and hardware of one fit (defaults follow Yee et al. 2026)."""

    model_config = ConfigDict(extra="forbid")

    max_epochs: int = Field(100, ge=1, description="Upper bound on training epochs.")
    batch_size: int = Field(32, ge=1, description="Patches per optimiser step (per device under DDP).")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="Adam (L2 via weight_decay) or AdamW (decoupled).")
    lr: float = Field(1e-3, gt=0, description="Initial learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (L2 regularisation) of the optimiser.")
    decay_rate: float = Field(0.95, gt=0, le=1, description="Learning-rate factor applied every decay_steps steps.")
    decay_steps: int = Field(175, ge=1, description="Optimiser steps between learning-rate decays (staircase).")
    class_weighting: Literal["inverse", "none"] = Field(
        "inverse", description="Cross-entropy class weights inverse to training class frequency, or none."
    )
    sampler: Literal["none", "weighted"] = Field(
        "none", description="'weighted' draws classes equally often (with replacement) instead of shuffling."
    )
    monitor: Literal["val_balanced_accuracy", "val_loss"] = Field(
        "val_balanced_accuracy", description="Validation metric for early stopping and the best epoch."
    )
    patience: int = Field(15, ge=1, description="Epochs without improvement of the monitor before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change of the monitor that counts as improvement.")
    augment: Augment = Field(
        default_factory=Augment, description="Augmentation of training batches (applied in the loader workers)."
    )
    late_branch_loss: float = Field(
        0.0, ge=0, description="Weight of the mean per-branch cross-entropy added to the loss of late-fusion models."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per device.")
    seed: int = Field(0, description="Seed of torch, numpy, python and the loader workers.")
    accelerator: Literal["cpu", "gpu", "auto"] = Field("auto", description="Device type.")
    devices: int | str = Field(1, description="Number of devices per node (or 'auto').")
    strategy: str = Field("auto", description="'auto', 'ddp' (torchrun/srun), 'ddp_spawn' (plain call), 'fsdp', ...")
    num_nodes: int = Field(1, ge=1, description="Number of machines for distributed training.")
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = Field("32-true", description="Numeric precision.")
    deterministic: bool = Field(False, description="Use only deterministic torch algorithms (needed for bitwise GPU reproducibility).")
    progress: bool = Field(True, description="Show progress bars and the model summary.")


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


class ClassifierModule(L.LightningModule):
    """Wraps any cytofuse model: weighted cross-entropy, step-decayed Adam, epoch history."""

    def __init__(self, model: nn.Module, *, settings: TrainSettings, class_weight: np.ndarray | None = None,
                 history_path: Path | None = None) -> None:
        super().__init__()
        self.model = model
        self.settings = settings
        self.history_path = history_path
        weight = None if class_weight is None else torch.as_tensor(np.asarray(class_weight), dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)
        self.history: list[dict] = []
        self._late = settings.late_branch_loss > 0 and getattr(model, "fusion", "") == "late"
        self._reset_sums()

    def _reset_sums(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {"train": 0.0, "train_w": 0.0, "val": 0.0, "val_w": 0.0}
        self._confusion: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss_terms(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of weighted per-sample losses and sum of weights (their ratio is the weighted mean)."""
        losses = F.cross_entropy(logits.float(), y, weight=self.class_weight, reduction="none")
        w = self.class_weight[y] if self.class_weight is not None else torch.ones_like(losses)
        return losses.sum(), w.sum()

    def _branch_loss(self, branches, y: torch.Tensor) -> torch.Tensor:
        if isinstance(branches, torch.Tensor):
            branches = branches.unbind(1)
        terms = [F.cross_entropy(b.float(), y, weight=self.class_weight) for b in branches]
        return torch.stack(terms).mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self._late and hasattr(self.model, "forward_all"):
            logits, branches = self.model.forward_all(x)
        elif self._late:
            logits, branches = self.model(x), self.model.forward_branches(x)
        else:
            logits = self.model(x)
        total, weight = self._loss_terms(logits, y)
        loss = total / weight
        self._sums["train"] += total.detach()
        self._sums["train_w"] += weight.detach()
        if self._late:
            loss = loss + self.settings.late_branch_loss * self._branch_loss(branches, y)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        total, weight = self._loss_terms(logits, y)
        self._sums["val"] += total
        self._sums["val_w"] += weight
        k = logits.shape[1]
        counts = torch.bincount(y * k + logits.argmax(1), minlength=k * k).reshape(k, k)
        self._confusion = counts if self._confusion is None else self._confusion + counts

    def on_train_epoch_start(self) -> None:
        self._reset_sums()

    def _reduced(self, value) -> float:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        return float(self.trainer.strategy.reduce(t, reduce_op="sum"))

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
        self.log_dict({"val_loss": val_loss, "val_balanced_accuracy": bacc}, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        row = {"epoch": self.current_epoch, "train_loss": train_loss, "val_loss": val_loss,
               "val_balanced_accuracy": bacc, "lr": lr}
        self.history = [r for r in self.history if r["epoch"] < self.current_epoch] + [row]
        if self.trainer.is_global_zero and self.history_path is not None:
            _write_csv(pd.DataFrame(self.history, columns=HISTORY_COLUMNS), self.history_path)
        self._confusion = None

    def configure_optimizers(self):
        s = self.settings
        opt_cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
        opt = opt_cls(self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _StepDecay(s.decay_rate, s.decay_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cytofuse_history"] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("cytofuse_history", []))


# --------------------------------------------------------------------------- files


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict as safetensors (temp name, then rename).

    The model's ``config`` (its ``create_model`` arguments) is stored beside ``metadata`` so
    that ``cytofuse.models.load_model`` can rebuild it from the file alone.
    """
    import json

    from safetensors.torch import save_file

    from .models.weights import CONFIG_KEY

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = dict(metadata or {})
    if getattr(model, "config", None):
        meta[CONFIG_KEY] = json.dumps(model.config)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights written by :func:`save_weights` into ``model`` (strict)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model


def _best_checkpoint(path: Path) -> tuple[dict, int, float]:
    """Model state dict, epoch and monitored score stored in ``best.ckpt``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    scores = [v["best_model_score"] for k, v in ckpt.get("callbacks", {}).items()
              if k.startswith("ModelCheckpoint") and v.get("monitor")]
    return state, int(ckpt["epoch"]), float(scores[0]) if scores else float("nan")


# --------------------------------------------------------------------------- fit


def _labels_of(ds: Dataset, name: str) -> np.ndarray:
    labels = getattr(ds, "labels", None)
    if labels is None:
        raise InputError(f"fit: {name} needs a 'labels' array (as PatchDataset has) for class weights or the sampler")
    return np.asarray(labels, dtype=np.int64)


def _resolve_class_weights(model: nn.Module, train_ds: Dataset, settings: TrainSettings, given) -> np.ndarray | None:
    if given is not None:
        return np.asarray(given, dtype=np.float32)
    if settings.class_weighting == "none":
        return None
    labels = _labels_of(train_ds, "train_ds")
    num_classes = int(getattr(model, "num_classes", labels.max() + 1))
    return inverse_class_weights(labels, num_classes)


def _loaders(train_ds: Dataset, val_ds: Dataset, settings: TrainSettings) -> tuple[DataLoader, DataLoader]:
    common = {
        "batch_size": settings.batch_size,
        "num_workers": settings.num_workers,
        "persistent_workers": settings.num_workers > 0,
        "pin_memory": settings.accelerator == "gpu",
    }
    collate = AugmentCollate(settings.augment) if settings.augment.enabled else None
    if settings.sampler == "weighted":
        sampler = make_sampler(_labels_of(train_ds, "train_ds"))
        train = DataLoader(train_ds, sampler=sampler, collate_fn=collate, **common)
    else:
        train = DataLoader(train_ds, shuffle=True, collate_fn=collate, **common)
    return train, DataLoader(val_ds, shuffle=False, **common)


def _callbacks(settings: TrainSettings, out_dir: Path, extra: Sequence[L.Callback]) -> list[L.Callback]:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    mode = "max" if settings.monitor == "val_balanced_accuracy" else "min"
    stop = EarlyStopping(monitor=settings.monitor, mode=mode, patience=settings.patience, min_delta=settings.min_delta)
    best = ModelCheckpoint(dirpath=out_dir, filename="best", monitor=settings.monitor, mode=mode, save_top_k=1,
                           enable_version_counter=False)
    last = ModelCheckpoint(dirpath=out_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    return [*extra, stop, best, last]  # user callbacks see each epoch before the stopping decision


def _trainer(settings: TrainSettings, out_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        max_epochs=settings.max_epochs,
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy=settings.strategy,
        num_nodes=settings.num_nodes,
        precision=settings.precision,
        deterministic=settings.deterministic,
        callbacks=callbacks,
        logger=False,
        default_root_dir=out_dir,
        num_sanity_val_steps=0,
        enable_progress_bar=settings.progress,
        enable_model_summary=settings.progress,
    )


def fit_key(model: nn.Module, train_ds: Dataset, val_ds: Dataset, settings: TrainSettings) -> str:
    """A hash of what a fit's outcome depends on: settings, model layout and the two data sets."""
    h = hashlib.sha256(settings.model_dump_json(exclude={"progress", "num_workers"}).encode())
    h.update(type(model).__qualname__.encode())
    for name, value in model.state_dict().items():
        h.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
    for ds in (train_ds, val_ds):
        h.update(f"{type(ds).__qualname__}:{len(ds)}".encode())
        for attr in ("rows", "labels"):
            if getattr(ds, attr, None) is not None:
                h.update(np.ascontiguousarray(getattr(ds, attr)).tobytes())
        h.update(str(getattr(getattr(ds, "cache", None), "fingerprint", "")).encode())
        h.update(f"views={getattr(ds, 'views', None)}".encode())
    return h.hexdigest()[:32]


def _read_state(out_dir: Path) -> dict:
    path = out_dir / "fit.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(out_dir: Path, state: dict) -> None:
    tmp = out_dir / ".fit.json.partial"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, out_dir / "fit.json")


def _prepare(out_dir: Path, key: str, resume: bool) -> dict:
    """Decide how to start: the stored state of the same fit when resuming, else clear old outputs."""
    state = _read_state(out_dir)
    if resume and state.get("key") == key:
        return state
    if state.get("key") not in (None, key) and resume:
        warnings.warn(f"fit: {out_dir} holds a fit with other settings, model or data; starting over", stacklevel=3)
    if rank_zero_only.rank == 0:
        for name in ("last.ckpt", "best.ckpt", "best.safetensors", "history.csv", "fit.json"):
            (out_dir / name).unlink(missing_ok=True)
        _write_state(out_dir, {"key": key, "completed": False})
    return {}


_NOISE = [
    r".*does not have many workers.*",  # num_workers is the user's explicit choice
    r".*Checkpoint directory .* exists and is not empty.*",  # expected when resuming
    r".*is smaller than the logging interval.*",  # tiny data sets; no logger is attached
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # raised inside lightning by newer torch
]


def fit(model: nn.Module, train_ds: Dataset, val_ds: Dataset, *, settings: TrainSettings | None = None,
        out_dir: str | Path, class_weights: np.ndarray | None = None, resume: bool = True,
        callbacks: Sequence[L.Callback] = ()) -> FitResult:
    """Train ``model`` on ``train_ds``, early-stop on ``val_ds``; the model ends with the best weights.

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
    key = fit_key(model, train_ds, val_ds, settings)
    state = _prepare(out_dir, key, resume)
    if state.get("completed") and (out_dir / "best.safetensors").is_file():
        return _stored_result(model, out_dir, state)
    weight = _resolve_class_weights(model, train_ds, settings, class_weights)
    if weight is not None and settings.sampler == "weighted" and class_weights is None:
        warnings.warn("fit: class_weighting='inverse' with sampler='weighted' corrects the imbalance twice", stacklevel=2)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    module = ClassifierModule(model, settings=settings, class_weight=weight, history_path=out_dir / "history.csv")
    train_loader, val_loader = _loaders(train_ds, val_ds, settings)
    last = out_dir / "last.ckpt"
    with warnings.catch_warnings(), _quiet(not settings.progress):
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        trainer = _trainer(settings, out_dir, _callbacks(settings, out_dir, callbacks))
        trainer.fit(module, train_loader, val_loader, ckpt_path=last if state and last.is_file() else None)
    return _finish(model, module, trainer, out_dir, settings, key)


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
            key: str) -> FitResult:
    """Restore the best epoch's weights, save them and the history, and describe the fit."""
    if trainer.interrupted:
        raise RuntimeError(f"fit: training in {out_dir} was interrupted; call fit again to resume from last.ckpt")
    state, best_epoch, best_score = _best_checkpoint(out_dir / "best.ckpt")
    model.load_state_dict(state)
    history = pd.DataFrame(module.history, columns=HISTORY_COLUMNS)
    if history.empty or history["epoch"].max() < best_epoch:  # spawned workers kept the module's history
        history = pd.read_csv(out_dir / "history.csv")
    stopped_early = _early_stopped(out_dir / "last.ckpt")
    result = FitResult(best_epoch, best_score, history, out_dir / "best.safetensors", stopped_early)
    completed = stopped_early or int(history["epoch"].max()) + 1 >= settings.max_epochs
    if trainer.is_global_zero:
        _save_result(model, result, out_dir, settings, key=key, completed=completed)
    return result


def _early_stopped(last: Path) -> bool:
    """Whether EarlyStopping ended the fit (read from the checkpoint, so it also works for spawned workers)."""
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    states = [v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("EarlyStopping")]
    return bool(states) and int(states[0].get("stopped_epoch", 0)) > 0


def _save_result(model: nn.Module, result: FitResult, out_dir: Path, settings: TrainSettings, *, key: str,
                 completed: bool) -> None:
    """Best weights, history and ``fit.json`` (a fit not marked completed resumes on the next call)."""
    meta = {"key": key, "completed": completed, "best_epoch": result.best_epoch, "best_score": result.best_score,
            "monitor": settings.monitor, "stopped_early": result.stopped_early}
    save_weights(model, result.weights_path, metadata={k: str(v) for k, v in meta.items()})
    _write_csv(result.history, out_dir / "history.csv")
    _write_state(out_dir, meta)


def _stored_result(model: nn.Module, out_dir: Path, done: dict) -> FitResult:
    load_weights(model, out_dir / "best.safetensors")
    history = pd.read_csv(out_dir / "history.csv")
    return FitResult(int(done["best_epoch"]), float(done["best_score"]), history, out_dir / "best.safetensors",
                     bool(done["stopped_early"]))


# --------------------------------------------------------------------------- inference


@torch.no_grad()
def predict_proba(model: nn.Module, ds: Dataset, *, batch_size: int = 64, num_workers: int = 0,
                  return_features: bool = False, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (N, K) float32 for every item of ``ds``, and the embeddings when asked."""
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
            if return_features and hasattr(model, "head"):
                f = model.forward_features(x)
                logits = model.head(f)
                feats.append(f.float().cpu())
            else:
                logits = model(x)
                if return_features:
                    feats.append(model.forward_features(x).float().cpu())
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    proba = torch.cat(probs).numpy().astype(np.float32)
    return proba, (torch.cat(feats).numpy() if return_features else None)
