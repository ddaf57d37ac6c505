"""The distillation core shared by every distilling model (classifier, R-CNN, RetinaNet).

`DistillationCore` is an `nn.Module` that a distilling model owns as its `distill` child. It holds

* the inert teacher: eval mode, no grad, kept in a tuple so it is outside the module tree (never
  in `parameters()`, `state_dict()`, the optimizer, DDP or an export); `.to()` / `.half()` /
  `.double()` reach it through `_apply`, and `.train()` never takes it out of eval mode;
* the feature pairs (validated against both models' output shapes, aligned by `align_pair`);
* the weighted sum of the feature losses (`loss_nst` and `loss_<name>` of MODEL.TRANSFER) and
  of the logits losses (`loss_kd`, and MODEL.TRANSFER losses marked `on_logits`, e.g. DKD), with
  every weight applied here (trainers only sum the loss dict);
* the losses' learned modules (`regressors`, a ModuleDict: FitNet regressors, MGD generators,
  FGD context blocks, DeFeat/FGFI adapters, ReviewKD's fusion): student-side, so they are in
  `parameters()` (the optimizer), in `state_dict()` (training checkpoints, exact resume) and,
  under `distill.`, dropped from the student export; never part of the teacher;
* the check, at construction, that every argument of every loss is supplied.

How each argument of a MODEL.TRANSFER loss ``fn(f_s, f_t, ...)`` is supplied (one path):

  ``module`` / ``regressor``  built here by ``fn.build_module(Cs, Ct, **module_args)``, one per
                              pair (or one for all pairs, below), key ``<name>_<i>`` / ``<name>``;
  ``stride``                  the pair's stride after alignment (the coarser of the two);
  ``level_strides``           the strides of all pairs, finest first (GT-to-level assignment);
  names in ``supplies``       passed by the owning model per step (``labels`` of a classifier,
                              ``gt_boxes`` and its anchors ``anchor_cells`` / ``anchor_offset``
                              of a detector, ``target`` = RoI gt classes of R-CNN);
  other keywords              the method's hyper-parameters (``transfer_args``), bound now.

Attributes a loss may carry: ``over_all_pairs`` (it takes the lists of all pairs' aligned maps,
e.g. ReviewKD; FEATURE_WEIGHTS do not apply to it), ``on_logits`` (it takes class logits, e.g.
DKD, and is computed by `kd` next to loss_kd), ``build_module`` (its learned module).
A per-loss warm-up (``warmup_iters``, e.g. FGFI's 400) multiplies the loss by 0 before that
iteration (detectron2's EventStorage iteration), so keys and DDP's graph stay the same.

The models themselves only record their features and call `feature_losses` / `kd`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from torch import nn

from ..losses import build_transfer_loss, get_transfer_loss, kd_loss
from .pairs import align_pair, build_feature_pairs

__all__ = ["DistillationCore", "METHOD_KEYS", "distill_config", "freeze", "nst_kernel_args"]

logger = logging.getLogger(__name__)

_OWN_WEIGHT = ("nst", "kd")  # losses with their own config namespace, not MODEL.TRANSFER
_MODULE_ARGS = ("module", "regressor")  # the loss's learned module, built by fn.build_module
_PAIR_ARGS = ("stride", "level_strides")  # filled from the feature pairs

# Hyper-parameters of the MODEL.TRANSFER methods: MODEL.<NAME>.<KEY> -> (what, keyword), what =
# "loss" (a keyword of the registered loss), "module" (of its fn.build_module) or "warmup" (the
# core's warm-up). Defaults and comments: nst_det/config.py.
METHOD_KEYS: Dict[str, Dict[str, Tuple[str, str]]] = {
    "cwd": {"TAU": ("loss", "tau")},
    "mgd": {"MASK_RATIO": ("loss", "mask_ratio")},
    "fgd": {"TEMPERATURE": ("loss", "temperature"), "ALPHA": ("loss", "alpha"),
            "BETA": ("loss", "beta"), "GAMMA": ("loss", "gamma"), "LAMBDA": ("loss", "lambda_")},
    "defeat": {"FG_WEIGHT": ("loss", "fg_weight"), "BG_WEIGHT": ("loss", "bg_weight")},
    "fgfi": {"PSI": ("loss", "psi"), "WARMUP_ITERS": ("warmup", "")},
    "reviewkd": {"MID_CHANNELS": ("module", "mid_channels")},
    "dkd": {"ALPHA": ("loss", "alpha"), "BETA": ("loss", "beta"),
            "TEMPERATURE": ("loss", "T")},
}


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


def _method_args(cfg, names: Sequence[str]) -> Tuple[dict, dict, dict]:
    """(transfer_args, module_args, warmup_iters) of the named methods, from METHOD_KEYS."""
    out = {"loss": {}, "module": {}, "warmup": {}}
    for name in names:
        for key, (what, kw) in METHOD_KEYS.get(name, {}).items():
            value = cfg.MODEL[name.upper()][key]
            if what == "warmup":
                out["warmup"][name] = int(value)
            else:
                out[what].setdefault(name, {})[kw] = value
    return out["loss"], out["module"], out["warmup"]


def distill_config(cfg) -> dict:
    """The keyword arguments of `DistillationCore` that come from the config.

    Reads MODEL.DISTILL.{STUDENT,TEACHER}_FEATURES / FEATURE_WEIGHTS (the pairs of every feature
    loss), MODEL.NST.*, MODEL.KD.*, MODEL.TRANSFER.{NAMES, WEIGHTS} and, for each name there,
    its own namespace (MODEL.CWD, MODEL.FGD, ...: see METHOD_KEYS).
    """
    names, weights = list(cfg.MODEL.TRANSFER.NAMES), list(cfg.MODEL.TRANSFER.WEIGHTS)
    if len(names) != len(weights):
        raise ValueError(f"MODEL.TRANSFER.NAMES {names} and MODEL.TRANSFER.WEIGHTS {weights} "
                         "must have the same length")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # one loss_<name> and one set of modules per name: a second would replace it
        raise ValueError(f"MODEL.TRANSFER.NAMES {names} lists {repeated} more than once")
    # the arguments of the losses that are on: a weight-0 entry is dropped, its modules too
    transfer_args, module_args, warmup_iters = _method_args(
        cfg, [n for n, w in zip(names, weights) if float(w) != 0])
    d = cfg.MODEL.DISTILL
    return {
        "student_features": list(d.STUDENT_FEATURES),
        "teacher_features": list(d.TEACHER_FEATURES),
        "feature_weights": list(d.FEATURE_WEIGHTS),
        "nst_weight": cfg.MODEL.NST.LOSS_WEIGHT,
        "nst_kernel": cfg.MODEL.NST.KERNEL,
        "nst_kernel_args": nst_kernel_args(cfg),
        "transfer_losses": list(zip(names, weights)),
        "transfer_args": transfer_args,
        "module_args": module_args,
        "warmup_iters": warmup_iters,
        "kd_weight": cfg.MODEL.KD.LOSS_WEIGHT,
        "kd_temperature": cfg.MODEL.KD.TEMPERATURE,
    }


def freeze(model: nn.Module) -> nn.Module:
    """Put `model` in eval mode with every parameter's requires_grad off; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def _iteration() -> int:
    """The training iteration of detectron2's current EventStorage (the trainers open one)."""
    from detectron2.utils.events import get_event_storage

    try:
        return get_event_storage().iter
    except AssertionError:
        raise RuntimeError("a loss warm-up needs the training iteration: run the step inside "
                           "detectron2's EventStorage (the trainers do)") from None


