"""torchvision classifiers by name, and their intermediate features by node name.

Shared by the classification student/teacher (`TorchvisionClassifier`) and the detection
backbone (`TorchvisionBackbone`). Features come from `torchvision.models.feature_extraction`:
a node name is a leaf node of the traced graph (e.g. "features.3.block.2.1", "layer3.1.add") or
a module path (e.g. "features.6", "layer3", "trunk_output.block3"), which means the last node
inside that module. Both wrappers adopt the traced graph's submodules as their own children, so
their state_dict keys are exactly torchvision's (minus modules a feature extractor never runs,
such as the classifier head): a torchvision-layout classification checkpoint is the backbone's
own state dict, no renaming table involved.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Dict, List, Sequence, Tuple

import torch
import torchvision
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

__all__ = [
    "available_nodes",
    "build_torchvision_model",
    "feature_extractor",
    "node_shapes",
    "torchvision_classifier_names",
]

_PROBE = 128  # probe input side: every stride of these networks (<= 32) divides it


@cache
def torchvision_classifier_names() -> Tuple[str, ...]:
    """Every classification model name of torchvision.models (get_model names)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def build_torchvision_model(arch: str, num_classes: int = 1000) -> nn.Module:
    """torchvision classifier `arch`, randomly initialised (weights=None: nothing downloaded).

    In-place activations are turned off, so a node taken before an activation (e.g. a BN
    output, a residual sum) is not overwritten by the activation that follows it.
    """
    if arch not in torchvision_classifier_names():
        raise KeyError(f"{arch!r} is not a torchvision classification model; available: "
                       f"{', '.join(torchvision_classifier_names())}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    for m in model.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    return model


def _leaf_nodes(model: nn.Module) -> List[str]:
    train, evals = get_graph_node_names(model)
    return [n for n in evals if n in set(train) and n != "x"]


def available_nodes(model: nn.Module) -> List[str]:
    """Leaf node names of `model`'s graph, and the module paths containing them, in graph order."""
    out, seen = [], set()
    for leaf in _leaf_nodes(model):
        parts = leaf.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in seen:
                seen.add(name)
                out.append(name)
    return out


def node_shapes(model: nn.Module) -> Dict[str, ShapeSpec]:
    """{node name: ShapeSpec(channels, stride)} of every node with a [B, C, h, w] map output.

    Measured on two probe images of different heights (eval mode, no grad): a map's channels
    and width stay and its height grows with the input's, which tells a channels-last
    [B, h, w, C] output (Swin, inside ConvNeXt blocks) from a map. A module path has the shape
    of the last leaf node inside it (torchvision's rule for prefixes).
    """
    leaves = _leaf_nodes(model)
    was_training = model.training
    param = next(model.parameters())
    try:
        extractor = create_feature_extractor(model.eval(), {n: n for n in leaves})
        with torch.no_grad():
            out, taller = (extractor(torch.zeros(1, 3, h, _PROBE, dtype=param.dtype,
                                                 device=param.device))
                           for h in (_PROBE, _PROBE * 3 // 2))
    except Exception as e:  # e.g. ViT, MaxViT: a fixed input size
        raise ValueError(f"{type(model).__name__}: its feature nodes cannot be probed with "
                         f"{_PROBE}-pixel images ({type(e).__name__}: {e}); torchvision models "
                         "that need a fixed input size are not supported") from None
    finally:
        model.train(was_training)
    shapes = {}
    for leaf in leaves:
        t, t2 = out[leaf], taller[leaf]
        if not (torch.is_tensor(t) and t.dim() == 4) or t.shape[-2:].numel() == 1:
            continue  # not a map, or globally pooled
        if t2.shape[1] != t.shape[1] or t2.shape[3] != t.shape[3] or t2.shape[2] <= t.shape[2]:
            continue  # not [B, C, h, w] (channels-last), or not a map of the image's height
        stride = 2 ** round(math.log2(_PROBE / t.shape[-2]))
        spec = ShapeSpec(channels=t.shape[1], stride=stride)
        parts = leaf.split(".")
        for i in range(1, len(parts) + 1):  # later leaves overwrite: the module's last node
            shapes[".".join(parts[:i])] = spec
    # a module whose last node is not 4-D (e.g. a head) is not a feature
    last = {}
    for leaf in leaves:
        parts = leaf.split(".")
        for i in range(1, len(parts) + 1):
            last[".".join(parts[:i])] = leaf
    return {k: v for k, v in shapes.items() if last[k] in shapes}


def check_nodes(names: Sequence[str], shapes: Dict[str, ShapeSpec], arch: str, what: str):
    """Raise a ValueError naming the unknown nodes and listing the available ones."""
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"{what}: {arch} has no feature node {unknown}; available nodes with "
                         f"[B, C, h, w] outputs, in graph order: {list(shapes)}")


def feature_extractor(model: nn.Module, nodes: Dict[str, str]) -> nn.Module:
    """torchvision's feature extractor of `model` returning {output name: node} (a GraphModule).

    Its leaf modules are `model`'s own (shared, not copied).
    """
    # detectron2's FrozenBatchNorm2d branches on its input: keep it a leaf of the trace
    leaves = {"leaf_modules": [FrozenBatchNorm2d]}
    return create_feature_extractor(model, return_nodes=dict(nodes), tracer_kwargs=leaves)


def adopt_children(owner: nn.Module, graph: nn.Module) -> None:
    """Make `graph`'s top-level submodules `owner`'s children (same objects, same names)."""
    for name, child in graph.named_children():
        owner.add_module(name, child)
    for name, p in graph.named_parameters(recurse=False):
        owner.register_parameter(name, p)
    for name, b in graph.named_buffers(recurse=False):
        owner.register_buffer(name, b)
