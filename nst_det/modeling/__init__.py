"""Models. Importing registers them with detectron2's registries.

Detection: BasicRes5ROIHeads (ROI_HEADS_REGISTRY, C4 heads for ResNet-18/34), DistillationRCNN
and DistillationRetinaNet (META_ARCH_REGISTRY, users of nst_det.distill's core) and their frozen
teacher (teacher.py); any torchvision classifier as a backbone (backbone/torchvision_backbone.py).
ResNet-18/34 C4 and FPN students use detectron2's own `build_resnet_backbone` /
`build_resnet_fpn_backbone` (depths 18 and 34 built in).
"""

from . import backbone, classification  # noqa: F401  (registration side effects)
from .distill_rcnn import DistillationRCNN
from .distill_retinanet import DistillationRetinaNet
from .roi_heads import BasicRes5ROIHeads
from .teacher import TeacherWeightsError, build_teacher

__all__ = ["BasicRes5ROIHeads", "DistillationRCNN", "DistillationRetinaNet", "TeacherWeightsError",
           "build_teacher"]
