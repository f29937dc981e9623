"""The model folder: a trained classifier with everything prediction needs to redo its preprocessing.

Layout::

    MODEL_DIR/
      model.yaml           the card (``ModelCard``)
      weights.safetensors  one model, or fold_0.safetensors ... fold_{k-1}.safetensors (an ensemble:
                           the mean of the fold models' class probabilities)

Every weights file carries its ``create_model`` arguments (``cytofuse.models.save_weights``),
so the folder rebuilds without the run that made it. A folder written by a newer format,
or whose weights disagree with the card's channels or classes, is refused with an error.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cytofuse.errors import InputError
from cytofuse.preprocess.patches import PatchSettings
from cytofuse.preprocess.recipe import Normalisation, PatchRecipe, mean_normalisation
from cytofuse.runs import FitFolder, RunFolder, check_replaceable, replacing_folder, software_versions

if TYPE_CHECKING:
    from torch import nn

FORMAT = "cytofuse-model"
FORMAT_VERSION = 2  # 2: the patch recipe as one `recipe` (1: `patches` and `normalisation` dicts)
CARD_FILE = "model.yaml"
FILTER_DIR = "empty_filter"  # a model's copy of its learned empty-patch filter


def _cytofuse_version() -> str:
    from cytofuse import __version__

    return __version__


class ModelCard(BaseModel):
    """What a model folder holds: classes, input channels, the patch recipe, provenance.

    format_version 2 stores the patch recipe as ``recipe`` (``PatchRecipe``: settings, channels,
    normalisation); a format_version 1 card (``patches`` and ``normalisation`` dicts) is read into one.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["cytofuse-model"] = FORMAT
    format_version: int = FORMAT_VERSION
    cytofuse_version: str = Field(default_factory=_cytofuse_version)
    class_names: list[str] = Field(..., min_length=2, description="Classes in the order of the model's outputs.")
    channel_names: list[str] = Field(..., min_length=1, description="The model's input channels, in order, by name.")
    recipe: PatchRecipe = Field(..., description="How patches are cut and normalised: as in training.")
    weights: list[str] = Field(default_factory=list, description="Weight files; more than one is an ensemble.")
    tta: bool = Field(False, description="Predict with the mean class probability over the 8 dihedral transforms.")
    model: dict = Field(default_factory=dict, description="The model's create_model arguments (for display).")
    trained_on: dict = Field(default_factory=dict, description="Images, patches, epochs, source run.")
    software: dict = Field(default_factory=software_versions)

    @model_validator(mode="before")
    @classmethod
    def _read_layout(cls, data):
        """channel_names from the recipe when only it names them; a format_version 1 card's ``patches`` and
        ``normalisation`` dicts become its recipe."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "recipe" not in data:
            patches = data.pop("patches", None) or {}
            norm = data.pop("normalisation", None) or {"method": "percentile", "percentiles": [1.0, 99.8]}
            if not isinstance(patches, dict) or not isinstance(norm, dict):
                raise ValueError(f"patches and normalisation must be mappings, got {patches!r} and {norm!r}")
            names = data.get("channel_names")
            try:
                data["recipe"] = PatchRecipe.from_card_v1(patches, norm, names if isinstance(names, list) else [])
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"patches / normalisation (format_version 1 layout): {problems}") from None
            data["format_version"] = FORMAT_VERSION
        elif "channel_names" not in data and isinstance(data["recipe"], (PatchRecipe, dict)):
            recipe = data["recipe"]
            data["channel_names"] = list(recipe.channels if isinstance(recipe, PatchRecipe) else
                                         recipe.get("channels") or [])
        return data

    @model_validator(mode="after")
    def _check_channels(self) -> "ModelCard":
        if self.recipe.channels != self.channel_names:
            raise ValueError(f"recipe.channels {self.recipe.channels} differ from channel_names {self.channel_names}")
        return self


def card_for(models: list["nn.Module"], *, class_names: list[str], recipe: PatchRecipe | None = None,
             channel_names: list[str] | None = None, patches: PatchSettings | None = None,
             trained_on: dict | None = None, normalisation: Normalisation | None = None, tta: bool = False) -> ModelCard:
    """A card for ``models`` trained with ``recipe`` (weights names are set when the folder is written).

    Instead of a recipe, its pieces may be given: ``patches`` (the PatchSettings), ``channel_names`` and
    ``normalisation``. A model that names its input channels (``config["channel_names"]``: a subset of
    the patch channels, without any training-only auxiliary channel) gets those as the card's channels.
    """
    config = dict(getattr(models[0], "config", None) or {})
    if recipe is None:
        if patches is None or channel_names is None:
            raise InputError("card_for needs a recipe, or patches and channel_names")
        recipe = PatchRecipe.build(patches, channel_names, normalisation)
    elif patches is not None or channel_names is not None or normalisation is not None:
        raise InputError("card_for takes a recipe or its pieces (patches, channel_names, normalisation), not both")
    if config.get("channel_names"):
        recipe = PatchRecipe.build(recipe.settings, config["channel_names"], recipe.normalisation)
    return ModelCard(
        class_names=list(class_names), channel_names=list(recipe.channels), recipe=recipe,
        model=config, trained_on=dict(trained_on or {}), tta=tta,
    )


def weight_names(n: int) -> list[str]:
    """File names of ``n`` weight files: one model, or the folds of an ensemble."""
    return ["weights.safetensors"] if n == 1 else [f"fold_{k}.safetensors" for k in range(n)]


def _check_config(config: dict, card: ModelCard, where: str) -> None:
    """A model's stored config must match the card's channels and classes."""
    if not config:
        raise InputError(f"{where} has no stored model config; it was not written by cytofuse")
    want = (len(card.channel_names), len(card.class_names))
    got = (config.get("in_channels"), config.get("num_classes"))
    if got != want:
        raise InputError(
            f"{where} takes {got[0]} channels and predicts {got[1]} classes, but the card lists "
            f"{want[0]} channels {card.channel_names} and {want[1]} classes {card.class_names}"
        )


def write_model_folder(out: str | Path, models: list["nn.Module"], card: ModelCard, *, overwrite: bool = False) -> Path:
    """Write ``models`` (one, or the folds of an ensemble) and ``card`` to the folder ``out``.

    Written to a temporary folder beside ``out`` and swapped into place; an existing ``out``
    is replaced only with ``overwrite`` and only if cytofuse made it. A learned
    empty-patch filter named by the card is copied into the folder (``empty_filter/``), so the
    folder predicts as in training wherever it is moved.
    """
    from cytofuse.models import save_weights

    out = Path(out)
    if not models:
        raise InputError(f"write_model_folder: models must hold at least one model, got {models!r}")
    check_replaceable(out, overwrite=overwrite, what="model folder")
    names = weight_names(len(models))
    card = card.model_copy(update={"weights": names})
    for k, model in enumerate(models):
        _check_config(dict(getattr(model, "config", None) or {}), card, f"write_model_folder: models[{k}]")
    source_filter = card.recipe.settings.empty_filter
    if source_filter is not None and not Path(source_filter).is_dir():
        raise InputError(f"write_model_folder: the model's empty-patch filter {source_filter} (patches.empty_filter) "
                         "does not exist; a model folder carries a copy of it")
    if source_filter is not None:
        from cytofuse.preprocess.emptyfilter import check_filter_folder

        check_filter_folder(source_filter)
    with replacing_folder(out, overwrite=overwrite, what="model folder") as tmp:
        if source_filter is not None:  # the card names the copy, relative to the folder
            shutil.copytree(source_filter, tmp / FILTER_DIR)
            card = card.model_copy(update={"recipe": card.recipe.with_empty_filter(FILTER_DIR)})
        for model, name in zip(models, names):
            save_weights(model, tmp / name)
        (tmp / CARD_FILE).write_text(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))
    return out


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` unless it may be written (kept for callers that check before training)."""
    check_replaceable(out, overwrite=overwrite, what="model folder")


