"""FGFI: fine-grained feature imitation (Wang et al., CVPR 2019, arXiv 1906.03609)."""

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ._det_utils import adapted_pair, box_list
from ._utils import full_precision
from .gt_masks import DEFAULT_LEVEL_STRIDES, fgfi_mask
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["FGFIAdapter", "fgfi_loss"]


class FGFIAdapter(nn.Module):
    """FGFI's adapter: Conv3x3(Cs, Ct), padding 1, then ReLU (twangnh ``stu_feature_adap``).

    Weights from a truncated-like normal (N(0, 1) folded by ``fmod(2)``) times 1e-4, bias at
    PyTorch's default, as the reference's ``normal_init(..., 0.0001, truncated=True)``.
    DeFeat's FPN port drops the ReLU: ``relu=False``.

    Args:
        student_channels: Cs.
        teacher_channels: Ct.
        relu: apply the ReLU (default True, as the original).
    Shapes:
        [B, Cs, H, W] -> [B, Ct, H, W].
    """

    def __init__(self, student_channels: int, teacher_channels: int, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=3, padding=1)
        self.act = nn.ReLU() if relu else nn.Identity()
        with torch.no_grad():
            self.conv.weight.normal_().fmod_(2).mul_(1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


@TRANSFER_LOSS_REGISTRY.register(name="fgfi")
@full_precision
def fgfi_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    gt_boxes: Sequence,
    stride: float,
    module: nn.Module,
    psi: float = 0.5,
    level_strides: Optional[Sequence[float]] = DEFAULT_LEVEL_STRIDES,
    anchor_sizes: Optional[Sequence[float]] = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    anchor_offset: float = 0.0,
    anchor_cells: Optional[Mapping[float, torch.Tensor]] = None,
) -> torch.Tensor:
    """FGFI imitation loss on one level: squared error on the near-object positions / (2 N_pos).

    Wang et al. 2019, "Distilling Object Detectors with Fine-grained Feature Imitation";
    twangnh/Distilling-Object-Detectors ``trainval_net_sup.py``: with I the imitation mask
    (:func:`gt_masks.fgfi_mask`, anchors with IoU > psi * max IoU of a GT) and
    N_pos = sum I (positions over the batch, not times C),

        L = sum_{b,c,h,w} I * (adapter(S) - T)^2 / (2 * N_pos),  0 when N_pos = 0.

    The reference weights it by 0.01 and switches it off for the first 400 iterations (a
    warm-up the caller applies; this function has no notion of iterations).

    Args:
        f_s: [B, Cs, H, W] student map (gradients flow, also into ``module``).
        f_t: [B, Ct, H, W] teacher map (detached).
        gt_boxes: B box tensors [Ni, 4], xyxy pixels of the padded input.
        stride: this level's stride; one of ``level_strides`` unless that is None.
        module: an :class:`FGFIAdapter` (Cs, Ct); it runs in float32 like the loss.
        psi: threshold factor of the imitation mask.
        level_strides: strides of all distilled levels for the GT-to-level rule (None: every GT
            on this level, the original single-map FGFI).
        anchor_sizes, aspect_ratios, anchor_offset: this level's anchors (default detectron2's
            FPN anchors: size 8 * stride, ratios 0.5 / 1 / 2, offset 0).
        anchor_cells: {stride: [A, 4] cell anchors} of the detector's anchor generator (a
            detector supplies it with its ``anchor_offset``): this level's replace anchor_sizes
            and aspect_ratios, as the reference imitates where the detector's anchors are.
    Returns:
        Scalar loss.
    """
    f_s, f_t = adapted_pair(f_s, f_t, module, "fgfi_loss")
    boxes = box_list(gt_boxes, f_s.shape[0], f_s.device, "fgfi_loss")
    mask = fgfi_mask(
        boxes,
        stride,
        f_s.shape[-2:],
        psi,
        level_strides,
        anchor_sizes,
        aspect_ratios,
        anchor_offset,
        device=f_s.device,
        cell_anchors=None if anchor_cells is None else _cells_of(anchor_cells, stride),
    ).to(f_s.dtype)[:, None]
    n_pos = mask.sum()
    return ((f_s - f_t).pow(2) * mask).sum() / (2 * n_pos).clamp(min=1.0)


fgfi_loss.build_module = FGFIAdapter


def _cells_of(anchor_cells: Mapping[float, torch.Tensor], stride: float) -> torch.Tensor:
    if stride not in anchor_cells:  # a silent fallback would imitate at other anchors
        raise ValueError(f"fgfi_loss: the detector has no anchors at stride {stride} (its anchor "
                         f"levels: {sorted(anchor_cells)})")
    return anchor_cells[stride]
