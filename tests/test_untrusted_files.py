"""Files cytofuse reads back are data only: a planted pickle never runs, and the package never unpickles.

Each test plants a payload whose unpickling would create a marker file, in a place where
cytofuse reads a file back, and checks that the marker is never created.
"""

from __future__ import annotations

import ast
import json
import pathlib
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cytofuse
from cytofuse.preprocess.emptyfilter import EmptyFilter, SVMArrays
from cytofuse.errors import InputError


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Payload(marker)))
    return path


def test_the_payload_runs_when_unpickled(tmp_path):
    """The payload is live: unpickling it does create the marker (so its absence below means something)."""
    pickle.loads(_plant(tmp_path / "p.pkl", tmp_path / "ran").read_bytes())
    assert (tmp_path / "ran").is_file()


# --------------------------------------------------------------------------- the empty filter's SVM as arrays


def _features(n: int = 120, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    x = rng.normal(0.0, 1.0, (n, d)) * rng.uniform(0.5, 20.0, d) + 3.0 * labels[:, None]
    return x.astype(np.float32), labels


@pytest.mark.parametrize("one_class", [False, True])
def test_svm_arrays_reproduce_the_fitted_sklearn_pipeline(one_class):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, OneClassSVM

    x, y = _features()
    test, _ = _features(80, seed=1)
    if one_class:
        fitted = make_pipeline(StandardScaler(), OneClassSVM(kernel="rbf", nu=0.1, gamma="scale")).fit(x[y])
    else:
        fitted = make_pipeline(StandardScaler(), SVC(kernel="rbf", gamma="scale", class_weight="balanced")).fit(x, y)
    arrays = SVMArrays.from_pipeline(fitted)
    want = fitted.decision_function(test)
    assert np.abs(arrays.decision_function(test) - want).max() < 1e-6
    assert np.abs(arrays.decision_function(test.astype(np.float64)) - fitted.decision_function(test.astype(np.float64))).max() < 1e-6
    np.testing.assert_array_equal(arrays.predict(test), fitted.predict(test))
    assert 0 < (want > 0).sum() < len(want)  # both signs occur: the comparison covers the boundary's two sides
    assert arrays.kind == ("one_class" if one_class else "svc")
    assert arrays.support_vectors.shape == (len(fitted[-1].support_), 12)


@pytest.mark.parametrize("one_class", [False, True])
def test_saved_filter_is_json_and_safetensors_and_predicts_the_same(tmp_path, one_class):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    flat = rng.normal(100, 3, (30, 1, 16, 16))
    blobs = flat + rng.normal(0, 1, flat.shape) + 200 * (rng.random(flat.shape) < 0.2)
    patches = np.r_[flat, blobs].astype(np.float32)
    labels = np.r_[np.zeros(30, bool), np.ones(30, bool)]
    filt = EmptyFilter(encoder="intensity")
    if one_class:
        with pytest.warns(UserWarning, match="one-class empty filter"):
            filt.fit(blobs.astype(np.float32))
    else:
        filt.fit(patches, labels)
    folder = filt.save(tmp_path / "flt")
    assert sorted(p.name for p in folder.iterdir()) == [".cytofuse-run", "card.json", "svm.safetensors"]
    card = json.loads((folder / "card.json").read_text())
    assert card["card_version"] == 2 and card["svm"]["kind"] == ("one_class" if one_class else "svc")
    stored = load_file(str(folder / "svm.safetensors"))
    assert stored["support_vectors"].shape == (card["svm"]["n_support"], card["feature_dim"])
    back = EmptyFilter.load(folder)
    np.testing.assert_array_equal(back.decision_function(patches), filt.decision_function(patches))
    if not one_class:
        assert (back.predict(patches) == labels).mean() > 0.9


def test_broken_svm_arrays_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    x, y = _features(40)
    patches = x[:, :9].reshape(40, 1, 3, 3)
    folder = EmptyFilter(encoder="intensity", normalise="none").fit(patches, y).save(tmp_path / "flt")
    arrays = load_file(str(folder / "svm.safetensors"))
    save_file(arrays | {"gamma": np.array([np.nan])}, str(folder / "svm.safetensors"))
    with pytest.raises(InputError, match=r"svm\.safetensors: SVM arrays hold NaN"):
        EmptyFilter.load(folder)
    save_file(arrays | {"dual_coef": arrays["dual_coef"][:-1].copy()}, str(folder / "svm.safetensors"))
    with pytest.raises(InputError, match="inconsistent SVM array shapes"):
        EmptyFilter.load(folder)


# --------------------------------------------------------------------------- planted payloads: the empty filter


def _legacy_filter(folder: Path, marker: Path) -> Path:
    """A filter folder as older cytofuse wrote it: card_version 1 and a pickled SVM (here, a payload)."""
    folder.mkdir(parents=True)
    card = {"card_version": 1, "kind": "cytofuse.preprocess.emptyfilter", "mode": "two_class", "encoder": "intensity",
            "pretrained": None, "normalise": "patch", "n_channels": 1, "patch_size": [32, 32], "feature_dim": 9,
            "params": {"nu": 0.1, "C": 1.0, "seed": 0}}
    (folder / "card.json").write_text(json.dumps(card))
    _plant(folder / "svm.joblib", marker)
    return folder


def test_an_old_pickled_filter_is_refused_unopened(tmp_path):
    folder = _legacy_filter(tmp_path / "flt", tmp_path / "ran")
    with pytest.raises(InputError, match=r"older cytofuse.*svm\.joblib.*re-run `cytofuse emptyfilter`") as err:
        EmptyFilter.load(folder)
    assert str(folder) in str(err.value)
    assert not (tmp_path / "ran").exists()


def test_a_payload_under_the_new_name_is_refused(tmp_path):
    x, y = _features(40)
    folder = EmptyFilter(encoder="intensity", normalise="none").fit(x[:, :9].reshape(40, 1, 3, 3), y).save(tmp_path / "flt")
    _plant(folder / "svm.safetensors", tmp_path / "ran")
    with pytest.raises(InputError, match=r"svm\.safetensors: not a readable safetensors file"):
        EmptyFilter.load(folder)
    assert not (tmp_path / "ran").exists()


def _model_with_filter(tmp_path: Path) -> Path:
    from cytofuse.inference.modelfolder import card_for, write_model_folder
    from cytofuse.models import create_model
    from cytofuse.preprocess.patches import PatchSettings

    rng = np.random.default_rng(0)
    patches = rng.normal(100, 3, (40, 1, 32, 32)).astype(np.float32)
    patches[20:, :, 8:24, 8:24] += 300
    EmptyFilter(encoder="intensity").fit(patches, np.arange(40) >= 20).save(tmp_path / "flt")
    model = create_model("early", in_channels=1, num_classes=2, encoder="smallcnn").eval()
    settings = PatchSettings(size=32, stride=16, min_ratio=0.0, empty_filter=tmp_path / "flt")
    card = card_for([model], class_names=["a", "b"], channel_names=["BF"], patches=settings)
    return write_model_folder(tmp_path / "model", [model], card)


def test_a_model_folder_with_an_old_pickled_filter_copy_is_refused(tmp_path):
    from typer.testing import CliRunner

    from cytofuse.cli import app
    from cytofuse.io.readers import Image, write_ome_tiff
    from cytofuse.inference.modelfolder import read_model_folder

    folder = _model_with_filter(tmp_path)
    _, card = read_model_folder(folder)  # the copy of the current format is read
    assert card.recipe.settings.empty_filter == folder / "empty_filter"
    copy = folder / "empty_filter"
    card_json = json.loads((copy / "card.json").read_text())
    (copy / "svm.safetensors").unlink()
    (copy / "card.json").write_text(json.dumps(card_json | {"card_version": 1}))
    _plant(copy / "svm.joblib", tmp_path / "ran")
    with pytest.raises(InputError, match="re-run `cytofuse emptyfilter`"):
        read_model_folder(folder)
    image = tmp_path / "field.ome.tif"
    write_ome_tiff(image, Image(np.full((1, 1, 64, 64), 100, np.uint16), ("BF",)))
    result = CliRunner().invoke(app, ["predict", str(folder), str(image), "--out", str(tmp_path / "pred")])
    assert result.exit_code != 0 and "re-run `cytofuse emptyfilter`" in " ".join(result.output.split())
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "pred").exists()


