"""The distillation core shared by every distilling model (classifier, R-CNN, RetinaNet).

`DistillationCore` is an `nn.Module` that a distilling model owns as its `distill` child. It holds

* the inert teacher: eval mode, no grad, kept in a tuple so it is outside the module tree (never
  in `parameters()`, `state_dict()`, the optimizer, DDP or an export); `.to()` / `.half()` /
  `.double()` reach it through `_apply`, and `.train()` never takes it out of eval mode;
* the feature pairs (validated against both models' output shapes, aligned by `align_pair`);
* the weighted sum of the feature losses (`loss_nst` and `loss_<name>` of MODEL.TRANSFER) and
  `loss_kd` on logits, with every weight applied here (trainers only sum the loss dict);
* the check, at construction, that every loss gets the arguments it needs: a learned regressor
  per pair (student-side modules, trained with the student) for losses taking `regressor`, and the
  values the model `supplies` (e.g. `labels` in classification) for the others.

The models themselves only record their features and call `feature_losses` / `kd`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Dict, Mapping, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from torch import nn

from ..losses import FitNetRegressor, build_transfer_loss, get_transfer_loss, kd_loss
from .pairs import align_pair, build_feature_pairs

__all__ = ["DistillationCore", "distill_config", "freeze", "nst_kernel_args"]

logger = logging.getLogger(__name__)

_OWN_WEIGHT = ("nst", "kd")  # losses with their own config namespace, not MODEL.TRANSFER


def nst_kernel_args(cfg) -> dict:
    """MODEL.NST.{KERNEL, POLY_*, GAUSSIAN_SIGMA2} -> keyword arguments of `nst_loss`."""
    nst = cfg.MODEL.NST
    args = {
        "linear": {},
        "poly": {"degree": nst.POLY_DEGREE, "c": nst.POLY_C},
        "gaussian": {"sigma2": nst.GAUSSIAN_SIGMA2 if nst.GAUSSIAN_SIGMA2 > 0 else None},
    }
    if nst.KERNEL not in args:
        raise ValueError(f"MODEL.NST.KERNEL must be one of {sorted(args)}; got {nst.KERNEL!r}")
    return args[nst.KERNEL]


def distill_config(cfg) -> dict:
    """The keyword arguments of `DistillationCore` that come from the config.

    Reads MODEL.DISTILL.{STUDENT,TEACHER}_FEATURES / FEATURE_WEIGHTS (the pairs of every feature
    loss), MODEL.NST.*, MODEL.KD.* and MODEL.TRANSFER.{NAMES, WEIGHTS}.
    """
    names, weights = list(cfg.MODEL.TRANSFER.NAMES), list(cfg.MODEL.TRANSFER.WEIGHTS)
    if len(names) != len(weights):
        raise ValueError(f"MODEL.TRANSFER.NAMES {names} and MODEL.TRANSFER.WEIGHTS {weights} "
                         "must have the same length")
    d = cfg.MODEL.DISTILL
    return {
        "student_features": list(d.STUDENT_FEATURES),
        "teacher_features": list(d.TEACHER_FEATURES),
        "feature_weights": list(d.FEATURE_WEIGHTS),
        "nst_weight": cfg.MODEL.NST.LOSS_WEIGHT,
        "nst_kernel": cfg.MODEL.NST.KERNEL,
        "nst_kernel_args": nst_kernel_args(cfg),
        "transfer_losses": list(zip(names, weights)),
        "kd_weight": cfg.MODEL.KD.LOSS_WEIGHT,
        "kd_temperature": cfg.MODEL.KD.TEMPERATURE,
    }


def freeze(model: nn.Module) -> nn.Module:
    """Put `model` in eval mode with every parameter's requires_grad off; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


