"""Training-only auxiliary channels: modality dropout and extra samples; never an input at test time."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cytofuse.config import model_channels, validate_config
from cytofuse.errors import ConfigError, InputError
from cytofuse.models import create_model


def test_aux_encoder_is_used_in_training_and_absent_at_test():
    torch.manual_seed(0)
    model = create_model("intermediate", in_channels=2, num_classes=3, encoder="smallcnn", aux_channels=1,
                         aux_p=0.0, channel_names=["BF", "DF"])
    x = torch.rand(4, 3, 32, 32)
    model.train()
    with_aux = model.forward_features(x)
    assert with_aux.shape == (4, 3 * model.encoders[0].out_features)
    assert with_aux[:, -model.encoders[0].out_features:].abs().sum() > 0  # p=0: the auxiliary features are kept
    model.eval()
    with pytest.raises(InputError, match=r"expects x of shape \(B, 2, H, W\), got \(4, 3, 32, 32\)"):
        model(x)  # at test time an auxiliary channel is refused
    before = model(x[:, :2])
    with torch.no_grad():
        for p in model.aux_encoders.parameters():
            p.add_(1.0)
    assert torch.equal(before, model(x[:, :2]))  # test-time output does not depend on the auxiliary encoder


def test_modality_dropout_zeroes_about_p_of_the_samples():
    torch.manual_seed(0)
    model = create_model("intermediate", in_channels=1, num_classes=2, encoder="smallcnn", aux_channels=1, aux_p=0.3)
    model.train()
    feats = model.forward_features(torch.rand(400, 2, 16, 16))
    dropped = (feats[:, model.encoders[0].out_features:].abs().sum(dim=1) == 0).float().mean().item()
    assert 0.22 < dropped < 0.38


def test_aux_needs_intermediate_fusion():
    with pytest.raises(InputError, match="need fusion 'intermediate', got 'late'"):
        create_model("late", in_channels=2, num_classes=2, encoder="smallcnn", aux_channels=1)
    with pytest.raises(ConfigError, match="auxiliary_mode 'dropout' .* needs fusion 'intermediate'"):
        validate_config({"data": {"images": "x"}, "models": [{"fusion": "early", "auxiliary": ["DNA"]}]})


def test_model_channels_default_to_everything_but_the_auxiliary():
    cfg = validate_config({"data": {"images": "x"}, "models": [
        {"fusion": "intermediate", "auxiliary": ["DNA"]},
        {"fusion": "early", "channels": ["BF"], "auxiliary": ["DNA"], "auxiliary_mode": "samples", "name": "bf"},
        {"fusion": "early", "auxiliary": ["DNA"], "auxiliary_mode": "samples", "name": "all"}]})
    names = ("BF", "DNA", "DF")
    assert model_channels(cfg.models[0], names) == ([0, 2], [1])
    assert model_channels(cfg.models[1], names) == ([0], [1])
    with pytest.raises(ConfigError, match="'samples' needs exactly one input channel, got \\['BF', 'DF'\\]"):
        model_channels(cfg.models[2], names)
    with pytest.raises(ConfigError, match="both inputs and auxiliary"):
        validate_config({"data": {"images": "x"}, "models": [{"fusion": "intermediate", "channels": ["BF"], "auxiliary": ["BF"]}]})


def test_patch_dataset_views_repeat_each_row_with_the_same_label(tmp_path):
    from cytofuse.training.cache import CacheChannels, PatchDataset

    class Cache:  # a 3-channel cache whose channel c of row r holds the value 10 r + c
        channels = ("BF", "DF", "DNA")
        path = tmp_path

        def __len__(self):
            return 5

        def __getitem__(self, item):
            r = np.atleast_1d(item)
            block = (10 * r[:, None] + np.arange(3)[None, :])[:, :, None, None] * np.ones((1, 1, 4, 4))
            return block[0] if np.ndim(item) == 0 else block

    ds = PatchDataset(Cache(), np.array([1, 3]), np.array([0, 1]), views=[[0], [2]])
    assert len(ds) == 4 and ds.labels.tolist() == [0, 1, 0, 1]
    assert [float(ds[i][0][0, 0, 0]) for i in range(4)] == [10, 30, 12, 32]
    assert ds[0][0].shape == (1, 4, 4)
    inputs = PatchDataset(Cache(), np.array([1]), np.array([0]), channels=[2, 0])
    assert inputs[0][0][:, 0, 0].tolist() == [12, 10]
    with pytest.raises(InputError, match="non-empty lists of equal length"):
        PatchDataset(Cache(), np.array([1]), np.array([0]), views=[[0, 1], [2]])
    view = CacheChannels.__new__(CacheChannels)  # the view's indexing alone
    view.cache, view.index = Cache(), [2]
    assert view[np.array([1, 2])].shape == (2, 1, 4, 4) and float(view[1][0, 0, 0]) == 12


@pytest.fixture(scope="module")
def three_channel_set(tmp_path_factory):
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    out = tmp_path_factory.mktemp("aux") / "data"
    write_synthetic_dataset(out, classes=2, images_per_class=4, shape=(1, 64, 64), seed=3, progress=False)
    return out / "labels.csv"


@pytest.fixture
def forward_spy(monkeypatch) -> list[tuple[bool, int]]:
    """(training mode, input channels) of every forward pass of an intermediate-fusion model."""
    from cytofuse.models.fusion import IntermediateFusion

    seen: list[tuple[bool, int]] = []
    original = IntermediateFusion.forward_features

    def spy(self, x):
        seen.append((self.training, int(x.shape[1])))
        return original(self, x)

    monkeypatch.setattr(IntermediateFusion, "forward_features", spy)
    return seen


def test_cv_never_feeds_an_auxiliary_channel_at_test_time(three_channel_set, tmp_path, forward_spy):
    """Spy on every forward pass of a CV run: eval-mode passes (validation, test folds) see 2 channels."""
    from cytofuse.workflows.cv import run_cv
    from cytofuse.inference.modelfolder import load_models
    from cytofuse.inference.predict import predict_images
    from cytofuse.io.readers import Image, read_image

    torch.set_num_threads(1)
    seen = forward_spy
    cfg = validate_config({
        "data": {"manifest": str(three_channel_set)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "intermediate", "encoder": "smallcnn", "auxiliary": ["recycling_endosome"], "name": "aux"}],
        "train": {"max_epochs": 1, "batch_size": 8, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2, "baseline": True, "probes": False},
    })
    run_cv(cfg, tmp_path / "run", progress=False)
    assert {c for training, c in seen if not training} == {2}
    assert {c for training, c in seen if training} == {3}
    metrics = json.loads((tmp_path / "run" / "models" / "aux" / "metrics.json").read_text())
    assert metrics["model"]["input_channels"] == ["mitochondria", "early_endosome"]
    assert metrics["model"]["auxiliary_channels"] == ["recycling_endosome"]
    baseline = pd.read_parquet(tmp_path / "run" / "models" / "handcrafted" / "predictions.parquet")
    assert len(baseline)  # the baseline ran on the test-time channels (default baseline_channels)
    models, card = load_models(tmp_path / "run", model_name="aux")
    assert card.channel_names == ["mitochondria", "early_endosome"]
    # each fold's recipe names the model's input channels, not the auxiliary one; explain sees those only
    from cytofuse.evaluation.explain import model_view
    from cytofuse.preprocess.recipe import PatchRecipe
    from cytofuse.runs import RunFolder
    from cytofuse.training.cache import PatchCache

    for fold in RunFolder(tmp_path / "run").model("aux").folds():
        assert PatchRecipe.read(fold.recipe).channels == ["mitochondria", "early_endosome"]
    view = model_view(tmp_path / "run", "aux", PatchCache.open(tmp_path / "run" / "cache"))
    assert list(view.channels) == ["mitochondria", "early_endosome"] and view[[0]].shape[1] == 2
    # an image without the auxiliary channel is predicted
    full = read_image(pd.read_csv(three_channel_set)["path"].map(lambda p: three_channel_set.parent / p).iloc[0])
    keep = [full.channel_names.index(c) for c in card.channel_names]
    image = Image(full.data[keep], tuple(card.channel_names), full.pixel_size_um, "no-aux.tif", {})
    summary = predict_images(tmp_path / "run", [image], out=tmp_path / "pred", model_name="aux", progress=False,
                             precision="fp32")
    assert len(summary) == 1 and summary["patches"].iloc[0] > 0


def test_distill_loss_is_the_weighted_kl_at_temperature(tmp_path):
    from cytofuse.training.fit import ClassifierModule, TrainSettings

    model = create_model("early", in_channels=1, num_classes=3, encoder="smallcnn")
    settings = TrainSettings(distill_temperature=2.0)
    module = ClassifierModule(model, settings=settings, class_weight=np.array([1.0, 2.0, 1.0]))
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    own = torch.softmax(logits / 2.0, dim=1)
    assert module._distill_loss(logits, own, y).item() == pytest.approx(0.0, abs=1e-6)  # matching the teacher costs nothing
    soft = torch.tensor([[0.2, 0.6, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    kl = (soft * (soft.log() - torch.log_softmax(logits / 2.0, dim=1))).sum(1)
    expected = (kl[0] * 1.0 + kl[1] * 2.0) / 3.0 * 4.0  # class weights of y, times T^2
    assert module._distill_loss(logits, soft, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_patch_dataset_soft_targets_make_triples(tmp_path):
    from cytofuse.training.cache import PatchDataset

    cache = np.arange(3 * 2 * 4 * 4, dtype=np.float32).reshape(3, 2, 4, 4)

    class Cache:
        path = tmp_path
        channels = ("a", "b")

        def __len__(self):
            return 3

        def __getitem__(self, item):
            return cache[item]

    soft = np.array([[0.9, 0.1], [0.3, 0.7]], dtype=np.float32)
    ds = PatchDataset(Cache(), np.array([0, 2]), np.array([0, 1]), channels=[1], soft_targets=soft)
    x, y, p = ds[1]
    assert x.shape == (1, 4, 4) and y == 1 and p.tolist() == pytest.approx([0.3, 0.7])
    with pytest.raises(InputError, match=r"soft_targets must be .* \(2, K\) probabilities, got shape \(3, 2\)"):
        PatchDataset(Cache(), np.array([0, 2]), np.array([0, 1]), soft_targets=np.ones((3, 2)))


def test_cv_distills_from_a_teacher_that_sees_the_auxiliary_channel(three_channel_set, tmp_path, forward_spy):
    """auxiliary_mode 'distill': a 3-channel teacher per fold in fold_k/teacher; the model itself only ever sees 2."""
    from cytofuse.workflows.cv import run_cv
    from cytofuse.inference.modelfolder import load_models
    from cytofuse.training.fit import TrainSettings

    torch.set_num_threads(1)
    seen = forward_spy
    cfg = validate_config({
        "data": {"manifest": str(three_channel_set)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "intermediate", "auxiliary": ["recycling_endosome"], "auxiliary_mode": "distill", "name": "kd"}],
        "train": {"max_epochs": 1, "batch_size": 8, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2, "baseline": False, "probes": False},
    })
    run_cv(cfg, tmp_path / "run", progress=False)
    assert {c for training, c in seen if training} == {2, 3}  # the teacher trains on 3 channels, the model on 2
    model_dir = tmp_path / "run" / "models" / "kd"
    for k in range(2):
        teacher = model_dir / f"fold_{k}" / "teacher"
        assert json.loads((teacher / "fit.json").read_text())["completed"] is True
        assert len(pd.read_csv(teacher / "history.csv")) == 1
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["model"]["auxiliary_mode"] == "distill"
    assert metrics["model"]["input_channels"] == ["mitochondria", "early_endosome"]
    models, card = load_models(tmp_path / "run", model_name="kd")
    assert card.channel_names == ["mitochondria", "early_endosome"]
    assert not any("aux" in name for name in models[0].state_dict())  # the model has no auxiliary encoder
    assert TrainSettings().distill_weight == 0.5 and TrainSettings().distill_temperature == 2.0


def test_reconstruction_loss_is_zero_for_a_perfect_head_and_the_mse_of_standardised_block_means():
    from cytofuse.training.fit import ClassifierModule, TrainSettings

    model = create_model("early", in_channels=2, num_classes=3, encoder="smallcnn")
    settings = TrainSettings(aux_grid=2)
    module = ClassifierModule(model, settings=settings, aux_targets=1, feature_dim=4)
    assert module.aux_head.out_features == 4  # one channel, 2 x 2 block means
    torch.manual_seed(0)
    x_aux = torch.rand(3, 1, 8, 8)
    blocks = torch.nn.functional.avg_pool2d(x_aux, 4).flatten(1)  # (3, 4): the 2 x 2 block means
    target = (blocks - blocks.mean()) / blocks.std()
    with torch.no_grad():  # a head that returns its features: feed it the standardised targets themselves
        module.aux_head.weight.copy_(torch.eye(4))
        module.aux_head.bias.zero_()
    assert module._reconstruction_loss(target, x_aux).item() == pytest.approx(0.0, abs=1e-10)
    assert module._reconstruction_loss(torch.zeros(3, 4), x_aux).item() == pytest.approx(
        float((target ** 2).mean()), rel=1e-5)


def test_fit_refuses_auxiliary_targets_that_the_training_patches_lack(tmp_path):
    from torch.utils.data import TensorDataset

    from cytofuse.training.fit import TrainSettings, fit

    model = create_model("early", in_channels=2, num_classes=2, encoder="smallcnn")
    ds = TensorDataset(torch.rand(4, 2, 16, 16), torch.tensor([0, 1, 0, 1]))
    ds.labels = np.array([0, 1, 0, 1])
    with pytest.raises(InputError, match="auxiliary_targets=1 .* need that many channels more .* got 2 and 2"):
        fit(model, ds, ds, settings=TrainSettings(max_epochs=1, progress=False), out_dir=tmp_path, auxiliary_targets=1)


def test_cv_reconstructs_the_auxiliary_channel_in_training_only(three_channel_set, tmp_path, forward_spy):
    """auxiliary_mode 'reconstruct': training batches carry 3 channels, the model sees 2 in every pass and
    has no trace of the training-only head; the head's loss changes the trained weights."""
    from cytofuse.workflows.cv import run_cv
    from cytofuse.inference.modelfolder import load_models

    torch.set_num_threads(1)
    seen = forward_spy
    base = {
        "data": {"manifest": str(three_channel_set)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "train": {"max_epochs": 1, "batch_size": 8, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2, "baseline": False, "probes": False},
    }
    model = {"fusion": "intermediate", "auxiliary": ["recycling_endosome"], "auxiliary_mode": "reconstruct", "name": "rec"}
    run_cv(validate_config({**base, "models": [model]}), tmp_path / "run", progress=False)
    assert {c for _, c in seen} == {2}  # features of the two input channels only, in training and at test
    metrics = json.loads((tmp_path / "run" / "models" / "rec" / "metrics.json").read_text())
    assert metrics["model"]["auxiliary_mode"] == "reconstruct"
    assert metrics["model"]["input_channels"] == ["mitochondria", "early_endosome"]
    models, card = load_models(tmp_path / "run", model_name="rec")
    assert card.channel_names == ["mitochondria", "early_endosome"]
    assert not any("aux" in name for name in models[0].state_dict())
    run_cv(validate_config({**base, "models": [{**model, "auxiliary": [], "auxiliary_mode": "dropout"}]}),
           tmp_path / "plain", progress=False)
    plain, _ = load_models(tmp_path / "plain", model_name="rec")
    changed = [not torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), plain[0].state_dict().values())
               if a.is_floating_point()]
    assert any(changed)  # same seed and inputs: only the reconstruction loss can have moved the weights
