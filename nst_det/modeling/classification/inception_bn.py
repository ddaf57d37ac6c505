"""Inception-BN (BN-Inception), the NST paper's ImageNet student, in nst_det's own code.

Architecture: Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift" (arXiv 1502.03167, Figure 5: GoogLeNet with the 5x5
convolutions replaced by two 3x3, BN after every convolution, stride-2 "pass through" blocks
3c and 4e), with the channel table of the MXNet Inception-BN model the NST code trained:

    block  1x1  3x3red 3x3  d3x3red d3x3  pool  proj   out
    3a      64    64    64     64     96   avg    32   256
    3b      64    64    96     64     96   avg    64   320
    3c       -   128   160     64     96   max     -   576   (stride 2)
    4a     224    64    96     96    128   avg   128   576
    4b     192    96   128     96    128   avg   128   576
    4c     160   128   160    128    160   avg   128   608
    4d      96   128   192    160    192   avg   128   608
    4e       -   128   192    192    256   max     -  1056   (stride 2)
    5a     352   192   320    160    224   avg   128  1024
    5b     352   192   320    192    224   max   128  1024

Choices of ours (documented where the sources differ): convolutions have no bias (BN follows);
the stride-2 max pools are 3x3 with padding 1, so every stride is exact for sizes divisible by
32 (the MXNet model pads neither stem pool; at 224 both give 7 x 7 at the end); no dropout.

Stages, grouped by output stride like a ResNet so the detection backbone can cut anywhere:

    name    contents                              channels  stride
    stem    conv1 7x7/2 + max pool                      64       4
    stage2  conv2_reduce 1x1, conv2 3x3                192       4
    stage3  max pool, inception3a, 3b                  320       8
    stage4  inception3c (/2), 4a, 4b, 4c, 4d           608      16
    stage5  inception4e (/2), 5a, 5b                  1024      32

Every block returns its *pre-activation*: a ConvBN without ReLU, or the concatenation of its
branches each ending in BN (the pass-through max pool branch is already >= 0). The stage applies
the ReLU between blocks, so a stage can hand out its last block's output before the ReLU (the
NST paper's student feature: inception 5b, 1024 x 7 x 7 at 224, pre-ReLU) at no cost.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .registry import CLASSIFIER_REGISTRY

__all__ = ["ConvBN", "InceptionA", "InceptionB", "InceptionBN", "InceptionStage",
           "build_inception_bn_stages", "STAGE_CHANNELS", "STAGE_STRIDES"]

NormFactory = Callable[[int], nn.Module]
STAGE_CHANNELS = {"stem": 64, "stage2": 192, "stage3": 320, "stage4": 608, "stage5": 1024}
STAGE_STRIDES = {"stem": 4, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 32}


class ConvBN(nn.Module):
    """Conv (no bias) + norm, with the ReLU only if `relu` (otherwise a pre-activation output)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
                 relu: bool = True, norm: NormFactory = nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = norm(cout)
        self.relu = relu
        self.preact = not relu  # the stage applies the ReLU after pre-activation outputs
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x, inplace=True) if self.relu else x


class InceptionA(nn.Module):
    """Stride-1 Inception block: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | pool(3x3)-1x1, concatenated.

    [B, cin, H, W] -> [B, n1x1 + n3x3 + nd3x3 + proj, H, W], pre-activation.
    """

    preact = True

    def __init__(self, cin: int, n1x1: int, n3x3red: int, n3x3: int, nd3x3red: int, nd3x3: int,
                 pool: str, proj: int, norm: NormFactory = nn.BatchNorm2d):
        super().__init__()
        self.b1x1 = ConvBN(cin, n1x1, 1, relu=False, norm=norm)
        self.b3x3 = nn.Sequential(
            ConvBN(cin, n3x3red, 1, norm=norm), ConvBN(n3x3red, n3x3, 3, padding=1, relu=False,
                                                       norm=norm))
        self.bd3x3 = nn.Sequential(
            ConvBN(cin, nd3x3red, 1, norm=norm), ConvBN(nd3x3red, nd3x3, 3, padding=1, norm=norm),
            ConvBN(nd3x3, nd3x3, 3, padding=1, relu=False, norm=norm))
        pools = {"avg": nn.AvgPool2d(3, 1, 1), "max": nn.MaxPool2d(3, 1, 1)}
        self.pool = pools[pool]
        self.bproj = ConvBN(cin, proj, 1, relu=False, norm=norm)
        self.out_channels = n1x1 + n3x3 + nd3x3 + proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b1x1(x), self.b3x3(x), self.bd3x3(x), self.bproj(self.pool(x))], dim=1)


