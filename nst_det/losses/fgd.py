"""Focal and global distillation, FGD (Yang et al., CVPR 2022, arXiv 2111.11837)."""

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._det_utils import box_list, channel_align, run_module
from ._utils import check_maps, full_precision
from .gt_masks import fgd_masks
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["FGDGlobal", "fgd_attention", "fgd_loss"]


class _ContextBlock(nn.Module):
    """GcBlock context modelling + channel-add transform of one side (C -> C).

    context = sum_hw softmax_hw(conv1x1(x)) * x  ([B, C, 1, 1]); out = x + transform(context)
    with transform = Conv1x1(C, C/2) - LayerNorm([C/2, 1, 1]) - ReLU - Conv1x1(C/2, C). Init
    as the reference: the mask conv Kaiming-normal (fan_in), zero bias; the last conv zero, so
    the block starts as the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"FGDGlobal needs >= 2 teacher channels; got {channels}")
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(),
            nn.Conv2d(channels // 2, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weights = F.softmax(self.conv_mask(x).reshape(b, 1, -1), dim=-1)  # [B, 1, HW]
        context = torch.bmm(x.reshape(b, c, -1), weights.transpose(1, 2)).reshape(b, c, 1, 1)
        return x + self.channel_add(context)


class FGDGlobal(nn.Module):
    """FGD's learned modules for one level: align conv and the two GcBlocks of the global loss.

    As in yzd-v/FGD ``FeatureLoss``: a 1x1 ``align`` conv Cs -> Ct only when the channel counts
    differ (identity otherwise), and one context block for the student map (``student``) and
    one for the teacher map (``teacher``), both trainable; all of it belongs to the student
    side (trained with it, never part of the teacher, dropped at export).

    Args:
        student_channels: Cs.
        teacher_channels: Ct (>= 2).
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.align = channel_align(student_channels, teacher_channels)
        self.student = _ContextBlock(teacher_channels)
        self.teacher = _ContextBlock(teacher_channels)


def fgd_attention(f: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """FGD's spatial and channel attention of f [B, C, H, W].

    Spatial: H*W * softmax over positions of mean_c |f| / T  -> [B, H, W];
    channel: C * softmax over channels of mean_hw |f| / T    -> [B, C].
    """
    b, c, h, w = f.shape
    a = f.abs()
    spatial = (h * w) * F.softmax(a.mean(1).reshape(b, -1) / temperature, dim=1)
    channel = c * F.softmax(a.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.reshape(b, h, w), channel


@TRANSFER_LOSS_REGISTRY.register(name="fgd")
@full_precision
def fgd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    gt_boxes: Sequence,
    stride: float,
    module: FGDGlobal,
    temperature: float = 0.5,
    alpha: float = 5e-5,
    beta: float = 2.5e-5,
    gamma: float = 5e-5,
    lambda_: float = 5e-7,
) -> torch.Tensor:
    """FGD on one level: focal (fg/bg, attention-weighted), attention and global losses.

    Yang et al. 2022, "Focal and Global Knowledge Distillation for Detectors", as in yzd-v/FGD
    ``mmdet/distillation/losses/fgd.py``. With S = align(student), T = teacher, their spatial
    and channel attentions A^S, A^C (:func:`fgd_attention`, temperature T) and the GT masks
    M (foreground, 1 / box area) and N (normalised background) of :func:`gt_masks.fgd_masks`:

    * L_fg = sum M * A^S_t * A^C_t * (S - T)^2 / B, L_bg the same with N (teacher attention);
    * L_at = (sum |A^C_s - A^C_t| + sum |A^S_s - A^S_t|) / B;
    * L_global = sum (GC_s(S) - GC_t(T))^2 / B, GC the context blocks of ``module``;

    returning alpha * L_fg + beta * L_bg + gamma * L_at + lambda_ * L_global. The defaults are
    the reference's two-stage ones (Faster/Mask R-CNN, p2-p5); RetinaNet uses alpha, beta,
    gamma, lambda = 1e-3, 5e-4, 5e-4, 5e-6 (loss weight 1 in both: the weights are inside).

    Args:
        f_s: [B, Cs, H, W] student map (gradients flow, also into ``module``).
        f_t: [B, Ct, H, W] teacher map (detached).
        gt_boxes: B box tensors [Ni, 4], xyxy pixels of the padded input.
        stride: this level's stride (maps boxes to the grid).
        module: an :class:`FGDGlobal` (Cs, Ct); it runs in float32 like the loss.
        temperature: attention temperature.
        alpha, beta, gamma, lambda_: weights of L_fg, L_bg, L_at, L_global.
    Returns:
        Scalar loss.
    """
    check_maps(f_s, f_t, "fgd_loss")
    if f_s.shape[-2:] != f_t.shape[-2:]:
        raise ValueError(
            f"fgd_loss: spatial sizes differ ({tuple(f_s.shape[-2:])} vs {tuple(f_t.shape[-2:])})"
        )
    f_t = f_t.detach()
    f_s = run_module(module.align, f_s)
    if f_s.shape[1] != f_t.shape[1]:
        raise ValueError(
            f"fgd_loss: aligned student has {f_s.shape[1]} channels, teacher "
            f"{f_t.shape[1]}; build the module with FGDGlobal(Cs, Ct)"
        )
    b = f_s.shape[0]
    boxes = box_list(gt_boxes, b, f_s.device, "fgd_loss")
    fg, bg = fgd_masks(boxes, stride, f_s.shape[-2:], device=f_s.device, dtype=f_s.dtype)
    fg, bg = fg[:, None], bg[:, None]

    sp_t, ch_t = fgd_attention(f_t, temperature)
    sp_s, ch_s = fgd_attention(f_s, temperature)
    weight = sp_t[:, None] * ch_t[:, :, None, None]  # [B, C, H, W], teacher attention
    sq = (f_s - f_t).pow(2) * weight
    loss_fg = (sq * fg).sum() / b
    loss_bg = (sq * bg).sum() / b
    loss_at = ((ch_s - ch_t).abs().sum() + (sp_s - sp_t).abs().sum()) / b
    glob_s, glob_t = run_module(module.student, f_s), run_module(module.teacher, f_t)
    loss_global = (glob_s - glob_t).pow(2).sum() / b
    return alpha * loss_fg + beta * loss_bg + gamma * loss_at + lambda_ * loss_global


fgd_loss.build_module = FGDGlobal
