import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from cytofuse.training.cache import Augment, PatchDataset, build_patch_cache
from cytofuse.errors import InputError
from cytofuse.training.fit import ChanceLevelWarning, FitResult, TrainSettings, fit, load_weights, predict_proba

P = 16
NO_AUG = Augment(enabled=False)


class TinyNet(nn.Module):
    """The cytofuse model interface on a two-layer CNN."""

    fusion = "early"

    def __init__(self, in_channels: int = 2, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward_features(self, x):
        return self.encoder(x)

    def forward(self, x):
        return self.head(self.forward_features(x))


class TinyLate(TinyNet):
    fusion = "late"

    def __init__(self):
        super().__init__()
        self.branch = nn.Linear(32, 3 * 2)

    def forward_branches(self, x):
        return self.branch(self.forward_features(x)).view(-1, 2, 3)


def _toy_patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: bright top half of channel 0; 1: bright bottom half; 2: bright channel 1."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    x = rng.normal(0.0, 0.3, size=(n, 2, P, P)).astype(np.float32)
    x[labels == 0, 0, : P // 2] += 1.0
    x[labels == 1, 0, P // 2 :] += 1.0
    x[labels == 2, 1] += 1.0
    return x, labels


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A patch cache of 96 toy patches (one image each); the first 64 train, the rest validate."""
    x, labels = _toy_patches(96, seed=0)
    return _split_datasets(x, labels, 64, tmp_path_factory.mktemp("toy") / "cache")


def _split_datasets(x: np.ndarray, labels: np.ndarray, n_train: int, out) -> tuple[PatchDataset, PatchDataset]:
    """A float32 patch cache of ``x`` (one image per patch, channels a and b); the first n_train train."""
    ids = [f"img{i}" for i in range(len(x))]
    index = pd.DataFrame({"patch_id": np.arange(len(x), dtype=np.int64), "image_id": ids, "z": 0, "y": 0, "x": 0,
                          "size": P, "label": labels.astype(str), "group": ids})
    stats = pd.DataFrame({"image_id": ids, "lo_a": 0.0, "hi_a": 1.0, "lo_b": 0.0, "hi_b": 1.0})
    cache = build_patch_cache(index, stats, load_image=lambda i: x[int(i[3:])][:, None], channels=["a", "b"],
                              out=out, progress=False, dtype=np.float32)
    rows = np.arange(len(x))
    return (PatchDataset(cache, rows[:n_train], labels[:n_train]),
            PatchDataset(cache, rows[n_train:], labels[n_train:]))


def _settings(**kw) -> TrainSettings:
    base = dict(max_epochs=6, batch_size=16, lr=1e-2, accelerator="cpu", progress=False, augment=NO_AUG, patience=50)
    return TrainSettings(**{**base, **kw})


def _model(seed: int = 0, cls=TinyNet) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


class StopAfter(Callback):
    """Stops training at the end of epoch ``n - 1`` (as an interruption would)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.n:
            trainer.should_stop = True


class EpochRecorder(Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)


class Scripted(Callback):
    """Overwrites the smoothed monitored metric with a scripted sequence (to test early stopping)."""

    def __init__(self, scores):
        self.scores = scores

    def on_validation_end(self, trainer, pl_module):
        trainer.callback_metrics["val_smoothed"] = torch.tensor(self.scores[trainer.current_epoch])


def test_settings_defaults_follow_the_paper_and_reject_unknown_fields():
    s = TrainSettings()
    assert (s.max_epochs, s.batch_size, s.optimizer, s.schedule, s.ema, s.early_stopping) == (30, 32, "adamw", "cosine", True, False)
    assert (s.resolved_weight_decay, s.precision, s.tta, s.select) == (0.01, "auto", True, "last")
    assert (s.decay_rate, s.decay_steps, s.patience) == (0.95, 175, 15)  # the paper's staircase and patience, as options
    assert s.model_copy(update={"optimizer": "adam"}).resolved_weight_decay == 0.0
    assert s.monitor == "val_balanced_accuracy" and s.class_weighting == "inverse"
    assert all(f.description for f in TrainSettings.model_fields.values())
    with pytest.raises(ValueError, match="extra"):
        TrainSettings(epochs=3)
    with pytest.raises(ValueError, match="optimizer"):
        TrainSettings(optimizer="sgd")


def test_fit_learns_separable_toy_problem(toy, tmp_path):
    train_ds, val_ds = toy
    model = _model()
    # flips would swap classes 0 and 1 (top / bottom half): crop, small rotation and jitter only
    aug = Augment(flip=False, rot90=False, crop_scale=0.9, rotate_deg=10)
    result = fit(model, train_ds, val_ds, settings=_settings(max_epochs=8, augment=aug), out_dir=tmp_path)
    assert isinstance(result, FitResult)
    assert result.best_score >= 0.9
    assert list(result.history.columns) == ["epoch", "train_loss", "val_loss", "val_balanced_accuracy", "lr", "val_smoothed"]
    assert result.history["epoch"].tolist() == list(range(8))
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "history.csv"), result.history, check_dtype=False)
    proba, feats = predict_proba(model, val_ds, batch_size=10, return_features=True)
    assert proba.shape == (32, 3) and proba.dtype == np.float32 and feats.shape == (32, 32)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    bacc = np.mean([(proba.argmax(1)[val_ds.labels == k] == k).mean() for k in range(3)])
    assert bacc == pytest.approx(result.best_score)  # the model holds the best epoch's weights
    assert model.training  # predict_proba restores the mode
    # no early stopping: the end of the budget is evaluated; a completed fit keeps no checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "fit.json", "history.csv"]
    assert result.best_epoch == 7


def test_early_stopping_restores_best_epoch(toy, tmp_path):
    train_ds, val_ds = toy
    scores = [0.2, 0.5, 0.9, 0.4, 0.6, 0.8, 0.85, 0.3, 0.3, 0.3]
    model = _model()
    settings = _settings(max_epochs=10, patience=3, early_stopping=True, smoothing=1, min_epochs=1, keep_checkpoints=True)
    result = fit(model, train_ds, val_ds, settings=settings, out_dir=tmp_path, callbacks=[Scripted(scores)])
    assert result.stopped_early and result.best_epoch == 2 and result.best_score == pytest.approx(0.9)
    assert result.history["epoch"].tolist() == [0, 1, 2, 3, 4, 5]  # 3 epochs without improvement after epoch 2
    best = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert best["epoch"] == 2
    for name, value in model.state_dict().items():  # the model holds the best epoch's weight average
        torch.testing.assert_close(value, best["state_dict"][f"ema.{name}"])
    reloaded = load_weights(_model(seed=5), result.weights_path)
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name])