def read_card(path: str | Path) -> ModelCard:
    """The validated card of a model folder; clear errors for anything that is not a readable one."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model folder {path} does not exist or is not a folder")
    card_file = path / CARD_FILE
    if not card_file.is_file():
        raise InputError(f"{path} is not a cytofuse model folder: it has no {CARD_FILE}")
    try:
        raw = yaml.safe_load(card_file.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{card_file} is not valid YAML: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise InputError(f"{card_file} is not a cytofuse model card: format must be {FORMAT!r}, got {found!r}")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{card_file}: format_version must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise InputError(
            f"{card_file} has format_version {version}, written by cytofuse {raw.get('cytofuse_version', '?')}; "
            f"this cytofuse reads format_version <= {FORMAT_VERSION}: upgrade cytofuse to use this model"
        )
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise InputError(f"invalid model card {card_file}:\n  " + "\n  ".join(lines)) from None


def read_model_folder(path: str | Path) -> tuple[list["nn.Module"], ModelCard]:
    """The models (eval mode) and card of a model folder written by ``write_model_folder``."""
    from cytofuse.models import load_model, read_model_config

    path = Path(path)
    card = read_card(path)
    if not card.weights:
        raise InputError(f"{path / CARD_FILE} lists no weight files")
    own_filter = card.recipe.settings.empty_filter
    if own_filter is not None and not own_filter.is_absolute():  # the folder's copy, relative to it
        card = card.model_copy(update={"recipe": card.recipe.with_empty_filter(path / own_filter)})
    own_filter = card.recipe.settings.empty_filter
    if own_filter is not None and own_filter.is_dir():  # a missing one is named at predict time
        from cytofuse.preprocess.emptyfilter import check_filter_folder

        check_filter_folder(own_filter)
    models = []
    for name in card.weights:
        file = path / name
        if not file.is_file():
            raise InputError(f"model folder {path} lacks the weights file {name} listed in {CARD_FILE}")
        _check_config(read_model_config(file), card, str(file))
        models.append(load_model(file))
    return models, card


# --------------------------------------------------------------------------- from a CV run


def cv_model_names(run_dir: str | Path) -> list[str]:
    """Display names of the models of a CV run, from its config.yaml."""
    return [m.display_name for m in _run_config(Path(run_dir)).models]


def _run_config(run_dir: Path):
    from cytofuse.config import validate_config

    file = RunFolder(run_dir).config
    if not file.is_file():
        raise InputError(f"{run_dir} is neither a model folder nor a CV run folder: it has no {CARD_FILE} or config.yaml")
    return validate_config(yaml.safe_load(file.read_text()) or {}, source=str(file))


def cv_fold_dirs(run_dir: str | Path, model_name: str | None = None) -> tuple[str, list[FitFolder]]:
    """The chosen model's display name and its trained fold folders (fold_0, fold_1, ...) in a CV run."""
    run_dir = Path(run_dir)
    names = [m.display_name for m in _run_config(run_dir).models]
    if model_name is None:
        if len(names) != 1:
            raise InputError(f"CV run {run_dir} has models {names}; choose one with model_name")
        model_name = names[0]
    if model_name not in names:
        raise InputError(f"model_name must be one of {names} (the models of CV run {run_dir}), got {model_name!r}")
    model = RunFolder(run_dir).model(model_name)
    folds = [f for f in model.folds() if f.weights.is_file()]
    if not folds:
        raise InputError(f"CV run {run_dir} has no trained fold of model {model_name!r} "
                         f"(no fold folder in {model.root} holds {model.fold(0).weights.name})")
    return model_name, folds


