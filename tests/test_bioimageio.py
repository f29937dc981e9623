"""bioimage.io packages of `cytofuse export`: built with bioimageio.spec, valid offline, reproducible, and
declaring the very normalisation cytofuse applies."""

import json
import socket

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("bioimageio.spec", reason='needs the bioimageio extra: pip install -e ".[bioimageio]"')

from cytofuse.bioimageio import PLACEHOLDER_CITE, check_package, parse_author, parse_cite, quiet_file_handles  # noqa: E402
from cytofuse.errors import InputError  # noqa: E402
from cytofuse.evaluation.metrics import evaluate_run  # noqa: E402
from cytofuse.export import export_model_folder, run_exported  # noqa: E402
from cytofuse.inference.modelfolder import card_for, write_model_folder  # noqa: E402
from cytofuse.io.readers import Image, write_ome_tiff  # noqa: E402
from cytofuse.models import create_model  # noqa: E402
from cytofuse.preprocess.patches import PatchSettings, cut_patches  # noqa: E402
from cytofuse.preprocess.recipe import Normalisation  # noqa: E402
from cytofuse.runs import RunFolder  # noqa: E402
from cytofuse.training.fit import recalibrate_batchnorm  # noqa: E402

# torch 2.13 deprecates TorchScript and the legacy ONNX exporter, and says so inside torch
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

P = 32
CLASSES = ["control", "drug-a", "drug-b"]
CHANNELS = ["red", "green"]
NAME = "intermediate smallcnn"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network (bioimageio can fetch things): any connection fails loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _image(seed: int = 0) -> Image:
    """A (2, 2, 96, 96) uint16 stack: bright blobs on a dim noisy field."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:96]
    data = rng.integers(90, 110, (2, 2, 96, 96)).astype(np.float64)
    for c in range(2):
        for cy, cx in rng.uniform(10, 86, (4, 2)):
            data[c] += (1500 + 800 * c) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 7.0**2))[None]
    return Image(data.astype(np.uint16), tuple(CHANNELS), (1.0, 0.5, 0.5), "blobs.ome.tif")


def _model_folder(path, *, scope: str, members: int = 1):
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        model = create_model("intermediate", in_channels=2, num_classes=3, encoder="smallcnn")
        x = torch.from_numpy(np.random.default_rng(seed).random((8, 2, P, P), dtype=np.float32))
        recalibrate_batchnorm(model, [(x, None)])  # with BatchNorm's initial statistics every patch looks alike
        model.eval()
        with torch.no_grad():  # confident answers, so reproduction is a real check
            for layer in model.head.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.mul_(200)
        models.append(model)
    settings = PatchSettings(size=P, stride=P, min_ratio=0.05, percentiles=(1.0, 99.8))
    norm = None
    if scope == "dataset":
        norm = Normalisation(scope="dataset", percentiles=(1.0, 99.8), channels=CHANNELS, low=[95.0, 98.0],
                             high=[1200.0, 1900.0], measured_on="the training split's patches")
    card = card_for(models, class_names=CLASSES, channel_names=CHANNELS, patches=settings, normalisation=norm,
                    trained_on={"images": 8, "model_name": NAME})
    return write_model_folder(path, models, card)


def _cv_run(path):
    """A CV run folder holding only the model's metrics.json, computed by cytofuse from made-up predictions."""
    rng = np.random.default_rng(0)
    rows = []
    for fold in range(2):
        for image in range(6):
            truth = image % 3
            for _ in range(4):
                p = rng.dirichlet(np.ones(3))
                p[truth] += 0.4
                rows.append({"fold": fold, "image_id": f"f{fold}i{image}", "group": f"g{fold}{image}", "y_true": truth,
                             **{f"prob_{c}": v for c, v in zip(CLASSES, p / p.sum())}})
    metrics = {"cv": evaluate_run(pd.DataFrame(rows), classes=CLASSES),
               "measured_on": "2-fold CV grouped by the image set's group column: 48 test patches from 12 images"}
    folder = RunFolder(path).model(NAME).root
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return path, metrics


def _export(tmp_path, *, scope: str = "dataset", **kw):
    model_dir = _model_folder(tmp_path / "model", scope=scope)
    image = _image()
    files = export_model_folder(model_dir, tmp_path / "export", sample_image=image, **kw)
    return files, image


def _apply_declared_preprocessing(descr, tensor: np.ndarray) -> np.ndarray:
    """The input preprocessing a bioimage.io consumer applies, read from the package's description."""
    axes = [str(a.id) for a in descr.inputs[0].axes]
    out = tensor
    for step in descr.inputs[0].preprocessing:
        kw = step.kwargs
        if step.id == "ensure_dtype":
            out = out.astype(str(kw.dtype))
        elif step.id == "scale_linear":
            shape = [1] * out.ndim
            shape[axes.index(str(kw.axis))] = -1
            out = out * np.reshape(kw.gain, shape) + np.reshape(kw.offset, shape)
        elif step.id == "clip":
            out = np.clip(out, kw.min, kw.max)
        else:
            raise AssertionError(f"unexpected preprocessing {step.id}")
    return out


