"""Ground-truth masks on a feature grid for the GT-aware detection losses (FGD, DeFeat, FGFI).

Conventions shared by every function here:

* ``gt_boxes`` is a list of B tensors [Ni, 4] (or detectron2 ``Boxes``), xyxy in pixels of the
  padded input image (detectron2's ``Instances.gt_boxes`` are in the resized image's pixels,
  which the padding does not move). An image without boxes is a [0, 4] tensor.
* A feature level is given by its ``stride`` and its ``size = (H, W)``; box coordinates are
  mapped to the grid by dividing by the stride. Cells outside the grid are dropped, so boxes
  partly (or wholly) outside the padded image work.
* Masks are float32 tensors [B, H, W] on ``device`` (default: the boxes' device), constants
  (no gradient).

Level assignment (DeFeat, FGFI's FPN port): a GT is distilled only on the level its size picks,
the rule of ggjy/DeFeat.pytorch ``AnchorHead._map_roi_levels``: with w, h the box size,
k = floor(log2(sqrt((w + 1) * (h + 1)) / 56 + 1e-6)), clamped to [0, L - 1], indexes the list
of distilled levels (ordered by stride, finest first; 5 levels in the reference). For
detectron2's R-CNN FPN that list is strides (4, 8, 16, 32, 64) (p2-p6, the default here); for
RetinaNet (p3-p7) pass ``level_strides=(8, 16, 32, 64, 128)``, as the reference (whose RetinaNet
levels also start at index 0) does; ``level_strides=None`` puts every GT on the given level (the
single-map setting of the original FGFI).
"""

import math
from typing import Optional, Sequence, Tuple

import torch

from ._det_utils import box_list

__all__ = [
    "DEFAULT_LEVEL_STRIDES",
    "fgd_masks",
    "assign_levels",
    "defeat_fg_mask",
    "grid_anchors",
    "fgfi_mask",
]

DEFAULT_LEVEL_STRIDES = (4, 8, 16, 32, 64)  # detectron2 R-CNN FPN p2-p6


def _size(size) -> Tuple[int, int]:
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"feature size must be positive (H, W); got {tuple(size)}")
    return h, w


def _boxes(gt_boxes, device):
    dev = device
    if dev is None:
        first = next((getattr(b, "tensor", b) for b in gt_boxes), None)
        dev = first.device if torch.is_tensor(first) else torch.device("cpu")
    return box_list(gt_boxes, len(gt_boxes), dev, "gt_masks"), dev


