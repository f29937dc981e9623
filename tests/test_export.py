import hashlib
import json
import re

import numpy as np
import pytest
import torch
import yaml

from cytofuse.errors import CytofuseError, InputError, RunFolderError
from cytofuse.export import (
    FILE_NAMES,
    INPUT_NAME,
    OUTPUT_NAME,
    as_probability_model,
    export_model_folder,
    export_onnx,
    export_torchscript,
    load_exported,
    max_abs_difference,
    read_exported_metadata,
    run_exported,
)
from cytofuse.inference.modelfolder import card_for, read_card, write_model_folder
from cytofuse.runs import MARKER
from cytofuse.models import create_model
from cytofuse.preprocess.patches import PatchSettings, extract_patches

# torch 2.13 deprecates TorchScript (trace, save, load) and the legacy ONNX exporter built on it,
# and says so with DeprecationWarnings raised inside torch; they are not about our code.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

FUSIONS = ["early", "intermediate", "late", "single"]
CLASSES = ["control", "drug-a", "drug-b"]
CHANNELS = ["red", "green", "blue"]
P = 64


def _model(name: str, *, encoder: str = "smallcnn", seed: int = 0, k: int = 3):
    torch.manual_seed(seed)
    extra = {"channel": 1} if name == "single" else {}
    model = create_model(name, in_channels=3, num_classes=k, encoder=encoder, **extra)
    if name == "late":  # unequal branch weights, so the fusion weights are really exported
        model.set_branch_weights([0.6, 0.3, 0.1])
    _calibrate(model)
    _sharpen(model)
    return model.eval()


def _calibrate(model) -> None:
    """BatchNorm statistics of the synthetic patches: with the initial ones (mean 0, variance 1) a
    random deep encoder maps every patch to nearly the same features."""
    from cytofuse.training.fit import recalibrate_batchnorm

    x = torch.from_numpy(_synthetic_patches(16))
    recalibrate_batchnorm(model, [(x, None)])


def _sharpen(model, gain: float = 200.0) -> None:
    """Scale the heads' linear layers: random models give near-uniform probabilities, where
    softmax hides differences; confident, patch-dependent outputs make parity tests stricter."""
    with torch.no_grad():
        for layer in model.head.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(gain)


