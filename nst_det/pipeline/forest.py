"""Forest plot of the paired differences: one row per method, mean Δ and its interval.

The Agg canvas is chosen where the figure is drawn (a bare `Figure` on a `FigureCanvasAgg`), so
importing this module sets no matplotlib backend and touches no pyplot state.
"""

from __future__ import annotations

__all__ = ["ForestRow", "forest_plot"]

from dataclasses import dataclass


@dataclass(frozen=True)
class ForestRow:
    name: str
    mean: float | None  # mean Δ; None: the row is drawn empty ("not compared")
    low: float | None  # interval; None with one seed (point only)
    high: float | None
    n: int  # paired seeds
    note: str = ""  # text beside the row: chosen weight, loss cost per step


def forest_plot(rows: list, path: str, metric: str = "AP50", level: float = 0.95) -> None:
    """Write a PNG forest plot of `rows` (top to bottom in the given order) to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = 1.1 + 0.4 * max(1, len(rows))  # inches: 0.6 below the axes, 0.5 above
    fig = Figure(figsize=(9.0, height))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.16, 0.6 / height, 0.42, 1 - 1.1 / height))
    ys = list(range(len(rows)))[::-1]
    ends = [0.0]
    for y, row in zip(ys, rows):
        if row.mean is None:
            ax.text(0, y, "not compared", va="center", ha="center", fontsize=7, color="grey")
            continue
        if row.low is not None:
            ax.hlines(y, row.low, row.high, color="tab:blue", lw=2)
            ends += [row.low, row.high]
            marker, color = "o", "tab:blue"
        else:
            marker, color = "x", "tab:orange"  # one seed: no interval
        ax.plot([row.mean], [y], marker=marker, color=color, ms=6, zorder=3)
        ends.append(row.mean)
    ax.axvline(0.0, color="black", lw=0.8, ls="--")
    pad = 0.1 * (max(ends) - min(ends)) or 1.0
    ax.set_xlim(min(ends) - pad, max(ends) + pad)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_yticks(ys, [r.name for r in rows], fontsize=8)
    for y, row in zip(ys, rows):
        seeds = f"n={row.n}" + ("" if row.low is not None or row.mean is None else ", no CI")
        ax.annotate(f"{seeds}   {row.note}", (1.03, y), xycoords=("axes fraction", "data"),
                    va="center", fontsize=7, annotation_clip=False)
    ax.set_xlabel(f"Δ{metric} vs plain, same seed (mean, {100 * level:.0f}% t-interval)")
    ax.set_title(f"paired Δ{metric} per method (× : one seed, no interval)", fontsize=9)
    fig.savefig(path, dpi=90)
