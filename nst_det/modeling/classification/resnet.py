"""torchvision's ImageNet ResNets, with named (optionally pre-ReLU) stage features.

`ResNetClassifier` subclasses `torchvision.models.ResNet` without changing a parameter, so its
state_dict keys are torchvision's and torchvision's published ImageNet state dicts load as they
are. Stage names follow detectron2 (`res2`..`res5`), so the classification student, the
converted detection backbone and the NST feature pairs all speak the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .registry import CLASSIFIER_REGISTRY

__all__ = ["ResNetClassifier"]

STAGES = ("res2", "res3", "res4", "res5")


def block_pre_relu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock / Bottleneck up to, not including, its final ReLU.

    Returns (residual branch + shortcut) [B, C, H', W'], i.e. `block(x)` before the ReLU.
    """
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return out + identity


class ResNetClassifier(ResNet):
    """torchvision ResNet (same modules, same keys) that can also return its stage features.

    Features (name: channels, stride), for BasicBlock / Bottleneck networks:
        stem: 64, 4 (after the max pool; post-ReLU)
        res2: 64 / 256, 4;  res3: 128 / 512, 8;  res4: 256 / 1024, 16;  res5: 512 / 2048, 32.
    With `pre_relu=True` each `resN` is taken at its last block before the final ReLU (the
    residual sum), as the NST paper does for its teacher's final block; the network itself goes
    on with the ReLU applied, so logits are identical either way.
    """

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 1000):
        super().__init__(block, layers, num_classes=num_classes)
        width = 4 if block is Bottleneck else 1
        self.feature_channels = {"stem": 64, **{s: 64 * width * 2**i for i, s in enumerate(STAGES)}}
        self.feature_strides = {"stem": 4, **{s: 4 * 2**i for i, s in enumerate(STAGES)}}

    def forward_features(
        self, x: torch.Tensor, pre_relu: bool = True, names=None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the network once.

        Args:
            x: [B, 3, H, W] normalised images.
            pre_relu: take each `resN` before the ReLU of its last block.
            names: unused (every feature is returned).
        Returns:
            (logits [B, num_classes], {name: [B, C, ceil(H/stride), ceil(W/stride)]}).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = {"stem": x}
        for name, layer in zip(STAGES, (self.layer1, self.layer2, self.layer3, self.layer4)):
            for block in layer[:-1]:
                x = block(x)
            if pre_relu:
                feats[name] = block_pre_relu(layer[-1], x)
                x = F.relu(feats[name])  # not in place: the pre-ReLU tensor is kept
            else:
                x = feats[name] = layer[-1](x)
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits, feats


@CLASSIFIER_REGISTRY.register()
def resnet18(num_classes: int) -> ResNetClassifier:
    """torchvision resnet18 (BasicBlock, [2, 2, 2, 2])."""
    return ResNetClassifier(BasicBlock, [2, 2, 2, 2], num_classes)


@CLASSIFIER_REGISTRY.register()
def resnet34(num_classes: int) -> ResNetClassifier:
    """torchvision resnet34 (BasicBlock, [3, 4, 6, 3])."""
    return ResNetClassifier(BasicBlock, [3, 4, 6, 3], num_classes)


@CLASSIFIER_REGISTRY.register()
def resnet50(num_classes: int) -> ResNetClassifier:
    """torchvision resnet50 (Bottleneck, [3, 4, 6, 3]; stride in the 3x3 conv, "v1.5")."""
    return ResNetClassifier(Bottleneck, [3, 4, 6, 3], num_classes)


@CLASSIFIER_REGISTRY.register()
def resnet101(num_classes: int) -> ResNetClassifier:
    """torchvision resnet101 (Bottleneck, [3, 4, 23, 3])."""
    return ResNetClassifier(Bottleneck, [3, 4, 23, 3], num_classes)
