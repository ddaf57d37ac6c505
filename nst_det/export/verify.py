"""Check an exported detector against the eager model on the same preprocessed images."""

from __future__ import annotations

import numpy as np

from .runtime import Detections

# Default tolerances: boxes in pixels of the resized image, scores in probability units.
BOX_ATOL = 0.05
SCORE_ATOL = 1e-3


def compare_detections(reference: Detections, candidate: Detections) -> dict:
    """Max deviations between two detection sets, each detection matched one to one.

    Exports usually keep the order, but two detections whose scores differ by round-off may swap
    places, so detections are paired by a minimum-cost assignment (scipy's
    `linear_sum_assignment`) on the largest box coordinate difference, a class mismatch costing
    more than any box difference.
    Returns:
        {"count_ref", "count_out", "classes_equal", "max_box_dev", "max_score_dev"}; deviations are
        +inf when the counts differ, since the sets cannot then be compared one to one.
    """
    from scipy.optimize import linear_sum_assignment  # a dependency of POT (pyproject.toml)

    n_ref, n_out = len(reference["scores"]), len(candidate["scores"])
    result = {"count_ref": n_ref, "count_out": n_out}
    if n_ref != n_out:
        return {**result, "classes_equal": False, "max_box_dev": float("inf"),
                "max_score_dev": float("inf")}
    if n_ref == 0:
        return {**result, "classes_equal": True, "max_box_dev": 0.0, "max_score_dev": 0.0}
    box_cost = np.abs(reference["boxes"][:, None, :] - candidate["boxes"][None, :, :]).max(
        axis=2, initial=0.0)
    other_class = reference["classes"][:, None] != candidate["classes"][None, :]
    rows, cols = linear_sum_assignment(box_cost + other_class * (box_cost.max(initial=0.0) + 1))
    box_dev = np.abs(reference["boxes"][rows] - candidate["boxes"][cols]).max(initial=0.0)
    score_dev = np.abs(reference["scores"][rows] - candidate["scores"][cols]).max(initial=0.0)
    return {**result, "classes_equal": bool(np.array_equal(reference["classes"][rows],
                                                           candidate["classes"][cols])),
            "max_box_dev": float(box_dev), "max_score_dev": float(score_dev)}


def verify(reference_runner, candidate_runner, images, box_atol=BOX_ATOL,
           score_atol=SCORE_ATOL, more_images=None) -> dict:
    """Run both on every image; passed when counts and classes match and deviations are small.

    Args:
        images: preprocessed float32 [C, H, W] tensors.
        more_images: optional function () -> further images, called once when the reference
            detected nothing on `images` and the outputs agreed: empty outputs compare no box.
    Returns:
        a JSON-serialisable summary with per-image comparisons and the tolerances used.
    """
    images = list(images)
    per_image = [compare_detections(reference_runner(img), candidate_runner(img)) for img in images]
    if more_images is not None and not any(r["count_ref"] or r["count_out"] for r in per_image):
        per_image += [compare_detections(reference_runner(img), candidate_runner(img))
                      for img in more_images()]
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