def test_a_model_is_not_written_with_an_old_pickled_filter(tmp_path):
    from cytofuse.inference.modelfolder import card_for, write_model_folder
    from cytofuse.models import create_model
    from cytofuse.preprocess.patches import PatchSettings

    flt = _legacy_filter(tmp_path / "flt", tmp_path / "ran")
    model = create_model("early", in_channels=1, num_classes=2, encoder="smallcnn").eval()
    card = card_for([model], class_names=["a", "b"], channel_names=["BF"],
                    patches=PatchSettings(size=32, empty_filter=flt))
    with pytest.raises(InputError, match="re-run `cytofuse emptyfilter`"):
        write_model_folder(tmp_path / "model", [model], card)
    assert not (tmp_path / "model").exists() and not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------- planted payloads: the patch stage's parts


def _image_set(tmp_path: Path):
    from cytofuse.io.imagesets import ImageSet
    from cytofuse.io.readers import Image, write_ome_tiff

    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "img").mkdir()
    for i, label in enumerate(["a", "a", "b", "b"]):
        stack = rng.normal(100, 5, (1, 2, 64, 64)).astype(np.uint16)
        stack[:, :, : 16 * (i + 1), :32] += 1000
        write_ome_tiff(tmp_path / "img" / f"{label}{i}.ome.tif", Image(stack, ("mito",)))
        rows.append({"path": f"img/{label}{i}.ome.tif", "label": label})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return ImageSet.from_manifest(tmp_path / "labels.csv")


