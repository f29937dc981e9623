"""The recipes of docs/architecture.md, done: a new encoder and a new fusion strategy, each reaching
configs, create_model, training and saved-model loading without touching cytofuse's own files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cytofuse.config import validate_config
from cytofuse.errors import InputError
from cytofuse.models import CytofuseModel, create_model, load_model, register_encoder, register_fusion, save_weights
from cytofuse.models import encoders as encoders_mod
from cytofuse.models import registry as registry_mod
from cytofuse.models.fusion import channel_slice, make_head


class TinyEncoder(nn.Module):
    """conv-ReLU-global pool: D = 8 features."""

    out_features = 8

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x).mean(dim=(2, 3))

    def last_block(self) -> nn.Module:
        return self.block


class MaxFusion(CytofuseModel):
    """One encoder per channel, features fused by an element-wise maximum (a late-ish pooling fusion)."""

    fusion = "maxfusion"

    def __init__(self, make_encoder, *, encoder_name, in_channels, num_classes, dropout, hidden) -> None:
        super().__init__(encoder_name=encoder_name, in_channels=in_channels, num_classes=num_classes)
        self.encoders = nn.ModuleList(make_encoder(1) for _ in range(in_channels))
        self.head = make_head(self.encoders[0].out_features, num_classes, dropout=dropout, hidden=hidden)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        feats = torch.stack([enc(channel_slice(x, i)) for i, enc in enumerate(self.encoders)])
        return feats.max(dim=0).values

    def gradcam_layers(self) -> dict[str, nn.Module]:
        return {f"ch{i}": enc.last_block() for i, enc in enumerate(self.encoders)}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(encoders_mod, "ENCODERS", dict(encoders_mod.ENCODERS))
    monkeypatch.setattr(registry_mod, "MODELS", dict(registry_mod.MODELS))
    register_encoder("tinycnn", TinyEncoder)
    register_fusion("maxfusion", MaxFusion)


def test_a_registered_encoder_and_fusion_reach_configs_models_and_saved_files(registered, tmp_path):
    cfg = validate_config({"data": {"images": "x"}, "models": [{"fusion": "maxfusion", "encoder": "tinycnn"}]})
    m = cfg.models[0]
    model = create_model(m.fusion, in_channels=3, num_classes=4, encoder=m.encoder)
    assert isinstance(model, MaxFusion) and len(model.encoders) == 3
    x = torch.rand(5, 3, 16, 16)
    assert model(x).shape == (5, 4) and model.forward_features(x).shape == (5, 8)
    save_weights(model, tmp_path / "m.safetensors")
    again = load_model(tmp_path / "m.safetensors")
    torch.testing.assert_close(again(x), model.eval()(x))


def test_a_registered_fusion_trains(registered, tmp_path):
    from cytofuse.training.fit import TrainSettings, fit

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 2, 12, 12), dtype=np.float32)
    y = np.arange(64) % 2
    x[y == 1, 1] += 1.0  # class 1: bright second channel
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    ds.labels = y
    model = create_model("maxfusion", in_channels=2, num_classes=2, encoder="tinycnn")
    result = fit(model, ds, ds, out_dir=tmp_path / "fit",
                 settings=TrainSettings(max_epochs=10, batch_size=16, lr=3e-2, ema=False, progress=False, accelerator="cpu"))
    assert result.history["val_balanced_accuracy"].iloc[-1] >= 0.9


def test_registration_refuses_clashes_and_bad_values(registered):
    with pytest.raises(InputError, match="encoder 'smallcnn' exists; pass replace=True"):
        register_encoder("smallcnn", TinyEncoder)
    with pytest.raises(InputError, match="cls must be a subclass of CytofuseModel, got <class 'int'>"):
        register_fusion("number", int)
    with pytest.raises(InputError, match="name must be an identifier such as 'tinycnn', got 'two words'"):
        register_encoder("two words", TinyEncoder)
    with pytest.raises(Exception, match=r"fusion must be one of \['early', 'intermediate', 'late', 'single', 'maxfusion'\], got 'mid'"):
        validate_config({"data": {"images": "x"}, "models": [{"fusion": "mid"}]})


def test_a_registered_reader_serves_read_image_probe_and_image_folders(monkeypatch, tmp_path):
    """A made-up text format: first line the channel names, then one 'c z y x value' line per pixel."""
    from cytofuse.io import readers
    from cytofuse.io.imagesets import ImageSet
    from cytofuse.io.readers import Image, probe_image, read_image, register_reader

    monkeypatch.setattr(readers, "_FORMATS", dict(readers._FORMATS))

    def read_pix(path, axes):
        lines = path.read_text().splitlines()
        rows = np.array([[float(v) for v in line.split()] for line in lines[1:]])
        data = np.zeros((2, 1, 3, 4), dtype=np.float32)
        data[tuple(rows[:, :4].astype(int).T)] = rows[:, 4]
        return Image(data, tuple(lines[0].split()), (None, 0.5, 0.5), str(path), {"format": "pix"})

    register_reader(".pix", read_pix)
    for label, value in (("a", 7), ("b", 9)):
        (tmp_path / label).mkdir()
        (tmp_path / label / "one.pix").write_text(f"DNA actin\n1 0 2 3 {value}\n0 0 0 0 1\n")
    image = read_image(tmp_path / "a" / "one.pix")
    assert image.channel_names == ("DNA", "actin") and image.data.shape == (2, 1, 3, 4)
    assert image.data[1, 0, 2, 3] == 7 and image.data.sum() == 8
    assert probe_image(tmp_path / "b" / "one.pix").shape == (2, 1, 3, 4)
    found = ImageSet.from_folder(tmp_path)
    assert sorted(r.label for r in found) == ["a", "b"] and found.read(found.records[1]).data[1, 0, 2, 3] == 9
    from types import SimpleNamespace

    flat = SimpleNamespace(data=np.zeros((3, 4), np.float32), channel_names=("x",), pixel_size_um=(None,) * 3, metadata={})
    register_reader(".flat", lambda path, axes: flat)  # not an Image: cytofuse checks the array itself
    (tmp_path / "one.flat").write_text("x")
    with pytest.raises(InputError, match=r"one.flat: the reader registered for .flat returned 2-D data of shape \(3, 4\)"):
        read_image(tmp_path / "one.flat")
    with pytest.raises(InputError, match="register_reader: .pix files are read already; pass replace=True"):
        register_reader(".pix", read_pix)


def test_a_registered_report_section_is_rendered_from_the_run_folder(synthetic_set, tmp_path, monkeypatch):
    import pandas as pd

    from cytofuse.evaluation import report as report_mod
    from cytofuse.evaluation.report import Section, register_section, write_report
    from cytofuse.workflows.cv import run_cv

    monkeypatch.setattr(report_mod, "SECTIONS", [])
    torch.set_num_threads(1)
    cfg = validate_config({
        "data": {"manifest": str(synthetic_set / "labels.csv")},
        "patches": {"size": 32, "min_ratio": 0.0, "max_per_image": 4},
        "models": [{"fusion": "early", "name": "early"}],
        "train": {"max_epochs": 1, "batch_size": 8, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": 2, "baseline": False, "probes": False},
    })
    run_cv(cfg, tmp_path / "run", progress=False)

    def fold_sizes(run):  # patches per CV fold, read from the run's own folds table
        folds = pd.read_csv(run.folds)
        return Section("Patches per fold", "Test patches in each fold.", folds.groupby("fold").size().rename("patches").reset_index())

    register_section(fold_sizes)
    register_section(lambda run: None)  # nothing to show for this run: no section
    html = write_report(tmp_path / "run").read_text()
    n = pd.read_csv(tmp_path / "run" / "folds.csv").groupby("fold").size().tolist()
    assert "<h2" in html and "Patches per fold</h2>" in html and "Test patches in each fold." in html
    for count in n:
        assert f">{count}</td>" in html
    with pytest.raises(InputError, match="build must be callable"):
        register_section("fold_sizes")


def test_config_knows_the_built_in_names_without_importing_torch():
    """Before the registry is imported, configs check against its built-in names (the patch stage needs no torch)."""
    import subprocess
    import sys

    from cytofuse.config import BUILTIN_ENCODERS, BUILTIN_FUSIONS
    from cytofuse.models.encoders import list_encoders
    from cytofuse.models.registry import list_models

    assert list(BUILTIN_FUSIONS) == list_models() and list(BUILTIN_ENCODERS) == list_encoders()
    code = ("import sys; from cytofuse.config import validate_config; "
            "validate_config({'data': {'images': 'x'}, 'models': [{'fusion': 'late', 'encoder': 'resnet18'}]}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
