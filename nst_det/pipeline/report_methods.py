"""The report's methods section: each transfer method's detection student against the plain one
(`det_plain_s<seed>`: same pretrained student, schedule and seeds, no transfer loss), seed by
seed (paired.py), read from the stage records only: the method runs' stage.json and metrics.json
(the training step), the calibration stages' weights and loss time, the weight grid's choice.
"""

from __future__ import annotations

import os
import statistics

from .describe import markdown_table, metrics_rows, section, select
from .figures import ForestRow, forest_plot
from .paired import format_interval, mean_sd, paired_difference
from .plan import is_plain_student
from .records import finished_results
from .weight_grid import factor_label

__all__ = ["group_numbers", "methods_section", "method_numbers"]

METRICS = ("AP50", "AP", "AP75", "APs", "APm", "APl")  # AP50, AP, then those present
CONTROL_LABELS = {"negative": "control: A/A, expect no difference",
                  "positive": "control: hand-set NST"}


def group_numbers(group: list, results: dict, **extra) -> dict:
    """The numbers of one recipe's runs (its seeds): {"seeds": [...], metric: [value per seed],
    "by_seed": {metric: {seed: value}}, "step_ms": median training step (metrics.json), **extra}
    for AP50, AP and every other summary bbox metric the records hold (METRICS first).
    results: stage name -> its stage.json."""
    group = sorted(group, key=lambda s: s.meta.get("seed", 0))
    bbox = [results[s.name]["metrics"]["bbox"] for s in group]
    seeds = [s.meta.get("seed") for s in group]
    keys = sorted({k for b in bbox for k in b if "-" not in k} | set(METRICS[:2]),
                  key=lambda k: (METRICS.index(k) if k in METRICS else len(METRICS), k))
    steps = [r["time"] for s in group for r in metrics_rows(s.out_dir) if "time" in r]
    return {"seeds": seeds, **{k: [b[k] for b in bbox if k in b] for k in keys},
            "by_seed": {k: {s: b[k] for s, b in zip(seeds, bbox) if k in b} for k in keys},
            "step_ms": 1e3 * statistics.median(steps) if steps else None, **extra}


def method_numbers(stages: list, results: dict | None = None) -> dict:
    """{"plain": {...}, method: {...}}: `group_numbers` of the plain student, each method and
    each control, with their loss weights and loss time; results: stage name -> its stage.json
    (read here when not given)."""
    results = finished_results(stages) if results is None else results
    stages = [s for s in stages if s.name in results]

    def record(stage, key):
        return results[stage.name]["metrics"][key]

    def grid_weights(method, factor):  # a grid point's loss weights, from grid_<method>
        return next((record(g, "weight_grid")["weights"].get(factor_label(factor), {})
                     for g in select(stages, role="weight_grid", method=method)), {})

    calib = {s.meta["method"]: record(s, "calibration") for s in select(stages, role="calibration")}
    plain = [s for s in stages if is_plain_student(s)]
    numbers = {"plain": group_numbers(plain, results)} if plain else {}
    groups = {}  # the methods', then the controls' runs
    for s in select(stages, role="method") + select(stages, role="control"):
        groups.setdefault(s.meta["method"], []).append(s)
    for name, group in groups.items():
        meta, c = group[0].meta, calib.get(name, {})
        numbers[name] = group_numbers(group, results, loss_ms=c.get("loss_ms"),
                                      weights=meta.get("weights", c.get("weights", {})))
        if meta["role"] == "control":  # its weights are in its meta (not calibrated)
            numbers[name]["control"] = meta["control"]
    for s in select(stages, role="weight_select"):
        method, choice = s.meta["method"], record(s, "weight_select")
        if method in numbers:  # the seeds ran at the chosen grid weight, not the calibrated one
            chosen = grid_weights(method, choice["chosen"])
            numbers[method].update(weights=chosen, grid={
                **{k: choice.get(k) for k in ("split", "dataset", "chosen")}, "weights": chosen,
                "points": [{**p, "weights": grid_weights(method, p["factor"])}
                           for p in choice["points"]]})
    return numbers


def _weights(n: dict) -> str:
    return ", ".join(f"{k[5:]} {v:.3g}" for k, v in n.get("weights", {}).items())


def methods_section(stages: list, out_dir: str, fig_dir: str = "figures",
                    results: dict | None = None) -> tuple:
    """(markdown lines, numbers) of the methods table, forest plot and weight grid; ([], {})
    without method runs. numbers[method]["paired"][metric]: the paired comparison with the
    plain student (Paired.as_dict()) of each metric. results: as method_numbers'."""
    numbers = method_numbers(stages, results)
    if not any(name != "plain" for name in numbers):
        return [], {}
    plain = numbers.get("plain", {}).get("by_seed", {})
    metrics = [k for k in METRICS if k in METRICS[:2] or any(k in n for n in numbers.values())]
    rows, forest = [], []
    for name, n in numbers.items():
        control, loss_ms, step_ms = n.get("control"), n.get("loss_ms"), n.get("step_ms")
        label = f"{name} ({CONTROL_LABELS.get(control, f'control: {control}')})" if control \
            else name
        cost = f"{loss_ms:.1f}" if loss_ms is not None else ("0" if name == "plain" else "n/a")
        compared = ["—", "—"] * len(metrics)
        if name != "plain":
            paired = {m: paired_difference(n["by_seed"].get(m, {}), plain.get(m, {}))
                      for m in metrics}
            compared = [c for p in paired.values() for c in (format_interval(p), p.verdict)]
            p = paired["AP50"]
            forest.append(ForestRow(label, p.mean, p.low, p.high, p.n,
                                    f"{_weights(n) or 'weight n/a'}; loss {cost} ms/step"))
            n["paired"] = {m: q.as_dict() for m, q in paired.items()}
        rows.append([label, _weights(n) or "—", ",".join(map(str, n["seeds"])),
                     *[mean_sd(n.get(m, [])) for m in metrics], *compared, cost,
                     f"{100 * loss_ms / step_ms:.1f}% of {step_ms:.0f} ms"
                     if loss_ms is not None and step_ms else "—"])
    plot = os.path.join(fig_dir, "methods_forest_ap50.png")  # relative to report.md
    os.makedirs(os.path.join(out_dir, fig_dir), exist_ok=True)
    forest_plot(forest, os.path.join(out_dir, plot), "AP50")
    grids = {m: n["grid"] for m, n in numbers.items() if "grid" in n}
    header = ["Method", "loss weight(s)", "seeds", *metrics,
              *[c for m in metrics for c in (f"Δ{m} paired [95% CI]", f"{m} verdict")],
              "loss ms/step", "loss share of step"]
    lines = [*section("Transfer methods at the detection stage", "transfer-methods"),
             "The methods' loss weights: " + ("calibrated, then scaled by the grid factor with "
                                              "the best validation AP50 (table below)"
                                              if grids else "as calibrated") + ".", "",
             *markdown_table(rows, header).splitlines(), "",
             f"![paired ΔAP50 per method, 95% intervals]({plot})", ""]
    if not grids:
        return lines, numbers
    grid_rows = [[m, g["dataset"] or g["split"], "; ".join(
        f"{factor_label(p['factor'])}: {_weights(p) or 'n/a'} → {p['AP50']:.1f}"
        for p in g["points"]), f"{factor_label(g['chosen'])} ({_weights(g) or 'n/a'})"]
        for m, g in grids.items()]
    return lines + ["### Loss weights chosen on the validation split", "", *markdown_table(
        grid_rows, ["Method", "validation set", "grid point: weight(s) → validation AP50",
                    "chosen"]).splitlines(), ""], numbers
