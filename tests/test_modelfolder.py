import pytest
import torch
import yaml

from cytofuse.errors import InputError, RunFolderError
from cytofuse.inference.modelfolder import (
    FORMAT_VERSION,
    ModelCard,
    card_for,
    load_models,
    read_model_folder,
    write_model_folder,
)
from cytofuse.models import create_model, save_weights
from cytofuse.preprocess.patches import PatchSettings


def _model(in_channels=2, num_classes=3, name="early", seed=0):
    torch.manual_seed(seed)
    return create_model(name, in_channels=in_channels, num_classes=num_classes, encoder="smallcnn").eval()


def _card(models, channels=("mito", "endo"), classes=("a", "b", "c")):
    return card_for(models, class_names=list(classes), channel_names=list(channels),
                    patches=PatchSettings(size=32, percentiles=(2.0, 99.0), max_per_image=10))


def test_round_trip_gives_identical_predictions_and_card(tmp_path):
    model = _model(name="intermediate")
    out = write_model_folder(tmp_path / "mf", [model], _card([model]))
    models, card = read_model_folder(out)
    x = torch.randn(5, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(models[0](x), model(x))
    assert card.weights == ["weights.safetensors"] and card.class_names == ["a", "b", "c"]
    assert card.channel_names == ["mito", "endo"] and card.model["name"] == "intermediate"
    assert card.recipe.normalisation is None and card.recipe.scope == "image"
    assert card.recipe.normalisation_summary() == {"method": "percentile", "percentiles": [2.0, 99.0]}
    settings = card.recipe.prediction_settings()
    assert settings.size == 32 and settings.percentiles == (2.0, 99.0)
    assert settings.max_per_image is None  # prediction patches every kept position
    assert set(card.software) >= {"python", "torch", "numpy", "monai"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mf"]  # no temporary folder left


def test_ensemble_writes_one_file_per_fold(tmp_path):
    models = [_model(seed=k) for k in range(3)]
    write_model_folder(tmp_path / "mf", models, _card(models))
    loaded, card = load_models(tmp_path / "mf")
    assert card.weights == ["fold_0.safetensors", "fold_1.safetensors", "fold_2.safetensors"]
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a(x), b(x)) for a, b in zip(loaded, models))


def test_existing_folder_is_refused_without_overwrite(tmp_path):
    model = _model()
    write_model_folder(tmp_path / "mf", [model], _card([model]))
    with pytest.raises(RunFolderError, match="--overwrite"):
        write_model_folder(tmp_path / "mf", [model], _card([model]))
    other = _model(seed=5)
    write_model_folder(tmp_path / "mf", [other], _card([other]), overwrite=True)
    (loaded,), _ = read_model_folder(tmp_path / "mf")
    state, want = loaded.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert not torch.equal(want["head.1.weight"], model.state_dict()["head.1.weight"])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(RunFolderError, match="data exists and is not a cytofuse model folder"):
        write_model_folder(tmp_path / "data", [model], _card([model]), overwrite=True)
    assert (tmp_path / "data" / "keep.txt").read_text() == "x"


def test_models_must_match_the_card(tmp_path):
    model = _model(in_channels=3)
    with pytest.raises(InputError, match=r"takes 3 channels and predicts 3 classes, but the card lists 2 channels"):
        write_model_folder(tmp_path / "mf", [model], _card([model]))


