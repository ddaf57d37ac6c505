"""Registry of classification networks (teachers and students) by architecture name."""

from fvcore.common.registry import Registry
from torch import nn

CLASSIFIER_REGISTRY = Registry("NST_CLASSIFIER")
CLASSIFIER_REGISTRY.__doc__ = """
Classification networks selectable by `cfg.MODEL.CLASSIFIER.ARCH` (student) and
`cfg.MODEL.TEACHER.ARCH` (teacher). A registered builder is called as `builder(num_classes)` and
returns an nn.Module with:

* `forward(images [B, 3, H, W]) -> logits [B, num_classes]`;
* `forward_features(images, pre_relu=True, names=None) -> (logits, {name: [B, C, h, w]})`
  (`names`: the features wanted; a model may return more);
* `feature_channels` / `feature_strides`: {name: int} for every feature name.
"""


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """Build the randomly initialised classifier `arch` (torchvision-style init).

    `arch` is a name registered here, else any torchvision classification model name (or
    "torchvision:<name>"), built as a `TorchvisionClassifier` (features by node name).
    """
    from ..torchvision_graph import torchvision_classifier_names
    from .torchvision_net import TORCHVISION_PREFIX, TorchvisionClassifier

    if arch in CLASSIFIER_REGISTRY:
        return CLASSIFIER_REGISTRY.get(arch)(num_classes)
    name = arch[len(TORCHVISION_PREFIX):] if arch.startswith(TORCHVISION_PREFIX) else arch
    if name in torchvision_classifier_names():
        return TorchvisionClassifier(name, num_classes)
    known = ", ".join(sorted(k for k, _ in CLASSIFIER_REGISTRY))
    raise KeyError(f"Unknown classifier arch {arch!r}; registered: {known}; or any torchvision "
                   "classification model name (torchvision.models.list_models())")