def test_interrupted_fit_resumes_from_last_epoch(toy, tmp_path):
    train_ds, val_ds = toy
    settings = _settings(max_epochs=5)
    first = fit(_model(), train_ds, val_ds, settings=settings, out_dir=tmp_path, callbacks=[StopAfter(2)])
    assert first.history["epoch"].tolist() == [0, 1]
    recorder = EpochRecorder()
    second = fit(_model(seed=1), train_ds, val_ds, settings=settings, out_dir=tmp_path, callbacks=[recorder])
    assert recorder.epochs == [2, 3, 4]
    assert second.history["epoch"].tolist() == [0, 1, 2, 3, 4]
    assert second.history.iloc[:2].equals(first.history)
    recorder = EpochRecorder()  # a completed fit with the same settings is loaded, not re-run
    third = fit(_model(seed=2), train_ds, val_ds, settings=settings, out_dir=tmp_path, callbacks=[recorder])
    assert recorder.epochs == [] and third.best_epoch == second.best_epoch
    recorder = EpochRecorder()
    fit(_model(), train_ds, val_ds, settings=settings, out_dir=tmp_path, resume=False, callbacks=[recorder])
    assert recorder.epochs == [0, 1, 2, 3, 4]
    recorder, other = EpochRecorder(), PatchDataset(train_ds.cache, train_ds.rows[:48], train_ds.labels[:48])
    with pytest.warns(UserWarning, match="other settings, model or data; starting over"):
        fit(_model(), other, val_ds, settings=settings, out_dir=tmp_path, callbacks=[recorder])
    assert recorder.epochs == [0, 1, 2, 3, 4]


