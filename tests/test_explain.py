import json

import numpy as np
import pandas as pd
import pytest
import torch

from cytofuse.errors import InputError
from cytofuse.evaluation.explain import (
    balanced_accuracy,
    channel_ablation,
    embeddings,
    explain_run,
    fold_ablation,
    gradcam,
    plot_gradcam_grid,
    project,
    select_examples,
    summarize_ablation,
)
from cytofuse.models import EarlyFusion, IntermediateFusion, SmallCNN, create_model

SIZE = 32


def _train(model, x: np.ndarray, y: np.ndarray, *, steps: int, seed: int = 0, lr: float = 3e-3):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = rng.choice(len(x), 32, replace=False)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _corner_square_toy(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class 1: a bright square in the top-left corner. Both classes: a bright bar in the lower half."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.1, 0.05, (n, 1, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    for i in range(n):
        row = rng.integers(40, 56)
        x[i, 0, row:row + 3, 8:56] += 1.0
        if y[i]:
            x[i, 0, 4:14, 4:14] += 1.0
    return x, y.astype(np.int64)


def _channel1_toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three channels of noise with random squares; only channel 1's square depends on the class."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.1, 0.05, (n, 3, SIZE, SIZE)).astype(np.float32)
    y = np.arange(n) % 2
    for i in range(n):
        for c in (0, 2):
            if rng.random() < 0.5:
                r, s = rng.integers(0, SIZE - 8, 2)
                x[i, c, r:r + 8, s:s + 8] += 1.0
        if y[i]:
            r, s = rng.integers(0, SIZE - 8, 2)
            x[i, 1, r:r + 8, s:s + 8] += 1.0
    return x, y.astype(np.int64)


def _narrow(in_channels: int) -> SmallCNN:
    """A narrow, shallow SmallCNN (one conv per stage), so the toy models train in a few seconds and the
    last map's receptive field stays small enough to localise the evidence sharply."""
    return SmallCNN(in_channels=in_channels, widths=(8, 16, 16, 32), depth=1)


@pytest.fixture(scope="module")
def corner_model():
    torch.set_num_threads(1)
    x, y = _corner_square_toy(256, seed=0)
    # 64 px patches give an 8x8 last map, fine enough to localise
    model = EarlyFusion(_narrow, encoder_name="smallcnn", in_channels=1, num_classes=2, dropout=0.0)
    return _train(model, x, y, steps=60)


@pytest.fixture(scope="module")
def channel1_model():
    torch.set_num_threads(1)
    x, y = _channel1_toy(256, seed=1)
    model = IntermediateFusion(_narrow, encoder_name="smallcnn", in_channels=3, num_classes=2, dropout=0.0)
    return _train(model, x, y, steps=80)


# --------------------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize("fusion, keys", [("early", ["all"]), ("intermediate", ["ch0", "ch1", "ch2"]),
                                          ("late", ["ch0", "ch1", "ch2"])])
def test_gradcam_gives_one_map_per_encoder_in_unit_range(fusion, keys):
    torch.manual_seed(0)
    model = create_model(fusion, in_channels=3, num_classes=4, encoder="smallcnn").eval()
    x = torch.rand(5, 3, 40, 40)
    cams = gradcam(model, x)
    assert list(cams) == keys
    for cam in cams.values():
        assert cam.shape == (5, 40, 40) and cam.dtype == np.float32
        assert cam.min() >= 0.0 and cam.max() <= 1.0 + 1e-6
        peaks = cam.reshape(5, -1).max(axis=1)
        assert np.all((np.abs(peaks - 1) < 1e-5) | (peaks == 0))  # each map peaks at 1 unless empty
    joint = gradcam(model, x, normalize="joint")
    peaks = np.stack([c.reshape(5, -1).max(axis=1) for c in joint.values()]).max(axis=0)
    assert np.all((np.abs(peaks - 1) < 1e-5) | (peaks == 0))  # one common peak per patch
    assert not model.training  # the mode is restored
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients accumulate


