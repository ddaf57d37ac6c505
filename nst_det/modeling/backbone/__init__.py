"""nst_det's own detectron2 backbones (registered in BACKBONE_REGISTRY on import)."""

from .inception_bn import (  # noqa: F401
    InceptionBNBackbone,
    build_inception_bn_backbone,
    build_inception_bn_fpn_backbone,
)
from .torchvision_backbone import (  # noqa: F401
    TorchvisionBackbone,
    build_torchvision_backbone,
    build_torchvision_fpn_backbone,
)