class InceptionB(nn.Module):
    """Stride-2 pass-through block: 1x1-3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2, concatenated.

    [B, cin, H, W] -> [B, n3x3 + nd3x3 + cin, ceil(H/2), ceil(W/2)], pre-activation.
    """

    preact = True

    def __init__(self, cin: int, n3x3red: int, n3x3: int, nd3x3red: int, nd3x3: int,
                 norm: NormFactory = nn.BatchNorm2d):
        super().__init__()
        self.b3x3 = nn.Sequential(
            ConvBN(cin, n3x3red, 1, norm=norm),
            ConvBN(n3x3red, n3x3, 3, stride=2, padding=1, relu=False, norm=norm))
        self.bd3x3 = nn.Sequential(
            ConvBN(cin, nd3x3red, 1, norm=norm), ConvBN(nd3x3red, nd3x3, 3, padding=1, norm=norm),
            ConvBN(nd3x3, nd3x3, 3, stride=2, padding=1, relu=False, norm=norm))
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.out_channels = n3x3 + nd3x3 + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b3x3(x), self.bd3x3(x), self.pool(x)], dim=1)


class InceptionStage(nn.Sequential):
    """Named blocks run in order, with a ReLU after every pre-activation output."""

    def forward_pre_relu(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output [B, C, h, w], the last block's output before its ReLU)."""
        pre = x
        for block in self:
            pre = block(x)
            x = F.relu(pre) if getattr(block, "preact", False) else pre
        return x, pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x)
            if getattr(block, "preact", False):
                x = F.relu(x, inplace=True)
        return x


def build_inception_bn_stages(norm: NormFactory = nn.BatchNorm2d) -> OrderedDict:
    """The five stages of Inception-BN ({name: InceptionStage}, see the module docstring)."""

    def a(cin, *args):
        return InceptionA(cin, *args, norm=norm)

    def b(cin, *args):
        return InceptionB(cin, *args, norm=norm)

    stages = OrderedDict()
    stages["stem"] = InceptionStage(OrderedDict(
        conv1=ConvBN(3, 64, 7, stride=2, padding=3, norm=norm), pool1=nn.MaxPool2d(3, 2, 1)))
    stages["stage2"] = InceptionStage(OrderedDict(
        conv2_reduce=ConvBN(64, 64, 1, norm=norm),
        conv2=ConvBN(64, 192, 3, padding=1, relu=False, norm=norm)))
    stages["stage3"] = InceptionStage(OrderedDict(
        pool2=nn.MaxPool2d(3, 2, 1),
        inception3a=a(192, 64, 64, 64, 64, 96, "avg", 32),
        inception3b=a(256, 64, 64, 96, 64, 96, "avg", 64)))
    stages["stage4"] = InceptionStage(OrderedDict(
        inception3c=b(320, 128, 160, 64, 96),
        inception4a=a(576, 224, 64, 96, 96, 128, "avg", 128),
        inception4b=a(576, 192, 96, 128, 96, 128, "avg", 128),
        inception4c=a(576, 160, 128, 160, 128, 160, "avg", 128),
        inception4d=a(608, 96, 128, 192, 160, 192, "avg", 128)))
    stages["stage5"] = InceptionStage(OrderedDict(
        inception4e=b(608, 128, 192, 192, 256),
        inception5a=a(1056, 352, 192, 320, 160, 224, "avg", 128),
        inception5b=a(1024, 352, 192, 320, 192, 224, "max", 128)))
    return stages


def init_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: He (fan_out) convs, BN = identity, Linear default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class InceptionBN(nn.Module):
    """Inception-BN classifier: stages stem..stage5, global average pool, linear head `fc`.

    Features (see the module docstring for channels and strides): stem (post-ReLU) and
    stage2..stage5 (with `pre_relu=True`: the stage's last block before its ReLU; stage5 is
    inception 5b: [B, 1024, 7, 7] at 224 input).
    """

    feature_channels = STAGE_CHANNELS
    feature_strides = STAGE_STRIDES

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        for name, stage in build_inception_bn_stages().items():
            self.add_module(name, stage)
        self.fc = nn.Linear(STAGE_CHANNELS["stage5"], num_classes)
        init_weights(self)

    def forward_features(
        self, x: torch.Tensor, pre_relu: bool = True, names=None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the network once.

        Args:
            x: [B, 3, H, W] normalised images.
            pre_relu: take stage2..stage5 before the ReLU of their last block.
            names: unused (every feature is returned).
        Returns:
            (logits [B, num_classes], {name: [B, C, ceil(H/stride), ceil(W/stride)]}).
        """
        x = self.stem(x)
        feats = {"stem": x}
        for name in ("stage2", "stage3", "stage4", "stage5"):
            x, pre = getattr(self, name).forward_pre_relu(x)
            feats[name] = pre if pre_relu else x
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> logits [B, num_classes]."""
        for name in ("stem", "stage2", "stage3", "stage4", "stage5"):
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@CLASSIFIER_REGISTRY.register()
def inception_bn(num_classes: int) -> InceptionBN:
    """Inception-BN (BN-Inception), the NST paper's student."""
    return InceptionBN(num_classes)
