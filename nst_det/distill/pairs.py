"""Student/teacher feature pairs: validation against the backbones, and the alignment rule.

Alignment rule (why: both backbones see the same images, anchored at the top-left corner; what
differs is the stride of a feature and how far each model padded the batch at the bottom/right):
  1. Stride mismatch: the finer map is average-pooled with kernel = stride = the stride ratio
     (an integer), with ceil_mode so the last, partly padded cell is kept. Both maps then have the
     coarser stride, and cell (i, j) of each covers the same image region.
  2. Size mismatch at equal stride (different padding, e.g. size_divisibility 32 vs 0): both maps
     are cropped to their common top-left extent; what is cropped is padding in the other model.
Nothing is interpolated and non-square maps are never assumed. After this, nst_loss sees equal
sizes and does no pooling of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

__all__ = ["FeaturePair", "align_pair", "build_feature_pairs"]


@dataclass(frozen=True)
class FeaturePair:
    """One distilled pair: student feature `student` against teacher feature `teacher`."""

    student: str
    teacher: str
    weight: float
    student_stride: int
    teacher_stride: int


def build_feature_pairs(
    student_features: Sequence[str],
    teacher_features: Sequence[str],
    weights: Sequence[float],
    student_shapes: Dict[str, ShapeSpec],
    teacher_shapes: Dict[str, ShapeSpec],
) -> List[FeaturePair]:
    """Pair the configured names position by position and check them against both backbones.

    Raises:
        ValueError: lists of different lengths, a name a backbone does not produce (the message
        lists the names it does produce), or strides whose ratio is not an integer.
    """
    if not (len(student_features) == len(teacher_features) == len(weights)):
        raise ValueError(
            "MODEL.DISTILL.STUDENT_FEATURES, TEACHER_FEATURES and FEATURE_WEIGHTS must have the "
            f"same length; got {list(student_features)}, {list(teacher_features)}, {list(weights)}"
        )
    for role, names, shapes in (
        ("student", student_features, student_shapes),
        ("teacher", teacher_features, teacher_shapes),
    ):
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise ValueError(
                f"MODEL.DISTILL.{role.upper()}_FEATURES names {unknown}, which the {role} does "
                f"not produce; available: {sorted(shapes)}"
            )
    pairs = []
    for s, t, w in zip(student_features, teacher_features, weights):
        ss, ts = student_shapes[s].stride, teacher_shapes[t].stride
        if max(ss, ts) % min(ss, ts):
            raise ValueError(
                f"feature pair {s} (stride {ss}) / {t} (stride {ts}): the stride ratio must be an "
                "integer so that the finer map can be pooled onto the coarser grid"
            )
        pairs.append(FeaturePair(s, t, float(w), ss, ts))
    return pairs


def _pool(x: torch.Tensor, ratio: int) -> torch.Tensor:
    return F.avg_pool2d(x, ratio, ratio, ceil_mode=True) if ratio > 1 else x


def align_pair(
    f_s: torch.Tensor, f_t: torch.Tensor, stride_s: int, stride_t: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bring a student and a teacher map of the same images onto one grid (rule: module doc).

    Args:
        f_s: [B, Cs, Hs, Ws] student map at stride `stride_s`.
        f_t: [B, Ct, Ht, Wt] teacher map at stride `stride_t`.
    Returns:
        ([B, Cs, H, W], [B, Ct, H, W]) at stride max(stride_s, stride_t).
    """
    f_s = _pool(f_s, stride_t // stride_s)
    f_t = _pool(f_t, stride_s // stride_t)
    h = min(f_s.shape[-2], f_t.shape[-2])
    w = min(f_s.shape[-1], f_t.shape[-1])
    return f_s[..., :h, :w], f_t[..., :h, :w]