def fgd_masks(
    gt_boxes: Sequence, stride: float, size, device=None, dtype=torch.float32
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FGD's foreground and background masks of one level (yzd-v/FGD ``fgd.py``).

    A box mapped to the grid (divided by ``stride``) covers rows floor(y1) .. ceil(y2) and
    columns floor(x1) .. ceil(x2), both ends included, as the reference does; its cells get
    1 / (number of rows * number of columns) of that (unclipped) extent, and where boxes
    overlap the largest value, i.e. the smallest box, wins. The background mask is 1 off every
    box, divided by its sum per image (all zero when boxes cover the whole map).

    Args:
        gt_boxes: B box tensors [Ni, 4], xyxy pixels of the padded input.
        stride: the level's stride in pixels.
        size: (H, W) of the level.
        device: device of the masks (default: the boxes').
        dtype: dtype of the masks (float64 keeps 1/area exact for float64 losses).
    Returns:
        (fg, bg), each [B, H, W] of ``dtype``.
    """
    h, w = _size(size)
    boxes, dev = _boxes(gt_boxes, device)
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    fg = torch.zeros(len(boxes), h, w, device=dev, dtype=dtype)
    for i, b in enumerate(boxes):
        if b.numel() == 0:
            continue
        g = b.to(dtype) / stride
        wmin, hmin = torch.floor(g[:, 0]), torch.floor(g[:, 1])
        wmax, hmax = torch.ceil(g[:, 2]), torch.ceil(g[:, 3])
        inv_area = 1.0 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))
        in_r = (rows[None] >= hmin[:, None]) & (rows[None] <= hmax[:, None])  # [N, H]
        in_c = (cols[None] >= wmin[:, None]) & (cols[None] <= wmax[:, None])  # [N, W]
        inside = in_r[:, :, None] & in_c[:, None, :]
        fg[i] = torch.where(inside, inv_area[:, None, None], 0.0).amax(0)
    bg = (fg == 0).to(dtype)
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1)  # an all-zero map stays zero
    return fg, bg


def assign_levels(boxes: torch.Tensor, num_levels: int) -> torch.Tensor:
    """DeFeat's level index of each box [N, 4]: floor(log2(sqrt((w+1)(h+1)) / 56 + 1e-6)).

    Clamped to [0, num_levels - 1] (ggjy/DeFeat.pytorch ``_map_roi_levels``; the +1 is the
    reference's pixel convention). Returns a long tensor [N].
    """
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0) + 1
    scale = torch.sqrt(wh[:, 0] * wh[:, 1])
    lvl = torch.floor(torch.log2(scale / 56 + 1e-6))
    return lvl.clamp(min=0, max=num_levels - 1).long()


def _on_level(b: torch.Tensor, stride, level_strides) -> torch.Tensor:
    if level_strides is None or b.numel() == 0:
        return b
    strides = list(level_strides)
    if stride not in strides:
        raise ValueError(f"stride {stride} is not one of level_strides {tuple(strides)}")
    return b[assign_levels(b, len(strides)) == strides.index(stride)]


def defeat_fg_mask(
    gt_boxes: Sequence,
    stride: float,
    size,
    level_strides: Optional[Sequence[float]] = DEFAULT_LEVEL_STRIDES,
    device=None,
) -> torch.Tensor:
    """DeFeat's binary foreground mask of one level (ggjy/DeFeat.pytorch ``get_gt_mask``).

    Only the GTs assigned to this level (module docstring) are drawn. A box divided by the
    stride and truncated to integers (lx, ly, rx, ry), clamped to the grid, fills rows
    ly .. ry-1 and columns lx .. rx-1; a box thinner than a cell (lx == rx or ly == ry) marks
    the single cell (ly, lx). Boxes wholly outside the grid (x2 < 0, y2 < 0, or starting past
    its right / bottom edge) mark nothing (the reference would index out of range there).

    Args:
        gt_boxes: B box tensors [Ni, 4], xyxy pixels of the padded input.
        stride: the level's stride; must be in ``level_strides`` unless that is None.
        size: (H, W) of the level.
        level_strides: strides of all distilled levels, finest first (None: no assignment).
        device: device of the mask (default: the boxes').
    Returns:
        [B, H, W] float32 mask of 0 and 1.
    """
    h, w = _size(size)
    boxes, dev = _boxes(gt_boxes, device)
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    mask = torch.zeros(len(boxes), h, w, device=dev)
    for i, b in enumerate(boxes):
        b = _on_level(b, stride, level_strides)
        if b.numel() == 0:
            continue
        g = torch.trunc(b / stride)
        lx, ly = g[:, 0].clamp(min=0), g[:, 1].clamp(min=0)
        rx, ry = g[:, 2].clamp(max=w), g[:, 3].clamp(max=h)
        thin = (lx == rx) | (ly == ry)
        rx = torch.where(thin, lx + 1, rx)
        ry = torch.where(thin, ly + 1, ry)
        valid = (b[:, 2] >= 0) & (b[:, 3] >= 0) & (lx < w) & (ly < h)
        in_r = (rows[None] >= ly[:, None]) & (rows[None] < ry[:, None])
        in_c = (cols[None] >= lx[:, None]) & (cols[None] < rx[:, None])
        inside = in_r[:, :, None] & in_c[:, None, :] & valid[:, None, None]
        mask[i] = inside.any(0).float()
    return mask


def grid_anchors(
    stride: float,
    size,
    sizes: Sequence[float],
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    offset: float = 0.0,
    device=None,
    cell_anchors: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Anchors of one level as detectron2's ``DefaultAnchorGenerator`` makes them.

    Cell anchors (unless given as ``cell_anchors`` [A, 4], a generator's own): for each size s
    (outer loop) and ratio r (inner), w = sqrt(s^2 / r), h = r*w, centred at 0; shifted to
    (x * stride + offset * stride, y * stride + offset * stride) of every cell, row-major.
    Returns [H * W * A, 4] xyxy, A = len(sizes) * len(aspect_ratios) or len(cell_anchors).
    """
    h, w = _size(size)
    if cell_anchors is not None:
        if cell_anchors.dim() != 2 or cell_anchors.shape[1] != 4:
            raise ValueError(f"cell anchors must be [A, 4] xyxy boxes (axis-aligned); got "
                             f"{tuple(cell_anchors.shape)}")
        base = cell_anchors.to(device=device, dtype=torch.float32)
    else:
        base = []
        for s in sizes:
            for r in aspect_ratios:
                aw = math.sqrt(s * s / r)
                ah = r * aw
                base.append([-aw / 2.0, -ah / 2.0, aw / 2.0, ah / 2.0])
        base = torch.tensor(base, dtype=torch.float32, device=device)
    sx = torch.arange(w, dtype=torch.float32, device=device) * stride + offset * stride
    sy = torch.arange(h, dtype=torch.float32, device=device) * stride + offset * stride
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)


def fgfi_mask(
    gt_boxes: Sequence,
    stride: float,
    size,
    psi: float = 0.5,
    level_strides: Optional[Sequence[float]] = DEFAULT_LEVEL_STRIDES,
    anchor_sizes: Optional[Sequence[float]] = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    offset: float = 0.0,
    device=None,
    cell_anchors: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """FGFI's imitation mask of one level (Wang et al. 2019; twangnh ``anchor_target_layer``).

    For each GT on this level (DeFeat's FPN port assigns GTs to levels, module docstring;
    ``level_strides=None`` keeps all), the IoU with every anchor of the level (those crossing
    the border included) is computed and thresholded at psi * (the GT's largest IoU); a
    position is imitated when any of its anchors passes for any GT. Anchors: the detector's own
    (``cell_anchors``), else ``anchor_sizes`` x ``aspect_ratios``, by default detectron2's FPN
    ones: one size 8 * stride, ratios 0.5 / 1 / 2, offset 0.

    Args:
        gt_boxes: B box tensors [Ni, 4], xyxy pixels of the padded input.
        stride: the level's stride.
        size: (H, W) of the level.
        psi: the threshold factor (0.5 in the paper and code).
        level_strides: strides of all distilled levels, finest first (None: no assignment).
        anchor_sizes: anchor sizes of the level (default (8 * stride,)).
        aspect_ratios: anchor aspect ratios h / w.
        offset: anchor centre offset in units of the stride (detectron2's ANCHOR_GENERATOR.OFFSET).
        device: device of the mask (default: the boxes').
        cell_anchors: [A, 4] the level's cell anchors (a detectron2 anchor generator's
            ``cell_anchors[level]``); replaces anchor_sizes and aspect_ratios.
    Returns:
        [B, H, W] float32 mask of 0 and 1.
    """
    from detectron2.structures import Boxes, pairwise_iou

    h, w = _size(size)
    boxes, dev = _boxes(gt_boxes, device)
    sizes = tuple(anchor_sizes) if anchor_sizes is not None else (8.0 * stride,)
    anchors = Boxes(grid_anchors(stride, (h, w), sizes, aspect_ratios, offset, device=dev,
                                 cell_anchors=cell_anchors))
    mask = torch.zeros(len(boxes), h, w, device=dev)
    for i, b in enumerate(boxes):
        b = _on_level(b, stride, level_strides)
        if b.numel() == 0:
            continue
        iou = pairwise_iou(anchors, Boxes(b.float()))  # [H*W*A, G]
        best = iou.max(dim=0).values
        hit = iou > psi * best[None, :]
        mask[i] = hit.reshape(h, w, -1).any(-1).float()
    return mask
