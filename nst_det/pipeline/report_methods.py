"""The report's methods section: every transfer method's detection student against the plain one.

Reads only stage files: each method run's stage.json (AP50, AP and, where the test set is
COCO-style, AP75 / APs / APm / APl) and metrics.json (detectron2's per-iteration `time`, the
training step), and each calibration stage's stage.json (the calibrated weights and the time of
the method's transfer loss, forward + backward, on the first batch's feature pairs). The plain
student is the plan's `det_plain_s<seed>` run (same pretrained student, schedule and seeds, no
transfer loss). Each method is compared with it seed by seed (paired.py): the mean of
method_s − plain_s over the seeds both have, its 95% t-interval, and "better" / "worse" only when
that interval excludes 0; the forest plot (figures.py) draws the ΔAP50 intervals next to the table.
"""

from __future__ import annotations

import os
import statistics

from .describe import markdown_table, metrics_rows
from .figures import ForestRow, forest_plot
from .paired import format_interval, mean_sd, paired_difference
from .plan import is_plain_student
from .weight_grid import factor_label
from .worker import finished_results

__all__ = ["methods_section", "method_numbers"]

COCO_EXTRA = ("AP75", "APs", "APm", "APl")


def _finished(stages, results, **meta):
    return [s for s in stages if s.name in results
            and all(s.meta.get(k) == v for k, v in meta.items())]


def method_numbers(stages: list, results: dict | None = None) -> dict:
    """{"plain": {...}, method: {...}} with per-seed bbox metrics, weights and costs; results:
    stage name -> its stage.json (read here when not given)."""
    if results is None:
        results = finished_results(stages)

    def finished(**meta):
        return _finished(stages, results, **meta)

    plain = [s for s in stages if s.name in results and is_plain_student(s)]
    runs = {}
    for s in finished(role="method"):
        runs.setdefault(s.meta["method"], []).append(s)
    calib = {s.meta["method"]: results[s.name]["metrics"]["calibration"]
             for s in finished(role="calibration")}

    def entry(group):
        group = sorted(group, key=lambda s: s.meta.get("seed", 0))
        bbox = [results[s.name]["metrics"]["bbox"] for s in group]
        keys = ("AP50", "AP", *[k for k in COCO_EXTRA if any(k in b for b in bbox)])
        steps = [r["time"] for s in group for r in metrics_rows(s.out_dir) if "time" in r]
        seeds = [s.meta.get("seed") for s in group]
        return {"seeds": seeds,
                **{k: [b[k] for b in bbox if k in b] for k in keys},
                "by_seed": {k: {seed: b[k] for seed, b in zip(seeds, bbox) if k in b}
                            for k in keys},
                "step_ms": 1e3 * statistics.median(steps) if steps else None}

    numbers = {"plain": entry(plain)} if plain else {}
    for method, group in runs.items():
        numbers[method] = entry(group)
        c = calib.get(method, {})
        numbers[method].update(weights=c.get("weights", {}), loss_ms=c.get("loss_ms"))
    for method, grid in _grids(finished, results).items():
        if method in numbers:  # the seeds ran at the chosen grid weight, not the calibrated one
            numbers[method].update(weights=grid["weights"], grid=grid)
    controls = {}
    for s in finished(role="control"):
        controls.setdefault(s.meta["method"], []).append(s)
    for name, group in controls.items():
        numbers[name] = entry(group)
        numbers[name].update(control=group[0].meta["control"],
                             weights=group[0].meta.get("weights", {}), loss_ms=None)
    return numbers


def _grids(finished, results: dict) -> dict:
    """method -> {"split", "dataset", "chosen", "weights" (at the chosen point), "points":
    [{"factor", "AP50" (validation), "weights"}]} from the select_<m> / grid_<m> records."""
    configs = {s.meta["method"]: results[s.name]["metrics"]["weight_grid"]["weights"]
               for s in finished(role="weight_grid")}
    grids = {}
    for s in finished(role="weight_select"):
        choice = results[s.name]["metrics"]["weight_select"]
        weights = configs.get(s.meta["method"], {})
        points = [{**p, "weights": weights.get(factor_label(p["factor"]), {})}
                  for p in choice["points"]]
        grids[s.meta["method"]] = {
            **{k: choice.get(k) for k in ("split", "dataset", "chosen")}, "points": points,
            "weights": weights.get(factor_label(choice["chosen"]), {})}
    return grids


def _weights(n: dict) -> str:
    return ", ".join(f"{k[5:]} {v:.3g}" for k, v in n.get("weights", {}).items())


CONTROL_LABELS = {"negative": "control: A/A, expect no difference",
                  "positive": "control: hand-set NST"}


def _label(name: str, n: dict) -> str:
    """The table's method cell: controls say so."""
    control = n.get("control")
    return f"{name} ({CONTROL_LABELS.get(control, 'control: ' + str(control))})" if control \
        else name


