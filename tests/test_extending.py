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