def test_gradcam_single_channel_model_and_bad_arguments():
    model = create_model("single", in_channels=3, num_classes=2, channel=2, encoder="smallcnn").eval()
    cams = gradcam(model, np.random.rand(3, 32, 32).astype(np.float32), target_class=1)
    assert list(cams) == ["ch2"] and cams["ch2"].shape == (1, 32, 32)
    with pytest.raises(InputError, match=r"target_class must be one class index in \[0, 2\).*got 5"):
        gradcam(model, torch.rand(2, 3, 32, 32), target_class=5)
    with pytest.raises(InputError, match=r"x must be \(C, H, W\) or \(B, C, H, W\), got shape \(32, 32\)"):
        gradcam(model, torch.rand(32, 32))
    with pytest.raises(InputError, match="normalize must be one of"):
        gradcam(model, torch.rand(1, 3, 32, 32), normalize="global")


def test_gradcam_peaks_on_the_region_the_decision_depends_on(corner_model):
    x, y = _corner_square_toy(64, seed=5)
    pred = corner_model(torch.from_numpy(x)).argmax(1).numpy()
    assert balanced_accuracy(y, pred) > 0.95
    cam = gradcam(corner_model, x[y == 1], target_class=1)["all"].mean(axis=0)
    square, bar = cam[:18, :18].mean(), cam[32:].mean()  # the bar is in every image: no evidence
    assert square > 0.5 and square > 10 * bar
    r, c = np.unravel_index(cam.argmax(), cam.shape)
    assert r < 32 and c < 32


# --------------------------------------------------------------------------- ablation


def test_ablation_ranks_the_only_informative_channel_first(channel1_model):
    x, y = _channel1_toy(96, seed=2)
    rows = np.arange(len(x))
    for mode in ("zero", "shuffle"):
        table = channel_ablation(channel1_model, x, rows, y, mode=mode, seed=0, channel_names=["a", "b", "c"])
        assert list(table["channel"]) == ["a", "b", "c"] and (table["mode"] == mode).all()
        assert table["intact"].iloc[0] > 0.9
        drops = table.set_index("channel")["drop"]
        assert drops["b"] > 0.3, table
        assert drops["b"] > 3 * max(drops["a"], drops["c"], 0.02), table
        assert np.allclose(table["intact"] - table["balanced_accuracy"], table["drop"])


