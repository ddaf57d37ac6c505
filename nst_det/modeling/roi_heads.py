"""C4 RoI heads for BasicBlock ResNets (ResNet-18/34).

detectron2's `build_resnet_backbone` builds R-18/34 up to res4 for a C4 detector, but its
`Res5ROIHeads` always builds res5 from BottleneckBlocks (2048 channels), which is the wrong stage
for a BasicBlock ResNet. The subclass below rebuilds, in detectron2's public `from_config`, the res5
stage and the heads that read its width; everything else (pooler, training/inference) is
detectron2's.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, Res5ROIHeads, build_mask_head
from torch import nn

__all__ = ["BasicRes5ROIHeads"]

# res5 depth of the BasicBlock ResNets, as in torchvision / detectron2's build_resnet_backbone
_RES5_BLOCKS = {18: 2, 34: 3}


@ROI_HEADS_REGISTRY.register()
class BasicRes5ROIHeads(Res5ROIHeads):
    """Res5ROIHeads whose per-region res5 stage is made of BasicBlocks (ResNet-18/34 C4).

    The stage has `MODEL.RESNETS.RES2_OUT_CHANNELS * 8` output channels (512 for R-18/34), takes
    the res4 output (half that) and starts with stride 2, like the backbone's own res5 would;
    its parameter names (`roi_heads.res5.<block>.conv1...`) follow detectron2's C4 convention, so
    converted classification weights of res5 load into it.

    Shapes: pooled RoIs [R, C4, P, P] -> res5 -> [R, 2 * C4, P/2, P/2] (P = POOLER_RESOLUTION).
    """

    @classmethod
    def from_config(cls, cfg, input_shape):
        # Res5ROIHeads' public from_config, then its res5 stage, box predictor and mask head
        # rebuilt for the BasicBlock stage's width (its BottleneckBlock stage is discarded)
        ret = super().from_config(cfg, input_shape)
        ret["res5"], out_channels = basic_res5_stage(cfg)
        ret["box_predictor"] = FastRCNNOutputLayers(
            cfg, ShapeSpec(channels=out_channels, height=1, width=1))
        if cfg.MODEL.MASK_ON:
            resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
            ret["mask_head"] = build_mask_head(
                cfg, ShapeSpec(channels=out_channels, width=resolution, height=resolution))
        return ret


def basic_res5_stage(cfg):
    """The per-region res5 stage of a ResNet-18/34 C4 detector: (nn.Sequential, out channels)."""
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in _RES5_BLOCKS:
        raise ValueError(
            f"BasicRes5ROIHeads is for ResNet-18/34; MODEL.RESNETS.DEPTH={depth} uses "
            "BottleneckBlocks: use MODEL.ROI_HEADS.NAME 'Res5ROIHeads'"
        )
    num_blocks = _RES5_BLOCKS[depth]
    out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8  # res5 is 8x res2
    blocks = ResNet.make_stage(
        BasicBlock,
        num_blocks,
        stride_per_block=[2] + [1] * (num_blocks - 1),
        in_channels=out_channels // 2,
        out_channels=out_channels,
        norm=cfg.MODEL.RESNETS.NORM,
    )
    return nn.Sequential(*blocks), out_channels
