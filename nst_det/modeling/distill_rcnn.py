"""DistillationRCNN: a GeneralizedRCNN student trained with NST (and optionally KD) from a teacher.

Training runs detectron2's own GeneralizedRCNN forward unchanged, reading the student's backbone
input/features (and, for KD, the sampled proposals and their class logits) through forward hooks;
then the teacher's backbone runs once, under no_grad, on the same batch, and the distillation
core (nst_det.distill) adds the weighted transfer losses to the loss dict. Inference is
GeneralizedRCNN's: the teacher does nothing.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import StandardROIHeads

from ..distill import DistillationCore, record_first_call
from .distill_detection import (
    GT_SUPPLIES,
    DetectorDistillMixin,
    build_detection_core,
    inherit_teacher_neck_head,
)
from .roi_logits import box_class_logits, box_pooler, check_kd_heads

__all__ = ["DistillationRCNN"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class DistillationRCNN(DetectorDistillMixin, GeneralizedRCNN):
    """GeneralizedRCNN whose training loss adds `loss_nst` (and `loss_kd`) from a frozen teacher.

    The teacher lives in the `distill` core (nst_det.distill.DistillationCore), outside the
    module tree: it is not in `parameters()`, `state_dict()`, the optimizer, DDP or an export;
    `.to()` / `.half()` move it too and `.train()` leaves it in eval mode.

    Losses (per training step, teacher features computed once):
      loss_nst = NST.LOSS_WEIGHT * sum_k DISTILL.FEATURE_WEIGHTS[k] * nst_loss(s_k, t_k), pairs
                 aligned by `nst_det.distill.align_pair`;
      loss_<name> for MODEL.TRANSFER.NAMES, the same sum with that loss and weight;
      loss_kd  = KD.LOSS_WEIGHT * kd_loss(student RoI logits, teacher RoI logits, T), the
                 teacher's box head run on the student's sampled proposals ([R, K + 1] logits);
      loss_dkd (MODEL.TRANSFER "dkd") on the same logits, target = the sampled proposals'
                 gt_classes (background = K), which StandardROIHeads' training forward returns.
    GT-aware feature losses (FGD, DeFeat, FGFI) get the batch's `gt_boxes` and FGFI the RPN's
    anchors (`gt_extras`).
    """

    @configurable
    def __init__(self, *, distill: DistillationCore, **kwargs):
        """
        Args:
            distill: the core with the frozen teacher detector (see `build_detection_core`).
            kwargs: GeneralizedRCNN's arguments (backbone, proposal_generator, roi_heads, ...).
        """
        super().__init__(**kwargs)
        self._init_distill(distill)
        if distill.uses_logits:
            # a teacher without RoI heads (e.g. a RetinaNet) is named by its own type
            check_kd_heads(self.roi_heads, getattr(distill.teacher, "roi_heads", distill.teacher))
        if distill.needs("target") and not isinstance(self.roi_heads, StandardROIHeads):
            raise ValueError(
                "a loss on RoI logits with targets (e.g. dkd) needs the sampled proposals' "
                "gt_classes, which StandardROIHeads' training forward returns; the student has "
                f"{type(self.roi_heads).__name__}")
        if not self.distilling:
            logger.warning("DistillationRCNN with every transfer weight 0: plain training")

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["distill"] = build_detection_core(cfg, ret["backbone"], "DistillationRCNN",
                                              supplies=(*GT_SUPPLIES, "target"))
        inherit_teacher_neck_head(cfg, ret, heads=("proposal_generator", "roi_heads"))
        return ret

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """GeneralizedRCNN.forward; in training, the loss dict also has the transfer losses."""
        if not self.training or not self.distilling:
            return super().forward(batched_inputs)
        backbone, pooler, predictor, heads = {}, {}, {}, {}
        kd = self.distill.uses_logits
        with ExitStack() as stack:
            stack.enter_context(record_first_call(self.backbone, backbone))
            if kd:
                stack.enter_context(record_first_call(box_pooler(self.roi_heads), pooler))
                stack.enter_context(record_first_call(self.roi_heads.box_predictor, predictor))
                stack.enter_context(record_first_call(self.roi_heads, heads))
            losses = super().forward(batched_inputs)
        t_feats = self.teacher_features(batched_inputs, backbone["args"][0])
        losses.update(self.distill.feature_losses(backbone["output"], t_feats,
                                                  **self.gt_extras(batched_inputs)))
        if kd:
            # the teacher's box head on the student's sampled proposals: [R, K + 1] logits
            with torch.no_grad():
                t_logits = box_class_logits(self.teacher.roi_heads, t_feats, pooler["args"][1])
            extras = {}
            if self.distill.needs("target"):
                # training StandardROIHeads returns (sampled proposals, losses); their order is
                # the pooler's, so row r of the logits has gt class target[r]
                extras["target"] = torch.cat([p.gt_classes for p in heads["output"][0]])
            losses.update(self.distill.kd(predictor["output"][0], t_logits, **extras))
        return losses
