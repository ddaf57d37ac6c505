"""The distillation core: inert teacher, feature recording, pair alignment, weighted losses.

Every distilling model of nst_det (ClassificationDistiller, DistillationRCNN,
DistillationRetinaNet) owns a `DistillationCore` as its `distill` child and only records the
features its own forward computes.
"""

from .core import DistillationCore, distill_config, freeze, nst_kernel_args
from .pairs import FeaturePair, align_pair, build_feature_pairs
from .recording import record_first_call

__all__ = [
    "DistillationCore",
    "FeaturePair",
    "align_pair",
    "build_feature_pairs",
    "distill_config",
    "freeze",
    "nst_kernel_args",
    "record_first_call",
]
