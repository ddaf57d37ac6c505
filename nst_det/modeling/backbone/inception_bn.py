"""Inception-BN as a detectron2 backbone: C4-style (through stride 16) and with an FPN.

The stages are the classification model's own (`build_inception_bn_stages`), with the same
parameter names, so a classification student converts by dropping its `fc` head only
(tools/convert_student_to_d2.py). Outputs are post-ReLU stage outputs:

    name    channels  stride
    stem          64       4
    stage2       192       4
    stage3       320       8
    stage4       608      16   (inception 4d: the C4 output)
    stage5      1024      32   (inception 5b)

Stages after the last requested output are not built (like detectron2's ResNet).
"""

from __future__ import annotations

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from ..classification.inception_bn import (
    STAGE_CHANNELS,
    STAGE_STRIDES,
    build_inception_bn_stages,
    init_weights,
)

__all__ = ["InceptionBNBackbone", "build_inception_bn_backbone",
           "build_inception_bn_fpn_backbone"]

STAGES = ("stem", "stage2", "stage3", "stage4", "stage5")


class InceptionBNBackbone(Backbone):
    """Inception-BN stages `stem`..`stage5`, returning the requested stage outputs.

    Args:
        out_features: stage names to return, e.g. ("stage4",) for C4, ("stage2", ..., "stage5")
            for an FPN.
        norm: detectron2 norm name for every conv ("FrozenBN", "BN", "SyncBN", "GN", ...).
        freeze_at: freeze (requires_grad=False, FrozenBN) the first `freeze_at` stages, with
            detectron2's meaning: 0 none, 1 the stem, 2 stem + stage2, ...
    Shapes:
        [B, 3, H, W] -> {name: [B, C, ceil(H / stride), ceil(W / stride)]}.
    """

    def __init__(self, out_features=("stage4",), norm: str = "FrozenBN", freeze_at: int = 0):
        super().__init__()
        unknown = [f for f in out_features if f not in STAGES]
        if not out_features or unknown:
            raise ValueError(f"out_features must be a non-empty subset of {STAGES}; "
                             f"got {list(out_features)}")
        self._out_features = list(out_features)
        last = max(STAGES.index(f) for f in out_features)
        self.stage_names = STAGES[: last + 1]
        stages = build_inception_bn_stages(norm=lambda c: get_norm(norm, c))
        for name in self.stage_names:
            self.add_module(name, stages[name])
        init_weights(self)
        self._out_feature_channels = {f: STAGE_CHANNELS[f] for f in out_features}
        self._out_feature_strides = {f: STAGE_STRIDES[f] for f in out_features}
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> InceptionBNBackbone:
        """Freeze the first `freeze_at` stages (weights fixed, BN turned into FrozenBN)."""
        for name in self.stage_names[:freeze_at]:
            stage = getattr(self, name)
            for p in stage.parameters():
                p.requires_grad = False
            self.add_module(name, FrozenBatchNorm2d.convert_frozen_batchnorm(stage))
        return self

    def forward(self, x):
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self):
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f],
                         stride=self._out_feature_strides[f])
            for f in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_inception_bn_backbone(cfg, input_shape: ShapeSpec) -> InceptionBNBackbone:
    """Inception-BN with outputs cfg.MODEL.INCEPTION_BN.OUT_FEATURES (C4: ["stage4"])."""
    if input_shape.channels != 3:
        raise ValueError(f"Inception-BN takes 3-channel images; got {input_shape.channels}")
    return InceptionBNBackbone(
        out_features=cfg.MODEL.INCEPTION_BN.OUT_FEATURES,
        norm=cfg.MODEL.INCEPTION_BN.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )


@BACKBONE_REGISTRY.register()
def build_inception_bn_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """detectron2's FPN (+ LastLevelMaxPool, i.e. p6) on Inception-BN stages.

    Uses cfg.MODEL.INCEPTION_BN.OUT_FEATURES for the bottom-up outputs and cfg.MODEL.FPN.* as
    detectron2's `build_resnet_fpn_backbone` does; e.g. IN_FEATURES ["stage2", "stage3",
    "stage4", "stage5"] gives p2..p6 at strides 4..64.
    """
    bottom_up = build_inception_bn_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
