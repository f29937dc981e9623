"""The final model: one fit on every labelled image for a fixed number of epochs, saved as a model folder.

With all images in training nothing is left to early-stop on, so the number of epochs is
given, or taken from a CV run of the same model: the median over folds of the best epoch's
count (``fit.json``'s 0-based ``best_epoch`` + 1, or the best row of ``history.csv``). The
fit reuses ``cytofuse.training.fit.fit``; its validation set is a few training patches that only
satisfy the trainer (no held-out data exists), and the weights of the LAST epoch are kept.

A late-fusion model with ``late_weights: validation`` sets each branch's weight from its
accuracy on held-out validation patches, which a fit on every image does not have: its
branch weights are the mean over the CV run's folds of the weights each fold model set on
its own validation split (renormalised to sum 1). Without a CV run this is an error; the
alternatives are ``late_weights: learned`` (or ``equal``), or giving the run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from cytofuse.config import ModelSettings, RunConfig, model_channels
from cytofuse.errors import InputError
from cytofuse.runs import FitFolder

_DUMMY_VAL = 32  # training patches handed to the trainer as its (not held-out) validation set


def _best_epoch(fold: FitFolder) -> int:
    """0-based best epoch of one CV fold, from fit.json or history.csv."""
    if fold.state.is_file():
        best = json.loads(fold.state.read_text()).get("best_epoch")
        if best is not None:
            return int(best)
    history = fold.history
    if not history.is_file():
        raise InputError(f"CV fold {fold.root} has neither fit.json with best_epoch nor history.csv")
    import pandas as pd

    table = pd.read_csv(history)
    return int(table.loc[table["val_balanced_accuracy"].idxmax(), "epoch"])


def epochs_from_cv(cv_run: str | Path, model_name: str | None = None) -> int:
    """Epochs for the final fit: median over the run's folds of (best epoch + 1), rounded."""
    from cytofuse.inference.modelfolder import cv_fold_dirs

    _, folds = cv_fold_dirs(cv_run, model_name)
    return int(round(float(np.median([_best_epoch(f) for f in folds])))) + 1


def late_weights_from_cv(cv_run: str | Path, model_name: str | None = None) -> np.ndarray:
    """Late-fusion branch weights (C,) for a final fit: the mean of the CV run's fold models' weights."""
    from safetensors import safe_open

    from cytofuse.inference.modelfolder import cv_fold_dirs

    _, folds = cv_fold_dirs(cv_run, model_name)
    weights = []
    for fold in folds:
        file = fold.weights
        with safe_open(str(file), framework="pt") as f:
            if "head.weight_logits" not in f.keys():
                raise InputError(f"{file} holds no late-fusion branch weights (head.weight_logits); "
                                 f"is CV run {cv_run} a run of a late-fusion model?")
            weights.append(f.get_tensor("head.weight_logits").double().softmax(0).numpy())
    if len({len(w) for w in weights}) != 1:
        raise InputError(f"the folds of CV run {cv_run} have different branch counts {[len(w) for w in weights]}")
    mean = np.mean(weights, axis=0)
    return mean / mean.sum()


def _cv_branch_weights(model_cfg: ModelSettings, cv_run: str | Path | None) -> np.ndarray | None:
    """The CV run's mean branch weights when the model needs validation weights; None otherwise."""
    if model_cfg.fusion != "late" or model_cfg.late_weights != "validation":
        return None
    if cv_run is None:
        raise InputError(
            f"model {model_cfg.display_name}: late_weights 'validation' weights each branch by its accuracy on "
            "held-out validation patches, and the final fit on all images has none; give cv_run (--cv-run) to "
            "average the branch weights of that run's fold models, or set late_weights: learned (or equal)"
        )
    return late_weights_from_cv(cv_run, model_cfg.display_name)


def _model_settings(cfg: RunConfig, model_name: str | None) -> ModelSettings:
    names = [m.display_name for m in cfg.models]
    if model_name is None:
        if len(cfg.models) != 1:
            raise InputError(f"the config has models {names}; choose the one to train with model_name")
        return cfg.models[0]
    if model_name not in names:
        raise InputError(f"model_name must be one of {names}, got {model_name!r}")
    return cfg.models[names.index(model_name)]


