"""Figures: one style, one colour map, and PNG + SVG written atomically beside each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cytofuse.runs import atomic_path

STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "svg.fonttype": "none",
}
LINESTYLES = ("-", "--", "-.", ":")


def figure(figsize: tuple[float, float], ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _output_base(out: str | Path) -> Path:
    out = Path(out)
    return out.with_suffix("") if out.suffix.lower() in (".png", ".svg") else out


def save_figure(fig, out: str | Path) -> tuple[Path, Path]:
    """Write ``out.png`` (300 dpi) and ``out.svg``, each to a temporary name renamed into place."""
    base = _output_base(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("png", "svg"):
        final = base.with_name(f"{base.name}.{fmt}")
        with atomic_path(final) as tmp, open(tmp, "xb") as handle:
            fig.savefig(handle, format=fmt, dpi=300, metadata={"Date": None} if fmt == "svg" else None)
        paths.append(final)
    return paths[0], paths[1]


def class_colours(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.85, n)]