def test_identical_fits_give_identical_weights(toy, tmp_path):
    train_ds, val_ds = toy
    settings = _settings(max_epochs=2, augment=Augment())
    a, b = _model(), _model()
    fit(a, train_ds, val_ds, settings=settings, out_dir=tmp_path / "a")
    fit(b, train_ds, val_ds, settings=settings, out_dir=tmp_path / "b")
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), name
    c = _model()
    fit(c, train_ds, val_ds, settings=settings.model_copy(update={"seed": 1}), out_dir=tmp_path / "c")
    assert not torch.equal(a.head.weight, c.head.weight)


def test_loader_workers_are_seeded(toy, tmp_path):
    """Augmentation runs in the worker processes; their seeds follow settings.seed."""
    train_ds, val_ds = toy
    settings = _settings(max_epochs=1, num_workers=1, augment=Augment())
    a, b = _model(), _model()
    fit(a, train_ds, val_ds, settings=settings, out_dir=tmp_path / "a")
    fit(b, train_ds, val_ds, settings=settings, out_dir=tmp_path / "b")
    assert torch.equal(a.head.weight, b.head.weight)


def test_fit_with_registry_models(toy, tmp_path):
    models = pytest.importorskip("cytofuse.models")
    train_ds, val_ds = toy
    for fusion in ("intermediate", "late"):
        torch.manual_seed(0)
        model = models.create_model(fusion, in_channels=2, num_classes=3, encoder="smallcnn", dropout=0.1)
        result = fit(model, train_ds, val_ds, settings=_settings(max_epochs=3, late_branch_loss=0.3),
                     out_dir=tmp_path / fusion)
        assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]
        proba, _ = predict_proba(model, val_ds)
        np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)


