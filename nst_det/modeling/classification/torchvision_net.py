"""Any torchvision classifier as a classification student or teacher, features by node name.

`build_classifier(arch)` falls back to `TorchvisionClassifier(arch)` for every torchvision
classification model not registered under its own name (mobilenet_v2, mobilenet_v3_large,
efficientnet_b0, regnet_y_400mf, convnext_tiny, ...); "torchvision:<name>" forces it for a
registered name too (e.g. "torchvision:resnet18" for node-name features of a ResNet). Its
state_dict keys are torchvision's, so torchvision's published files load strictly as they are,
and the detection backbone of the same network (`TorchvisionBackbone`) takes the same keys.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from ..torchvision_graph import (
    adopt_children,
    available_nodes,
    build_torchvision_model,
    feature_extractor,
    node_shapes,
)

__all__ = ["TORCHVISION_PREFIX", "TorchvisionClassifier"]

TORCHVISION_PREFIX = "torchvision:"
_LOGITS = "__logits__"


class TorchvisionClassifier(nn.Module):
    """A torchvision classifier whose intermediate nodes serve as transfer features.

    Feature names are torchvision feature-extraction node names (see
    `nst_det.modeling.torchvision_graph`); `feature_channels` / `feature_strides` list every node
    with a [B, C, h, w] output. The network's own choice of activations is kept: pick the node
    before or after an activation by name (`pre_relu` does not apply).

    Args:
        arch: a torchvision classification model name (torchvision.models.list_models()).
        num_classes: outputs of the head.
    """

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        self.arch = arch
        model = build_torchvision_model(arch, num_classes)
        self._model = (model,)  # executed as is; its children are ours (same objects)
        adopt_children(self, model)
        shapes = node_shapes(model)
        self.feature_channels = {k: s.channels for k, s in shapes.items()}
        self.feature_strides = {k: s.stride for k, s in shapes.items()}
        self._logits_node = available_nodes(model)[-1]
        self._extractors: Dict[Tuple[str, ...], nn.Module] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> logits [B, num_classes]."""
        model = self._model[0]
        model.training = self.training  # the top-level flag; children are shared
        return model(x)

    def forward_features(
        self, x: torch.Tensor, pre_relu: bool = True, names: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the network once, returning the logits and the named nodes.

        Args:
            x: [B, 3, H, W] normalised images.
            pre_relu: unused (the node name says where the feature is taken).
            names: the nodes to return (None: none).
        Returns:
            (logits [B, num_classes], {name: [B, C, ~H/stride, ~W/stride]}).
        """
        key = tuple(names or ())
        unknown = [n for n in key if n not in self.feature_channels]
        if unknown:
            raise KeyError(f"{self.arch} has no feature node {unknown}; available: "
                           f"{list(self.feature_channels)}")
        if key not in self._extractors:
            nodes = {n: n for n in key}
            nodes[self._logits_node] = _LOGITS
            self._extractors[key] = feature_extractor(self._model[0], nodes)
        extractor = self._extractors[key]
        if extractor.training != self.training:
            extractor.train(self.training)  # its graph differs (e.g. stochastic depth)
        out = extractor(x)
        logits = out.pop(_LOGITS)
        return logits, out
