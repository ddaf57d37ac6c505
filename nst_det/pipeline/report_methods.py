"""The report's methods section: every transfer method's detection student against the plain one.

Reads only stage files: each method run's stage.json (AP50, AP and, where the test set is
COCO-style, AP75 / APs / APm / APl) and metrics.json (detectron2's per-iteration `time`, the
training step), and each calibration stage's stage.json (the calibrated weights and the time of
the method's transfer loss, forward + backward, on the first batch's feature pairs). The plain
student is the plan's `det_plain_s<seed>` run (same pretrained student, schedule and seeds, no
transfer loss). A difference counts as measurable only beyond twice the plain student's seed
spread, as in the main table's verdict.
"""

from __future__ import annotations

import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .run import stage_result  # noqa: E402

__all__ = ["methods_section", "method_numbers"]

COCO_EXTRA = ("AP75", "APs", "APm", "APl")


def _mean_sd(values: list) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _step_seconds(out_dir: str) -> list:
    """detectron2's per-iteration `time` values (s) from a run's metrics.json."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["time"] for r in rows if "time" in r]


def _finished(stages, **meta):
    return [s for s in stages if stage_result(s) is not None
            and all(s.meta.get(k) == v for k, v in meta.items())]


def method_numbers(stages: list) -> dict:
    """{"plain": {...}, method: {...}} with per-seed bbox metrics, weights and costs."""
    plain = [s for s in _finished(stages, stage="det", role="student", method="plain")
             if s.kind == "train" and not s.meta.get("det_nst")]
    runs = {}
    for s in _finished(stages, role="method"):
        runs.setdefault(s.meta["method"], []).append(s)
    calib = {s.meta["method"]: stage_result(s)["metrics"]["calibration"]
             for s in _finished(stages, role="calibration")}

    def entry(group):
        bbox = [stage_result(s)["metrics"]["bbox"] for s in sorted(group, key=lambda s:
                                                                   s.meta.get("seed", 0))]
        keys = ("AP50", "AP", *[k for k in COCO_EXTRA if any(k in b for b in bbox)])
        steps = [t for s in group for t in _step_seconds(s.out_dir)]
        return {"seeds": sorted(s.meta.get("seed") for s in group),
                **{k: [b[k] for b in bbox if k in b] for k in keys},
                "step_ms": 1e3 * statistics.median(steps) if steps else None}

    numbers = {"plain": entry(plain)} if plain else {}
    for method, group in runs.items():
        numbers[method] = entry(group)
        c = calib.get(method, {})
        numbers[method].update(weights=c.get("weights", {}), loss_ms=c.get("loss_ms"))
    return numbers


def _judge(diff: float, spread: float | None) -> str:
    if spread is None:
        return "one seed only: no spread to judge it against"
    if abs(diff) <= 2 * spread:
        return f"within 2 × seed spread ({spread:.1f})"
    return f"beyond 2 × seed spread ({spread:.1f})"


def _plot(numbers: dict, path: str) -> None:
    names = list(numbers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4))
    for i, name in enumerate(names):
        values = numbers[name]["AP50"]
        ax.scatter([i] * len(values), values, s=18, color="tab:blue", zorder=3,
                   label="seed" if i == 0 else None)
        if values:
            ax.hlines(statistics.mean(values), i - 0.3, i + 0.3, color="black", zorder=4,
                      label="mean" if i == 0 else None)
    base = numbers.get("plain", {}).get("AP50", [])
    if len(base) > 1:
        mean, sd = statistics.mean(base), statistics.stdev(base)
        ax.axhspan(mean - 2 * sd, mean + 2 * sd, color="grey", alpha=0.2,
                   label="plain ± 2 sd")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("AP50 (%)")
    ax.set_title("detection-stage transfer methods: AP50 per seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def methods_section(stages: list, out_dir: str, fig_dir: str = "figures") -> tuple:
    """(markdown lines, numbers) of the methods table and plot; ([], {}) without method runs."""
    numbers = method_numbers(stages)
    if not any(name != "plain" for name in numbers):
        return [], {}
    base = numbers.get("plain", {}).get("AP50", [])
    spread = statistics.stdev(base) if len(base) > 1 else None
    extra = [k for k in COCO_EXTRA if any(k in n for n in numbers.values())]
    header = ["Method", "loss weight(s)", "seeds", "AP50", "AP", *extra, "ΔAP50 vs plain",
              "judged", "loss ms/step", "loss share of step"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, n in numbers.items():
        weights = ", ".join(f"{k[5:]} {v:.3g}" for k, v in n.get("weights", {}).items())
        if name == "plain":
            diff = judged = "—"
        elif base and n["AP50"]:
            d = statistics.mean(n["AP50"]) - statistics.mean(base)
            diff, judged = f"{d:+.1f}", _judge(d, spread)
        else:
            diff = judged = "n/a"
        loss_ms, step_ms = n.get("loss_ms"), n.get("step_ms")
        cost = f"{loss_ms:.1f}" if loss_ms is not None else ("0" if name == "plain" else "n/a")
        share = (f"{100 * loss_ms / step_ms:.1f}% of {step_ms:.0f} ms"
                 if loss_ms is not None and step_ms else "—")
        cells = [name, weights or "—", ",".join(map(str, n["seeds"])), _mean_sd(n["AP50"]),
                 _mean_sd(n["AP"]), *[_mean_sd(n.get(k, [])) for k in extra], diff, judged,
                 cost, share]
        rows.append("| " + " | ".join(cells) + " |")
    os.makedirs(os.path.join(out_dir, fig_dir), exist_ok=True)
    plot = os.path.join(fig_dir, "methods_ap50.png")
    _plot(numbers, os.path.join(out_dir, plot))
    lines = [
        "## Transfer methods at the detection stage", "",
        "One student per method and seed, all from the plain pretrained student and the same "
        "teacher detector, schedule and data; only the transfer loss differs. Each loss weight "
        "was calibrated so that the loss starts at a fixed fraction of the detection loss on the "
        "first training batches (nst_det/pipeline/methods.py; the calibrate_<method> stage "
        "folders hold the measurements), not chosen by test AP.", "",
        *rows, "",
        "AP: mean ± standard deviation over the seeds listed. ΔAP50: method mean minus the plain "
        "student's, judged against twice the plain student's seed spread. Loss ms/step: the "
        "method's transfer losses alone, forward + backward, on the first training batch's "
        "feature pairs (calibration stage, float32); share: of the median training step "
        "(detectron2's `time` in the method runs' metrics.json, all seeds).", "",
        f"![AP50 per method and seed]({plot})", "",
    ]
    return lines, numbers