def test_learning_rate_step_decay(toy, tmp_path):
    train_ds, val_ds = toy
    settings = _settings(max_epochs=4, lr=0.1, decay_rate=0.5, decay_steps=3, schedule="staircase", ema=False)
    result = fit(_model(), train_ds, val_ds, settings=settings, out_dir=tmp_path)
    steps = (result.history["epoch"] + 1) * 4  # 64 patches / batch 16
    np.testing.assert_allclose(result.history["lr"], 0.1 * 0.5 ** (steps // 3), rtol=1e-12)


def test_class_weights_and_late_branch_loss(toy, tmp_path):
    train_ds, val_ds = toy
    with pytest.raises(InputError, match=r"class \[2\] has no training sample"):
        sub = PatchDataset(train_ds.cache, train_ds.rows[train_ds.labels < 2], train_ds.labels[train_ds.labels < 2])
        fit(_model(), sub, val_ds, settings=_settings(), out_dir=tmp_path / "x")
    result = fit(_model(cls=TinyLate), train_ds, val_ds, settings=_settings(max_epochs=2, late_branch_loss=0.5),
                 out_dir=tmp_path / "late")
    assert np.isfinite(result.history["train_loss"]).all()


def test_bf16_mixed_precision_on_cpu(toy, tmp_path):
    train_ds, val_ds = toy
    result = fit(_model(), train_ds, val_ds, settings=_settings(max_epochs=2, precision="bf16-mixed"), out_dir=tmp_path)
    assert np.isfinite(result.history["val_loss"]).all()


def test_models_are_evaluated_on_the_device_they_trained_on():
    from cytofuse.training.fit import eval_device, on_gpu

    gpu = torch.cuda.is_available()
    assert eval_device(_settings(accelerator="cpu")) == "cpu" and not on_gpu(_settings(accelerator="cpu"))
    assert eval_device(_settings(accelerator="auto")) == ("cuda" if gpu else "cpu")
    assert on_gpu(_settings(accelerator="gpu")) == gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_on_the_gpu_in_bf16_learns_and_is_evaluated_there(toy, tmp_path):
    from cytofuse.models import create_model
    from cytofuse.training.fit import eval_device, resolve_precision

    train_ds, val_ds = toy
    settings = _settings(max_epochs=8, accelerator="gpu", bn_recalibrate=True)
    assert resolve_precision(settings) == "bf16-mixed" and eval_device(settings) == "cuda"
    torch.manual_seed(0)
    model = create_model("early", in_channels=2, num_classes=3, encoder="smallcnn", dropout=0.0)
    result = fit(model, train_ds, val_ds, settings=settings, out_dir=tmp_path)
    assert result.best_score >= 0.9 and np.isfinite(result.history["train_loss"]).all()
    assert next(model.parameters()).device.type == "cpu"  # handed back on the CPU, as on a CPU-only machine
    on_gpu, _ = predict_proba(model, val_ds, device="cuda", tta=True)
    on_cpu, _ = predict_proba(model, val_ds, device="cpu", tta=True)
    assert np.abs(on_gpu - on_cpu).max() < 1e-2 and (on_gpu.argmax(1) == on_cpu.argmax(1)).mean() >= 0.95


def test_double_augmentation_warns(toy, tmp_path):
    train_ds, val_ds = toy
    augmented = PatchDataset(train_ds.cache, train_ds.rows, train_ds.labels, augment=Augment())
    with pytest.warns(UserWarning, match="augmented twice"):
        fit(_model(), augmented, val_ds, settings=_settings(max_epochs=1, augment=Augment()), out_dir=tmp_path)


def test_weighted_sampler_trains(toy, tmp_path):
    train_ds, val_ds = toy
    result = fit(_model(), train_ds, val_ds, settings=_settings(max_epochs=2, sampler="weighted", class_weighting="none"),
                 out_dir=tmp_path)
    assert len(result.history) == 2


@pytest.mark.slow
def test_ddp_spawn_two_cpu_processes(toy, tmp_path):
    """DDP on CPU (gloo) from a plain call: strategy='ddp_spawn', devices=2."""
    train_ds, val_ds = toy
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = _settings(max_epochs=4, strategy="ddp_spawn", devices=2)
    result = fit(model, train_ds, val_ds, settings=settings, out_dir=tmp_path)
    assert result.history["epoch"].tolist() == [0, 1, 2, 3]
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.weights_path.is_file() and (tmp_path / "fit.json").is_file()


def test_a_config_of_the_last_release_gives_the_new_recipe():
    """Fields of the old recipe (patience, monitor, staircase decay) still validate; the recipe is the new one."""
    from cytofuse.config import validate_config

    old = {"data": {"images": "x"}, "train": {"max_epochs": 100, "patience": 15, "monitor": "val_loss", "lr": 0.002,
                                              "decay_steps": 100, "decay_rate": 0.95, "optimizer": "adam"}}
    s = validate_config(old).train_settings
    assert (s.max_epochs, s.schedule, s.ema, s.early_stopping, s.select) == (100, "cosine", True, False, "last")
    assert s.optimizer == "adam" and s.resolved_weight_decay == 0.0  # an explicit choice is kept
    staircase = validate_config({**old, "train": {**old["train"], "schedule": "staircase", "early_stopping": True}})
    assert staircase.train_settings.select == "best"


def test_warmup_cosine_schedule_reaches_zero_at_the_end_of_the_budget():
    from cytofuse.training.fit import _WarmupCosine

    f = _WarmupCosine(warmup=4, total=20)
    values = [f(step) for step in range(21)]
    assert values[0] == pytest.approx(0.2) and values[3] == pytest.approx(0.8)  # linear warm-up
    assert values[4] == pytest.approx(1.0) and values[20] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))  # then never increases
    assert values[12] == pytest.approx(0.5)  # half-way through the decay


def test_budget_in_optimiser_steps_and_ema_as_the_evaluated_model(toy, tmp_path):
    train_ds, val_ds = toy
    model = _model()
    result = fit(model, train_ds, val_ds, settings=_settings(max_steps=6, max_epochs=100, keep_checkpoints=True),
                 out_dir=tmp_path)
    # 4 steps per epoch (64 patches / batch 16): the budget ends inside epoch 1, validated at epoch ends only
    assert result.history["epoch"].tolist() == [0]
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    for name, value in model.state_dict().items():  # the returned model holds the weight average, not the last step
        torch.testing.assert_close(value, last["state_dict"][f"ema.{name}"])
    assert not torch.equal(last["state_dict"]["ema.head.weight"], last["state_dict"]["model.head.weight"])
    assert json.loads((tmp_path / "fit.json").read_text())["completed"] is True