def test_package_validates_offline_with_its_files_authors_and_validation_section(tmp_path):
    run, metrics = _cv_run(tmp_path / "run")
    files, _ = _export(tmp_path, cv_run=run, authors=["Ada Lovelace;Analytical Engines Ltd"],
                       cite=["Yee et al., organelle-aware fusion;10.1007/s13755-026-00400-1"])
    export = tmp_path / "export"
    assert files["rdf"] == export / "rdf.yaml"
    assert {p.name for p in export.iterdir()} >= {"rdf.yaml", "model.onnx", "model.pt", "model.yaml", "README.md",
                                                  "cover.png", "test_input.npy", "test_output.npy"}
    descr = check_package(files["rdf"])  # format + IO checks (hashes, tensors, cover, README)
    assert descr.validation_summary.status == "valid-format"
    assert not [d for d in descr.validation_summary.details if d.errors]
    assert ":" not in descr.name and "," not in descr.name and len(descr.description) <= 512
    assert len(descr.inputs[0].description) <= 128
    assert descr.weights.onnx.parent is None and descr.weights.torchscript.parent == "onnx"
    assert [(a.name, a.affiliation) for a in descr.authors] == [("Ada Lovelace", "Analytical Engines Ltd")]
    assert str(descr.cite[0].doi) == "10.1007/s13755-026-00400-1"
    assert [c for a in descr.outputs[0].axes if a.type == "channel" for c in a.channel_names] == CLASSES
    readme = (export / "README.md").read_text()
    ba = metrics["cv"]["image"]["summary"]["balanced_accuracy"]
    assert "## Validation" in readme and f"{ba['mean']:.3f} ± {ba['sd']:.3f}" in readme
    assert metrics["measured_on"] in readme and "PLACEHOLDER" not in readme
    from PIL import Image as PILImage

    with PILImage.open(export / "cover.png") as cover:
        assert cover.format == "PNG" and cover.size[0] == 2 * cover.size[1]
        assert len(set(np.asarray(cover.convert("L")).ravel().tolist())) > 10  # drawn, not blank
    raw = yaml.safe_load(files["rdf"].read_text())
    assert raw["config"]["cytofuse"]["class_names"] == CLASSES
    assert not list(tmp_path.glob(".*"))  # no temporary folder left beside the export


def test_declared_scale_linear_reproduces_cytofuse_normalisation_of_the_raw_patch(tmp_path):
    files, image = _export(tmp_path, scope="dataset")
    descr = check_package(files["rdf"])
    raw = np.load(tmp_path / "export" / "test_input.npy")
    assert raw.shape == (1, 2, P, P) and raw.max() > 500  # raw intensities, not normalised ones
    # the raw test input is a real patch of the sample image
    assert any(np.array_equal(raw[0], image.data[:, z, y : y + P, x : x + P])
               for z in range(2) for y in range(0, 96 - P + 1, P) for x in range(0, 96 - P + 1, P))
    declared = _apply_declared_preprocessing(descr, raw)
    low, high = np.array([95.0, 98.0]), np.array([1200.0, 1900.0])
    ours = cut_patches(raw[0][:, None], np.zeros((1, 3), np.int64), low, high, size=P)  # cytofuse's own kernel
    np.testing.assert_allclose(declared, ours, rtol=0, atol=1e-5)
    assert np.ptp(declared) > 0.5  # a real range, not a constant


def test_per_image_scope_declares_normalised_input_and_documents_the_recipe(tmp_path):
    files, image = _export(tmp_path, scope="image")
    descr = check_package(files["rdf"])
    assert {s.id for s in descr.inputs[0].preprocessing} == {"ensure_dtype"}  # no normalisation step
    x = np.load(tmp_path / "export" / "test_input.npy")
    from cytofuse.preprocess.patches import channel_statistics

    _, low, high = channel_statistics(image.data, percentiles=(1.0, 99.8))  # the whole image's percentiles
    matches = [cut_patches(image.data, np.array([[z, y, xx]]), low, high, size=P)
               for z in range(2) for y in range(0, 96 - P + 1, P) for xx in range(0, 96 - P + 1, P)]
    assert min(np.abs(m - x).max() for m in matches) < 1e-6
    readme = (tmp_path / "export" / "README.md").read_text()
    assert "WHOLE image" in readme and "ALREADY NORMALISED" in readme and "WHOLE image" in descr.inputs[0].description


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_weights_reproduce_the_test_output_from_the_test_input(tmp_path, fmt):
    files, _ = _export(tmp_path, formats=["onnx", "torchscript"])
    descr = check_package(files["rdf"])
    x = _apply_declared_preprocessing(descr, np.load(tmp_path / "export" / "test_input.npy"))
    want = np.load(tmp_path / "export" / "test_output.npy")
    assert want.shape == (1, 3) and abs(float(want.sum()) - 1) < 1e-5 and want.max() > 0.5
    np.testing.assert_allclose(run_exported(files[fmt], x), want, rtol=0, atol=1e-5)


