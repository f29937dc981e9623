import numpy as np
import pandas as pd
import pytest
import torch

from cytofuse.config import dump_config, validate_config
from cytofuse.errors import InputError
from cytofuse.workflows.final import late_weights_from_cv, train_final
from cytofuse.models import create_model, load_model, save_weights


def _late_config(manifest, late_weights="validation", **train):
    return validate_config({
        "data": {"manifest": str(manifest)},
        "patches": {"size": 32, "exclude_channels": ["nucleus"], "min_ratio": 0.0},
        "models": [{"fusion": "late", "encoder": "smallcnn", "late_weights": late_weights}],
        "train": {"max_epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu", **train},
        "cv": {"n_folds": 2},
    })


def _fake_cv_run(root, weights, manifest="labels.csv"):
    """A CV run folder with only what late_weights_from_cv reads: config.yaml and fold weights."""
    dump_config(_late_config(manifest), root / "config.yaml")
    for k, w in enumerate(weights):
        model = create_model("late", in_channels=len(w), num_classes=2, encoder="smallcnn", late_weights="validation")
        model.set_branch_weights(w)
        (root / "models" / "late" / f"fold_{k}").mkdir(parents=True)
        save_weights(model, root / "models" / "late" / f"fold_{k}" / "best.safetensors")
    return root


def test_late_weights_from_cv_average_the_fold_models(tmp_path):
    run = _fake_cv_run(tmp_path, [[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]])
    assert np.allclose(late_weights_from_cv(run), [0.3, 0.3, 0.4], atol=1e-6)
    assert np.allclose(late_weights_from_cv(run, "late"), [0.3, 0.3, 0.4], atol=1e-6)


def test_late_weights_from_a_run_without_late_fusion_is_an_error(tmp_path):
    dump_config(_late_config("labels.csv"), tmp_path / "config.yaml")
    (tmp_path / "models" / "late" / "fold_0").mkdir(parents=True)
    early = create_model("early", in_channels=3, num_classes=2, encoder="smallcnn")
    save_weights(early, tmp_path / "models" / "late" / "fold_0" / "best.safetensors")
    with pytest.raises(InputError, match="holds no late-fusion branch weights"):
        late_weights_from_cv(tmp_path)


def test_validation_late_weights_without_a_cv_run_name_the_setting_and_the_ways_out(tmp_path):
    cfg = _late_config(tmp_path / "absent" / "labels.csv")
    with pytest.raises(InputError, match=r"model late: late_weights 'validation' .* give cv_run \(--cv-run\) .* "
                                         r"late_weights: learned"):
        train_final(cfg, tmp_path / "final", epochs=1, progress=False)
    assert not (tmp_path / "final").exists()


@pytest.mark.slow
def test_final_late_model_takes_the_mean_branch_weights_of_the_cv_folds(tmp_path):
    from cytofuse.workflows.cv import run_cv
    from cytofuse.inference.modelfolder import read_model_folder
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    torch.set_num_threads(1)
    write_synthetic_dataset(tmp_path / "data", classes=2, images_per_class=4, shape=(2, 64, 64), seed=0, progress=False)
    cfg = _late_config(tmp_path / "data" / "labels.csv", max_epochs=2)
    run_cv(cfg, tmp_path / "run", progress=False)
    # every branch separates these easy classes perfectly, so the folds' validation weights are equal;
    # give the folds different ones, as harder data would, to see which weights the final model takes
    for k, w in enumerate([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]]):
        file = tmp_path / "run" / "models" / "late" / f"fold_{k}" / "best.safetensors"
        fold = load_model(file)
        fold.set_branch_weights(w)
        save_weights(fold, file)
    expected = late_weights_from_cv(tmp_path / "run")
    assert np.allclose(expected, [0.4, 0.3, 0.3], atol=1e-6)
    out = train_final(cfg, tmp_path / "final", cv_run=tmp_path / "run", progress=False)
    (model,), card = read_model_folder(out)
    assert np.allclose(model.head.branch_weights.numpy(), expected, atol=1e-6)
    assert card.trained_on["branch_weights"]["values"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert "run" in card.trained_on["branch_weights"]["from"]
    assert len(expected) == 3 and pd.read_csv(tmp_path / "data" / "labels.csv")["label"].nunique() == 2
