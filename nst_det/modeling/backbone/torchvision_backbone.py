"""Any torchvision classifier as a detectron2 backbone: chosen nodes, alone (C4-style) or + FPN.

The backbone runs torchvision's feature extractor (`torchvision.models.feature_extraction`)
over the classifier and returns the nodes of MODEL.TORCHVISION.OUT_FEATURES under their node
names. Its parameters are the classifier's own modules under the classifier's own names, minus
what the chosen nodes never run (the head, later stages), so a classification checkpoint of the
same network (a torchvision file or nst_det's ClassificationTrainer `student.*` weights) loads
into it strictly with `load_classifier_state_dict`, no renaming table involved.

Examples (node: channels, stride):
  mobilenet_v3_large  features.3: 24, 4; features.6: 40, 8; features.12: 112, 16;
                      features.16: 960, 32
  efficientnet_b0     features.2: 24, 4; features.3: 40, 8; features.5: 112, 16;
                      features.8: 1280, 32
  regnet_y_400mf      trunk_output.block1..block4: 48, 104, 208, 440 at 4, 8, 16, 32
  convnext_tiny       features.1, 3, 5, 7: 96, 192, 384, 768 at 4, 8, 16, 32
  resnet18            layer1..layer4: 64, 128, 256, 512 at 4, 8, 16, 32
A stock detectron2 user builds these after `import nst_det` (which registers the builders).
"""

from __future__ import annotations

import logging
from typing import Dict, Mapping, Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from ..torchvision_graph import (
    adopt_children,
    build_torchvision_model,
    check_nodes,
    feature_extractor,
    node_shapes,
)

__all__ = ["TorchvisionBackbone", "build_torchvision_backbone", "build_torchvision_fpn_backbone"]

logger = logging.getLogger(__name__)