def test_bioimageio_core_model_test_passes_for_onnx_and_torchscript(tmp_path):
    core = pytest.importorskip("bioimageio.core", reason='needs the bioimageio-test extra (bioimageio.core)')
    files, _ = _export(tmp_path)
    with quiet_file_handles():  # bioimageio's readers leave files to the garbage collector
        summary = core.test_model(files["rdf"])
    assert summary.status == "passed", summary.format()
    reproduced = {d.loc[-1] for d in summary.details if d.name.startswith("Reproduce test outputs") and d.status == "passed"}
    assert reproduced == {"onnx", "torchscript"}


def test_placeholders_validate_and_say_so_and_a_lone_format_is_the_original(tmp_path):
    files, _ = _export(tmp_path, formats=["torchscript"])
    descr = check_package(files["rdf"])
    assert descr.weights.onnx is None and descr.weights.torchscript.parent is None
    assert str(descr.cite[0].doi) == PLACEHOLDER_CITE[1] and "placeholder" in descr.authors[0].name
    readme = (tmp_path / "export" / "README.md").read_text()
    assert "PLACEHOLDERS" in readme and "No cross-validation metrics" in readme


def test_without_a_sample_image_the_test_patch_is_synthetic_and_said_to_be(tmp_path):
    model_dir = _model_folder(tmp_path / "model", scope="dataset", members=2)
    files = export_model_folder(model_dir, tmp_path / "export", formats=["onnx"])
    check_package(files["rdf"])
    assert "synthetic" in (tmp_path / "export" / "README.md").read_text()
    assert "ensemble of 2 fold models" in yaml.safe_load(files["rdf"].read_text())["description"]


def test_a_cv_run_gives_its_first_image_as_the_test_patch(tmp_path):
    """The run's config names the images (here a manifest) and its patch index the image ids."""
    image = _image(seed=3)
    (tmp_path / "images").mkdir()
    for i in range(2):
        write_ome_tiff(tmp_path / "images" / f"img{i}.ome.tif", image)
    (tmp_path / "labels.csv").write_text("path,label\nimages/img0.ome.tif,a\nimages/img1.ome.tif,b\n")
    run, _ = _cv_run(tmp_path / "run")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"manifest": str(tmp_path / "labels.csv")}}))
    from cytofuse.io.imagesets import ImageSet

    ids = [r.image_id for r in ImageSet.from_manifest(tmp_path / "labels.csv")]
    pd.DataFrame({"image_id": ids[::-1], "z": [0, 0], "y": [0, 0], "x": [0, 0]}).to_parquet(RunFolder(run).patches)
    model_dir = _model_folder(tmp_path / "model", scope="dataset")
    export_model_folder(model_dir, tmp_path / "export", cv_run=run, formats=["onnx"])
    readme = (tmp_path / "export" / "README.md").read_text()
    assert f"a patch of {tmp_path / 'images' / 'img0.ome.tif'} at (z, y, x)" in readme and "synthetic" not in readme
    raw = np.load(tmp_path / "export" / "test_input.npy")[0]
    assert any(np.array_equal(raw, image.data[:, z, y : y + P, x : x + P])
               for z in range(2) for y in range(0, 96 - P + 1, P) for x in range(0, 96 - P + 1, P))


def test_bad_author_or_cite_flags_are_refused_before_any_work(tmp_path):
    model_dir = _model_folder(tmp_path / "model", scope="dataset")
    with pytest.raises(InputError, match=r'--author must be "Name;affiliation".*got \'a/b;x\''):
        export_model_folder(model_dir, tmp_path / "export", authors=["a/b;x"])
    with pytest.raises(InputError, match=r'--cite must be "text;doi".*got \'paper;not-a-doi\''):
        export_model_folder(model_dir, tmp_path / "export", cite=["paper;not-a-doi"])
    assert not (tmp_path / "export").exists()
    assert parse_author("Ada;  ") == ("Ada", None)
    assert parse_cite("A; B;https://doi.org/10.1234/x.y") == ("A; B", "10.1234/x.y")
