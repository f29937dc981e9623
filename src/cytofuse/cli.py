"""The ``cytofuse`` command. Heavy libraries are imported inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Organelle-aware fusion classifiers for microscopy images: patches, grouped CV, explanations.",
)

OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an existing run folder.")
VerboseOpt = typer.Option(False, "--verbose", help="Print Lightning's own lines for every fit (device, precision, tips, "
                          "model summary); quiet by default (train.verbose).")
SchedulerOpt = typer.Option(None, "--scheduler", help="Run the per-image stage as one Dask task per image: local:N (N "
                            "worker processes here) or a running scheduler's address, e.g. tcp://host:8786 (its "
                            "workers must see the images and the output folder). The outputs are the same.")


def _fail(exc: Exception) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to create (images/ and labels.csv)."),
    classes: int = typer.Option(6, help="Number of classes (cell lines)."),
    images_per_class: int = typer.Option(4, help="Images per class."),
    shape: str = typer.Option("8,256,256", help="Stack shape Z,Y,X."),
    seed: int = typer.Option(0, help="Random seed (same seed, same data)."),
    difficulty: Optional[float] = typer.Option(None, help="0 (easy) to 1 (classes nearly identical); default 0.5 "
                                               "for organelles, 0.3 otherwise."),
    kind: str = typer.Option("organelles", help="organelles (3D phantoms), livedead (BF + PI fields per "
                             "condition) or singlecell (BF, DF, DNA cells per cell-cycle class)."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Write a synthetic data set: organelle phantoms (OME-TIFF + labels.csv), live/dead fields or single cells."""
    from cytofuse.errors import CytofuseError
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    if kind in ("livedead", "singlecell"):
        from cytofuse.synthetic.cells import write_livedead_set, write_single_cell_set

        try:
            if kind == "livedead":
                table = write_livedead_set(out, seed=seed, difficulty=0.3 if difficulty is None else difficulty,
                                           overwrite=overwrite)
            else:
                table = write_single_cell_set(out, seed=seed, difficulty=0.3 if difficulty is None else difficulty,
                                              overwrite=overwrite)
        except (CytofuseError, ValueError, FileExistsError) as exc:
            _fail(exc)
        typer.echo(f"wrote {kind} set to {out} ({len(table)} rows in {out / 'cells.csv'})")
        return
    if kind != "organelles":
        _fail(ValueError(f"--kind must be organelles, livedead or singlecell, got {kind!r}"))
    try:
        zyx = tuple(int(v) for v in shape.split(","))
        if len(zyx) != 3:
            raise ValueError
    except ValueError:
        _fail(ValueError(f"--shape must be Z,Y,X integers, got {shape!r}"))
    try:
        path = write_synthetic_dataset(
            out, classes=classes, images_per_class=images_per_class, shape=zyx, seed=seed,
            difficulty=0.5 if difficulty is None else difficulty, overwrite=overwrite,
        )
    except (CytofuseError, ValueError, FileExistsError) as exc:
        _fail(exc)
    typer.echo(f"wrote {classes * images_per_class} images and {path / 'labels.csv'}")