def train_final(cfg: RunConfig, out: str | Path, *, epochs: int | None = None, cv_run: str | Path | None = None,
                model_name: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Fit ``model_name`` of ``cfg`` on all images for ``epochs`` (or the CV run's) and write the model folder ``out``."""
    from cytofuse.training.cache import normalised_view
    from cytofuse.workflows.cv import refine_patch_index
    from cytofuse.workflows.fitting import build_run_cache, fit_model
    from cytofuse.inference.modelfolder import check_target, card_for, write_model_folder
    from cytofuse.preprocess.patches import build_patch_index
    from cytofuse.preprocess.recipe import PatchRecipe
    from cytofuse.workflows.patching import load_image_set

    out = Path(out)
    check_target(out, overwrite)
    model_cfg = _model_settings(cfg, model_name)
    branch_weights = _cv_branch_weights(model_cfg, cv_run)
    if epochs is None:
        if cv_run is None:
            raise InputError("train_final needs epochs or cv_run (a CV run of the same model to take epochs from)")
        epochs = epochs_from_cv(cv_run, model_cfg.display_name)
    if not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be an int >= 1, got {epochs!r}")
    image_set = load_image_set(cfg.data)
    image_set.validate(channels=cfg.patches.channels, exclude_channels=cfg.patches.exclude_channels,
                       min_classes=1 if cfg.labels else 2, patch_size=cfg.patches.size)
    work = out.with_name(f".{out.name}.work")
    index = build_patch_index(image_set, cfg.patches, work, workers=cfg.workers, progress=progress,
                              scheduler=cfg.scheduler)
    cache = build_run_cache(image_set, index, work, progress=progress)
    index = refine_patch_index(cfg, image_set, index, cache, work, progress=progress)  # empty filter, labels
    classes = sorted(index.patches["label"].unique().tolist())
    if len(classes) < 2:
        raise InputError(f"train_final needs at least two classes with patches, got {classes}")
    rows = cache.positions(index.patches["patch_id"].to_numpy())
    labels = index.patches["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    all_idx = np.arange(len(labels))
    val_idx = np.random.default_rng(0).choice(all_idx, min(_DUMMY_VAL, len(all_idx)), replace=False)
    settings = cfg.train_settings
    settings = settings.model_copy(update={"max_epochs": epochs, "max_steps": None, "early_stopping": False,
                                           "progress": progress and settings.progress})
    # no early stopping: the model at the end of the budget (its EMA when on) is the one kept
    inputs, _ = model_channels(model_cfg, index.channel_names)
    view = normalised_view(cfg.patches, cache, index, rows, work / "fit", seed=cfg.cv.seed,
                           measured_on=f"all {len(rows)} training patches of the final model",
                           channels=[index.channel_names[i] for i in inputs])
    model = fit_model(model_cfg, view, rows, labels, all_idx, np.sort(val_idx), index, classes, settings, work / "fit")
    if branch_weights is not None:
        if len(branch_weights) != model.in_channels:
            raise InputError(f"CV run {cv_run} has {len(branch_weights)} late-fusion branches, the final model "
                             f"{len(index.channel_names)} channels {list(index.channel_names)}")
        model.set_branch_weights(branch_weights.tolist())
    trained_on = {"images": int(index.patches["image_id"].nunique()), "patches": int(len(labels)), "epochs": epochs,
                  "epochs_from": Path(cv_run).name if cv_run is not None else "given", "model_name": model_cfg.display_name,
                  "patches_per_class": {c: int((labels == i).sum()) for i, c in enumerate(classes)}}
    if branch_weights is not None:
        trained_on["branch_weights"] = {"values": [round(float(w), 6) for w in branch_weights],
                                        "from": f"mean over the folds of CV run {Path(cv_run).name}"}
    recipe = PatchRecipe.read(FitFolder(work / "fit").recipe)  # the fit's recipe, as normalised_view wrote it
    card = card_for([model], class_names=classes, recipe=recipe, trained_on=trained_on, tta=settings.tta)
    write_model_folder(out, [model.eval()], card, overwrite=overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return out
