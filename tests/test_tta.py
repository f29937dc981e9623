"""Test-time augmentation over the 8 dihedral transforms: invariance, CV/predict/export parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cytofuse.models import create_model
from cytofuse.models.tta import DIHEDRAL_CODES, DihedralTTA, dihedral, tta_proba


class Asymmetric(torch.nn.Module):
    """A classifier that sees where things are (no pooling): its raw output depends on orientation."""

    in_channels, num_classes = 2, 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, stride=4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Asymmetric().eval()


def test_registry_models_work_with_tta():
    torch.manual_seed(0)
    net = create_model("intermediate", in_channels=2, num_classes=3, encoder="smallcnn").eval()
    with torch.no_grad():
        p = tta_proba(net, torch.rand(2, 2, 32, 32).contiguous(memory_format=torch.channels_last))
    assert p.shape == (2, 3) and torch.allclose(p.sum(1), torch.ones(2))


def test_the_eight_transforms_are_distinct_and_invertible():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    outs = {tuple(dihedral(x, c).flatten().tolist()) for c in DIHEDRAL_CODES}
    assert len(outs) == 8  # the dihedral group of the square has 8 elements


def test_tta_probabilities_do_not_depend_on_orientation(model):
    x = torch.rand(5, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = torch.softmax(model(x), 1)
        base = tta_proba(model, x)
        for code in DIHEDRAL_CODES:
            torch.testing.assert_close(tta_proba(model, dihedral(x, code)), base, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(torch.softmax(model(x.flip(-1)), 1), plain, atol=1e-3)  # the model alone is not invariant
        torch.testing.assert_close(base.sum(1), torch.ones(5))
        torch.testing.assert_close(tta_proba(model, x, tta=False), plain)


def test_predict_proba_with_tta_is_the_mean_over_transforms(model):
    from cytofuse.training.fit import predict_proba

    x = torch.rand(6, 2, 32, 32, generator=torch.Generator().manual_seed(2))
    ds = torch.utils.data.TensorDataset(x, torch.zeros(6, dtype=torch.long))
    proba, _ = predict_proba(model, ds, batch_size=4, tta=True)
    with torch.no_grad():
        want = torch.stack([torch.softmax(model(dihedral(x, c)), 1) for c in DIHEDRAL_CODES]).mean(0)
    np.testing.assert_allclose(proba, want.numpy(), rtol=1e-4, atol=1e-5)


# the legacy TorchScript-based ONNX exporter warns about itself inside torch (see test_export.py)
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
def test_exported_onnx_graph_averages_the_transforms(model, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from cytofuse.export import as_probability_model, export_onnx

    wrapped = as_probability_model(model, tta=True)
    assert isinstance(wrapped.members[0], DihedralTTA)
    path = export_onnx(wrapped, tmp_path / "m.onnx", patch_size=32)
    x = np.random.default_rng(3).random((3, 2, 32, 32), dtype=np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = tta_proba(model, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
