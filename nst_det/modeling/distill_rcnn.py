"""DistillationRCNN: a GeneralizedRCNN student trained with NST (and optionally KD) from a teacher.

Training runs detectron2's own GeneralizedRCNN forward unchanged, reading the student's backbone
input/features (and, for KD, the sampled proposals and their class logits) through forward hooks;
then the teacher's backbone runs once, under no_grad, on the same batch, and the transfer losses
are added to the loss dict with their weights applied. Inference is GeneralizedRCNN's: the
teacher does nothing.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import ExitStack
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from torch import nn

from ..losses import build_transfer_loss, kd_loss
from .feature_pairs import FeaturePair, align_pair, build_feature_pairs
from .recording import record_first_call
from .roi_logits import box_class_logits, box_pooler, check_kd_heads
from .teacher import build_teacher

__all__ = ["DistillationRCNN"]

logger = logging.getLogger(__name__)


def _nst_kernel_args(cfg) -> dict:
    """MODEL.NST.* -> keyword arguments of nst_loss for the configured kernel."""
    nst = cfg.MODEL.NST
    if nst.KERNEL == "poly":
        return {"degree": nst.POLY_DEGREE, "c": nst.POLY_C}
    if nst.KERNEL == "gaussian":  # <= 0: nst_loss's data-driven bandwidth
        return {"sigma2": nst.GAUSSIAN_SIGMA2 if nst.GAUSSIAN_SIGMA2 > 0 else None}
    return {}


@META_ARCH_REGISTRY.register()
class DistillationRCNN(GeneralizedRCNN):
    """GeneralizedRCNN whose training loss adds `loss_nst` (and `loss_kd`) from a frozen teacher.

    The teacher is held in a tuple, outside the module tree: it is not in `parameters()`,
    `state_dict()`, the optimizer, DDP or an export. `.to()` / `.cuda()` / `.half()` move it
    too (see `_apply`); `.train()` does not reach it, so it stays in eval mode.

    Losses (per training step, teacher features computed once):
      loss_nst = NST.LOSS_WEIGHT * sum_k FEATURE_WEIGHTS[k] * nst_loss(s_k, t_k), pairs aligned
                 by `feature_pairs.align_pair` (finer map avg-pooled to the coarser stride, then
                 both cropped to the common extent);
      loss_<name> for MODEL.TRANSFER.NAMES, the same sum with that loss and weight;
      loss_kd  = KD.LOSS_WEIGHT * kd_loss(student RoI logits, teacher RoI logits, T), the
                 teacher's box head run on the student's sampled proposals ([R, K + 1] logits).
    """

    @configurable
    def __init__(
        self,
        *,
        teacher: nn.Module,
        feature_pairs: Sequence[FeaturePair],
        nst_weight: float = 0.0,
        nst_kernel: str = "poly",
        nst_kernel_args: dict | None = None,
        transfer_losses: Sequence[Tuple[str, float]] = (),
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
        **kwargs,
    ):
        """
        Args:
            teacher: a frozen detectron2 detector (built by `teacher.build_teacher`).
            feature_pairs: student/teacher feature pairs with per-pair weights and strides.
            nst_weight: weight of loss_nst (0: off). nst_kernel, nst_kernel_args: for nst_loss.
            transfer_losses: (registry name, weight) of further losses on the same pairs.
            kd_weight: weight of loss_kd on RoI class logits (0: off). kd_temperature: T.
            kwargs: GeneralizedRCNN's arguments (backbone, proposal_generator, roi_heads, ...).
        """
        super().__init__(**kwargs)
        self._teacher = (teacher,)  # a tuple, so nn.Module does not register it as a child
        self.feature_pairs = list(feature_pairs)
        self.nst_weight = float(nst_weight)
        self.kd_weight = float(kd_weight)
        self.kd_temperature = float(kd_temperature)
        self._nst = build_transfer_loss("nst", kernel=nst_kernel, **(nst_kernel_args or {}))
        self._transfer = [(n, build_transfer_loss(n), float(w)) for n, w in transfer_losses]
        self._check(teacher)
        self._share_input = self._same_preprocessing(teacher)
        if not self.distilling:
            logger.warning("DistillationRCNN with every transfer weight 0: plain training")

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        teacher = build_teacher(cfg)
        nst = cfg.MODEL.NST
        if len(cfg.MODEL.TRANSFER.NAMES) != len(cfg.MODEL.TRANSFER.WEIGHTS):
            raise ValueError("MODEL.TRANSFER.NAMES and MODEL.TRANSFER.WEIGHTS differ in length")
        pairs = []  # validated only when a feature loss uses them
        if nst.LOSS_WEIGHT > 0 or cfg.MODEL.TRANSFER.NAMES:
            pairs = build_feature_pairs(
                nst.STUDENT_FEATURES,
                nst.TEACHER_FEATURES,
                nst.FEATURE_WEIGHTS,
                ret["backbone"].output_shape(),
                teacher.backbone.output_shape(),
            )
        ret.update(
            teacher=teacher,
            feature_pairs=pairs,
            nst_weight=nst.LOSS_WEIGHT,
            nst_kernel=nst.KERNEL,
            nst_kernel_args=_nst_kernel_args(cfg),
            transfer_losses=list(zip(cfg.MODEL.TRANSFER.NAMES, cfg.MODEL.TRANSFER.WEIGHTS)),
            kd_weight=cfg.MODEL.KD.LOSS_WEIGHT,
            kd_temperature=cfg.MODEL.KD.TEMPERATURE,
        )
        return ret

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher detector (not a submodule)."""
        return self._teacher[0]

    @property
    def distilling(self) -> bool:
        """Whether any transfer loss is on (otherwise training is GeneralizedRCNN's)."""
        return self.nst_weight > 0 or self.kd_weight > 0 or bool(self._transfer)

    def _apply(self, fn, *args, **kwargs):
        # device / dtype moves (.to, .cuda, .half, ...) go through _apply: take the teacher along
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def _check(self, teacher: nn.Module) -> None:
        """Fail at construction, not at the first step, on a bad loss or head configuration."""
        for name, fn, _ in self._transfer:
            if name in ("nst", "kd"):
                raise ValueError(f"MODEL.TRANSFER.NAMES has {name!r}: use MODEL.{name.upper()}")
            required = [
                p.name
                for p in list(inspect.signature(fn).parameters.values())[2:]
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
            if required:
                raise ValueError(
                    f"transfer loss {name!r} needs {required}, which detection does not supply"
                )
        probe = torch.rand(1, 2, 3, 3)
        self._nst(probe, probe)  # raises on an unknown kernel or bad kernel arguments
        if self.kd_weight > 0:
            check_kd_heads(self.roi_heads, teacher.roi_heads)

    def _same_preprocessing(self, teacher: nn.Module) -> bool:
        """Whether the student's normalised, padded batch is a valid teacher input as is."""
        s_div = self.backbone.size_divisibility
        t_div = teacher.backbone.size_divisibility
        return (
            torch.equal(self.pixel_mean.cpu(), teacher.pixel_mean.cpu())
            and torch.equal(self.pixel_std.cpu(), teacher.pixel_std.cpu())
            and (t_div <= 1 or (s_div > 0 and s_div % t_div == 0))
        )

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """GeneralizedRCNN.forward; in training, the loss dict also has the transfer losses."""
        if not self.training or not self.distilling:
            return super().forward(batched_inputs)
        backbone, pooler, predictor = {}, {}, {}
        with ExitStack() as stack:
            stack.enter_context(record_first_call(self.backbone, backbone))
            if self.kd_weight > 0:
                stack.enter_context(record_first_call(box_pooler(self.roi_heads), pooler))
                stack.enter_context(record_first_call(self.roi_heads.box_predictor, predictor))
            losses = super().forward(batched_inputs)
        losses.update(self.transfer_losses(batched_inputs, backbone, pooler, predictor))
        return losses

    def transfer_losses(self, batched_inputs, backbone: dict, pooler: dict, predictor: dict):
        """The weighted transfer losses of one step, from what `forward` recorded.

        Args:
            batched_inputs: the step's inputs (used only if the teacher preprocesses differently).
            backbone: {"args": ([B, 3, H, W] student input,), "output": {name: [B, C, h, w]}}.
            pooler: {"args": (features, list[Boxes] sampled proposals)} (KD only).
            predictor: {"output": ([R, K + 1] class logits, deltas)} (KD only).
        Returns:
            {"loss_nst", "loss_<transfer name>", "loss_kd"}: scalars, the enabled ones only.
        """
        teacher = self.teacher
        if self._share_input:
            t_input = backbone["args"][0]
        else:
            t_input = teacher.preprocess_image(batched_inputs).tensor
        with torch.no_grad():
            t_feats = teacher.backbone(t_input)
        s_feats = backbone["output"]

        losses = {}
        pairs = []  # aligned once, shared by NST and the other transfer losses
        for p in self.feature_pairs:
            f_s, f_t = s_feats[p.student], t_feats[p.teacher]
            pairs.append((p.weight, *align_pair(f_s, f_t, p.student_stride, p.teacher_stride)))
        if self.nst_weight > 0:
            losses["loss_nst"] = self.nst_weight * sum(w * self._nst(s, t) for w, s, t in pairs)
        for name, fn, weight in self._transfer:
            losses[f"loss_{name}"] = weight * sum(w * fn(s, t) for w, s, t in pairs)
        if self.kd_weight > 0:
            with torch.no_grad():
                t_logits = box_class_logits(teacher.roi_heads, t_feats, pooler["args"][1])
            s_logits = predictor["output"][0]
            losses["loss_kd"] = self.kd_weight * kd_loss(s_logits, t_logits, self.kd_temperature)
        return losses
