"""A standing corpus of bad inputs: each gives a clear error (exit code 2, a sentence, no traceback).

One line per case: the command, its exit code and a phrase the message must contain. The
inputs are tiny files written once per module; every case also checks that no input file
was changed, added or removed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cytofuse.cli import app
from cytofuse.io.readers import Image, write_ome_tiff
from cytofuse.synthetic.phantoms import CHANNELS, write_synthetic_dataset


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # {in}: the input folder, {out}: a fresh output path, {tmp}: the test's own folder
    code: int
    phrase: str
    started: bool = False  # the error comes from the patch stage: the (unfinished, resumable) run folder exists


P = ("patches", "--out", "{out}", "--size", "32", "--manifest")  # the patch stage on a manifest
CASES = [
    # manifests
    Case("empty manifest", (*P, "{in}/empty.csv"), 2, "empty.csv is empty (0 bytes)"),
    Case("header-only manifest", (*P, "{in}/header_only.csv"), 2, "but no rows"),
    Case("binary manifest", (*P, "{in}/binary.csv"), 2, "binary.csv is not a readable CSV file"),
    Case("missing manifest", (*P, "{in}/nowhere.csv"), 2, "manifest {in}/nowhere.csv does not exist"),
    Case("no label column", (*P, "{in}/no_label.csv"), 2, "has no label column 'label'"),
    Case("no path column", (*P, "{in}/no_path.csv"), 2, "needs a 'path' column"),
    Case("missing image file", (*P, "{in}/missing_file.csv"), 2, "gone.ome.tif"),
    Case("duplicate paths", (*P, "{in}/dup_paths.csv"), 2, "duplicate path"),
    Case("single class", (*P, "{in}/single_class.csv"), 2, "a classifier needs at least 2"),
    # image files
    Case("0-byte image", (*P, "{in}/zero_byte.csv"), 2, "files/zero.tif: zero-byte file"),
    Case("truncated TIFF", (*P, "{in}/truncated.csv"), 2, "truncated.tif"),
    Case("garbage TIFF", (*P, "{in}/garbage.csv"), 2, "cannot read {in}/files/garbage.tif"),
    Case("text as PNG", (*P, "{in}/textpng.csv"), 2, "cannot read {in}/files/text.png"),
    Case("unsupported suffix", (*P, "{in}/unsupported.csv"), 2, "img.bmp"),
    Case(".npy without axes", (*P, "{in}/npy.csv"), 2, "stores no axis order"),
    Case("channels differ", (*P, "{in}/channels_differ.csv"), 2, "1 channels ['x']"),
    Case("image smaller than the patch", (*P, "{in}/small.csv"), 2, "small.ome.tif: image is 16x16 px"),
    Case("TIFF whose IFD chain loops", (*P, "{in}/looping.csv"), 2, "looping.tif is truncated or corrupt"),
    Case("TIFF header claims 4e9 x 4e9 px", (*P, "{in}/huge.csv"), 2, "huge.tif decodes to"),
    Case("NaN and inf pixels", (*P, "{in}/nan.csv"), 2, "nan.ome.tif has 16 NaN or infinite pixel(s)", started=True),
    # image folders
    Case("missing image folder", ("patches", "--out", "{out}", "--images", "{in}/nowhere"), 2,
         "does not exist or is not a folder"),
    Case("empty class folder", ("patches", "--out", "{out}", "--size", "32", "--images", "{in}/empty_class"), 2,
         "class folder(s) ['{in}/empty_class/b'] hold no image files"),
    Case("no class folders", ("patches", "--out", "{out}", "--images", "{in}/no_classes"), 2,
         "has no class sub-folders with images"),
    # patch options and overrides
    Case("unknown excluded channel", (*P, "{in}/good/labels.csv", "--exclude", "golgi"), 2, "golgi"),
    Case("bad rule", (*P, "{in}/good/labels.csv", "--rule", "most"), 2, "patches.rule"),
    Case("YAML tag in --set", (*P, "{in}/good/labels.csv", "--set", "patches.size=!!python/object:os.system"), 2,
         "is not plain YAML"),
    Case("--set without =", (*P, "{in}/good/labels.csv", "--set", "patches.size"), 2,
         "override must look like section.field=value"),
    Case("--set on a value, not a section", ("cv", "{in}/run.yaml", "--out", "{out}", "--set", "patches.size.x=3"), 2,
         "'size' is not a section"),
    Case("zero patch size", ("cv", "{in}/run.yaml", "--out", "{out}", "--set", "patches.size=0"), 2,
         "patches.size: Input should be greater than 0"),
    # output paths
    Case("output under a file", ("patches", "--out", "{in}/afile/run", "--size", "32", "--manifest",
                                 "{in}/good/labels.csv"), 2, "afile is a file, not a folder"),
    Case("output is a file", ("patches", "--out", "{in}/afile", "--size", "32", "--manifest", "{in}/good/labels.csv"),
         2, "exists and is not a folder"),
    Case("output is a user's folder", ("patches", "--out", "{in}/mine", "--size", "32", "--overwrite",
                                       "--manifest", "{in}/good/labels.csv"), 2, "is not a cytofuse run folder"),
    # run configs
    Case("missing config", ("cv", "{in}/nowhere.yaml", "--out", "{out}"), 2, "nowhere.yaml does not exist"),
    Case("config not YAML", ("cv", "{in}/invalid.yaml", "--out", "{out}"), 2, "is not valid YAML"),
    Case("config is a list", ("cv", "{in}/list.yaml", "--out", "{out}"), 2, "must hold a mapping at top level"),
    Case("unknown config key", ("cv", "{in}/unknown_key.yaml", "--out", "{out}"), 2, "cv.folds: unknown key"),
    Case("one fold", ("cv", "{in}/run.yaml", "--out", "{out}", "--set", "cv.n_folds=1"), 2,
         "n_folds must be >= 2 or 'loo', got 1"),
    Case("more folds than groups", ("cv", "{in}/run.yaml", "--out", "{out}", "--set", "cv.n_folds=3"), 2,
         "n_folds=3 needs at least 3"),
    Case("duplicate model names", ("cv", "{in}/dup_names.yaml", "--out", "{out}"), 2,
         "models[0] and models[1] have the same name 'early'"),
    Case("unknown fusion", ("cv", "{in}/run.yaml", "--out", "{out}", "--set", "models=[{{fusion: deep}}]"), 2,
         "models.0.fusion"),
    Case("negative learning rate", ("cv", "{in}/run.yaml", "--out", "{out}", "--set", "train.lr=-1"), 2, "train.lr"),
    Case("patch larger than every image", ("cv", "{in}/run.yaml", "--out", "{out}", "--set", "patches.size=100"), 2,
         "image is 64x64 px (Y x X), smaller than patches.size=100"),
    # model folders, prediction, export, report, explain
    Case("predict: not a model folder", ("predict", "{in}/mine", "{in}/good/images/control_0.ome.tif", "--out",
                                         "{out}"), 2, "mine is not a cytofuse model folder"),
    Case("predict: missing image", ("predict", "{in}/model", "{in}/nowhere.tif", "--out", "{out}"), 2,
         "nowhere.tif does not exist"),
    Case("predict: NaN image", ("predict", "{in}/model", "{in}/files/nan.ome.tif", "--out", "{out}"), 2,
         "NaN or infinite pixel(s)"),
    Case("predict: TIFF header claims 4e9 x 4e9 px", ("predict", "{in}/model", "{in}/files/huge.tif", "--out", "{out}"),
         2, "huge.tif decodes to"),
    Case("predict: pickled filter in the model", ("predict", "{in}/legacy_model", "{in}/good/images/control_0.ome.tif",
                                                  "--out", "{out}"), 2, "re-run `cytofuse emptyfilter`"),
    Case("predict: output is a user's folder", ("predict", "{in}/model", "{in}/good/images/control_0.ome.tif", "--out",
                                                "{in}/mine", "--overwrite"), 2, "is not a cytofuse prediction folder"),
    Case("export: missing model", ("export", "{in}/nowhere", "{out}"), 2, "does not exist"),
    Case("export: output is a user's folder", ("export", "{in}/model", "{in}/mine", "--overwrite"), 2,
         "is not a cytofuse export folder"),
    Case("report: missing run", ("report", "{in}/nowhere"), 2, "does not exist"),
    Case("report: a model's predictions deleted", ("report", "{in}/orphan_run", "--out", "{out}/report.html"), 2,
         "['{in}/orphan_run/models/late'] have metrics.json but no predictions.parquet"),
    Case("explain: not a run", ("explain", "{in}/mine"), 2, "holds no trained model"),
    Case("emptyfilter: no cells folder", ("emptyfilter", "{in}/ef_nocells", "--out", "{out}", "--encoder",
                                          "intensity"), 2, "sub-folder cells/ is missing"),
    Case("emptyfilter: output is a user's folder", ("emptyfilter", "{in}/ef_nocells", "--out", "{in}/mine",
                                                    "--overwrite"), 2, "is not a cytofuse filter folder"),
    Case("synth: unknown kind", ("synth", "{out}", "--kind", "bogus"), 2, "--kind must be organelles"),
    Case("synth: bad shape", ("synth", "{out}", "--shape", "64,64"), 2, "--shape must be Z,Y,X integers"),
    Case("synth: output is a user's folder", ("synth", "{in}/mine", "--overwrite"), 2, "is not a cytofuse data folder"),
    Case("train: single class", ("train", "{in}/single_class.yaml", "--out", "{out}", "--epochs", "1"), 2,
         "a classifier needs at least 2"),  # refused at validation, before any patch is cut
]


def _write_manifest(path: Path, rows: list[tuple[str, str]], header: str = "path,label") -> None:
    path.write_text("\n".join([header, *(f"{p},{label}" for p, label in rows)]) + "\n")


def _stack(rng, shape=(1, 1, 64, 64), channels=CHANNELS, dtype=np.uint16) -> Image:
    return Image((rng.random((len(channels), *shape[1:])) * 1000).astype(dtype), tuple(channels))


def _image_files(root: Path, rng) -> None:
    files = root / "files"
    files.mkdir()
    (files / "zero.tif").write_bytes(b"")
    good = (root / "good" / "images" / "control_0.ome.tif").read_bytes()
    (files / "truncated.tif").write_bytes(good[: len(good) // 2])
    (files / "garbage.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    (files / "text.png").write_text("this is not a PNG")
    (files / "img.bmp").write_bytes(b"BM")
    np.save(files / "arr.npy", np.zeros((64, 64), np.uint16))
    _huge_tiff(files / "huge.tif")
    _looping_tiff(files / "looping.tif")
    write_ome_tiff(files / "one_channel.ome.tif", _stack(rng, channels=("x",)))
    write_ome_tiff(files / "small.ome.tif", _stack(rng, shape=(1, 1, 16, 16)))
    nan = _stack(rng, dtype=np.float32)
    nan.data[1, 0, :3, :5] = np.nan
    nan.data[2, 0, 7, 7] = np.inf
    write_ome_tiff(files / "nan.ome.tif", nan)


def _huge_tiff(path: Path, side: int = 4_000_000_000) -> None:
    """A 239-byte compressed TIFF whose header claims side x side pixels (more memory than any machine has)."""
    import struct

    import tifffile

    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), compression="zlib", rowsperstrip=side, metadata=None)
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        where = {tag.name: tag.valueoffset for tag in tif.pages.first.tags.values()}
    for name in ("ImageWidth", "ImageLength"):
        struct.pack_into("<I", raw, where[name], side)
    path.write_bytes(bytes(raw))


def _looping_tiff(path: Path) -> None:
    """A one-page TIFF whose next IFD is an empty IFD pointing back to the first (tifffile's series loops on it)."""
    import struct

    import tifffile

    tifffile.imwrite(path, np.zeros((16, 16), np.uint16), metadata=None)
    raw = bytearray(path.read_bytes())
    first = struct.unpack_from("<I", raw, 4)[0]
    entries = struct.unpack_from("<H", raw, first)[0]
    empty = len(raw) + len(raw) % 2
    raw += b"\x00" * (empty - len(raw)) + struct.pack("<HI", 0, first)
    struct.pack_into("<I", raw, first + 2 + 12 * entries, empty)
    path.write_bytes(bytes(raw))


def _manifests(root: Path) -> None:
    good = [(f"good/images/{name}_{i}.ome.tif", name) for name in ("control", "fragmented") for i in (0, 1)]
    (root / "empty.csv").write_bytes(b"")
    (root / "header_only.csv").write_text("path,label\n")
    (root / "binary.csv").write_bytes(b"\xff\xfe\x00\x81" * 64)
    _write_manifest(root / "no_label.csv", good, header="path,class")
    _write_manifest(root / "no_path.csv", good, header="file,label")
    _write_manifest(root / "missing_file.csv", [*good, ("good/images/gone.ome.tif", "control")])
    _write_manifest(root / "dup_paths.csv", [*good, good[0]])
    _write_manifest(root / "single_class.csv", good[:2])
    for name, file in (("zero_byte", "zero.tif"), ("truncated", "truncated.tif"), ("garbage", "garbage.tif"),
                       ("textpng", "text.png"), ("unsupported", "img.bmp"), ("npy", "arr.npy"),
                       ("channels_differ", "one_channel.ome.tif"), ("small", "small.ome.tif"), ("nan", "nan.ome.tif"),
                       ("huge", "huge.tif"), ("looping", "looping.tif")):
        _write_manifest(root / f"{name}.csv", [*good, (f"files/{file}", "fragmented")])


def _folders(root: Path, rng) -> None:
    for name, content in (("empty_class/a", True), ("empty_class/b", False), ("no_classes", False)):
        (root / name).mkdir(parents=True)
        if content:
            write_ome_tiff(root / name / "img.ome.tif", _stack(rng))
    (root / "afile").write_text("a file, not a folder")
    (root / "mine").mkdir()
    (root / "mine" / "thesis.docx").write_text("years of work")
    run = root / "orphan_run"  # a finished run whose second model lost its predictions
    for name in ("config.yaml", "patches.parquet", "images.parquet", "models/early/predictions.parquet",
                 "models/early/metrics.json", "models/late/metrics.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}")
    (root / "ef_nocells" / "empty").mkdir(parents=True)
    write_ome_tiff(root / "ef_nocells" / "empty" / "p.ome.tif", _stack(rng, shape=(1, 1, 32, 32), channels=("x",)))


def _configs(root: Path) -> None:
    base = {"data": {"manifest": "good/labels.csv"}, "patches": {"size": 32},
            "models": [{"fusion": "early", "encoder": "smallcnn"}], "cv": {"n_folds": 2}, "train": {"max_epochs": 1}}
    (root / "run.yaml").write_text(yaml.safe_dump(base))
    (root / "single_class.yaml").write_text(yaml.safe_dump(base | {"data": {"manifest": "single_class.csv"}}))
    (root / "unknown_key.yaml").write_text(yaml.safe_dump(base | {"cv": {"folds": 2}}))
    (root / "dup_names.yaml").write_text(yaml.safe_dump(base | {"models": [{"fusion": "early"}, {"fusion": "early",
                                                                                                  "encoder": "resnet18"}]}))
    (root / "list.yaml").write_text("- data\n- models\n")
    (root / "invalid.yaml").write_text("data: {manifest: [unclosed\n")


def _model_folders(root: Path) -> None:
    from cytofuse.preprocess.emptyfilter import EmptyFilter
    from cytofuse.inference.modelfolder import card_for, write_model_folder
    from cytofuse.models import create_model
    from cytofuse.preprocess.patches import PatchSettings

    model = create_model("early", in_channels=4, num_classes=2, encoder="smallcnn").eval()
    card = card_for([model], class_names=["control", "fragmented"], channel_names=list(CHANNELS),
                    patches=PatchSettings(size=32))
    write_model_folder(root / "model", [model], card)
    rng = np.random.default_rng(0)
    patches = rng.normal(100, 3, (20, 4, 32, 32)).astype(np.float32)
    patches[10:, :, 8:24, 8:24] += 300
    EmptyFilter(encoder="intensity").fit(patches, np.arange(20) >= 10).save(root / "filter")
    folder = write_model_folder(root / "legacy_model", [model], card.model_copy(
        update={"recipe": card.recipe.with_empty_filter(root / "filter")}))
    copy = folder / "empty_filter"
    (copy / "svm.safetensors").unlink()
    (copy / "svm.joblib").write_bytes(b"a pickle from an older cytofuse: never opened")
    card_json = json.loads((copy / "card.json").read_text())
    (copy / "card.json").write_text(json.dumps(card_json | {"card_version": 1}))


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad") / "in"
    rng = np.random.default_rng(0)
    write_synthetic_dataset(root / "good", classes=2, images_per_class=2, shape=(1, 64, 64), seed=1, progress=False)
    _image_files(root, rng)
    _manifests(root)
    _folders(root, rng)
    _configs(root)
    _model_folders(root)
    return root, _checksums(root)


def test_the_corpus_is_large_and_its_names_distinct():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_a_clear_error(case, inputs, tmp_path):
    root, before = inputs
    fill = {"in": str(root), "out": str(tmp_path / "out"), "tmp": str(tmp_path)}
    result = CliRunner().invoke(app, [a.format(**fill) for a in case.args])
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == case.code, output
    assert case.phrase.format(**fill) in output
    assert "Traceback" not in output
    assert (tmp_path / "out").exists() == case.started
    assert _checksums(root) == before


def test_explain_names_the_models_it_cannot_explain(tmp_path, monkeypatch):
    import pandas as pd

    import cytofuse.evaluation.explain as explain
    from cytofuse.errors import InputError

    run = tmp_path / "run"
    (run / "models" / "early" / "fold_0").mkdir(parents=True)
    (run / "models" / "early" / "fold_0" / "best.safetensors").write_bytes(b"")
    pd.DataFrame({"prob_a": [0.5]}).to_parquet(run / "models" / "early" / "predictions.parquet")
    (run / "models" / "late" / "fold_0").mkdir(parents=True)  # interrupted: weights of one fold, no predictions
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"manifest": "labels.csv"},
                                                     "models": [{"fusion": "early"}, {"fusion": "late"}]}))
    monkeypatch.setattr(explain, "explain_model", lambda run_dir, name, out, **kw: out / "summary.json")
    with pytest.warns(UserWarning, match=r"models \['late'\] of .* have no predictions.parquet .* not explained"):
        done = explain.explain_run(run, progress=False)
    assert list(done) == ["early"]
    with pytest.raises(InputError, match=r"model \['late'\] not found .*\['late'\] have no predictions yet"):
        explain.explain_run(run, model="late", progress=False)
