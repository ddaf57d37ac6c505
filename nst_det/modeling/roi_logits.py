"""RoI class logits for KD, through the public parts of detectron2's two box-head layouts.

Student side: while detectron2's own `roi_heads.forward` runs unchanged, forward hooks record
the boxes given to the box pooler (the sampled proposals) and the class scores of the box
predictor. Teacher side: the teacher's pooler + box head + predictor run on those boxes,
skipping its RPN, sampling and post-processing.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.modeling.roi_heads import CascadeROIHeads, Res5ROIHeads, StandardROIHeads
from detectron2.structures import Boxes
from torch import nn

__all__ = ["box_class_logits", "box_pooler", "check_kd_heads"]


def check_kd_heads(student_heads: nn.Module, teacher_heads: nn.Module) -> None:
    """Raise a ValueError unless both are Standard/Res5 RoI heads (no cascade), same classes."""
    for role, heads in (("student", student_heads), ("teacher", teacher_heads)):
        # a cascade (e.g. a zoo Cascade R-CNN or ViTDet teacher) has one box head per stage
        if isinstance(heads, CascadeROIHeads) or not isinstance(
                heads, (StandardROIHeads, Res5ROIHeads)):
            raise ValueError(
                f"KD on RoI logits supports StandardROIHeads and Res5ROIHeads (and subclasses with "
                f"one box head, not CascadeROIHeads); "
                f"the {role} has {type(heads).__name__}"
            )
    if student_heads.num_classes != teacher_heads.num_classes:
        raise ValueError(
            f"KD needs the same classes: student NUM_CLASSES={student_heads.num_classes}, "
            f"teacher {teacher_heads.num_classes} (its MODEL.ROI_HEADS.NUM_CLASSES, or "
            "model.roi_heads.num_classes of a LazyConfig teacher)"
        )


def box_pooler(heads: nn.Module) -> nn.Module:
    """The ROIPooler whose first call per forward receives the box proposals."""
    return heads.box_pooler if isinstance(heads, StandardROIHeads) else heads.pooler


def box_class_logits(
    heads: nn.Module, features: Dict[str, torch.Tensor], boxes: List[Boxes]
) -> torch.Tensor:
    """Class logits of a box head on given boxes.

    Args:
        heads: StandardROIHeads or Res5ROIHeads.
        features: backbone features {name: [B, C, H, W]} of the model that owns `heads`.
        boxes: per image, the R_i boxes in input-image coordinates.
    Returns:
        [sum R_i, K + 1] class logits (last column: background), as FastRCNNOutputLayers.
    """
    if isinstance(heads, StandardROIHeads):
        x = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
        x = heads.box_head(x)
    else:
        x = heads.res5(heads.pooler([features[f] for f in heads.in_features], boxes))
        x = x.mean(dim=[2, 3])
    scores, _ = heads.box_predictor(x)
    return scores
