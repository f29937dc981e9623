"""The built-in demo: organelle phantoms with known answers, cross-validated by every fusion strategy."""

from __future__ import annotations

from pathlib import Path



DEMO_CLASSES = 5  # control + one class per organelle + one that differs only in co-localisation
DEMO_IMAGES_PER_CLASS, DEMO_DIFFICULTY = 8, 0.25  # enough images for 5 folds with a validation split


def demo_config(data_dir: Path) -> dict:
    """The demo's run config: a CPU-sized version of the paper's comparison on the phantoms."""
    channels = ["mitochondria", "early_endosome", "recycling_endosome"]
    return {
        "data": {"manifest": str((data_dir / "labels.csv").resolve())},
        "patches": {"size": 64, "exclude_channels": ["nucleus"], "min_ratio": 0.03, "z_step": 2, "max_per_image": 32},
        "models": [{"fusion": "early"}, {"fusion": "intermediate"}, {"fusion": "late", "late_weights": "validation"}]
        + [{"fusion": "single", "channel": c} for c in channels],
        # the default recipe (warm-up + cosine over a fixed budget, weight EMA, no early stopping)
        "train": {"max_epochs": 15, "batch_size": 32, "progress": False},
        # the 30 fits of small models run two at a time, one thread each: 1.5x the throughput of one at a time
        "cv": {"n_folds": 5, "jobs": 2},
    }


def run_demo(out: str | Path, *, overwrite: bool = False, progress: bool = True):
    """Synthesise the phantom data set, then run the patch stage and 5-fold CV of every fusion strategy."""
    import yaml

    from cytofuse.config import validate_config
    from cytofuse.workflows.cv import run_cv
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    out = Path(out)
    data_dir = out / "data"
    if not (data_dir / "labels.csv").is_file() or overwrite:
        write_synthetic_dataset(
            data_dir, classes=DEMO_CLASSES, images_per_class=DEMO_IMAGES_PER_CLASS, shape=(8, 256, 256), seed=0,
            difficulty=DEMO_DIFFICULTY,
            overwrite=overwrite, progress=progress,
        )
    raw = demo_config(data_dir)
    (out / "demo.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return run_cv(validate_config(raw, source="demo"), out / "run", overwrite=overwrite, progress=progress)


COLOCALISATION_CLASS = "ee_on_mito"  # the demo class that differs from control only in co-localisation


def class_recall_table(result, *, level: str = "image"):
    """Recall of every class (rows) for every deep model (columns), pooled over the CV test folds."""
    import pandas as pd

    from cytofuse.evaluation.metrics import aggregate_by_image

    columns = {}
    for name, pred in result.predictions.items():
        if result.kinds.get(name, "model") != "model":
            continue
        table = aggregate_by_image(pred, classes=result.classes) if level == "image" else pred
        guess = table[[f"prob_{c}" for c in result.classes]].to_numpy().argmax(1)
        truth = table["y_true"].to_numpy()
        columns[name] = [float((guess[truth == k] == k).mean()) if (truth == k).any() else float("nan")
                         for k in range(len(result.classes))]
    return pd.DataFrame(columns, index=result.classes)


def print_demo_findings(result) -> None:
    """Per-class recall of each model; the co-localisation class shows what pooling before fusion loses."""
    from rich.console import Console

    from cytofuse.evaluation.metrics import to_rich_table

    console = Console()
    table = class_recall_table(result)
    console.print(to_rich_table(table.round(2), title="image-level recall per class, pooled over the CV test folds"))
    if COLOCALISATION_CLASS in table.index:
        row = table.loc[COLOCALISATION_CLASS]
        shown = ", ".join(f"{m} {v:.2f}" for m, v in row.items() if not m.startswith("single"))
        console.print(f"'{COLOCALISATION_CLASS}' differs from control only in where early endosomes sit relative to "
                      f"mitochondria (each channel alone is distributed alike): recall {shown}. Intermediate and late "
                      "fusion pool each channel's feature map before the channels meet, so pixel-level "
                      "co-localisation is invisible to them by construction; only early fusion, whose first "
                      "convolution sees the channels together, can learn it.")


