"""Classification stage: teachers/students by name and the distiller meta-architecture.

Importing registers the classifiers (resnet18/34/50/101, inception_bn) in CLASSIFIER_REGISTRY
(any other torchvision classifier is built by name as a TorchvisionClassifier)
and `ClassificationDistiller` in detectron2's META_ARCH_REGISTRY.
"""

from .distiller import ClassificationDistiller, build_classification_teacher
from .inception_bn import InceptionBN
from .registry import CLASSIFIER_REGISTRY, build_classifier
from .resnet import ResNetClassifier
from .torchvision_net import TorchvisionClassifier
from .weights import classifier_state_dict, load_classifier_weights

__all__ = [
    "CLASSIFIER_REGISTRY",
    "ClassificationDistiller",
    "InceptionBN",
    "ResNetClassifier",
    "TorchvisionClassifier",
    "build_classification_teacher",
    "build_classifier",
    "classifier_state_dict",
    "load_classifier_weights",
]
