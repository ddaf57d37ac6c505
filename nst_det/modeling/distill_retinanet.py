"""DistillationRetinaNet: a RetinaNet student trained with NST (and the other feature losses, and
optionally KD on per-anchor class logits) from a frozen teacher RetinaNet.

Training runs detectron2's own RetinaNet forward unchanged, reading the student's backbone
input/features and head outputs through forward hooks; the teacher's backbone (and, for KD, its
head) then runs once under no_grad on the same batch. The distillation core (nst_det.distill)
adds the weighted losses. Inference is RetinaNet's: the teacher does nothing.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from ..distill import DistillationCore, record_first_call
from .distill_detection import (
    DetectorDistillMixin,
    anchor_mismatch,
    build_detection_core,
    inherit_teacher_neck_head,
)

__all__ = ["DistillationRetinaNet", "sigmoid_kd_loss"]

logger = logging.getLogger(__name__)


def sigmoid_kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float) -> torch.Tensor:
    """KD for sigmoid (one-vs-all) classifiers such as RetinaNet's: T^2 * binary KL per class.

    The teacher's per-class probabilities sigmoid(z_t / T) are the soft targets of the student's
    sigmoid(z_s / T): KL(Bern(p_t) || Bern(p_s)) summed over the K classes, averaged over the
    anchors (Hinton et al. 2015, applied per class as in one-stage detector KD).

    Args:
        logits_s: [R, K] student logits (gradients flow). logits_t: [R, K] teacher logits.
        T: temperature (> 0).
    Returns:
        Scalar, computed in float32.
    """
    if logits_s.shape != logits_t.shape or logits_s.dim() != 2:
        raise ValueError(f"sigmoid_kd_loss expects two [R, K] logits; got "
                         f"{tuple(logits_s.shape)}, {tuple(logits_t.shape)}")
    zs, zt = logits_s.float() / T, logits_t.detach().float() / T
    p_t = torch.sigmoid(zt)
    # KL(Bern(p_t) || Bern(p_s)) = BCE(z_s; p_t) - BCE(z_t; p_t)
    kl = (F.binary_cross_entropy_with_logits(zs, p_t, reduction="none")
          - F.binary_cross_entropy_with_logits(zt, p_t, reduction="none"))
    return kl.sum(1).mean() * (T * T)


def _per_anchor(logits: Sequence[torch.Tensor], num_classes: int, sizes) -> torch.Tensor:
    """Level maps [N, A*K, Hi, Wi], cropped to `sizes` [(h, w)], -> [N * sum(h*w*A), K]."""
    rows = []
    for x, (h, w) in zip(logits, sizes):
        x = x[..., :h, :w]
        n = x.shape[0]
        rows.append(x.reshape(n, -1, num_classes, h, w).permute(0, 3, 4, 1, 2)
                    .reshape(-1, num_classes))
    return torch.cat(rows)


@META_ARCH_REGISTRY.register()
class DistillationRetinaNet(DetectorDistillMixin, RetinaNet):
    """RetinaNet whose training loss adds `loss_nst`, `loss_<transfer>` and `loss_kd`.

    The teacher (a RetinaNet, or any detector for feature losses only) lives in the `distill`
    core, outside the module tree, inert and moved with the student.

    Losses:
      loss_nst / loss_<name>: on MODEL.DISTILL feature pairs of the two backbones (e.g. p3..p7),
          aligned and weighted as in DistillationRCNN;
      loss_kd = KD.LOSS_WEIGHT * sigmoid_kd_loss over every anchor of every level: the
          teacher's head on its own features of the same images gives the logits of the same
          anchors (same anchor generator, strides and classes, checked at construction).
    """

    @configurable
    def __init__(self, *, distill: DistillationCore, **kwargs):
        """
        Args:
            distill: the core with the frozen teacher (see `build_detection_core`).
            kwargs: RetinaNet's arguments (backbone, head, anchor_generator, ...).
        """
        super().__init__(**kwargs)
        self._init_distill(distill)
        if distill.kd_weight > 0:
            self._check_kd_teacher(distill.teacher)
        if not self.distilling:
            logger.warning("DistillationRetinaNet with every transfer weight 0: plain training")

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["distill"] = build_detection_core(cfg, ret["backbone"], "DistillationRetinaNet")
        inherit_teacher_neck_head(cfg, ret, heads=("head",))
        return ret

    def _check_kd_teacher(self, teacher) -> None:
        """Per-anchor KD needs the same anchors and classes on both sides."""
        if not isinstance(teacher, RetinaNet):
            raise ValueError(f"KD on anchor logits needs a RetinaNet teacher; got "
                             f"{type(teacher).__name__}")
        s_shapes, t_shapes = self.backbone.output_shape(), teacher.backbone.output_shape()
        mine = ([s_shapes[f].stride for f in self.head_in_features],
                self.anchor_generator.num_anchors, self.num_classes)
        theirs = ([t_shapes[f].stride for f in teacher.head_in_features],
                  teacher.anchor_generator.num_anchors, teacher.num_classes)
        if mine != theirs:
            raise ValueError(
                "KD on anchor logits needs the teacher's anchors: (level strides, anchors per "
                f"cell, classes) student {mine} vs teacher {theirs}")
        problem = anchor_mismatch(self, teacher)  # the same count may be other boxes
        if problem:
            raise ValueError(f"KD on anchor logits needs the teacher's anchors; {problem}")

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """RetinaNet.forward; in training, the loss dict also has the transfer losses."""
        if not self.training or not self.distilling:
            return super().forward(batched_inputs)
        backbone, head = {}, {}
        kd = self.distill.kd_weight > 0
        with ExitStack() as stack:
            stack.enter_context(record_first_call(self.backbone, backbone))
            if kd:
                stack.enter_context(record_first_call(self.head, head))
            losses = super().forward(batched_inputs)
        t_feats = self.teacher_features(batched_inputs, backbone["args"][0])
        losses.update(self.distill.feature_losses(backbone["output"], t_feats,
                                                  **self.gt_extras(batched_inputs)))
        if kd:
            teacher = self.teacher
            with torch.no_grad():
                t_logits = teacher.head([t_feats[f] for f in teacher.head_in_features])[0]
            s_logits = head["output"][0]
            # equal strides; a different padding only adds cells at the bottom/right: crop
            sizes = [(min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
                     for s, t in zip(s_logits, t_logits)]
            losses["loss_kd"] = self.distill.kd_weight * sigmoid_kd_loss(
                _per_anchor(s_logits, self.num_classes, sizes),
                _per_anchor(t_logits, self.num_classes, sizes),
                self.distill.kd_temperature)
        return losses