def _grid_lines(numbers: dict) -> list:
    """The weight grid's table (one row per method with a grid); [] without one."""
    grids = {m: n["grid"] for m, n in numbers.items() if "grid" in n}
    if not grids:
        return []
    rows = [[method, g["dataset"] or g["split"],
             "; ".join(f"{factor_label(p['factor'])}: {_weights(p) or 'n/a'} → {p['AP50']:.1f}"
                       for p in g["points"]),
             f"{factor_label(g['chosen'])} ({_weights(g) or 'n/a'})"]
            for method, g in grids.items()]
    return ["Loss weights chosen on the validation split: each method trained once (the "
            "calibration seed) at its calibrated weight × 1/4, × 1, × 4 and evaluated on the "
            "toy minival split only (disjoint from trainval and test); its seeds above ran at "
            "the point with the best validation AP50 (select_<method> stages, "
            "nst_det/pipeline/weight_grid.py). No test metric enters the choice.", "",
            *markdown_table(["Method", "validation set",
                             "grid point: weight(s) → validation AP50", "chosen"],
                            rows).splitlines(), ""]


def _control_lines(numbers: dict) -> list:
    """What the control rows mean; [] without any."""
    if not any(n.get("control") for n in numbers.values()):
        return []
    return ["Controls: plain_aa is the plain student trained again with only its data order "
            "changed (NST_DET.DATA_SEED; the same SEED, initialisation, pretrained weights, "
            "config and data): its verdict should be no difference, else the intervals are too "
            "optimistic. nst_handset is NST at the NST config's hand-set "
            "MODEL.NST.LOSS_WEIGHT (no calibration), the main table's setting.", ""]


def methods_section(stages: list, out_dir: str, fig_dir: str = "figures",
                    results: dict | None = None) -> tuple:
    """(markdown lines, numbers) of the methods table and forest plot; ([], {}) without method
    runs. numbers[method]["paired"][metric] is the paired comparison with the plain student
    (Paired.as_dict()) for AP50, AP and the COCO metrics present. results: as method_numbers'."""
    numbers = method_numbers(stages, results)
    if not any(name != "plain" for name in numbers):
        return [], {}
    plain = numbers.get("plain", {}).get("by_seed", {})
    extra = [k for k in COCO_EXTRA if any(k in n for n in numbers.values())]
    metrics = ["AP50", "AP", *extra]
    header = ["Method", "loss weight(s)", "seeds", *metrics,
              *[c for m in metrics for c in (f"Δ{m} paired [95% CI]", f"{m} verdict")],
              "loss ms/step", "loss share of step"]
    rows, forest = [], []
    for name, n in numbers.items():
        if name != "plain":
            n["paired"] = {m: paired_difference(n["by_seed"].get(m, {}), plain.get(m, {}))
                           for m in metrics}
        compared = []
        for m in metrics:
            if name == "plain":
                compared += ["—", "—"]
            else:
                p = n["paired"][m]
                compared += [format_interval(p), p.verdict]
        loss_ms, step_ms = n.get("loss_ms"), n.get("step_ms")
        cost = f"{loss_ms:.1f}" if loss_ms is not None else ("0" if name == "plain" else "n/a")
        share = (f"{100 * loss_ms / step_ms:.1f}% of {step_ms:.0f} ms"
                 if loss_ms is not None and step_ms else "—")
        rows.append([_label(name, n), _weights(n) or "—", ",".join(map(str, n["seeds"])),
                     *[mean_sd(n.get(m, [])) for m in metrics], *compared, cost, share])
        if name != "plain":
            p = n["paired"]["AP50"]
            note = f"{_weights(n) or 'weight n/a'}; loss {cost} ms/step"
            forest.append(ForestRow(_label(name, n), p.mean, p.low, p.high, p.n, note))
            n["paired"] = {m: q.as_dict() for m, q in n["paired"].items()}
    os.makedirs(os.path.join(out_dir, fig_dir), exist_ok=True)
    plot = os.path.join(fig_dir, "methods_forest_ap50.png")  # relative to report.md
    forest_plot(forest, os.path.join(out_dir, plot), "AP50")
    lines = [
        "## Transfer methods at the detection stage", "",
        "One student per method and seed, all from the plain pretrained student and the same "
        "teacher detector, schedule and data; only the transfer loss differs. Each loss weight "
        "was calibrated so that the loss starts at a fixed fraction of the detection loss on the "
        "first training batches (nst_det/pipeline/methods.py; the calibrate_<method> stage "
        "folders hold the measurements)" + (
            ", then scaled by the grid factor with the best validation AP50 (below)"
            if any("grid" in n for n in numbers.values()) else "") +
        "; never chosen by test AP.", "",
        *markdown_table(header, rows).splitlines(), "",
        *_grid_lines(numbers), *_control_lines(numbers),
        f"![paired ΔAP50 per method, 95% intervals]({plot})", "",
        "AP columns: mean ± standard deviation over the seeds listed. ΔX paired: the mean over "
        "seeds of method_s − plain_s (the plain student of the same seed: same pretrained "
        "student, initialisation and data order), with its 95% Student-t interval over the "
        "seeds both have (n − 1 degrees of freedom). Verdict: better / worse only when the "
        "interval excludes 0, else no difference detected at this number of seeds; one seed "
        "gives no interval and no verdict. Loss ms/step: the method's transfer losses alone, "
        "forward + backward, on the first training batch's feature pairs (calibration stage, "
        "float32); share: of the median training step (detectron2's `time` in the method runs' "
        "metrics.json, all seeds). Forest plot: one row per method, mean ΔAP50 and its "
        "interval against the zero line, with the loss weight and the loss's ms per step.", "",
    ]
    return lines, numbers