class TorchvisionBackbone(Backbone):
    """The nodes `out_features` of torchvision classifier `arch`, as a detectron2 Backbone.

    Args:
        arch: torchvision classification model name, e.g. "mobilenet_v3_large".
        out_features: node names to return (see `nst_det.modeling.torchvision_graph`).
        norm: "FrozenBN" (every BatchNorm2d becomes detectron2's FrozenBatchNorm2d, the usual
            choice for detection fine-tuning with small batches) or "BN" (kept trainable).
        frozen_prefixes: module paths (or parameter names) whose parameters are not trained,
            matched by whole components ("features.1" is not "features.10"), e.g.
            ["features.0", "features.1"] for the stem of a MobileNet; their BatchNorms become
            FrozenBatchNorm2d as detectron2's FREEZE_AT makes them (statistics fixed too).
    Shapes:
        [B, 3, H, W] -> {node: [B, C, ceil(H / stride), ceil(W / stride)]} (output_shape()).
    """

    def __init__(self, arch: str, out_features: Sequence[str], norm: str = "FrozenBN",
                 frozen_prefixes: Sequence[str] = ()):
        super().__init__()
        if not out_features:
            raise ValueError("MODEL.TORCHVISION.OUT_FEATURES is empty")
        if norm not in ("FrozenBN", "BN"):
            raise ValueError(f"MODEL.TORCHVISION.NORM must be 'FrozenBN' or 'BN'; got {norm!r}")
        self.arch = arch
        model = build_torchvision_model(arch)
        shapes = node_shapes(model)
        check_nodes(out_features, shapes, arch, "MODEL.TORCHVISION.OUT_FEATURES")
        frozen = [p.rstrip(".") for p in frozen_prefixes]
        if norm == "FrozenBN":
            model = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
        else:  # frozen blocks keep their BN statistics too
            for path in [p for p in frozen if p in dict(model.named_modules())]:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child,
                        FrozenBatchNorm2d.convert_frozen_batchnorm(model.get_submodule(path)))
        graph = feature_extractor(model, {n: n for n in out_features})
        self._graph = (graph,)  # executed; its submodules are ours (same objects)
        adopt_children(self, graph)
        matched = set(frozen) & set(dict(self.named_modules()))  # a FrozenBN has no parameters
        for name, p in self.named_parameters():
            hits = {f for f in frozen if name == f or name.startswith(f + ".")}
            matched |= hits
            if hits:
                p.requires_grad_(False)
        if set(frozen) - matched:
            raise ValueError(f"MODEL.TORCHVISION.FROZEN_PREFIXES {list(frozen_prefixes)}: "
                             f"{sorted(set(frozen) - matched)} match no parameter of the "
                             f"{arch} backbone (module paths such as 'features.0')")
        self._out_features = list(out_features)
        self._out_feature_channels = {f: shapes[f].channels for f in out_features}
        self._out_feature_strides = {f: shapes[f].stride for f in out_features}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        graph = self._graph[0]
        if graph.training != self.training:
            graph.train(self.training)  # train/eval graphs differ (e.g. stochastic depth)
        return graph(x)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f: ShapeSpec(channels=self._out_feature_channels[f],
                             stride=self._out_feature_strides[f]) for f in self._out_features}

    def load_classifier_state_dict(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Load a classification state dict of the same network, strictly.

        Every backbone tensor must be in `state` with its shape; BN step counters are ignored
        and the classifier's other tensors (the head, stages after the last node) are skipped.

        Returns:
            The keys of `state` that were skipped (not part of the backbone).
        Raises:
            KeyError: backbone keys missing from `state`; ValueError: shape mismatches.
        """
        own = self.state_dict()
        # BN step counters: upstream detectron2's convert_frozen_batchnorm keeps them as buffers
        # of FrozenBatchNorm2d (v0.6 drops them), and the conversion tool leaves them out
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            raise KeyError(f"classifier state dict lacks {len(missing)} keys of the {self.arch} "
                           f"backbone: {missing[:10]}")
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if wrong:
            raise ValueError(f"shape mismatch for {len(wrong)} keys: {wrong[:10]}")
        self.load_state_dict({k: state.get(k, v) for k, v in own.items()}, strict=True)
        skipped = [k for k in state if k not in own]
        logger.info("%s backbone: loaded %d tensors, skipped %d (%s...)", self.arch, len(own),
                    len(skipped), skipped[:3])
        return skipped


@BACKBONE_REGISTRY.register()
def build_torchvision_backbone(cfg, input_shape: ShapeSpec) -> TorchvisionBackbone:
    """MODEL.TORCHVISION.{ARCH, OUT_FEATURES, NORM, FROZEN_PREFIXES}; C4-style with one node at
    stride 16 (e.g. features.12 of mobilenet_v3_large) and StandardROIHeads on it."""
    if input_shape.channels != 3:
        raise ValueError(f"torchvision backbones take 3-channel images; got {input_shape.channels}")
    tv = cfg.MODEL.TORCHVISION
    if cfg.MODEL.BACKBONE.FREEZE_AT > 0 and not tv.FROZEN_PREFIXES:
        logger.warning(f"MODEL.BACKBONE.FREEZE_AT {cfg.MODEL.BACKBONE.FREEZE_AT} does not apply to "
                       f"the torchvision backbone {tv.ARCH} (no ResNet stages): nothing is frozen; "
                       "name modules in MODEL.TORCHVISION.FROZEN_PREFIXES, e.g. ['features.0']")
    return TorchvisionBackbone(tv.ARCH, tv.OUT_FEATURES, tv.NORM, tv.FROZEN_PREFIXES)


@BACKBONE_REGISTRY.register()
def build_torchvision_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """detectron2's FPN (+ LastLevelMaxPool: p6) over MODEL.FPN.IN_FEATURES of the torchvision
    backbone (strides must double from node to node, e.g. 4, 8, 16, 32 -> p2..p6)."""
    return FPN(
        bottom_up=build_torchvision_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
