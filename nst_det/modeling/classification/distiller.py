"""The classification distiller: a student classifier trained with CE + weighted transfer losses.

Registered in detectron2's META_ARCH_REGISTRY, so detectron2's DefaultTrainer builds, trains,
checkpoints and evaluates it like any detector. In training it returns a loss dict

    {"loss_cls": CE, "loss_nst": w * sum_p w_p * MMD^2_p, "loss_kd": w * T^2 KL,
     "loss_<name>": w * sum_p w_p * <name>_p, ...}

with every weight applied by the distillation core (nst_det.distill.DistillationCore, the
`distill` child), which also holds the inert teacher outside the module tree. In evaluation it
returns one `{"logits": [num_classes]}` dict per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from nst_det.distill import DistillationCore, distill_config, nst_kernel_args

from .registry import build_classifier
from .weights import load_classifier_weights

__all__ = ["ClassificationDistiller", "build_classification_teacher", "nst_kernel_args"]


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
    load_classifier_weights(teacher, weights, "MODEL.TEACHER.WEIGHTS")
    return teacher


def feature_shapes(model: nn.Module | None) -> dict[str, ShapeSpec]:
    """{name: ShapeSpec(channels, stride)} of a registered classifier's features."""
    if model is None:
        return {}
    return {k: ShapeSpec(channels=c, stride=model.feature_strides[k])
            for k, c in model.feature_channels.items()}


@META_ARCH_REGISTRY.register()
class ClassificationDistiller(nn.Module):
    """Student classifier + distillation core; CE and transfer losses in one loss dict."""

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        distill: DistillationCore,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        pre_relu_features: bool = True,
    ):
        """
        Args:
            student: a classifier with `forward` and `forward_features` (see
                nst_det.modeling.classification.CLASSIFIER_REGISTRY).
            distill: the core holding the frozen teacher (same interface), the feature pairs and
                the weighted losses; losses taking `labels` get the batch's labels.
            pixel_mean, pixel_std: per-channel normalisation of the input images (0-255 scale,
                in the channel order the data mapper produces).
            pre_relu_features: take feature maps before their stage's last ReLU (the paper).
        """
        super().__init__()
        self.student = student
        self.distill = distill
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.pre_relu_features = pre_relu_features

    @classmethod
    def from_config(cls, cfg):
        student = build_classifier(cfg.MODEL.CLASSIFIER.ARCH, cfg.MODEL.CLASSIFIER.NUM_CLASSES)
        if cfg.MODEL.CLASSIFIER.WEIGHTS:
            load_classifier_weights(student, cfg.MODEL.CLASSIFIER.WEIGHTS,
                                    "MODEL.CLASSIFIER.WEIGHTS")
        teacher = build_classification_teacher(cfg)
        core = DistillationCore(
            teacher=teacher, student_shapes=feature_shapes(student),
            teacher_shapes=feature_shapes(teacher), supplies=("labels",),
            context="ClassificationDistiller", **distill_config(cfg))
        return {
            "student": student,
            "distill": core,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "pre_relu_features": cfg.MODEL.CLASSIFIER.PRE_RELU_FEATURES,
        }

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (not a submodule), or None."""
        return self.distill.teacher

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

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
        pairs = self.distill.feature_pairs
        logits_s, feats_s = self.student.forward_features(
            images, self.pre_relu_features, names=[p.student for p in pairs])
        losses = {"loss_cls": F.cross_entropy(logits_s, labels)}
        if not self.distill.distilling:
            return losses
        with torch.no_grad():
            logits_t, feats_t = self.teacher.forward_features(
                images, self.pre_relu_features, names=[p.teacher for p in pairs])
        losses.update(self.distill.feature_losses(feats_s, feats_t, labels=labels))
        losses.update(self.distill.kd(logits_s, logits_t))
        return losses
