"""Fitting one model of a run configuration on one split: the patch cache of a run, the model built
from its settings (with a distillation teacher for training-only channels), late-fusion weights.
Cross-validation (:mod:`cytofuse.workflows.cv`) and the final model (:mod:`cytofuse.workflows.final`) both
fit through here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cytofuse.errors import InputError
from cytofuse.preprocess.patches import PatchIndex
from cytofuse.runs import FitFolder, RunFolder


def build_run_cache(image_set, index: PatchIndex, run_dir: Path, *, progress: bool):
    from cytofuse.training.cache import build_patch_cache
    from cytofuse.io.readers import select_channels

    names = list(index.channel_names)

    def load(image_id: str) -> np.ndarray:
        image = image_set.read(image_id)
        return np.asarray(image.data[select_channels(image.channel_names, channels=names)])

    return build_patch_cache(index.patches, index.images, load_image=load, channels=names, out=RunFolder(run_dir).cache, progress=progress)


def fit_model(model_cfg, cache, rows, labels, fit_idx, val_idx, index: PatchIndex, classes, settings, out: Path, *,
              callbacks=()):
    """Fit ``model_cfg`` on cache rows ``fit_idx`` (validated on ``val_idx``) into ``out``; ``callbacks`` (Lightning)
    see this model's fit only, not a distillation teacher's."""
    from cytofuse.training.cache import PatchDataset
    from cytofuse.models import create_model
    from cytofuse.training.fit import fit

    from cytofuse.config import model_channels

    inputs, aux = model_channels(model_cfg, index.channel_names)
    names = [index.channel_names[i] for i in inputs]
    channel = None
    if model_cfg.fusion == "single":
        from cytofuse.io.readers import select_channels

        if model_cfg.channel is None:
            raise InputError(f"model {model_cfg.display_name}: fusion 'single' needs model.channel (one of {names})")
        channel = select_channels(names, channels=[model_cfg.channel])[0]
    dropout_aux = aux if model_cfg.auxiliary_mode == "dropout" else []
    soft = None
    if aux and model_cfg.auxiliary_mode == "distill":
        soft = teacher_targets(model_cfg, cache, rows, labels, fit_idx, val_idx, index, classes, settings, out,
                                inputs=inputs, aux=aux, channel=channel)
    import lightning as L

    # the initial weights follow from the seed alone, not from what ran before in this process
    L.seed_everything(settings.seed, verbose=False)
    model = create_model(
        model_cfg.fusion, in_channels=len(inputs), num_classes=len(classes), encoder=model_cfg.encoder,
        channel=channel, dropout=model_cfg.dropout, hidden=model_cfg.hidden, pretrained=model_cfg.pretrained,
        late_weights=model_cfg.late_weights, aux_channels=len(dropout_aux), aux_p=model_cfg.auxiliary_p,
        channel_names=names,
    )
    # Training sees the auxiliary channels (as extra encoders' inputs, or as extra one-channel samples);
    # validation, like every test-time input, holds the input channels only.
    targets = len(aux) if model_cfg.auxiliary_mode == "reconstruct" else 0
    if soft is not None:
        train_ds = PatchDataset(cache, rows[fit_idx], labels[fit_idx], channels=inputs, soft_targets=soft)
    elif targets:  # the auxiliary channels ride behind the inputs as targets, not as inputs
        train_ds = PatchDataset(cache, rows[fit_idx], labels[fit_idx], channels=inputs + aux)
    else:
        views = [inputs + dropout_aux] if dropout_aux else [inputs] + [[a] for a in aux]
        train_ds = PatchDataset(cache, rows[fit_idx], labels[fit_idx], views=views)
    val_ds = PatchDataset(cache, rows[val_idx], labels[val_idx], channels=inputs)
    fit(model, train_ds, val_ds, settings=settings, out_dir=out, callbacks=callbacks, auxiliary_targets=targets)
    if model_cfg.fusion == "late" and model_cfg.late_weights == "validation":
        from cytofuse.models import save_weights

        validation_weights(model, val_ds, settings)
        save_weights(model, FitFolder(out).weights)
    return model


def teacher_targets(model_cfg, cache, rows, labels, fit_idx, val_idx, index: PatchIndex, classes, settings, out: Path, *,
                     inputs: list[int], aux: list[int], channel: int | None) -> np.ndarray:
    """Distillation from training-only channels: fit a teacher (the model's fusion; early for a single-channel
    model) on inputs + auxiliary channels of the same training split, in ``out/teacher``, and return its
    probabilities on the training patches (dihedral mean when ``tta``) softened by ``distill_temperature``."""
    import lightning as L

    from cytofuse.training.cache import PatchDataset
    from cytofuse.models import create_model
    from cytofuse.training.fit import eval_device, fit, predict_proba

    seen = ([inputs[channel]] if channel is not None else inputs) + aux
    L.seed_everything(settings.seed, verbose=False)
    teacher = create_model(
        "early" if model_cfg.fusion == "single" else model_cfg.fusion, in_channels=len(seen), num_classes=len(classes),
        encoder=model_cfg.encoder, dropout=model_cfg.dropout, hidden=model_cfg.hidden, pretrained=model_cfg.pretrained,
        # the teacher has more branches than the model: its late weights are learned, never the model's own list
        late_weights="equal" if model_cfg.late_weights == "equal" else "learned",
        channel_names=[index.channel_names[i] for i in seen],
    )
    teach_ds = PatchDataset(cache, rows[fit_idx], labels[fit_idx], channels=seen)
    fit(teacher, teach_ds, PatchDataset(cache, rows[val_idx], labels[val_idx], channels=seen), settings=settings,
        out_dir=FitFolder(out).teacher.root)
    proba, _ = predict_proba(teacher, teach_ds, batch_size=128, tta=settings.tta, device=eval_device(settings))
    soft = np.power(np.clip(proba.astype(np.float64), 1e-12, None), 1.0 / settings.distill_temperature)
    return (soft / soft.sum(1, keepdims=True)).astype(np.float32)


def validation_weights(model, val_ds, settings) -> None:
    """Late fusion: weight each branch by its balanced accuracy above chance on the validation split."""
    import torch

    from cytofuse.models.fusion import branch_validation_weights

    loader = torch.utils.data.DataLoader(val_ds, batch_size=settings.batch_size)
    model.eval()
    logits, ys = [], []
    with torch.no_grad():
        for x, y in loader:
            logits.append(model.forward_branches(x))
            ys.append(y)
    model.set_branch_weights(branch_validation_weights(torch.cat(logits), torch.cat(ys)))