def _synthetic_patches(n: int, seed: int = 0) -> np.ndarray:
    """Normalised-range patches: smooth blobs over a dark field, different per channel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:P, 0:P]
    out = np.zeros((n, 3, P, P), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            cy, cx = rng.uniform(8, P - 8, size=2)
            out[i, c] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (4 + 4 * c) ** 2))
    return out + rng.normal(0, 0.02, out.shape).astype(np.float32)


def _probabilities(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()


def _export(fmt: str, model, path, **kw):
    fn = export_onnx if fmt == "onnx" else export_torchscript
    return fn(model, path / FILE_NAMES[fmt], patch_size=P, **kw)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", FUSIONS)
def test_exported_probabilities_match_pytorch_for_batches_1_and_7(name, fmt, tmp_path):
    model = _model(name)
    file = _export(fmt, model, tmp_path)
    x = _synthetic_patches(7)
    want, run = _probabilities(model, x), load_exported(file)
    for n in (1, 7):
        got = run(x[:n])
        assert got.shape == (n, 3)
        assert np.abs(got - want[:n]).max() < 1e-4
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert np.ptp(want, axis=0).max() > 0.02  # the patches really get different answers


def test_export_leaves_the_model_as_it_was(tmp_path):
    model = _model("intermediate").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", patch_size=P)
    export_torchscript(model, tmp_path / "m.pt", patch_size=P)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # exported in eval mode (dropout off, BN running statistics) whatever the caller's mode
    x = _synthetic_patches(4)
    assert max_abs_difference(model.eval(), tmp_path / "m.pt", x) < 1e-4


def test_late_fusion_exports_the_fused_probabilities(tmp_path):
    model = _model("late")
    file = export_onnx(model, tmp_path / "late.onnx", patch_size=P)
    x = _synthetic_patches(5)
    with torch.no_grad():
        branches = torch.softmax(model.forward_branches(torch.from_numpy(x)), dim=2)
        fused = (branches * torch.tensor([0.6, 0.3, 0.1]).view(1, 3, 1)).sum(dim=1).numpy()
    np.testing.assert_allclose(run_exported(file, x), fused, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_ensemble_is_one_graph_of_mean_probabilities(fmt, tmp_path):
    models = [_model("early", seed=1), _model("intermediate", seed=2)]
    file = _export(fmt, models, tmp_path)
    x = _synthetic_patches(6)
    want = (_probabilities(models[0], x) + _probabilities(models[1], x)) / 2
    assert np.abs(run_exported(file, x) - want).max() < 1e-5
    assert np.abs(want - _probabilities(models[0], x)).max() > 1e-3  # the mean differs from a member


def test_onnx_graph_names_axes_and_opset(tmp_path):
    import onnx

    file = export_onnx(_model("early"), tmp_path / "m.onnx", patch_size=P, opset=17,
                       metadata={"class_names": CLASSES, "note": "text"})
    graph = onnx.load(str(file))
    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, P, P]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 3]
    assert {o.domain: o.version for o in graph.opset_import}[""] == 17
    assert read_exported_metadata(file) == {"class_names": CLASSES, "note": "text"}
    assert not list(tmp_path.glob(".*tmp"))


def test_torchscript_keeps_metadata(tmp_path):
    file = export_torchscript(_model("single"), tmp_path / "m.pt", patch_size=P, metadata={"patch_size": P})
    assert read_exported_metadata(file) == {"patch_size": P}


def test_export_argument_errors(tmp_path):
    model = _model("early")
    with pytest.raises(InputError, match=r"patch_size must be an int >= 8 .*, got 0"):
        export_onnx(model, tmp_path / "m.onnx", patch_size=0)
    with pytest.raises(InputError, match=r"patch_size must be an int >= 8 .*, got 64\.0"):
        export_torchscript(model, tmp_path / "m.pt", patch_size=64.0)
    with pytest.raises(InputError, match=r"opset must be an int >= 13, got 9"):
        export_onnx(model, tmp_path / "m.onnx", patch_size=P, opset=9)
    with pytest.raises(InputError, match=r"same in_channels and num_classes"):
        as_probability_model([model, _model("early", k=4)])
    with pytest.raises(InputError, match=r"non-empty list"):
        as_probability_model([])
    with pytest.raises(InputError, match="exported model file not found"):
        run_exported(tmp_path / "absent.onnx", _synthetic_patches(1))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- model folders and rdf.yaml


def _model_folder(path, models, size: int = P):
    settings = PatchSettings(size=size, percentiles=(2.0, 99.5))
    card = card_for(models, class_names=CLASSES, channel_names=CHANNELS, patches=settings,
                    trained_on={"images": 12})
    return write_model_folder(path, models, card)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


PACKAGE_FILES = ["README.md", "cover.png", "rdf.yaml", "sample_input.tif", "sample_output.tif", "test_input.npy",
                 "test_output.npy"]


def test_export_model_folder_writes_both_formats_rdf_and_card(tmp_path):
    model_dir = _model_folder(tmp_path / "model", [_model("late")])
    files = export_model_folder(model_dir, tmp_path / "export")
    assert set(files) == {"onnx", "torchscript", "rdf", "card"}
    written = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert written == sorted([MARKER, "model.onnx", "model.pt", "model.yaml", *PACKAGE_FILES])
    assert read_card(tmp_path / "export").class_names == CLASSES
    x = _synthetic_patches(7)
    (model,) = [_model("late")]
    for fmt in ("onnx", "torchscript"):
        assert max_abs_difference(model, files[fmt], x) < 1e-4
        meta = read_exported_metadata(files[fmt])
        assert meta["class_names"] == CLASSES and meta["patch_size"] == P
        assert meta["normalisation"] == {"method": "percentile", "percentiles": [2.0, 99.5]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "model"]  # no temporary folder left


def test_rdf_lists_class_names_axes_normalised_input_and_hashes(tmp_path):
    model_dir = _model_folder(tmp_path / "model", [_model("early", seed=1), _model("early", seed=2)])
    files = export_model_folder(model_dir, tmp_path / "export", verify=False)
    rdf = yaml.safe_load(files["rdf"].read_text())
    assert rdf["type"] == "model" and "ensemble of 2 fold models" in rdf["description"]
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    assert inp["id"] == INPUT_NAME and inp["data"] == {"type": "float32"}
    assert [a.get("id", a["type"]) for a in inp["axes"]] == ["batch", "channel", "y", "x"]
    assert inp["axes"][1]["channel_names"] == CHANNELS
    assert [a.get("size") for a in inp["axes"][2:]] == [P, P]
    # per-image percentiles cannot be computed from a patch: the input is declared normalised, no scale_range
    assert {step["id"] for step in inp["preprocessing"]} == {"ensure_dtype"}
    assert "p2" in inp["description"] and "p99.5" in inp["description"] and "WHOLE image" in inp["description"]
    assert out["id"] == OUTPUT_NAME and out["axes"][1]["channel_names"] == CLASSES
    assert rdf["config"]["cytofuse"]["class_names"] == CLASSES
    assert rdf["config"]["cytofuse"]["ensemble_members"] == 2
    weights = rdf["weights"]
    assert weights["onnx"]["source"] == "model.onnx" and weights["onnx"]["sha256"] == _sha(files["onnx"])
    assert weights["onnx"]["opset_version"] == 17 and "parent" not in weights["onnx"]
    assert weights["torchscript"]["source"] == "model.pt" and weights["torchscript"]["parent"] == "onnx"
    assert weights["torchscript"]["sha256"] == _sha(files["torchscript"])
    assert weights["torchscript"]["pytorch_version"] == torch.__version__.split("+")[0]


def test_export_model_folder_one_format_and_overwrite(tmp_path):
    model_dir = _model_folder(tmp_path / "model", [_model("intermediate")])
    files = export_model_folder(model_dir, tmp_path / "export", formats=["torchscript"], verify=False)
    assert set(files) == {"torchscript", "rdf", "card"}
    assert set(yaml.safe_load(files["rdf"].read_text())["weights"]) == {"torchscript"}
    with pytest.raises(RunFolderError, match=re.escape(f"export folder {tmp_path / 'export'} exists")):
        export_model_folder(model_dir, tmp_path / "export", formats=["onnx"])
    files = export_model_folder(model_dir, tmp_path / "export", formats=["onnx"], overwrite=True, verify=False,
                                bioimageio=False)
    assert set(files) == {"onnx", "card"}
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [MARKER, "model.onnx", "model.yaml"]


def test_export_model_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError, match=re.escape(f"model folder {missing} does not exist")):
        export_model_folder(missing, tmp_path / "export")
    model_dir = _model_folder(tmp_path / "model", [_model("early")])
    msg = r"formats must be a non-empty list of \['onnx', 'torchscript'\], got \['onnx', 'tflite'\]"
    with pytest.raises(InputError, match=msg):
        export_model_folder(model_dir, tmp_path / "export", formats=("onnx", "tflite"))
    with pytest.raises(InputError, match=r"formats must be a non-empty list"):
        export_model_folder(model_dir, tmp_path / "export", formats=())
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(InputError, match="is not a cytofuse model folder"):
        export_model_folder(tmp_path / "not-a-model", tmp_path / "export")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"notes exists and is not a cytofuse export folder \(it has no \.cytofuse-run"):
        export_model_folder(model_dir, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "not-a-model", "notes"]


# --------------------------------------------------------------------------- real patches


def _real_patches(real_data, n: int = 7) -> np.ndarray:
    """Normalised 64 px patches of hela-cells.tif, percentiles of the whole image, Otsu-filtered."""
    from cytofuse.io.readers import read_image

    image = read_image(real_data / "unlabelled-multichannel" / "hela-cells.tif")
    settings = PatchSettings(size=P, min_ratio=0.2)
    kept = extract_patches(image.data, channel_names=image.channel_names, settings=settings)
    assert kept.n_kept >= n
    lo, hi = kept.low[:, None, None], kept.high[:, None, None]
    scale = 1.0 / np.maximum(hi - lo, 1e-6)
    patches = [(image.data[:, z, y : y + P, x : x + P] - lo) * scale for z, y, x in kept.origins[:n]]
    return np.stack(patches).astype(np.float32)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize(("name", "encoder"), [(f, "smallcnn") for f in FUSIONS] + [("intermediate", "resnet18")])
def test_parity_on_real_patches(real_data, name, encoder, tmp_path):
    x = _real_patches(real_data)
    assert 0.2 < float(x.mean()) < 0.8 and x.shape == (7, 3, P, P)
    model = _model(name, encoder=encoder)
    from cytofuse.training.fit import recalibrate_batchnorm

    recalibrate_batchnorm(model, [(torch.from_numpy(x), None)]).eval()  # statistics of these patches, as training gives
    assert np.ptp(_probabilities(model, x), axis=0).max() > 0.1  # answers differ between patches
    for fmt in ("onnx", "torchscript"):
        file = _export(fmt, model, tmp_path)
        assert max_abs_difference(model, file, x, batch_sizes=(1, 7)) < 1e-4, fmt
    assert json.dumps(read_exported_metadata(tmp_path / "model.pt")) == "{}"


def test_a_failed_parity_check_leaves_no_export_folder(tmp_path, monkeypatch):
    import cytofuse.export as export

    model_dir = _model_folder(tmp_path / "model", [_model("early")])
    monkeypatch.setattr(export, "max_abs_difference", lambda *a, **k: 3e-3)
    with pytest.raises(CytofuseError, match=r"exported onnx file model.onnx differs from PyTorch by 3.00e-03"):
        export_model_folder(model_dir, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
