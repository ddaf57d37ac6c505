"""Registry of classification networks (teachers and students) by architecture name."""

from fvcore.common.registry import Registry
from torch import nn

CLASSIFIER_REGISTRY = Registry("NST_CLASSIFIER")
CLASSIFIER_REGISTRY.__doc__ = """
Classification networks selectable by `cfg.MODEL.CLASSIFIER.ARCH` (student) and
`cfg.MODEL.TEACHER.ARCH` (teacher). A registered builder is called as `builder(num_classes)` and
returns an nn.Module with:

* `forward(images [B, 3, H, W]) -> logits [B, num_classes]`;
* `forward_features(images, pre_relu=True) -> (logits, {name: [B, C, h, w]})`;
* `feature_channels` / `feature_strides`: {name: int} for every feature name.
"""


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """Build the randomly initialised classifier registered as `arch` (torchvision-style init)."""
    if arch not in CLASSIFIER_REGISTRY:
        known = ", ".join(sorted(k for k, _ in CLASSIFIER_REGISTRY))
        raise KeyError(f"Unknown classifier arch {arch!r}; registered: {known}")
    return CLASSIFIER_REGISTRY.get(arch)(num_classes)