def test_batchnorm_recalibration_matches_the_training_data_statistics(toy):
    from cytofuse.models import create_model
    from cytofuse.training.fit import recalibrate_batchnorm

    train_ds, _ = toy
    torch.manual_seed(0)
    model = create_model("early", in_channels=2, num_classes=3, encoder="smallcnn")
    loader = torch.utils.data.DataLoader(train_ds, batch_size=64)
    recalibrate_batchnorm(model, loader)
    first = model.encoder.blocks[0][0]
    x = torch.stack([train_ds[i][0] for i in range(len(train_ds))])
    with torch.no_grad():
        pre = first[0](x)  # the first convolution's output, which the first BatchNorm normalises
    torch.testing.assert_close(first[1].running_mean, pre.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert first[1].momentum == 0.1 and model.training  # settings restored


def test_a_fit_resumed_after_an_interruption_equals_an_uninterrupted_one(toy, tmp_path):
    """Shuffling, augmentation and dropout are seeded per epoch: resuming from the checkpoint of epoch 2
    gives the same weights, bit for bit, as training the 4 epochs at once."""
    train_ds, val_ds = toy
    settings = _settings(max_epochs=4, augment=Augment(crop_scale=0.9, gain=0.1))
    whole = _model()
    fit(whole, train_ds, val_ds, settings=settings, out_dir=tmp_path / "whole")
    part = _model()
    fit(part, train_ds, val_ds, settings=settings, out_dir=tmp_path / "part", callbacks=[StopAfter(2)])
    resumed = _model(seed=7)  # a different start: the checkpoint must supply everything
    fit(resumed, train_ds, val_ds, settings=settings, out_dir=tmp_path / "part")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("verbose", [False, True])
def test_lightning_lines_only_when_verbose(toy, tmp_path, capfd, caplog, verbose):
    """Every fold of every model used to print Lightning's device lines, a tip and the model summary."""
    import logging

    train_ds, val_ds = toy
    caplog.set_level(logging.INFO)
    fit(_model(), train_ds, val_ds, settings=_settings(max_epochs=1, verbose=verbose), out_dir=tmp_path)
    printed = "".join(capfd.readouterr()) + caplog.text  # the summary is printed, the device lines are logged
    for line in ("GPU available", "Trainable params"):
        assert (line in printed) is verbose, (line, printed[-400:])


class CheckpointSaves(Callback):
    """Records, at each epoch's start, the epoch stored in last.ckpt (None before the first save)."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(torch.load(self.path, weights_only=True)["epoch"] if self.path.is_file() else None)


@pytest.mark.parametrize("every_s, expected", [(0.0, [None, 0, 1, 2]), (3600.0, [None, None, None, None])])
def test_resumable_checkpoint_every_epoch_or_after_an_interval_and_always_at_the_end(toy, tmp_path, every_s, expected):
    train_ds, val_ds = toy
    saves = CheckpointSaves(tmp_path / "last.ckpt")
    result = fit(_model(), train_ds, val_ds, settings=_settings(max_epochs=4, checkpoint_every_s=every_s,
                                                                keep_checkpoints=True), out_dir=tmp_path, callbacks=[saves])
    assert saves.seen == expected
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)  # the end of the budget is always saved
    assert last["global_step"] == 4 * 4 and "optimizer_states" in last
    assert json.loads((tmp_path / "fit.json").read_text())["completed"] is True
    assert result.history["epoch"].tolist() == [0, 1, 2, 3]


def test_a_fit_stopped_between_interval_checkpoints_resumes_to_the_same_weights(toy, tmp_path):
    """With an hour between checkpoints, a fit stopped after epoch 2 has its state saved at the stop only;
    the resumed fit still equals the uninterrupted one, bit for bit."""
    train_ds, val_ds = toy
    settings = _settings(max_epochs=4, checkpoint_every_s=3600.0, augment=Augment(crop_scale=0.9, gain=0.1))
    whole = _model()
    fit(whole, train_ds, val_ds, settings=settings, out_dir=tmp_path / "whole")
    fit(_model(), train_ds, val_ds, settings=settings, out_dir=tmp_path / "part", callbacks=[StopAfter(2)])
    resumed, recorder = _model(seed=7), EpochRecorder()
    fit(resumed, train_ds, val_ds, settings=settings, out_dir=tmp_path / "part", callbacks=[recorder])
    assert recorder.epochs == [2, 3]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_best_checkpoint_holds_weights_only(toy, tmp_path):
    """The best epoch is evaluated, never resumed from: no optimiser state, about half of last.ckpt."""
    train_ds, val_ds = toy
    scores = [0.2, 0.9, 0.4, 0.5]
    settings = _settings(max_epochs=4, early_stopping=True, smoothing=1, min_epochs=1,  # evaluates the best epoch
                         keep_checkpoints=True)
    result = fit(_model(), train_ds, val_ds, settings=settings, out_dir=tmp_path, callbacks=[Scripted(scores)])
    best = torch.load(tmp_path / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in best and "optimizer_states" in last
    assert best["epoch"] == 1 and best["cytofuse_score"] == pytest.approx(0.9)
    assert (result.best_epoch, result.best_score) == (1, pytest.approx(0.9))
    assert (tmp_path / "best.ckpt").stat().st_size < 0.7 * (tmp_path / "last.ckpt").stat().st_size


def test_a_completed_fit_deletes_its_checkpoints_and_an_unfinished_one_keeps_them(toy, tmp_path):
    train_ds, val_ds = toy
    settings = _settings(max_epochs=4, early_stopping=True, smoothing=1, min_epochs=1, patience=50)
    fit(_model(), train_ds, val_ds, settings=settings, out_dir=tmp_path, callbacks=[StopAfter(2)])
    assert (tmp_path / "last.ckpt").is_file() and (tmp_path / "best.ckpt").is_file()  # to resume from
    assert json.loads((tmp_path / "fit.json").read_text())["completed"] is False
    recorder = EpochRecorder()
    fit(_model(), train_ds, val_ds, settings=settings, out_dir=tmp_path, callbacks=[recorder])
    assert recorder.epochs == [2, 3]
    assert not (tmp_path / "last.ckpt").exists() and not (tmp_path / "best.ckpt").exists()
    assert json.loads((tmp_path / "fit.json").read_text())["completed"] is True
    recorder = EpochRecorder()  # the completed fit is read back from its weights, not re-run
    again = fit(_model(seed=3), train_ds, val_ds, settings=settings, out_dir=tmp_path, callbacks=[recorder])
    assert recorder.epochs == [] and again.history["epoch"].tolist() == [0, 1, 2, 3]


def test_label_smoothing_and_mixup_enter_the_training_loss_only():
    from cytofuse.training.fit import ClassifierModule

    weight = np.array([1.0, 2.0, 3.0])
    module = ClassifierModule(TinyNet(), settings=_settings(label_smoothing=0.2, mixup=0.4), class_weight=weight)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -1.0, 0.0]])
    y = torch.tensor([0, 1, 2, 2])
    w = torch.tensor(weight, dtype=torch.float32)

    def smoothed(targets):  # cross-entropy against (1 - eps) one-hot + eps / K, weighted by the label's class
        q = 0.8 * F.one_hot(targets, 3) + 0.2 / 3
        per_sample = -(q * F.log_softmax(logits, 1)).sum(1) * w[targets]
        return per_sample.sum(), w[targets].sum()

    total, wsum = module._training_loss_terms(logits, y, None, 1.0)
    expected = smoothed(y)
    assert float(total) == pytest.approx(float(expected[0]), rel=1e-5) and float(wsum) == pytest.approx(float(expected[1]))
    perm = torch.tensor([3, 2, 1, 0])
    total, wsum = module._training_loss_terms(logits, y, perm, 0.7)
    a, b = smoothed(y), smoothed(y[perm])
    assert float(total) == pytest.approx(0.7 * float(a[0]) + 0.3 * float(b[0]), rel=1e-5)
    assert float(wsum) == pytest.approx(0.7 * float(a[1]) + 0.3 * float(b[1]))
    # the smoothed share does not take the other classes' weights: a rare class's weight leaves the loss of a
    # sample of another class as it is (torch's weighted smoothing would pull every sample towards it)
    rare = ClassifierModule(TinyNet(), settings=_settings(label_smoothing=0.2), class_weight=np.array([1.0, 100.0, 1.0]))
    even = ClassifierModule(TinyNet(), settings=_settings(label_smoothing=0.2), class_weight=np.ones(3))
    first = (logits[:1], y[:1])
    assert float(rare._training_loss_terms(*first, None, 1.0)[0]) == pytest.approx(float(even._training_loss_terms(*first, None, 1.0)[0]))
    # validation keeps the plain weighted cross-entropy
    plain = F.cross_entropy(logits, y, weight=w, reduction="sum")
    assert float(module._loss_terms(logits, y)[0]) == pytest.approx(float(plain), rel=1e-5)
    # mixup blends each input with one partner: every mixed sample lies on the segment between the two
    torch.manual_seed(0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    mixed, _, perm, lam = module._mixed(x, [])
    assert 0 < lam < 1 and sorted(perm.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])


def test_fit_with_mixup_and_label_smoothing_learns_and_repeats(toy, tmp_path):
    from cytofuse.training.fit import fit_key

    train_ds, val_ds = toy
    settings = _settings(max_epochs=8, mixup=0.4, label_smoothing=0.1)
    a, b = _model(), _model()
    result = fit(a, train_ds, val_ds, settings=settings, out_dir=tmp_path / "a")
    fit(b, train_ds, val_ds, settings=settings, out_dir=tmp_path / "b")
    assert result.best_score >= 0.9
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), name
    plain = _model()
    fit(plain, train_ds, val_ds, settings=_settings(max_epochs=8), out_dir=tmp_path / "plain")
    assert not torch.equal(a.head.weight, plain.head.weight)
    keys = {fit_key(_model(), train_ds, val_ds, s) for s in (_settings(), settings, _settings(mixup=0.4))}
    assert len(keys) == 3


def test_log_prior_values_and_missing_class():
    from cytofuse.training.cache import log_prior

    np.testing.assert_allclose(log_prior(np.array([0] * 30 + [1] * 10), 2), np.log([0.75, 0.25]), rtol=1e-6)
    with pytest.raises(InputError, match=r"log_prior: class \['S'\] has no training sample"):
        log_prior(np.array([0, 0, 2]), 3, class_names=["G1", "S", "G2"])


def test_logit_adjustment_enters_the_losses_not_the_evaluated_logits(toy):
    from cytofuse.training.fit import ClassifierModule

    offset = np.log([0.6, 0.3, 0.1]).astype(np.float32)
    module = ClassifierModule(TinyNet(), settings=_settings(class_weighting="logit_adjust"), logit_offset=offset)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 1, 2])
    total, weight = module._loss_terms(logits, y)
    expected = F.cross_entropy(logits + torch.from_numpy(offset), y, reduction="sum")
    assert float(total) == pytest.approx(float(expected), rel=1e-6) and float(weight) == 3.0
    # a rare class's logit is lowered in the loss, so its loss is larger than without the adjustment
    assert float(total) > float(F.cross_entropy(logits, y, reduction="sum"))
    x = torch.from_numpy(_toy_patches(4, seed=1)[0])
    module.eval()
    torch.testing.assert_close(module.evaluated(x), module.model(x))  # what is evaluated and predicted is unadjusted


def _overlapping(n: int, rare: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes told apart by a noisy brightness shift of channel 0 (overlapping: at best ~0.7 balanced
    accuracy); class 1 is the rare one."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < rare).astype(np.int64)
    level = labels * 1.0 + rng.normal(0.0, 1.0, n)
    x = rng.normal(0.0, 0.2, size=(n, 2, P, P)).astype(np.float32)
    x[:, 0] += level[:, None, None].astype(np.float32)
    return x, labels


def test_logit_adjustment_raises_the_rare_class_recall(tmp_path):
    """On overlapping classes with a 10 % minority, unweighted cross-entropy favours the majority; logit
    adjustment moves the decision to where both classes' recalls balance."""
    x, labels = _overlapping(600, 0.1, seed=0)
    train_ds, val_ds = _split_datasets(x, labels, 400, tmp_path / "cache")
    recall = {}
    for weighting in ("none", "logit_adjust"):
        model = _model(cls=lambda: TinyNet(num_classes=2))
        with warnings.catch_warnings():  # the unweighted model may end at chance: that is the point
            warnings.simplefilter("ignore", ChanceLevelWarning)
            fit(model, train_ds, val_ds, settings=_settings(max_epochs=8, lr=3e-3, class_weighting=weighting, tta=False),
                out_dir=tmp_path / weighting)
        proba, _ = predict_proba(model, val_ds, tta=False)
        pred, truth = proba.argmax(1), labels[400:]
        recall[weighting] = [float((pred[truth == k] == k).mean()) for k in (0, 1)]
    assert recall["none"][1] < 0.4 < recall["logit_adjust"][1] - 0.1, recall
    assert np.mean(recall["logit_adjust"]) > np.mean(recall["none"]), recall