def test_fold_ablation_averages_over_folds_with_each_fold_model(channel1_model):
    x, y = _channel1_toy(64, seed=3)
    pred = pd.DataFrame({"patch_id": np.arange(64), "fold": np.arange(64) // 2 % 2, "y_true": y})  # both classes per fold
    per_fold = fold_ablation({0: channel1_model, 1: channel1_model}, x, pred, mode="shuffle", seed=0)
    assert len(per_fold) == 6 and sorted(per_fold["fold"].unique()) == [0, 1] and (per_fold["n"] == 32).all()
    summary = summarize_ablation(per_fold)
    assert summary.iloc[0]["channel"] == "ch1" and summary.iloc[0]["rank"] == 1
    fold_means = per_fold[per_fold["channel"] == "ch1"]["drop"]
    assert summary.iloc[0]["drop_mean"] == pytest.approx(fold_means.mean())
    assert summary.iloc[0]["drop_sd"] == pytest.approx(fold_means.std())
    with pytest.raises(InputError, match=r"no model for fold 1; models are given for folds \[0\]"):
        fold_ablation({0: channel1_model}, x, pred)


def test_ablation_rejects_bad_mode_and_rows(channel1_model):
    x, y = _channel1_toy(8, seed=0)
    with pytest.raises(InputError, match=r"mode must be one of \['zero', 'shuffle'\], got 'noise'"):
        channel_ablation(channel1_model, x, np.arange(8), y, mode="noise")
    with pytest.raises(InputError, match="rows and labels must be 1D"):
        channel_ablation(channel1_model, x, np.arange(8), y[:4])


def test_balanced_accuracy_is_mean_recall_over_present_classes():
    assert balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx((2 / 3 + 1) / 2)


# --------------------------------------------------------------------------- figures and embeddings


def test_gradcam_grid_figure_is_written_and_not_blank(corner_model, tmp_path):
    from matplotlib.image import imread

    x, y = _corner_square_toy(4, seed=9)
    cams = gradcam(corner_model, x)
    png, svg = plot_gradcam_grid(x, cams, channel_names=["grey"], row_labels=["a", "b", "c", "d"], out=tmp_path / "grid")
    assert png.name == "grid.png" and svg.read_text().startswith("<?xml")
    image = imread(png)
    assert image[..., :3].std() > 0.1  # images and overlays, not an empty canvas
    with pytest.raises(InputError, match="N row labels"):
        plot_gradcam_grid(x, cams, channel_names=["grey"], row_labels=["a"], out=tmp_path / "bad")


def test_select_examples_takes_the_most_confident_correct_and_wrong_per_class():
    pred = pd.DataFrame({"patch_id": range(6), "fold": 0, "y_true": [0, 0, 0, 1, 1, 1],
                         "prob_a": [0.9, 0.6, 0.2, 0.3, 0.1, 0.8], "prob_b": [0.1, 0.4, 0.8, 0.7, 0.9, 0.2]})
    picks = select_examples(pred, ["a", "b"], n=1)
    assert picks[["patch_id", "correct"]].values.tolist() == [[0, True], [2, False], [4, True], [5, False]]


def test_embeddings_project_each_fold_with_its_own_model(channel1_model):
    x, y = _channel1_toy(40, seed=4)
    pred = pd.DataFrame({"patch_id": np.arange(40), "fold": np.arange(40) // 20, "y_true": y})
    table = embeddings({0: channel1_model, 1: channel1_model}, x, pred, methods=["tsne"], max_per_fold=15)
    assert len(table) == 30 and table.groupby("fold").size().tolist() == [15, 15]
    assert {"tsne_x", "tsne_y", "y_pred"} <= set(table.columns)
    assert np.isfinite(table[["tsne_x", "tsne_y"]].to_numpy()).all()
    assert balanced_accuracy(table["y_true"], table["y_pred"]) > 0.8
    with pytest.raises(InputError, match=r"method must be one of \['tsne', 'umap'\], got 'pca'"):
        project(np.zeros((10, 3)), method="pca")
    with pytest.raises(InputError, match=r"N >= 5, got shape \(3, 2\)"):
        project(np.zeros((3, 2)))


@pytest.mark.slow
def test_umap_projection_separates_two_clusters():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(6, 1, (20, 8))])
    xy = project(feats, method="umap", seed=0)
    assert xy.shape == (40, 2)
    gap = np.linalg.norm(xy[:20].mean(0) - xy[20:].mean(0))
    assert gap > 3 * max(xy[:20].std(0).max(), xy[20:].std(0).max())


# --------------------------------------------------------------------------- run folder


def _cv_config(manifest, *, epochs: int, n_folds: int, models, **patches):
    from cytofuse.config import validate_config

    return validate_config({
        "data": {"manifest": str(manifest)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0} | patches,
        "models": models,
        "train": {"max_epochs": epochs, "batch_size": 16, "progress": False, "accelerator": "cpu"},
        "cv": {"n_folds": n_folds},
    })


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic_set):
    from cytofuse.workflows.cv import run_cv

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("explain")
    cfg = _cv_config(synthetic_set / "labels.csv", epochs=1, n_folds=2,
                     models=[{"fusion": "intermediate", "encoder": "smallcnn"},
                             {"fusion": "single", "channel": "mitochondria", "encoder": "smallcnn"}])
    run_cv(cfg, root / "run", progress=False)
    return root / "run"


def test_explain_run_writes_every_output_and_skips_when_done(tiny_run, tmp_path):
    from matplotlib.image import imread

    paths = explain_run(tiny_run, model="intermediate", out=tmp_path / "ex", n_examples=2, methods=["tsne"],
                        progress=False)
    folder = tmp_path / "ex" / "intermediate"
    assert paths == {"intermediate": folder / "summary.json"}
    summary = json.loads(paths["intermediate"].read_text())
    assert summary["classes"] == ["control", "fragmented"]
    assert summary["channels"] == ["mitochondria", "early_endosome", "recycling_endosome"]
    assert {(r["mode"], r["channel"]) for r in summary["ablation"]} == {
        (m, c) for m in ("zero", "shuffle") for c in summary["channels"]}
    assert [r["channel"] for r in summary["single_channel"]] == ["mitochondria"]
    for name in ("gradcam_control", "gradcam_fragmented", "ablation", "single_channel", "embedding_tsne", "thumbnails_tsne"):
        assert (folder / f"{name}.svg").is_file()
        assert imread(folder / f"{name}.png")[..., :3].std() > 0.02, name
    table = pd.read_parquet(folder / "embeddings.parquet")
    n_test = len(pd.read_parquet(tiny_run / "models" / "intermediate" / "predictions.parquet"))
    assert len(table) == n_test and set(table["fold"]) == {0, 1}
    ablation = pd.read_csv(folder / "ablation.csv")
    assert (ablation["n_folds"] == 2).all() and ablation.groupby("mode")["rank"].apply(list).tolist() == [[1, 2, 3]] * 2
    stamp = (folder / "summary.json").stat().st_mtime_ns
    explain_run(tiny_run, model="intermediate", out=tmp_path / "ex", methods=["tsne"], progress=False)
    assert (folder / "summary.json").stat().st_mtime_ns == stamp  # done: skipped
    with pytest.raises(InputError, match=r"model \['late'\] not found.*run models are \['intermediate', 'single_mitochondria'\]"):
        explain_run(tiny_run, model="late", progress=False)


def test_explain_run_resumes_after_the_last_finished_step(tiny_run, tmp_path):
    out = tmp_path / "ex"
    explain_run(tiny_run, model="single_mitochondria", out=out, n_examples=1, methods=["tsne"], thumbnails=False,
                progress=False)
    folder = out / "single_mitochondria"
    assert list(json.loads((folder / "summary.json").read_text())["gradcam"]) == ["gradcam_control.png", "gradcam_fragmented.png"]
    (folder / "summary.json").unlink()
    (folder / ".embeddings.json").unlink()
    stamp = (folder / "ablation.csv").stat().st_mtime_ns
    explain_run(tiny_run, model="single_mitochondria", out=out, methods=["tsne"], thumbnails=False, progress=False)
    assert (folder / "summary.json").is_file() and (folder / "ablation.csv").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_ablation_on_synthetic_phantoms_ranks_mitochondria_first(tmp_path):
    """control vs fragmented differ in mitochondria only (cytofuse.synthetic.phantoms.informative_channels)."""
    from cytofuse.workflows.cv import run_cv
    from cytofuse.synthetic.phantoms import informative_channels, write_synthetic_dataset

    assert informative_channels("control", "fragmented") == {"mitochondria"}
    torch.set_num_threads(2)
    write_synthetic_dataset(tmp_path / "data", classes=2, images_per_class=6, shape=(4, 192, 192), seed=1,
                            difficulty=0.25, progress=False)
    cfg = _cv_config(tmp_path / "data" / "labels.csv", epochs=15, n_folds=3, size=48, min_ratio=0.03, max_per_image=24,
                     models=[{"fusion": "intermediate", "encoder": "smallcnn"}])
    run_cv(cfg, tmp_path / "run", progress=False)
    paths = explain_run(tmp_path / "run", methods=["tsne"], thumbnails=False, n_examples=1, progress=False)
    summary = json.loads(paths["intermediate"].read_text())
    print(json.dumps(summary["ablation"], indent=1))
    assert summary["ablation"][0]["intact_mean"] > 0.8  # the model learned the task
    for mode in ("zero", "shuffle"):
        rows = [r for r in summary["ablation"] if r["mode"] == mode]
        assert rows[0]["channel"] == "mitochondria" and rows[0]["rank"] == 1
        assert rows[0]["drop_mean"] > rows[1]["drop_mean"] + 0.05
