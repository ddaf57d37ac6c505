"""The report's figures: each function draws one PNG from numbers it is given and returns its path.

Every figure gets its own Agg canvas (a bare `Figure` on a `FigureCanvasAgg`) where it is drawn,
so importing this module sets no matplotlib backend and touches no pyplot state (a notebook or
an interactive session that imported nst_det keeps its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..utils.atomic import atomic_write

__all__ = ["ForestRow", "forest_plot", "curves", "per_class_ap", "detections", "selectivity"]


def _canvas(**fig_kw):
    """A matplotlib Figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**fig_kw)
    FigureCanvasAgg(fig)
    return fig


def _figure(nrows: int = 1, ncols: int = 1, **fig_kw):
    """A figure and its axes, as `pyplot.subplots` returns them."""
    fig = _canvas(**fig_kw)
    return fig, fig.subplots(nrows, ncols)


def _save(fig, out_dir: str, path: str) -> str:
    fig.tight_layout()
    _write_png(fig, os.path.join(out_dir, path))
    return path


def _write_png(fig, path: str) -> None:
    """Write `fig` to `path` atomically: a report stopped while drawing leaves no broken PNG."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)


def run_colours(names) -> dict:
    """name -> a colour of its own (matplotlib's 10-colour cycle repeats from the 11th run)."""
    import matplotlib

    names = list(names)
    if len(names) > 20:  # a continuous map, sampled evenly
        turbo = matplotlib.colormaps["turbo"]
        return {name: turbo(i / (len(names) - 1)) for i, name in enumerate(names)}
    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: palette(i) for i, name in enumerate(names)}


def curves(cls_runs: dict, det_runs: dict, out_dir: str, path: str) -> str:
    """Loss curves of the classification runs and loss + AP50 curves of the detection runs;
    each dict: run name -> its metrics.json rows (detectron2's per-iteration scalars)."""
    fig, axes = _figure(1, 3, figsize=(15, 4))
    colour = run_colours(cls_runs)
    for name, rows in cls_runs.items():
        loss = [r for r in rows if "total_loss" in r]
        axes[0].plot([r["iteration"] for r in loss], [r["total_loss"] for r in loss], ".-",
                     label=name, color=colour[name])
    colour = run_colours(det_runs)
    for name, rows in det_runs.items():
        loss = [r for r in rows if "total_loss" in r]
        axes[1].plot([r["iteration"] for r in loss], [r["total_loss"] for r in loss], ".-",
                     label=name, color=colour[name])
        ap = [r for r in rows if "bbox/AP50" in r]
        axes[2].plot([r["iteration"] for r in ap], [r["bbox/AP50"] for r in ap], "o-",
                     label=name, color=colour[name])
    for ax, title in zip(axes, ("classification pretraining: loss",
                                "detection: total loss", "detection: AP50")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=6)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    return _save(fig, out_dir, path)


def per_class_ap(bbox: dict, metric: str, out_dir: str, path: str) -> str:
    """Bars of each run's `<metric>-<class>` values (VOC: AP50, COCO: AP); bbox: run name -> its
    bbox metrics. Labels turn upright past 10 classes, and the legend sits beside the axes."""
    prefix = f"{metric}-"
    classes = sorted({k[len(prefix):] for b in bbox.values() for k in b if k.startswith(prefix)})
    fig, ax = _figure(figsize=(max(12.0, 0.35 * len(classes) * max(1, len(bbox)) ** 0.5), 4))
    if classes:
        width, colour = 0.8 / len(bbox), run_colours(bbox)
        for i, (name, b) in enumerate(bbox.items()):
            ax.bar(np.arange(len(classes)) + i * width,
                   [b.get(f"{prefix}{c}", 0.0) for c in classes], width, label=name,
                   color=colour[name])
        # each group's centre
        ax.set_xticks(np.arange(len(classes)) + (len(bbox) - 1) * width / 2, classes,
                      rotation=90 if len(classes) > 10 else 0, fontsize=7)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"per-class {metric}")
    return _save(fig, out_dir, path)


def detections(found: list, metadata, rgb: bool, title: str, out_dir: str, path: str) -> str:
    """One panel per (image, Instances) in `found`, drawn by detectron2's Visualizer; `rgb`:
    False when the images are BGR (cfg.INPUT.FORMAT)."""
    from detectron2.utils.visualizer import Visualizer

    fig, axes = _figure(1, len(found), figsize=(4 * len(found), 4))
    for ax, (image, instances) in zip(np.atleast_1d(axes), found):
        vis = Visualizer(image if rgb else image[:, :, ::-1], metadata)
        ax.imshow(vis.draw_instance_predictions(instances).get_image())
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, out_dir, path)


def selectivity(feats: dict, title: str, out_dir: str, path: str, channels: int = 5) -> str:
    """The paper's picture: the teacher's `channels` most varied channels (normalised
    activation maps) and, for every other entry, the channel whose normalised map is closest
    to each. feats: {"teacher": CxHxW tensor, row label: C'xH'xW' tensor, ...}."""
    import torch

    def normalised(f):
        f = f.flatten(1)
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-10)

    t = normalised(feats["teacher"])
    picked = torch.argsort(t.var(dim=1), descending=True)[:channels]
    fig, axes = _figure(len(feats), channels, figsize=(2.2 * channels, 2.2 * len(feats)))
    for row, (key, feat) in enumerate(feats.items()):
        f = normalised(feat)
        for col, ch in enumerate(picked):
            match = int(ch) if key == "teacher" else int(torch.argmax(f @ t[ch]))
            ax = axes[row, col]
            ax.imshow(f[match].reshape(feat.shape[1:]).numpy(), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"teacher ch {match}" if key == "teacher" else f"ch {match}", fontsize=8)
        axes[row, 0].set_ylabel(key)
    fig.suptitle(title)
    return _save(fig, out_dir, path)


@dataclass(frozen=True)
class ForestRow:
    name: str
    mean: float | None  # mean Δ; None: the row is drawn empty ("not compared")
    low: float | None  # interval; None with one seed (point only)
    high: float | None
    n: int  # paired seeds
    note: str = ""  # text beside the row: chosen weight, loss cost per step


def forest_plot(rows: list, path: str, metric: str = "AP50", level: float = 0.95):
    """Write a PNG forest plot of `rows` (top to bottom in the given order) to `path`; returns
    the matplotlib Figure."""
    height = 1.1 + 0.4 * max(1, len(rows))  # inches: 0.6 below the axes, 0.5 above
    fig = _canvas(figsize=(9.0, height))
    # the row names sit left of the axes: room for the longest (~0.0075 of the width per
    # character at fontsize 8), the axes ending where the notes begin
    left = min(0.4, max(0.16, 0.03 + 0.0075 * max((len(r.name) for r in rows), default=0)))
    ax = fig.add_axes((left, 0.6 / height, 0.58 - left, 1 - 1.1 / height))
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
    _write_png(fig, path)
    return fig
