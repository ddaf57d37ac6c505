"""Check an exported detector against the eager model on the same preprocessed images."""

from __future__ import annotations

import numpy as np

from .runtime import Detections

# Default tolerances: boxes in pixels of the resized image, scores in probability units.
BOX_ATOL = 0.05
SCORE_ATOL = 1e-3


def compare_detections(reference: Detections, candidate: Detections) -> dict:
    """Max deviations between two detection sets in the same order (exports keep the order).

    Returns:
        {"count_ref", "count_out", "classes_equal", "max_box_dev", "max_score_dev"}; deviations are
        +inf when the counts differ, since the sets cannot then be compared one to one.
    """
    n_ref, n_out = len(reference["scores"]), len(candidate["scores"])
    result = {"count_ref": n_ref, "count_out": n_out}
    if n_ref != n_out:
        return {**result, "classes_equal": False, "max_box_dev": float("inf"),
                "max_score_dev": float("inf")}
    box_dev = np.abs(reference["boxes"] - candidate["boxes"]).max(initial=0.0)
    score_dev = np.abs(reference["scores"] - candidate["scores"]).max(initial=0.0)
    return {**result, "classes_equal": bool(np.array_equal(reference["classes"],
                                                           candidate["classes"])),
            "max_box_dev": float(box_dev), "max_score_dev": float(score_dev)}


def verify(reference_runner, candidate_runner, images, box_atol=BOX_ATOL,
           score_atol=SCORE_ATOL) -> dict:
    """Run both on every image; passed when counts and classes match and deviations are small.

    Args:
        images: preprocessed float32 [C, H, W] tensors.
    Returns:
        a JSON-serialisable summary with per-image comparisons and the tolerances used.
    """
    per_image = [compare_detections(reference_runner(img), candidate_runner(img)) for img in images]
    passed = all(
        r["classes_equal"] and r["max_box_dev"] <= box_atol and r["max_score_dev"] <= score_atol
        for r in per_image
    )
    return {
        "passed": passed,
        "box_atol_px": box_atol,
        "score_atol": score_atol,
        "max_box_dev": max((r["max_box_dev"] for r in per_image), default=0.0),
        "max_score_dev": max((r["max_score_dev"] for r in per_image), default=0.0),
        "total_detections": sum(r["count_ref"] for r in per_image),
        "images": per_image,
    }