@dataclass
class _Transfer:
    """One MODEL.TRANSFER loss as the core runs it."""

    name: str
    fn: Callable  # with its hyper-parameters bound
    weight: float
    supplied: list  # the names in `supplies` it takes
    module_arg: str | None = None  # "module" / "regressor" when it has a learned module
    pair_args: list = field(default_factory=list)  # of _PAIR_ARGS
    all_pairs: bool = False
    on_logits: bool = False
    same_channels: bool = False  # it compares maps of one width and has no adapter
    warmup: int = 0


class DistillationCore(nn.Module):
    """Inert teacher + feature pairs + weighted transfer losses (see the module docstring).

    Args:
        teacher: the teacher model (frozen here), or None when no loss is on.
        student_shapes, teacher_shapes: {feature name: ShapeSpec(channels, stride)} of what the
            two models produce; the pairs are checked against them.
        student_features, teacher_features, feature_weights: the pairs, position by position.
            Only validated (and used) when a feature loss is on.
        nst_weight: weight of loss_nst (0: off). nst_kernel, nst_kernel_args: for `nst_loss`.
        transfer_losses: (registry name, weight) of further losses (feature losses on the same
            pairs, or logits losses); weight 0 entries are dropped.
        transfer_args: {name: keyword arguments} bound to those losses (their hyper-parameters).
        module_args: {name: keyword arguments} of their ``build_module``.
        warmup_iters: {name: N}: that loss is 0 (times 0) before iteration N.
        kd_weight, kd_temperature: weight and T of loss_kd (0: off).
        supplies: names of the extra arguments the owning model passes to `feature_losses` /
            `kd` (e.g. ("labels",), ("gt_boxes", "anchor_cells", "anchor_offset", "target"));
            a loss that requires anything else is an error now.
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
        transfer_args: Mapping[str, dict] | None = None,
        module_args: Mapping[str, dict] | None = None,
        warmup_iters: Mapping[str, int] | None = None,
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
        transfer_args, module_args = dict(transfer_args or {}), dict(module_args or {})
        warmup_iters = dict(warmup_iters or {})
        self._transfer = [
            self._plan(name, float(weight), transfer_args.get(name, {}), supplies, context,
                       int(warmup_iters.get(name, 0)))
            for name, weight in transfer_losses if float(weight) != 0
        ]
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
        # the losses' learned modules (historical name): student-side, see the module docstring
        self.regressors = nn.ModuleDict()
        s_ch = [student_shapes[p.student].channels for p in self.feature_pairs]
        t_ch = [teacher_shapes[p.teacher].channels for p in self.feature_pairs]
        for t in self._transfer:
            wider = [f"{p.student} ({cs}) / {p.teacher} ({ct})"
                     for p, cs, ct in zip(self.feature_pairs, s_ch, t_ch) if cs != ct]
            if t.same_channels and wider:  # else the first training step fails on the shapes
                raise ValueError(
                    f"MODEL.TRANSFER.NAMES has {t.name!r}, which compares student and teacher "
                    f"features of equal channel counts, but the pairs {wider} (channels) of "
                    "MODEL.DISTILL.STUDENT_FEATURES / TEACHER_FEATURES differ: pair features of "
                    "one width (e.g. FPN levels of the same MODEL.FPN.OUT_CHANNELS), or use a "
                    "loss with an adapter (fitnet, mgd, fgd, defeat)")
            strides = [p.student_stride for p in self.feature_pairs]
            if t.all_pairs and strides != sorted(strides):  # it fuses coarse to fine by position
                raise ValueError(
                    f"MODEL.TRANSFER.NAMES has {t.name!r}, which fuses the pairs' levels along "
                    "their order: list MODEL.DISTILL.STUDENT_FEATURES / TEACHER_FEATURES finest "
                    f"first (student strides {strides})")
            if t.module_arg is None:
                continue
            build = get_transfer_loss(t.name).build_module
            kwargs = module_args.get(t.name, {})
            if t.all_pairs:
                self.regressors[t.name] = build(s_ch, t_ch, **kwargs)
            else:
                for i, (cs, ct) in enumerate(zip(s_ch, t_ch)):
                    self.regressors[f"{t.name}_{i}"] = build(cs, ct, **kwargs)
        # each pair's stride after alignment (the coarser of the two), in pair order
        self.pair_strides = [max(p.student_stride, p.teacher_stride) for p in self.feature_pairs]
        unknown = set(module_args) - {t.name for t in self._transfer if t.module_arg}
        if unknown:
            raise ValueError(f"module arguments for {sorted(unknown)}, which have no learned "
                             "module (or are off)")

    @staticmethod
    def _plan(name, weight, bound, supplies, context, warmup) -> _Transfer:
        """How the core calls MODEL.TRANSFER loss `name` (raises on what nobody supplies)."""
        if name in _OWN_WEIGHT:
            raise ValueError(f"MODEL.TRANSFER.NAMES has {name!r}, which has its own weight: "
                             f"use MODEL.{name.upper()}.LOSS_WEIGHT")
        raw = get_transfer_loss(name)  # KeyError listing the registered names
        fn = build_transfer_loss(name, **bound)  # TypeError naming a bad hyper-parameter
        params = list(inspect.signature(raw).parameters.values())[2:]
        names = [p.name for p in params]
        module_arg = next((a for a in _MODULE_ARGS if a in names), None)
        if not hasattr(raw, "build_module"):
            module_arg = None
        t = _Transfer(name, fn, weight, [n for n in names if n in supplies], module_arg,
                      all_pairs=bool(getattr(raw, "over_all_pairs", False)),
                      on_logits=bool(getattr(raw, "on_logits", False)),
                      same_channels=bool(getattr(raw, "same_channels", False)), warmup=warmup)
        if not (t.all_pairs or t.on_logits):
            t.pair_args = [n for n in names if n in _PAIR_ARGS]
        given = set(t.supplied) | set(t.pair_args) | set(bound) | {module_arg}
        missing = [
            p.name for p in params
            if p.default is inspect.Parameter.empty and p.name not in given
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if missing:
            raise ValueError(f"transfer loss {name!r} needs {missing}, which {context} does "
                             f"not supply (it supplies {sorted(supplies)})")
        return t

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (not a submodule), or None."""
        return self._teacher[0]

    @property
    def uses_features(self) -> bool:
        """Whether a feature loss (NST or a MODEL.TRANSFER feature loss) is on."""
        return self.nst_weight > 0 or any(not t.on_logits for t in self._transfer)

    @property
    def uses_logits(self) -> bool:
        """Whether a logits loss (KD, or a MODEL.TRANSFER logits loss such as DKD) is on."""
        return self.kd_weight > 0 or any(t.on_logits for t in self._transfer)

    @property
    def distilling(self) -> bool:
        """Whether any transfer loss is on (otherwise the owner trains as a plain model)."""
        return self.uses_features or self.uses_logits

    def needs(self, name: str) -> bool:
        """Whether an enabled loss takes the supplied value `name` (e.g. "gt_boxes")."""
        return any(name in t.supplied for t in self._transfer)

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

    def _scale(self, t: _Transfer) -> float:
        """t.weight, or 0 during t's warm-up."""
        return 0.0 if t.warmup > 0 and _iteration() < t.warmup else t.weight

    def feature_losses(
        self, s_feats: Dict[str, torch.Tensor], t_feats: Dict[str, torch.Tensor], **extras
    ) -> Dict[str, torch.Tensor]:
        """The weighted feature losses of one step.

        Args:
            s_feats: {name: [B, Cs, Hs, Ws]} student features (gradients flow).
            t_feats: {name: [B, Ct, Ht, Wt]} teacher features of the same images.
            extras: the values named in `supplies` (e.g. labels=[B] class indices, gt_boxes=B
                tensors [Ni, 4] xyxy in the padded input's pixels).
        Returns:
            {"loss_nst", "loss_<transfer name>"}: weighted scalars, the enabled ones only;
            loss = weight * sum_k FEATURE_WEIGHTS[k] * loss(s_k, t_k), pairs aligned once
            (an `over_all_pairs` loss: weight * loss([s_k], [t_k])).
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
        for t in self._transfer:
            if t.on_logits:
                continue
            kwargs = {k: extras[k] for k in t.supplied}
            if t.all_pairs:
                if t.module_arg:
                    kwargs[t.module_arg] = self.regressors[t.name]
                total = t.fn([s for _, s, _ in pairs], [f for _, _, f in pairs], **kwargs)
            else:
                total = 0.0
                for i, (w, s, f) in enumerate(pairs):
                    pair_values = {"stride": self.pair_strides[i],
                                   "level_strides": tuple(sorted(set(self.pair_strides)))}
                    kwargs.update({k: pair_values[k] for k in t.pair_args})
                    if t.module_arg:
                        kwargs[t.module_arg] = self.regressors[f"{t.name}_{i}"]
                    total = total + w * t.fn(s, f, **kwargs)
            losses[f"loss_{t.name}"] = self._scale(t) * total
        return losses

    def kd(self, logits_s: torch.Tensor, logits_t: torch.Tensor,
           **extras) -> Dict[str, torch.Tensor]:
        """The weighted logits losses: {"loss_kd", "loss_<name>" of `on_logits` losses}, if on.

        Args:
            logits_s, logits_t: [N, K] student and teacher logits of the same N samples.
            extras: the values named in `supplies` (e.g. target=[N] class indices for DKD).
        """
        losses = {}
        if self.kd_weight > 0:
            losses["loss_kd"] = self.kd_weight * kd_loss(logits_s, logits_t, self.kd_temperature)
        for t in self._transfer:
            if t.on_logits:
                kwargs = {k: extras[k] for k in t.supplied}
                losses[f"loss_{t.name}"] = self._scale(t) * t.fn(logits_s, logits_t, **kwargs)
        return losses
