"""What the pipeline does besides training: the export of the best student."""

from __future__ import annotations

import math
import os

from .plan import Stage
from .records import finished_results


def best_student(stages: list, results: dict | None = None) -> Stage:
    """The finished student detector with the highest AP50 (the one exported, and the one whose
    detections the report draws); results: stage name -> its stage.json (read when not given)."""
    results = finished_results(stages) if results is None else results
    students = [s for s in stages if s.kind == "train" and s.meta.get("stage") == "det"
                and s.meta.get("role") == "student" and s.name in results]
    if not students:
        raise RuntimeError("no finished student detector to export")
    # a diverged run (NaN AP50) never wins: NaN would stay the maximum once it led
    return max(students, key=lambda s: _finite_or_lowest(
        _first_test_set_ap50(results[s.name]["metrics"])))


def _finite_or_lowest(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _first_test_set_ap50(metrics: dict) -> float:
    """AP50 on the first test set: detectron2 keys results by data set only when there are
    several (VOC and COCO evaluators both report bbox/AP50)."""
    bbox = metrics.get("bbox") or next(
        (m["bbox"] for m in metrics.values() if isinstance(m, dict) and "bbox" in m), None)
    if bbox is None or "AP50" not in bbox:
        raise RuntimeError(f"a student's final metrics hold no bbox AP50: {sorted(metrics)}")
    return bbox["AP50"]


def export_stage(stage: Stage, stages: list) -> dict:
    """Export the best student as a student-only checkpoint and as ONNX, both verified."""
    from ..config import load_config
    from ..export.api import export_and_verify

    best = best_student(stages)
    cfg = load_config(os.path.join(best.out_dir, "config.yaml"),
                      ["MODEL.WEIGHTS", os.path.join(best.out_dir, "model_final.pth"),
                       "MODEL.DEVICE", "cpu"])
    results = {"student": best.name}
    for fmt in ("checkpoint", "onnx"):
        summary = export_and_verify(cfg, fmt, os.path.join(stage.out_dir, fmt))  # or raises
        results[fmt] = {k: summary[k] for k in ("file", "size_bytes", "max_box_dev",
                                                  "max_score_dev", "passed")}
    return results
