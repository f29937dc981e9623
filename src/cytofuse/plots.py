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


def plot_optimisation_history(number, value, state, out: str | Path, *, title: str, maximize: bool = True,
                              ylabel: str = "Objective") -> tuple[Path, Path]:
    """One study's trials: value against trial number (complete trials as dots, pruned ones as grey crosses at
    their last reported value) and the best complete value so far as a step line."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    number, value = np.asarray(number, dtype=float), np.asarray(value, dtype=float)
    state = np.asarray(state).astype(str)
    complete, pruned = state == "COMPLETE", (state == "PRUNED") & np.isfinite(value)
    order = np.argsort(number[complete])
    done_n, done_v = number[complete][order], value[complete][order]
    best = np.maximum.accumulate(done_v) if maximize else np.minimum.accumulate(done_v)
    with matplotlib.rc_context(STYLE):
        fig, ax = figure((4.6, 3.0))
        ax.scatter(done_n, done_v, s=18, color="#31688e", zorder=3, label="complete")
        if pruned.any():
            ax.scatter(number[pruned], value[pruned], s=18, marker="x", color="0.55", zorder=2,
                       label="pruned (last reported)")
        if len(done_n):
            ax.step(np.append(done_n, number.max()), np.append(best, best[-1]), where="post", color="#b5367a",
                    lw=1.4, label="best so far")
        ax.set(xlabel="Trial", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, lw=0.4, alpha=0.5)
        ax.legend(frameon=False, loc="best")
        return save_figure(fig, out)


def plot_importances(table, out: str | Path, *, title: str) -> tuple[Path, Path]:
    """Horizontal bars of a table of importances (one row per parameter, one column per study)."""
    import matplotlib

    params, columns = list(table.index), list(table.columns)
    height = 0.8 / max(1, len(columns))
    colours = class_colours(len(columns))
    with matplotlib.rc_context(STYLE):
        fig, ax = figure((5.6, 1.2 + 0.45 * len(params) * max(1, len(columns)) ** 0.5))
        y = np.arange(len(params))
        for i, (column, colour) in enumerate(zip(columns, colours)):
            ax.barh(y + (i - (len(columns) - 1) / 2) * height, table[column].to_numpy(dtype=float), height,
                    color=colour, label=str(column))
        ax.set_yticks(y, params)
        ax.invert_yaxis()
        ax.set(xlabel="Importance (share of the objective's variance)", xlim=(0, 1), title=title)
        ax.legend(frameon=False, fontsize=7, loc="lower right")
        return save_figure(fig, out)
