"""ReviewKD for detection: ABF fusion and the HCL loss (Chen et al., CVPR 2021,
arXiv 2104.09044)."""

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._det_utils import run_module
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["ABF", "ReviewKDFusion", "hcl_loss", "reviewkd_loss"]


class ABF(nn.Module):
    """Attention-based fusion of one level (ReviewKD ``Detection/model/kd_trans.py``).

    x -> Conv1x1(Cs, M, no bias) + BN; if ``fuse``, the residual y of the next coarser level is
    nearest-upsampled to x's size and mixed in: a = sigmoid(Conv1x1(2M, 2)([x, y])),
    x = x * a_0 + y * a_1. The output is Conv3x3(M, Ct, no bias) + BN of x; x itself is
    passed on as the residual of the next finer level. Kaiming-uniform (a = 1) conv init.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
            if fuse
            else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual=None):
        """Returns (output [B, Ct, H, W], residual [B, M, H, W])."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ABF with fuse=True needs the coarser level's residual")
            y = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            att = self.att_conv(torch.cat([x, y], dim=1))
            x = x * att[:, 0:1] + y * att[:, 1:2]
        return self.conv2(x), x


class ReviewKDFusion(nn.Module):
    """ReviewKD's student-side fusion over all levels, coarse to fine.

    One :class:`ABF` per level; the coarsest (last in the input list) has no fusion, every finer
    one fuses the residual of the level above it. Input and output lists are ordered as given
    (finest first, e.g. p2 ... p6); output level i has ``teacher_channels[i]`` channels.

    Args:
        student_channels: channels of each student level.
        teacher_channels: channels of each teacher level (same length).
        mid_channels: width M of the fusion (256 in the reference).
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        mid_channels: int = 256,
    ):
        super().__init__()
        student_channels, teacher_channels = list(student_channels), list(teacher_channels)
        if len(student_channels) != len(teacher_channels) or not student_channels:
            raise ValueError(
                f"ReviewKDFusion needs one teacher level per student level; got "
                f"{student_channels} and {teacher_channels}"
            )
        n = len(student_channels)
        self.abfs = nn.ModuleList(
            ABF(cs, mid_channels, ct, fuse=i < n - 1)
            for i, (cs, ct) in enumerate(zip(student_channels, teacher_channels))
        )

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(features) != len(self.abfs):
            raise ValueError(
                f"ReviewKDFusion built for {len(self.abfs)} levels, got {len(features)}"
            )
        out: List[torch.Tensor] = [None] * len(features)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(features))):
            out[i], residual = self.abfs[i](features[i], residual)
        return out


def _hcl_level(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    loss = F.mse_loss(fs, ft)
    weight, total = 1.0, 1.0
    for size in (4, 2, 1):
        if size >= fs.shape[2]:  # the reference compares with H only
            continue
        weight /= 2.0
        pooled = F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        loss = loss + weight * pooled
        total += weight
    return loss / total


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (the precision policy of ``_utils``)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def hcl_loss(s_list: Sequence[torch.Tensor], t_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss, summed over levels (ReviewKD ``hcl``).

    Per level: MSE at full size plus the MSEs of both maps adaptive-average-pooled to 4x4,
    2x2 and 1x1 with weights 1, 0.5, 0.25, 0.125, divided by the sum of the weights used. A
    pooled size >= the map's H is skipped, and the halving weight then moves on to the next
    size used (the reference's rule: for H = 4 the 2x2 and 1x1 terms get 0.5 and 0.25).

    Args:
        s_list: L student maps [B, C_l, H_l, W_l] (gradients flow).
        t_list: L teacher maps of the same shapes (detached).
    Returns:
        Scalar: sum over levels (computed in float32).
    """
    s_list, t_list = list(s_list), list(t_list)
    if len(s_list) != len(t_list) or not s_list:
        raise ValueError(f"hcl_loss: {len(s_list)} student levels vs {len(t_list)} teacher")
    dtype = _common_dtype(s_list + t_list)
    total = 0.0
    with torch.autocast(device_type=s_list[0].device.type, enabled=False):
        for fs, ft in zip(s_list, t_list):
            if fs.shape != ft.shape:
                raise ValueError(
                    f"hcl_loss: student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}"
                )
            total = total + _hcl_level(fs.to(dtype), ft.detach().to(dtype))
    return total


@TRANSFER_LOSS_REGISTRY.register(name="reviewkd")
def reviewkd_loss(
    s_list: Sequence[torch.Tensor], t_list: Sequence[torch.Tensor], module: ReviewKDFusion
) -> torch.Tensor:
    """ReviewKD for detection: HCL between the fused student levels and the teacher levels.

    Chen et al. 2021, "Distilling Knowledge via Knowledge Review"; the detectron2 code of
    dvlab-research/ReviewKD (``Detection/model/rcnn.py``): all student FPN outputs go through
    the ABF chain (``module``, a :class:`ReviewKDFusion`), then ``hcl_loss`` against all teacher
    FPN outputs. Reference weights: 1.0 (R-50 <- R-101), 1.2 (R-18 <- R-101), 2.0
    (MobileNetV2 <- R-50), 0.8 (Mask R-CNN). Takes all levels at once (``over_all_pairs``).

    Args:
        s_list: L student maps [B, Cs_l, H_l, W_l], finest first (gradients flow, also into
            ``module``).
        t_list: L teacher maps [B, Ct_l, H_l, W_l] (detached).
        module: the fusion, built as ``ReviewKDFusion(student_channels, teacher_channels)``.
            It runs in float32 (autocast off), as the loss does.
    Returns:
        Scalar loss.
    """
    s_list, t_list = list(s_list), list(t_list)
    with torch.autocast(device_type=s_list[0].device.type, enabled=False):
        dtype = _common_dtype(s_list)
        fused = run_module(module, [s.to(dtype) for s in s_list])
    return hcl_loss(fused, t_list)


reviewkd_loss.over_all_pairs = True
reviewkd_loss.build_module = ReviewKDFusion
