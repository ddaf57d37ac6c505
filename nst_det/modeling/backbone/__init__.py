"""nst_det's own detectron2 backbones (registered in BACKBONE_REGISTRY on import)."""

from .inception_bn import (  # noqa: F401
    InceptionBNBackbone,
    build_inception_bn_backbone,
    build_inception_bn_fpn_backbone,
)
