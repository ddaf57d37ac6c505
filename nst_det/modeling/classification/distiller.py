"""The classification distiller: a student classifier trained with CE + weighted transfer losses.

Registered in detectron2's META_ARCH_REGISTRY, so detectron2's DefaultTrainer builds, trains,
checkpoints and evaluates it like any detector. In training it returns a loss dict

    {"loss_cls": CE, "loss_nst": w * sum_p w_p * MMD^2_p, "loss_kd": w * T^2 KL,
     "loss_<name>": w * sum_p w_p * <name>_p, ...}

with every weight applied here (the trainer only sums). In evaluation it returns one
`{"logits": [num_classes]}` dict per image.

The teacher is inert: eval mode, `requires_grad=False`, run under `torch.no_grad()`, and held
outside the module tree (in a tuple attribute), so it is never in `parameters()`, the optimizer,
DDP or `state_dict()`; `.to()` / `.float()` etc. still reach it (`_apply` is extended) and
`.train()` never switches it out of eval mode.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from nst_det.losses import FitNetRegressor, get_transfer_loss, kd_loss, nst_loss

from .registry import build_classifier
from .weights import load_classifier_weights

__all__ = ["ClassificationDistiller", "build_classification_teacher", "nst_kernel_args"]

logger = logging.getLogger(__name__)


def nst_kernel_args(cfg) -> dict:
    """The keyword arguments of `nst_loss` for cfg.MODEL.NST.KERNEL."""
    nst = cfg.MODEL.NST
    args = {
        "linear": {},
        "poly": {"degree": nst.POLY_DEGREE, "c": nst.POLY_C},
        "gaussian": {"sigma2": nst.GAUSSIAN_SIGMA2 if nst.GAUSSIAN_SIGMA2 > 0 else None},
    }
    if nst.KERNEL not in args:
        raise ValueError(f"MODEL.NST.KERNEL must be one of {sorted(args)}; got {nst.KERNEL!r}")
    return args[nst.KERNEL]


def build_classification_teacher(cfg) -> nn.Module | None:
    """The frozen teacher of cfg.MODEL.TEACHER.{ARCH, WEIGHTS} (None if ARCH is empty).

    Its head has cfg.MODEL.CLASSIFIER.NUM_CLASSES outputs; WEIGHTS (a local torchvision-style
    state dict or a ClassificationTrainer checkpoint) is required and loaded strictly.
    """
    arch, weights = cfg.MODEL.TEACHER.ARCH, cfg.MODEL.TEACHER.WEIGHTS
    if not arch:
        return None
    if not weights:
        raise ValueError(f"MODEL.TEACHER.ARCH={arch!r} needs MODEL.TEACHER.WEIGHTS (a local file)")
    teacher = build_classifier(arch, cfg.MODEL.CLASSIFIER.NUM_CLASSES)
    load_classifier_weights(teacher, weights)
    return teacher


@META_ARCH_REGISTRY.register()
class ClassificationDistiller(nn.Module):
    """Student classifier + optional frozen teacher; CE and transfer losses in one loss dict."""

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module | None = None,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        pre_relu_features: bool = True,
        student_features: tuple[str, ...] = (),
        teacher_features: tuple[str, ...] = (),
        feature_weights: tuple[float, ...] = (),
        nst_weight: float = 0.0,
        nst_kernel: str = "poly",
        nst_kernel_args: dict | None = None,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
        transfer_losses: dict[str, float] | None = None,
    ):
        """
        Args:
            student: a classifier with `forward` and `forward_features` (see
                nst_det.modeling.classification.CLASSIFIER_REGISTRY).
            teacher: the same interface; frozen here. Required if any transfer weight is > 0.
            pixel_mean, pixel_std: per-channel normalisation of the input images (0-255 scale,
                in the channel order the data mapper produces).
            pre_relu_features: take feature maps before their stage's last ReLU (the paper).
            student_features, teacher_features, feature_weights: the feature pairs (by name) of
                the feature losses (NST and `transfer_losses`) and one weight per pair.
            nst_weight: weight of loss_nst (0: off); the paper's lambda is 2 * nst_weight.
            nst_kernel, nst_kernel_args: the MMD kernel and its arguments (see `nst_loss`).
            kd_weight, kd_temperature: weight and T of loss_kd (`kd_loss` includes the T^2).
            transfer_losses: {registry name: weight} of other feature losses (e.g. "at", "sp",
                "fitnet", "mmd"); losses taking a `regressor` get a FitNetRegressor per pair,
                losses taking `labels` (class-conditional ones) get the batch's labels.
        """
        super().__init__()
        self.student = student
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.pre_relu_features = pre_relu_features
        if not len(student_features) == len(teacher_features) == len(feature_weights):
            raise ValueError(
                "student_features, teacher_features and feature_weights must have equal lengths; "
                f"got {list(student_features)}, {list(teacher_features)}, {list(feature_weights)}")
        self.feature_pairs = list(zip(student_features, teacher_features, feature_weights))
        self.nst_weight = nst_weight
        self.nst_kernel = nst_kernel
        self.nst_kernel_args = dict(nst_kernel_args or {})
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.transfer_losses = {k: v for k, v in (transfer_losses or {}).items() if v != 0}
        for name in self.transfer_losses:
            if name in ("nst", "kd"):
                raise ValueError(f"{name!r} has its own weight (MODEL.{name.upper()}.LOSS_WEIGHT); "
                                 "do not list it in MODEL.TRANSFER.NAMES")
            get_transfer_loss(name)  # fail now on an unknown name

        uses_features = bool(self.nst_weight or self.transfer_losses)
        needs_teacher = uses_features or bool(self.kd_weight)
        if needs_teacher and teacher is None:
            raise ValueError("a transfer loss weight is > 0 but no teacher is given "
                             "(set MODEL.TEACHER.ARCH and MODEL.TEACHER.WEIGHTS)")
        if teacher is not None and not needs_teacher:
            logger.warning("A teacher is configured but every transfer weight is 0: it is unused.")
        if uses_features and not self.feature_pairs:
            raise ValueError("feature losses are enabled but no feature pairs are configured")
        self._needs_teacher = needs_teacher and teacher is not None
        self._teacher = (None,)
        if teacher is not None:
            for s, t, _ in self.feature_pairs if uses_features else ():
                _check_feature(student, s, "student")
                _check_feature(teacher, t, "teacher")
            teacher.eval()
            teacher.requires_grad_(False)
            self._teacher = (teacher,)  # a tuple: not registered as a submodule

        # What each loss takes besides (f_s, f_t): class-conditional losses get the labels, and
        # FitNet-style losses a learned regressor per pair (student-side modules, trained with it)
        self._loss_params = {name: inspect.signature(get_transfer_loss(name)).parameters
                             for name in self.transfer_losses}
        self.regressors = nn.ModuleDict()
        for name in self.transfer_losses:
            if "regressor" in self._loss_params[name]:
                for i, (s, t, _) in enumerate(self.feature_pairs):
                    self.regressors[f"{name}_{i}"] = FitNetRegressor(
                        student.feature_channels[s], teacher.feature_channels[t])

    @classmethod
    def from_config(cls, cfg):
        student = build_classifier(cfg.MODEL.CLASSIFIER.ARCH, cfg.MODEL.CLASSIFIER.NUM_CLASSES)
        if cfg.MODEL.CLASSIFIER.WEIGHTS:
            load_classifier_weights(student, cfg.MODEL.CLASSIFIER.WEIGHTS)
        names, weights = cfg.MODEL.TRANSFER.NAMES, cfg.MODEL.TRANSFER.WEIGHTS
        if len(names) != len(weights):
            raise ValueError(f"MODEL.TRANSFER.NAMES {list(names)} and WEIGHTS {list(weights)} "
                             "must have equal lengths")
        return {
            "student": student,
            "teacher": build_classification_teacher(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "pre_relu_features": cfg.MODEL.CLASSIFIER.PRE_RELU_FEATURES,
            "student_features": cfg.MODEL.NST.STUDENT_FEATURES,
            "teacher_features": cfg.MODEL.NST.TEACHER_FEATURES,
            "feature_weights": cfg.MODEL.NST.FEATURE_WEIGHTS,
            "nst_weight": cfg.MODEL.NST.LOSS_WEIGHT,
            "nst_kernel": cfg.MODEL.NST.KERNEL,
            "nst_kernel_args": nst_kernel_args(cfg),
            "kd_weight": cfg.MODEL.KD.LOSS_WEIGHT,
            "kd_temperature": cfg.MODEL.KD.TEMPERATURE,
            "transfer_losses": dict(zip(names, weights)),
        }

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (not a submodule), or None."""
        return self._teacher[0]

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() reach the teacher although it is not a submodule
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # always: BN statistics of the teacher never change
        return self

    def preprocess_image(self, batched_inputs: list[dict]) -> torch.Tensor:
        """Stack and normalise the images: list of [3, H, W] (equal sizes) -> [B, 3, H, W]."""
        images = torch.stack([x["image"] for x in batched_inputs]).to(self.device)
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, batched_inputs: list[dict]):
        """
        Args:
            batched_inputs: dicts with "image" ([3, H, W] uint8 or float, 0-255) and, in
                training, "label" (int).
        Returns:
            training: {"loss_cls", "loss_nst", "loss_kd", "loss_<name>"} (enabled ones only);
            evaluation: one {"logits": [num_classes]} per image.
        """
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            return [{"logits": row} for row in self.student(images)]
        labels = torch.as_tensor([x["label"] for x in batched_inputs], device=self.device)
        logits_s, feats_s = self.student.forward_features(images, self.pre_relu_features)
        losses = {"loss_cls": F.cross_entropy(logits_s, labels)}
        if not self._needs_teacher:
            return losses
        with torch.no_grad():
            logits_t, feats_t = self.teacher.forward_features(images, self.pre_relu_features)
        if self.nst_weight:
            losses["loss_nst"] = self.nst_weight * sum(
                w * nst_loss(feats_s[s], feats_t[t], self.nst_kernel, **self.nst_kernel_args)
                for s, t, w in self.feature_pairs)
        if self.kd_weight:
            losses["loss_kd"] = self.kd_weight * kd_loss(logits_s, logits_t, self.kd_temperature)
        for name, weight in self.transfer_losses.items():
            fn = get_transfer_loss(name)
            extra = {"labels": labels} if "labels" in self._loss_params[name] else {}
            total = 0.0
            for i, (s, t, w) in enumerate(self.feature_pairs):
                if f"{name}_{i}" in self.regressors:
                    extra["regressor"] = self.regressors[f"{name}_{i}"]
                total = total + w * fn(feats_s[s], feats_t[t], **extra)
            losses[f"loss_{name}"] = weight * total
        return losses


def _check_feature(model: nn.Module, name: str, role: str) -> None:
    if name not in model.feature_channels:
        raise KeyError(f"{role} {type(model).__name__} has no feature {name!r}; "
                       f"available: {sorted(model.feature_channels)}")