class DistillationCore(nn.Module):
    """Inert teacher + feature pairs + weighted transfer losses (see the module docstring).

    Args:
        teacher: the teacher model (frozen here), or None when no loss is on.
        student_shapes, teacher_shapes: {feature name: ShapeSpec(channels, stride)} of what the
            two models produce; the pairs are checked against them.
        student_features, teacher_features, feature_weights: the pairs, position by position.
            Only validated (and used) when a feature loss is on.
        nst_weight: weight of loss_nst (0: off). nst_kernel, nst_kernel_args: for `nst_loss`.
        transfer_losses: (registry name, weight) of further feature losses on the same pairs;
            weight 0 entries are dropped.
        kd_weight, kd_temperature: weight and T of loss_kd (0: off).
        supplies: names of the extra arguments the owning model passes to `feature_losses`
            (e.g. ("labels",)); a loss that requires anything else is an error now.
        context: how the owner is named in error messages.
    """

    def __init__(
        self,
        *,
        teacher: nn.Module | None,
        student_shapes: Mapping[str, ShapeSpec],
        teacher_shapes: Mapping[str, ShapeSpec],
        student_features: Sequence[str] = (),
        teacher_features: Sequence[str] = (),
        feature_weights: Sequence[float] = (),
        nst_weight: float = 0.0,
        nst_kernel: str = "poly",
        nst_kernel_args: dict | None = None,
        transfer_losses: Sequence[Tuple[str, float]] = (),
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
        supplies: Sequence[str] = (),
        context: str = "this model",
    ):
        super().__init__()
        self.nst_weight = float(nst_weight)
        self.kd_weight = float(kd_weight)
        self.kd_temperature = float(kd_temperature)
        self._nst = build_transfer_loss("nst", kernel=nst_kernel, **(nst_kernel_args or {}))
        self._transfer = []  # (name, fn, weight, {param: how it is supplied})
        for name, weight in transfer_losses:
            if name in _OWN_WEIGHT:
                raise ValueError(f"MODEL.TRANSFER.NAMES has {name!r}, which has its own weight: "
                                 f"use MODEL.{name.upper()}.LOSS_WEIGHT")
            fn = get_transfer_loss(name)  # KeyError listing the registered names
            if float(weight) != 0:
                self._transfer.append((name, fn, float(weight)))
        probe = torch.rand(1, 2, 3, 3)
        self._nst(probe, probe)  # raises on an unknown kernel or bad kernel arguments

        if self.distilling and teacher is None:
            raise ValueError("a transfer loss weight is > 0 but no teacher is given "
                             "(set MODEL.TEACHER.*)")
        if teacher is not None and not self.distilling:
            logger.warning("A teacher is configured but every transfer weight is 0: it is unused.")
        self._teacher = (freeze(teacher) if teacher is not None else None,)  # not a submodule

        self.feature_pairs = []
        if self.uses_features:
            self.feature_pairs = build_feature_pairs(
                student_features, teacher_features, feature_weights, student_shapes,
                teacher_shapes)
            if not self.feature_pairs:
                raise ValueError("feature losses are enabled but MODEL.DISTILL.STUDENT_FEATURES "
                                 "is empty")
        self.regressors = nn.ModuleDict()  # student-side: in the optimizer and the state dict
        self._extra = {}
        for name, fn, _ in self._transfer:
            params = list(inspect.signature(fn).parameters.values())[2:]
            self._extra[name] = [p.name for p in params if p.name in supplies]
            if any(p.name == "regressor" for p in params):
                for i, pair in enumerate(self.feature_pairs):
                    self.regressors[f"{name}_{i}"] = FitNetRegressor(
                        student_shapes[pair.student].channels,
                        teacher_shapes[pair.teacher].channels)
            missing = [
                p.name for p in params
                if p.default is inspect.Parameter.empty and p.name != "regressor"
                and p.name not in supplies
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
            if missing:
                raise ValueError(f"transfer loss {name!r} needs {missing}, which {context} does "
                                 f"not supply (it supplies {sorted(supplies)})")

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (not a submodule), or None."""
        return self._teacher[0]

    @property
    def uses_features(self) -> bool:
        """Whether a feature loss (NST or MODEL.TRANSFER) is on."""
        return self.nst_weight > 0 or bool(self._transfer)

    @property
    def distilling(self) -> bool:
        """Whether any transfer loss is on (otherwise the owner trains as a plain model)."""
        return self.uses_features or self.kd_weight > 0

    def _apply(self, fn, *args, **kwargs):
        # device / dtype moves (.to, .cuda, .half, ...) go through _apply: take the teacher along
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # always: the teacher's BN statistics never change
        return self

    def feature_losses(
        self, s_feats: Dict[str, torch.Tensor], t_feats: Dict[str, torch.Tensor], **extras
    ) -> Dict[str, torch.Tensor]:
        """The weighted feature losses of one step.

        Args:
            s_feats: {name: [B, Cs, Hs, Ws]} student features (gradients flow).
            t_feats: {name: [B, Ct, Ht, Wt]} teacher features of the same images.
            extras: the values named in `supplies` (e.g. labels=[B] class indices).
        Returns:
            {"loss_nst", "loss_<transfer name>"}: weighted scalars, the enabled ones only;
            loss = weight * sum_k FEATURE_WEIGHTS[k] * loss(s_k, t_k), pairs aligned once.
        """
        if not self.uses_features:
            return {}
        pairs = [
            (p.weight, *align_pair(s_feats[p.student], t_feats[p.teacher], p.student_stride,
                                   p.teacher_stride))
            for p in self.feature_pairs
        ]
        losses = {}
        if self.nst_weight > 0:
            losses["loss_nst"] = self.nst_weight * sum(w * self._nst(s, t) for w, s, t in pairs)
        for name, fn, weight in self._transfer:
            kwargs = {k: extras[k] for k in self._extra[name]}
            total = 0.0
            for i, (w, s, t) in enumerate(pairs):
                if f"{name}_{i}" in self.regressors:
                    kwargs["regressor"] = self.regressors[f"{name}_{i}"]
                total = total + w * fn(s, t, **kwargs)
            losses[f"loss_{name}"] = weight * total
        return losses

    def kd(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{"loss_kd": KD weight * kd_loss([N, K] student, [N, K] teacher logits, T)}, if on."""
        if self.kd_weight <= 0:
            return {}
        return {"loss_kd": self.kd_weight * kd_loss(logits_s, logits_t, self.kd_temperature)}
