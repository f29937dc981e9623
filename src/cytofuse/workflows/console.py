"""What a run prints: attrition per class, the models beside the baseline and probes, the probes' verdict."""

from __future__ import annotations

from pathlib import Path

from cytofuse.preprocess.patches import PatchIndex


def print_patch_summary(index: PatchIndex, out: str | Path) -> None:
    """Attrition per class and the images that kept too few patches."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"Patches per class (channels: {', '.join(index.channel_names)})")
    for col in ("class", "images", "candidates", "kept", "attrition %", "images below minimum"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in index.attrition.itertuples(index=False):
        table.add_row(str(row.label), str(row.images), str(row.candidates), str(row.kept),
                      f"{row.attrition_pct:.1f}", str(row.images_below_minimum))
    console.print(table)
    if index.sparse_images:
        console.print(f"[yellow]{len(index.sparse_images)} image(s) kept fewer patches than min_patches:[/] "
                      + ", ".join(index.sparse_images[:10]) + (" ..." if len(index.sparse_images) > 10 else ""))
        console.print("  see images.parquet (notes column); patches.fallback=top_k keeps their best patches")
    console.print(f"{len(index.patches)} patches from {len(index.images)} images written to {out}")


SCOPES = {  # the deep models' normalisation scope, as the CV summary states it
    "image": "per image (each image's own percentiles); for whole fields of constant acquisition, let `cytofuse "
             "tune` compare it with dataset scope (tune.space: patches.normalise: {choices: [image, dataset]})",
    "dataset": "per data set (percentiles of each fold's training patches; test patches never enter them)",
    "fixed": "fixed range (patches.fixed_range)",
}


def print_cv_summary(result) -> None:
    """The models, the handcrafted baseline and the shortcut probes side by side (mean ± sd over folds)."""
    from rich.console import Console

    from cytofuse.evaluation.metrics import format_summary_table, to_rich_table

    console = Console()
    kinds = getattr(result, "kinds", {}) or dict.fromkeys(result.metrics, "model")
    first = next(iter(result.metrics.values()))
    for level in ("patch", "image"):
        table = format_summary_table({k: v["cv"] for k, v in result.metrics.items()}, level=level)
        table = table.drop(columns=[c for c in table.columns if str(c) == "Accuracy"])  # the paper's four metrics
        if set(kinds.values()) != {"model"}:
            table.insert(0, "kind", [kinds.get(name, "model") for name in table.index])
        console.print(to_rich_table(table, title=f"{level}-level metrics, mean ± sd over folds"))
    console.print(f"measured on: {first['measured_on']}")
    scopes = {v.get("model", {}).get("normalisation") for k, v in result.metrics.items() if kinds.get(k) == "model"}
    for scope in sorted(scopes - {None}):
        console.print(f"normalisation: {SCOPES.get(scope, scope)}", markup=False)
    _print_probe_verdict(console, result, kinds)
    console.print(f"run folder: {result.run_dir}")


def _print_probe_verdict(console, result, kinds: dict) -> None:
    """A loud warning per probe that rivals the models or sits far above chance, else one quiet line."""
    if "probe" not in kinds.values():
        return
    found = getattr(result, "shortcut_warnings", [])
    for text in found:
        console.print(f"[bold red]WARNING:[/] {text}")
    if found:
        console.print("  check how the classes were imaged (plates, wells, exposure, background) before trusting the models")
    else:
        console.print("shortcut probes: none rivals the models or sits far above chance (image level)")