@app.command()
def patches(
    config: Optional[Path] = typer.Argument(None, help="YAML run config (data and patches sections)."),
    images: Optional[Path] = typer.Option(None, help="Folder with one sub-folder per class."),
    manifest: Optional[Path] = typer.Option(None, help="CSV manifest (path, label, group)."),
    out: Path = typer.Option(..., help="Run folder to write."),
    size: Optional[int] = typer.Option(None, help="Patch side in pixels."),
    stride: Optional[int] = typer.Option(None, help="Step between patches (default: size)."),
    min_ratio: Optional[float] = typer.Option(None, help="Minimum foreground ratio."),
    rule: Optional[str] = typer.Option(None, help="any | all | mean over channels."),
    channels: Optional[str] = typer.Option(None, help="Comma-separated channels to use (names or indices)."),
    exclude: Optional[str] = typer.Option(None, help="Comma-separated channels to drop, e.g. the nucleus."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: section.field=value."),
    workers: int = typer.Option(1, help="Worker processes."),
    scheduler: Optional[str] = SchedulerOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Cut images into z-slice patches and drop sparse ones (global Otsu foreground ratio)."""
    from cytofuse.errors import CytofuseError

    flags = {"size": size, "stride": stride, "min_ratio": min_ratio, "rule": rule,
             "channels": _csv(channels), "exclude_channels": _csv(exclude)}
    overrides = list(set_) + [f"patches.{k}={_yaml(v)}" for k, v in flags.items() if v is not None]
    try:
        cfg = _config(config, images=images, manifest=manifest, overrides=overrides)
        cfg = _with_scheduler(cfg.model_copy(update={"workers": workers}), scheduler)
        from cytofuse.workflows.patching import run_patches

        index = run_patches(cfg, out, overwrite=overwrite)
    except (CytofuseError, FileExistsError) as exc:
        _fail(exc)
    from cytofuse.workflows.console import print_patch_summary

    print_patch_summary(index, out)


@app.command()
def cv(
    config: Path = typer.Argument(..., help="YAML run config."),
    out: Path = typer.Option(..., help="Run folder to write (resumed when unfinished)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: section.field=value."),
    scheduler: Optional[str] = SchedulerOpt,
    verbose: bool = VerboseOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Patches -> image-grouped stratified k-fold CV of every configured model -> metrics."""
    from cytofuse.errors import CytofuseError

    try:
        cfg = _with_scheduler(_config(config, images=None, manifest=None, overrides=_verbose(set_, verbose)), scheduler)
        from cytofuse.workflows.cv import run_cv, run_sweep

        if cfg.sweep is not None:
            table = run_sweep(cfg, out, overwrite=overwrite)
        else:
            result = run_cv(cfg, out, overwrite=overwrite)
    except (CytofuseError, FileExistsError) as exc:
        _fail(exc)
    from cytofuse.workflows.console import print_cv_summary

    if cfg.sweep is not None:
        from rich.console import Console

        Console().print(table.to_string(index=False), f"\nwritten to {out / 'sweep.csv'}")
    else:
        print_cv_summary(result)


@app.command()
def explain(
    run_dir: Path = typer.Argument(..., help="A finished CV run folder."),
    model: Optional[str] = typer.Option(None, help="Only this model (its display name); default every deep model."),
    out: Optional[Path] = typer.Option(None, help="Output folder; default RUN_DIR/explain."),
    n_examples: int = typer.Option(4, help="Correct and wrong Grad-CAM examples per class."),
    umap: bool = typer.Option(True, help="Also project embeddings with UMAP (t-SNE always)."),
    thumbnails: bool = typer.Option(True, help="Thumbnail scatter of the embedding."),
) -> None:
    """Grad-CAM per channel encoder, channel ablation and embeddings of a CV run's test patches."""
    from cytofuse.errors import CytofuseError

    try:
        from cytofuse.evaluation.explain import explain_run

        done = explain_run(run_dir, model=model, out=out, n_examples=n_examples,
                           methods=("tsne", "umap") if umap else ("tsne",), thumbnails=thumbnails, progress=True)
    except (CytofuseError, FileExistsError) as exc:
        _fail(exc)
    for name, summary in done.items():
        typer.echo(f"{name}: {summary}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A CV or sweep run folder."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write; default RUN_DIR/report.html."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """One self-contained HTML page: data, attrition, metrics, figures, shortcut probes, explanations, config."""
    from cytofuse.errors import CytofuseError

    try:
        from cytofuse.evaluation.report import write_report

        path = write_report(run_dir, out=out, overwrite=overwrite)
    except (CytofuseError, FileExistsError) as exc:
        _fail(exc)
    typer.echo(f"report written to {path}")


@app.command()
def tune(
    config: Path = typer.Argument(..., help="YAML run config with a tune section (the search space)."),
    out: Path = typer.Option(..., help="Run folder to write (an unfinished search resumes; a finished one continues "
                             "when asked for more trials)."),
    trials: Optional[int] = typer.Option(None, help="Trials per study (default: tune.trials)."),
    timeout: Optional[float] = typer.Option(None, help="Wall-clock budget of the whole search in minutes."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage shared by several processes: an SQLAlchemy URL "
                                          "(postgresql+psycopg://..., sqlite:///...) or a journal file path; default "
                                          "RUN/tune/study.db."),
    worker: int = typer.Option(0, help="0: the leader (searches, refits, writes best_config.yaml); N > 0: an extra "
                               "process that only runs trials of the leader's studies in --storage, with its own "
                               "--out."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: section.field=value."),
    verbose: bool = VerboseOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Nested hyperparameter search (Optuna TPE + Hyperband) scored beside the defaults on the same outer folds."""
    from cytofuse.errors import CytofuseError

    try:
        cfg = _config(config, images=None, manifest=None, overrides=_verbose(set_, verbose))
        from cytofuse.workflows.tune import run_tune

        result = run_tune(cfg, out, trials=trials, timeout_min=timeout, storage=storage, worker=worker,
                          overwrite=overwrite)
    except (CytofuseError, FileExistsError) as exc:
        _fail(exc)
    from cytofuse.workflows.tune import WorkerResult, print_tune_summary, print_worker_summary

    if isinstance(result, WorkerResult):
        print_worker_summary(result)
    else:
        print_tune_summary(result)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML run config (the one used for `cytofuse cv`)."),
    out: Path = typer.Option(..., help="Model folder to write."),
    epochs: Optional[int] = typer.Option(None, help="Epochs; default: from --cv-run (median best epoch + 1)."),
    cv_run: Optional[Path] = typer.Option(None, help="A finished CV run of this config, for the epoch count."),
    model: Optional[str] = typer.Option(None, help="Which model of the config (its display name); default the first."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: section.field=value."),
    scheduler: Optional[str] = SchedulerOpt,
    verbose: bool = VerboseOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Fit one model on all labelled images and write a model folder for `predict` and `export`."""
    from cytofuse.errors import CytofuseError

    try:
        cfg = _with_scheduler(_config(config, images=None, manifest=None, overrides=_verbose(set_, verbose)), scheduler)
        from cytofuse.workflows.final import train_final

        path = train_final(cfg, out, epochs=epochs, cv_run=cv_run, model_name=model, overwrite=overwrite)
    except (CytofuseError, FileExistsError) as exc:
        _fail(exc)
    typer.echo(f"model folder written to {path}")


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="A model folder (`cytofuse train`) or a CV run folder (fold ensemble)."),
    images: list[str] = typer.Argument(..., help="Image files, any readable format, or fsspec URLs (s3://...)."),
    out: Path = typer.Option(..., help="Output folder (summary, per-patch table, heat maps)."),
    model: Optional[str] = typer.Option(None, help="Model name inside a CV run folder."),
    batch_size: int = typer.Option(64, help="Patches per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Threads that each cut a batch and run the model on it "
                                          "(default: one per core; 0: one batch at a time)."),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 (auto: bf16 where the device has it natively)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto: the first CUDA GPU torch sees, "
                               "else the CPU)."),
    channel_names: Optional[str] = typer.Option(None, help="Comma-separated channel names for files that store none."),
    axes: Optional[str] = typer.Option(None, help="Axis order of .npy files, e.g. YXC."),
    heatmap_resolution: str = typer.Option("stride", help="stride (one value per patch-grid cell, the summary's "
                                           "heatmap_cell_px image pixels) | full (one value per image pixel, "
                                           "files cell**2 times larger)."),
    format_: str = typer.Option("tiff", "--format", help="Heat maps as tiff (OME-TIFF files) | ome-zarr (OME-Zarr "
                                "multiscale images, one channel per class, for viewers that stream)."),
    read_ahead: bool = typer.Option(False, help="Read and preprocess the next image while the model runs on "
                                    "the current one: faster on many images, two images in memory."),
    scheduler: Optional[str] = SchedulerOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Classify whole images: per-image probabilities and decision, per-patch table, per-class heat maps."""
    from cytofuse.errors import CytofuseError

    try:
        from cytofuse.inference.predict import predict_images
        from cytofuse.io.distributed import check_scheduler

        from cytofuse.io.readers import as_image_path

        summary = predict_images(
            model_dir, [as_image_path(i) for i in images], out=out, model_name=model, batch_size=batch_size, workers=workers,
            precision=precision, channel_names=_csv(channel_names), axes=axes, overwrite=overwrite,
            heatmap_resolution=heatmap_resolution, read_ahead=read_ahead, scheduler=check_scheduler(scheduler),
            heatmap_format=format_, device=device,
        )
    except (CytofuseError, FileExistsError) as exc:
        _fail(exc)
    from rich.console import Console

    Console().print(summary.to_string(index=False), f"\nwritten to {out}")


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="A model folder written by `cytofuse train`, or a CV run (its folds)."),
    out: Path = typer.Argument(..., help="Folder to write (model.onnx, model.pt, model.yaml, a bioimage.io package)."),
    format_: list[str] = typer.Option(["onnx", "torchscript"], "--format", help="onnx and/or torchscript."),
    opset: int = typer.Option(17, help="ONNX opset."),
    verify: bool = typer.Option(True, help="Check exported outputs against PyTorch (max abs diff <= 1e-4)."),
    model: Optional[str] = typer.Option(None, help="Which model of a CV run (its display name)."),
    bioimageio: bool = typer.Option(True, help="Write and validate a bioimage.io package (rdf.yaml, test tensors, "
                                    "cover, README); needs cytofuse[bioimageio]."),
    cv_run: Optional[Path] = typer.Option(None, help="The CV run the model came from: its metrics go into the README "
                                          "and its first image gives the test patch."),
    sample_image: Optional[Path] = typer.Option(None, help="An image to cut the package's test patch from."),
    author: list[str] = typer.Option([], help='"Name;affiliation" (repeatable); default a marked placeholder.'),
    cite: list[str] = typer.Option([], help='"text;doi" (repeatable); default a marked placeholder.'),
    license_: str = typer.Option("BSD-3-Clause", "--license", help="SPDX license of the exported weights."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Export a model to ONNX and TorchScript as a validated bioimage.io model package."""
    from cytofuse.errors import CytofuseError

    try:
        from cytofuse.export import export_model_folder

        paths = export_model_folder(model_dir, out, formats=format_, opset=opset, verify=verify, overwrite=overwrite,
                                    model_name=model, bioimageio=bioimageio, cv_run=cv_run, sample_image=sample_image,
                                    authors=author, cite=cite, license=license_)
    except (CytofuseError, FileExistsError) as exc:
        _fail(exc)
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


@app.command()
def emptyfilter(
    examples: Path = typer.Argument(..., help="Folder with empty/ and cells/ patch images, or (--voc) fields with Pascal-VOC boxes."),
    out: Path = typer.Option(..., "--out", help="Filter folder to write (use it as patches.empty_filter)."),
    voc: bool = typer.Option(False, "--voc", help="EXAMPLES holds fields (name.png + name.xml boxes): cut a labelled grid."),
    size: int = typer.Option(64, help="Patch size of the grid cut from --voc fields (use the run's patches.size)."),
    stride: Optional[int] = typer.Option(None, help="Grid step for --voc fields (default: size)."),
    encoder: str = typer.Option("resnet18", help="Feature encoder: resnet18/34/50, smallcnn, or 'intensity' statistics."),
    pretrained: Optional[Path] = typer.Option(None, help="Local encoder weights (torchvision .pth or safetensors)."),
    folds: int = typer.Option(5, help="Grouped folds of the held-out evaluation printed before the final fit."),
    seed: int = typer.Option(0, help="Seed of the random encoder and the folds."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing filter folder."),
) -> None:
    """Learn an empty-patch filter (CNN features + SVM) from labelled patches; print its held-out F1; save it."""
    from cytofuse.preprocess.emptyfilter import EmptyFilter, evaluate_filter, patches_from_voc_fields, read_labelled_patches
    from cytofuse.errors import CytofuseError
    from cytofuse.runs import check_replaceable

    try:
        check_replaceable(out, overwrite=overwrite, what="filter folder")  # before the slow part
        if voc:
            patches, labels, groups, _ = patches_from_voc_fields(examples, size=size, stride=stride, normalise="none")
        else:
            patches, labels, groups, _ = read_labelled_patches(examples)
        scores = evaluate_filter(patches, labels, groups, n_splits=folds, encoder=encoder, pretrained=pretrained, seed=seed)
        typer.echo(
            f"held-out ({folds}-fold, grouped by {'field' if voc else 'group'}; {scores['n_empty']} empty, "
            f"{scores['n_cells']} with cells): F1 empty {scores['f1_empty']:.3f} (all-empty rule "
            f"{scores['trivial_f1_empty']:.3f}), F1 cells {scores['f1_cells']:.3f}, "
            f"balanced accuracy {scores['balanced_accuracy']:.3f}"
        )
        EmptyFilter(encoder=encoder, pretrained=pretrained, seed=seed).fit(patches, labels, groups=groups).save(out, overwrite=overwrite)
    except (CytofuseError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(f"wrote {out}")


@app.command()
def montage(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="Folder with one sub-folder per class holding montage "
                                      "files (one per channel, Ch3_X.tif ...), or one montage file."),
    out: Path = typer.Option(..., "--out", help="Folder to write: <class>/cell_<i>.ome.tif and cells.csv."),
    tile: int = typer.Option(..., "--tile", help="Tile side in pixels (40 for the Jurkat exports)."),
    order: str = typer.Option("column", help="Fill order of the tiles: column (down each column first) or row."),
    count: Optional[int] = typer.Option(None, help="Cells per montage file: tiles after the first N are ignored."),
    counts: Optional[Path] = typer.Option(None, help="YAML (name: count) or CSV (name,count) of tiles per class folder "
                                          "or per montage (class/key)."),
    channels: Optional[str] = typer.Option(None, help="Rename channels, e.g. Ch3=BF,Ch4=DNA,Ch6=DF."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder made by cytofuse."),
) -> None:
    """Cut imaging flow cytometry montages into one OME-TIFF per cell; padding and repeated tiles are left out."""
    from cytofuse.errors import CytofuseError
    from cytofuse.io.montage import MANIFEST, parse_channel_map, read_counts, write_montage_cells

    try:
        if order not in ("column", "row"):
            raise CytofuseError(f"--order must be column or row, got {order!r}")
        summary = write_montage_cells(
            input_path, out, tile_size=tile, order=order, count=count,  # type: ignore[arg-type]
            counts=read_counts(counts) if counts is not None else None,
            channels=parse_channel_map(channels), overwrite=overwrite)
    except (CytofuseError, ValueError, FileExistsError) as exc:
        _fail(exc)
    _print_montage_summary(summary, out / MANIFEST)


def _print_montage_summary(summary, manifest: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Montage tiles per class (seen: within the count; padding and duplicates: rejected)")
    columns = ("class", "montages", "tiles", "after count", "seen", "cells", "padding", "duplicates")
    for col in columns:
        table.add_column(col, justify="left" if col == "class" else "right")
    for s in summary:
        table.add_row(s.label, *(str(v) for v in (s.montages, s.tiles, s.ignored, s.seen, s.cells, s.padding, s.duplicates)))
    console = Console()
    console.print(table)
    for s in (s for s in summary if s.cells_after_padding):
        console.print(f"[yellow]{s.label}: {s.cells_after_padding} cell tile(s) come after padding in their montage; "
                      "check --order[/]")
    console.print(f"{sum(s.cells for s in summary)} cells written; manifest {manifest} (use it as data.manifest)")


@app.command()
def demo(
    out: Path = typer.Option(Path("cytofuse-demo"), help="Folder for the synthetic data and the run."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Synthesise organelle phantoms and compare early, intermediate, late and single-channel classifiers (5-fold CV)."""
    from cytofuse.errors import CytofuseError
    from cytofuse.workflows.console import print_cv_summary, print_patch_summary
    from cytofuse.workflows.demo import print_demo_findings, run_demo

    try:
        result = run_demo(out, overwrite=overwrite)
    except (CytofuseError, FileExistsError) as exc:
        _fail(exc)
    from cytofuse.preprocess.patches import read_patch_index

    print_patch_summary(read_patch_index(result.run_dir), result.run_dir)
    print_cv_summary(result)
    print_demo_findings(result)


def _verbose(overrides: list[str], verbose: bool) -> list[str]:
    return list(overrides) + (["train.verbose=true"] if verbose else [])


def _with_scheduler(cfg, scheduler: str | None):
    """``cfg`` with the ``--scheduler`` of the command line, when one is given (checked and named as the flag)."""
    if scheduler is None:
        return cfg
    from cytofuse.io.distributed import check_scheduler

    return cfg.model_copy(update={"scheduler": check_scheduler(scheduler, what="--scheduler")})


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _yaml(value) -> str:
    import json

    return json.dumps(value)


def _config(path: Path | None, *, images: Path | None, manifest: Path | None, overrides: list[str]):
    from cytofuse.config import load_config, validate_config

    data = [f"data.images={_yaml(str(images.resolve()))}"] if images else []
    data += [f"data.manifest={_yaml(str(manifest.resolve()))}"] if manifest else []
    if path is not None:
        return load_config(path, overrides=data + overrides)
    from cytofuse.config import apply_override

    raw: dict = {}
    for item in data + overrides:
        apply_override(raw, item)
    cfg = validate_config(raw, source="command-line flags")
    return cfg.model_copy(update={"data": cfg.data.resolve(Path.cwd())})


class Interrupted(BaseException):
    """Ctrl+C (SIGINT) inside a command: not a KeyboardInterrupt, which the trainer would turn into exit 1."""


def _on_sigint(signum, frame) -> None:
    raise Interrupted()


def main() -> None:
    import signal

    signal.signal(signal.SIGINT, _on_sigint)
    try:
        app()
    except Interrupted:
        import sys

        print("\ncytofuse: interrupted. Everything finished so far is kept in the output folder (stages, folds, and "
              "the last epoch checkpoint of the fit in progress); run the same command again to resume where it "
              "stopped.", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