def test_newer_format_version_is_a_clear_error(tmp_path):
    model = _model()
    write_model_folder(tmp_path / "mf", [model], _card([model]))
    raw = yaml.safe_load((tmp_path / "mf" / "model.yaml").read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    raw["new_field"] = 1
    (tmp_path / "mf" / "model.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match=rf"format_version {FORMAT_VERSION + 1}.*reads format_version <= {FORMAT_VERSION}"):
        read_model_folder(tmp_path / "mf")


def test_not_a_model_folder_and_missing_weights(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_model_folder(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no model.yaml"):
        read_model_folder(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.yaml").write_text("format: something-else\n")
    with pytest.raises(InputError, match="format must be 'cytofuse-model', got 'something-else'"):
        read_model_folder(tmp_path / "other")
    model = _model()
    write_model_folder(tmp_path / "mf", [model], _card([model]))
    (tmp_path / "mf" / "weights.safetensors").unlink()
    with pytest.raises(InputError, match="lacks the weights file weights.safetensors"):
        read_model_folder(tmp_path / "mf")


def test_weights_that_disagree_with_the_card_are_refused(tmp_path):
    model = _model()
    write_model_folder(tmp_path / "mf", [model], _card([model]))
    save_weights(_model(num_classes=4), tmp_path / "mf" / "weights.safetensors")
    with pytest.raises(InputError, match=r"predicts 4 classes, but the card lists .* 3 classes \['a', 'b', 'c'\]"):
        read_model_folder(tmp_path / "mf")


def test_card_rejects_unknown_keys_and_bad_normalisation():
    with pytest.raises(ValueError, match="extra"):
        ModelCard(class_names=["a", "b"], channel_names=["x"], colour="red")
    with pytest.raises(ValueError, match="normalisation must be"):
        ModelCard(class_names=["a", "b"], channel_names=["x"], normalisation={"method": "zscore"})


# A format_version 1 card, as `card_for` wrote it before the patch recipe (dataset normalisation over
# the cache channels endo, mito, nucleus; the model reads mito, endo; a relative empty-filter copy).
CARD_V1 = """\
format: cytofuse-model
format_version: 1
cytofuse_version: 0.1.0
class_names: [a, b, c]
channel_names: [mito, endo]
patches:
  size: 32
  stride: 16
  min_ratio: 0.05
  rule: mean
  channels: null
  exclude_channels: []
  z_step: 2
  min_patches: 1
  fallback: none
  max_per_image: 10
  percentiles: [2.0, 99.0]
  normalise: dataset
  fixed_range: null
  hist_samples: 8000000
  group_by: image
  drop_duplicates: true
  seed: 0
  empty_filter: empty_filter
normalisation:
  method: percentile
  percentiles: [2.0, 99.0]
  scope: dataset
  channels: [endo, mito, nucleus]
  low: [1.0, 10.0, 5.0]
  high: [200.0, 900.0, 50.0]
  measured_on: 40 training patches
weights: [weights.safetensors]
tta: false
model: {name: early, in_channels: 2, num_classes: 3, encoder: smallcnn}
trained_on: {images: 4}
software: {python: '3.11'}
"""


def test_a_format_version_1_card_is_read_into_the_same_recipe(tmp_path):
    import numpy as np

    model = _model()
    folder = write_model_folder(tmp_path / "mf", [model], _card([model]))
    (folder / "model.yaml").write_text(CARD_V1)
    _, card = read_model_folder(folder)
    # what ModelCard.fixed_bounds() and .patch_settings() of format_version 1 returned for this card
    low, high = card.recipe.bounds()
    np.testing.assert_array_equal(low, [10.0, 1.0])
    np.testing.assert_array_equal(high, [900.0, 200.0])
    want = PatchSettings(size=32, stride=16, z_step=2, percentiles=(2.0, 99.0), normalise="dataset",
                         empty_filter=folder / "empty_filter")
    assert card.recipe.prediction_settings() == want
    assert card.recipe.normalisation.measured_on == "40 training patches"
    assert card.recipe.settings.max_per_image == 10 and card.channel_names == card.recipe.channels == ["mito", "endo"]
    assert card.format_version == FORMAT_VERSION == 2
    # written again, the card has the recipe layout and reads back the same
    again = ModelCard.model_validate(yaml.safe_load(yaml.safe_dump(card.model_dump(mode="json"))))
    assert again == card and "recipe" in card.model_dump() and "patches" not in card.model_dump()


def test_recipe_bounds_and_checks():
    from cytofuse.preprocess.recipe import Normalisation, PatchRecipe

    norm = Normalisation(scope="fixed", channels=["a", "b"], low=[0.0, 1.0], high=[10.0, 20.0])
    recipe = PatchRecipe.build(PatchSettings(percentiles=(2.0, 99.0)), ["b"], norm)
    assert recipe.normalisation.percentiles == (2.0, 99.0)  # a fixed range takes the settings' percentiles
    assert [list(v) for v in recipe.bounds()] == [[1.0], [20.0]]
    assert [list(v) for v in recipe.bounds(["b", "a"])] == [[1.0, 0.0], [20.0, 10.0]]
    with pytest.raises(InputError, match=r"normalisation lists channels \['a', 'b'\], not \['c'\]"):
        recipe.bounds(["a", "c"])
    with pytest.raises(ValueError, match="not the model's"):
        PatchRecipe(settings=PatchSettings(), channels=["c"], normalisation=norm)
    with pytest.raises(ValueError, match="percentiles"):
        PatchRecipe(settings=PatchSettings(), channels=["a"],
                    normalisation=Normalisation(scope="dataset", percentiles=(2.0, 98.0), channels=["a"], low=[0.0],
                                                high=[1.0]))
    with pytest.raises(ValueError, match="channels, low and high of equal length"):
        Normalisation(scope="dataset", channels=["a", "b"], low=[0.0], high=[1.0])
    assert PatchRecipe.build(PatchSettings(), ["a"], Normalisation(channels=["a"])).bounds() is None
    with pytest.raises(ValueError, match=r"recipe.channels \['a'\] differ from channel_names \['b'\]"):
        ModelCard(class_names=["x", "y"], channel_names=["b"], recipe=recipe.model_copy(update={"channels": ["a"]}))
