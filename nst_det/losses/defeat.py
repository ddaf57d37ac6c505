"""DeFeat: decoupled foreground / background feature distillation (Guo et al., CVPR 2021,
arXiv 2103.14475)."""

from typing import Optional, Sequence

import torch
from torch import nn

from ._det_utils import adapted_pair, box_list
from ._utils import full_precision
from .gt_masks import DEFAULT_LEVEL_STRIDES, defeat_fg_mask
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["DeFeatAdapter", "defeat_loss"]


class DeFeatAdapter(nn.Module):
    """DeFeat's per-level adapter: Conv3x3(Cs, Ct), padding 1, no activation.

    Weights drawn from N(0, 1), folded into (-2, 2) by ``fmod`` and scaled by 1e-4, bias left
    at PyTorch's default, as ggjy/DeFeat.pytorch's ``neck_adapt``. Student side (trained with
    it, dropped at export).

    Args:
        student_channels: Cs.
        teacher_channels: Ct.
    Shapes:
        [B, Cs, H, W] -> [B, Ct, H, W].
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=3, padding=1)
        with torch.no_grad():
            self.conv.weight.normal_().fmod_(2).mul_(1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@TRANSFER_LOSS_REGISTRY.register(name="defeat")
@full_precision
def defeat_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    gt_boxes: Sequence,
    stride: float,
    module: nn.Module,
    fg_weight: float = 3.0,
    bg_weight: float = 12.0,
    level_strides: Optional[Sequence[float]] = DEFAULT_LEVEL_STRIDES,
) -> torch.Tensor:
    """DeFeat neck loss on one level: fg and bg squared errors, each normalised on its own.

    Guo et al. 2021, "Distilling Object Detectors via Decoupled Features"; ggjy/DeFeat.pytorch
    ``mmdet/apis/train.py`` (``neck-adapt,neck-decouple,pixel-wise``). With M the binary GT
    mask of this level (:func:`gt_masks.defeat_fg_mask`: each GT on its assigned level only)
    and D = (adapter(S) - T)^2:

        L_fg = sum M D / max(1, 2 * C * sum M),  L_bg = sum (1 - M) D / max(1, 2 * C * sum (1 - M))

    (sums over the batch, C the teacher channels) and returns fg_weight * L_fg + bg_weight * L_bg.
    The reference averages this over its 5 FPN levels (fold 1/L into the level weights); its
    released (VOC) weights are fg 3, bg 12.

    Args:
        f_s: [B, Cs, H, W] student map (gradients flow, also into ``module``).
        f_t: [B, Ct, H, W] teacher map (detached).
        gt_boxes: B box tensors [Ni, 4], xyxy pixels of the padded input.
        stride: this level's stride; one of ``level_strides`` unless that is None.
        module: a :class:`DeFeatAdapter` (Cs, Ct); it runs in float32 like the loss.
        fg_weight, bg_weight: weights of L_fg and L_bg.
        level_strides: strides of all distilled levels, finest first, for the GT-to-level rule
            (default detectron2 R-CNN p2-p6; RetinaNet p3-p7: (8, 16, 32, 64, 128); None: every
            GT on this level).
    Returns:
        Scalar loss.
    """
    f_s, f_t = adapted_pair(f_s, f_t, module, "defeat_loss")
    boxes = box_list(gt_boxes, f_s.shape[0], f_s.device, "defeat_loss")
    fg = defeat_fg_mask(boxes, stride, f_s.shape[-2:], level_strides, device=f_s.device)
    fg = fg.to(f_s.dtype)[:, None]  # [B, 1, H, W]
    c = f_s.shape[1]
    sq = (f_s - f_t).pow(2)
    loss_fg = (sq * fg).sum() / (2.0 * c * fg.sum()).clamp(min=1.0)
    loss_bg = (sq * (1 - fg)).sum() / (2.0 * c * (1 - fg).sum()).clamp(min=1.0)
    return fg_weight * loss_fg + bg_weight * loss_bg


defeat_loss.build_module = DeFeatAdapter