def model_folder_from_cv(run_dir: str | Path, model_name: str | None = None) -> tuple[list["nn.Module"], ModelCard]:
    """The fold models of a CV run as an ensemble, with a card built from the folds' recipes and the patch index."""
    import pyarrow.parquet as pq

    from cytofuse.models import load_model

    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    name, folds = cv_fold_dirs(run_dir, model_name)
    patches_file = RunFolder(run_dir).patches
    if not patches_file.is_file():
        raise InputError(f"CV run {run_dir} lacks patches.parquet; the run did not finish its patch stage")
    table = pq.read_table(patches_file, columns=["label", "image_id"]).to_pandas()
    classes = sorted(table["label"].astype(str).unique().tolist())
    models = [load_model(f.weights) for f in folds]
    trained_on = {"source_run": run_dir.name, "model_name": name, "folds": len(folds),
                  "images": int(table["image_id"].nunique()), "patches": int(len(table))}
    recipe = cv_recipe(run_dir, folds)
    card = card_for(models, class_names=classes, recipe=recipe, trained_on=trained_on, tta=cfg.train_settings.tta)
    card = card.model_copy(update={"weights": weight_names(len(models))})
    for k, model in enumerate(models):
        _check_config(model.config, card, str(folds[k].weights))
    return models, card


def fold_recipe(fold: FitFolder) -> PatchRecipe | None:
    """The patch recipe of one CV fold's model (``fold_<k>/recipe.json``); None for a fold of a run made
    before fold recipes."""
    return PatchRecipe.read(fold.recipe) if fold.recipe.is_file() else None


def cv_recipe(run_dir: str | Path, folds: list[FitFolder]) -> PatchRecipe:
    """The patch recipe of a CV run's fold ensemble: the settings and input channels of the folds' recipes
    with the mean of their normalisation ranges (:meth:`PatchRecipe.ensemble`).

    A run made before fold recipes gets the run's config patches, the patch channels of its index
    (``card_for`` narrows them to the channels the model names) and :func:`fold_normalisation`.
    """
    recipes = [fold_recipe(f) for f in folds]
    if recipes and all(r is not None for r in recipes):
        return PatchRecipe.ensemble(recipes)
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    patches_file = RunFolder(run_dir).patches
    if not patches_file.is_file():
        raise InputError(f"CV run {run_dir} lacks patches.parquet; the run did not finish its patch stage")
    channels = [c[3:] for c in pq.read_schema(patches_file).names if c.startswith("fg_")]
    return PatchRecipe.build(_run_config(run_dir).patches, channels, fold_normalisation(folds))


def fold_normalisation(folds: list[FitFolder]) -> Normalisation | None:
    """Dataset / fixed normalisation of a fold ensemble: the mean over folds of each fold's training-split
    percentiles, from its recipe (or, in a run made before fold recipes, its ``normalisation.json``); None
    for per-image normalisation or runs that stored none."""
    norms = []
    for fold in folds:
        recipe = fold_recipe(fold)
        if recipe is not None:
            norms.append(recipe.normalisation)
        elif fold.normalisation.is_file():
            norms.append(Normalisation.model_validate_json(fold.normalisation.read_text()))
        else:
            return None
    return mean_normalisation(norms)


def load_models(path: str | Path, *, model_name: str | None = None) -> tuple[list["nn.Module"], ModelCard]:
    """A model folder, or the fold ensemble of a CV run folder (told apart by model.yaml vs config.yaml)."""
    path = Path(path)
    if (path / CARD_FILE).is_file() or not RunFolder(path).config.is_file():
        return read_model_folder(path)
    return model_folder_from_cv(path, model_name)