def _interrupted_parts(tmp_path: Path, image_set, settings, monkeypatch) -> Path:
    """Run the patch stage until the third image raises; return the folder holding the finished parts."""
    import cytofuse.preprocess.patches as patches_mod

    real, calls = patches_mod._patch_one, []

    def flaky(image_set, image_id, settings):
        calls.append(image_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(image_set, image_id, settings)

    monkeypatch.setattr(patches_mod, "_patch_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        patches_mod.build_patch_index(image_set, settings, tmp_path / "run", progress=False)
    monkeypatch.setattr(patches_mod, "_patch_one", real)
    (key,) = (tmp_path / "run" / ".patch_parts").iterdir()
    return key


def test_patch_parts_are_data_and_planted_payloads_are_ignored(tmp_path, monkeypatch):
    from cytofuse.preprocess.patches import PatchSettings, build_patch_index

    image_set = _image_set(tmp_path)
    settings = PatchSettings(size=16, stride=16, min_ratio=0.1)
    whole = build_patch_index(image_set, settings, None, progress=False)
    key = _interrupted_parts(tmp_path, image_set, settings, monkeypatch)
    parts = sorted(key.glob("*.npz"))
    assert len(parts) == 2 and not list(key.glob("*.pkl"))
    with np.load(parts[0], allow_pickle=False) as data:  # plain arrays: readable without unpickling
        assert data["origins"].shape[1] == 3 and data["thresholds"].shape == (1,)
    marker = tmp_path / "ran"
    _plant(parts[0], marker)  # a finished part replaced by a pickle
    _plant(key / "old.pkl", marker)  # a part in the old format
    with open(key / "objects.npz", "wb") as fh:  # an .npz whose array is pickled objects
        np.savez(fh, meta=np.array([_Payload(marker)], dtype=object))
    resumed = build_patch_index(image_set, settings, tmp_path / "run", progress=False)
    assert not marker.exists()
    pd.testing.assert_frame_equal(resumed.patches, whole.patches)
    pd.testing.assert_frame_equal(resumed.images, whole.images)
    assert not (tmp_path / "run" / ".patch_parts").exists()


# --------------------------------------------------------------------------- no unpickling in the package

_PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
_UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all",
                "Loader", "UnsafeLoader", "FullLoader"}


def _keyword(call: ast.Call, name: str):
    """The constant value of keyword ``name`` in ``call`` (None when absent or not a constant)."""
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def _unsafe_uses(source: str) -> list[str]:
    """Lines of ``source`` that can run code from a file: pickle-family imports, unsafe loader calls."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in _PICKLERS]
        elif isinstance(node, ast.ImportFrom):
            bad = [node.module] if (node.module or "").split(".")[0] in _PICKLERS else []
        elif isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else ""
            bad = [f"{owner}.{node.attr}"] if (node.attr == "read_pickle"
                                              or (owner == "yaml" and node.attr in _UNSAFE_YAML)) else []
        elif isinstance(node, ast.Call):
            bad = _unsafe_call(node)
        else:
            continue
        hits += [f"line {node.lineno}: {b}" for b in bad]
    return hits


def _unsafe_call(call: ast.Call) -> list[str]:
    func = call.func
    owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    bad = []
    if _keyword(call, "weights_only") is False:
        bad.append(f"{owner}.{name}(weights_only=False)")
    if _keyword(call, "allow_pickle") is True:
        bad.append(f"{owner}.{name}(allow_pickle=True)")
    if owner == "torch" and name == "load" and _keyword(call, "weights_only") is None:
        bad.append("torch.load without weights_only=True")
    return bad


@pytest.mark.parametrize("source", [
    "import pickle", "import joblib", "from joblib import load", "import cloudpickle as cp", "from pickle import loads",
    "torch.load(f)", "torch.load(f, map_location='cpu', weights_only=False)", "np.load(f, allow_pickle=True)",
    "pd.read_pickle(f)", "yaml.load(s, Loader=yaml.Loader)", "yaml.unsafe_load(s)",
])
def test_the_scan_finds_code_that_unpickles(source):
    assert _unsafe_uses(source)


@pytest.mark.parametrize("source", [
    '"""dropped when pickled"""', "# a pickle would run code", "torch.load(f, weights_only=True)",
    "np.load(f, allow_pickle=False)", "np.load(f)", "yaml.safe_load(s)", "x = 'joblib'",
])
def test_the_scan_passes_data_only_code_and_prose(source):
    assert _unsafe_uses(source) == []


def test_the_package_never_unpickles():
    root = Path(cytofuse.__file__).parent
    found = {str(p.relative_to(root)): _unsafe_uses(p.read_text()) for p in sorted(root.rglob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}
