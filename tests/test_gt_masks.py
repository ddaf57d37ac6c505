"""GT masks of the detection losses: FGD's foreground/background masks, FPN level assignment
and DeFeat's foreground mask, FGFI's anchor-IoU mask and its grid anchors.

Every mask is checked against cells worked out by hand from hand-made boxes, or against a
brute-force loop written out here (detectron2's own anchor generator for the anchors), never
through the code under test.
"""

import math

import pytest
import torch
from _det_loss_cases import DEFEAT_BOXES, FGD_BOXES, _fgd_expected

from nst_det.losses import assign_levels, defeat_fg_mask, fgd_masks, fgfi_mask, grid_anchors


# ---------------------------------------------------------------- GT masks: FGD
def test_fgd_masks_hand_made_boxes():
    fg, bg = fgd_masks(FGD_BOXES, stride=4, size=(6, 8))
    exp_fg, exp_bg = _fgd_expected()
    assert fg.shape == (2, 6, 8) and fg.dtype == torch.float32
    torch.testing.assert_close(fg.double(), exp_fg, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bg.double(), exp_bg, rtol=1e-6, atol=1e-7)
    assert float(bg[0].sum()) == pytest.approx(1.0) and float(bg[1].sum()) == pytest.approx(1.0)


def test_fgd_masks_full_cover_and_empty_batch():
    fg, bg = fgd_masks([torch.tensor([[0.0, 0.0, 32.0, 24.0]])], stride=4, size=(6, 8))
    assert torch.isfinite(bg).all() and float(bg.sum()) == 0.0
    # rows 0..6 and cols 0..8 (ceil end included) -> 1 / (7 * 9) on the whole grid
    torch.testing.assert_close(fg, torch.full((1, 6, 8), 1 / 63))
    fg, bg = fgd_masks([torch.zeros(0, 4)], stride=8, size=(3, 2))
    assert float(fg.abs().sum()) == 0 and torch.allclose(bg, torch.full((1, 3, 2), 1 / 6))


# ---------------------------------------------------------------- GT masks: DeFeat
def test_assign_levels_rule():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 110.0, 110.0],  # sqrt(111*111)/56 < 2 -> 0
            [0.0, 0.0, 111.0, 111.0],  # 112/56 = 2 -> 1
            [10.0, 10.0, 233.0, 233.0],  # 224/56 = 4 -> 2
            [0.0, 0.0, 5000.0, 5000.0],  # clamped to the last level
            [5.0, 5.0, 4.0, 4.0],  # degenerate -> 0
        ]
    )
    assert assign_levels(boxes, 5).tolist() == [0, 1, 2, 4, 0]
    assert assign_levels(boxes, 2).tolist() == [0, 1, 1, 1, 0]


def test_defeat_fg_mask_hand_made_boxes():
    m = defeat_fg_mask(DEFEAT_BOXES, stride=4, size=(8, 8))
    exp = torch.zeros(2, 8, 8)
    for r, c in [(1, 1), (1, 2), (2, 5), (7, 7), (3, 0)]:
        exp[0, r, c] = 1.0
    torch.testing.assert_close(m, exp)
    # the large box lands on stride 8 only, and fills that 4 x 4 map
    m8 = defeat_fg_mask(DEFEAT_BOXES, stride=8, size=(4, 4))
    torch.testing.assert_close(m8, torch.stack([torch.ones(4, 4), torch.zeros(4, 4)]))
    # without level assignment every box is drawn (the large one covers all)
    assert float(defeat_fg_mask(DEFEAT_BOXES, 4, (8, 8), level_strides=None)[0].sum()) == 64
    with pytest.raises(ValueError):
        defeat_fg_mask(DEFEAT_BOXES, stride=6, size=(8, 8))


# ---------------------------------------------------------------- GT masks: FGFI
def test_grid_anchors_match_detectron2_default_anchor_generator():
    from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

    for stride, size in [(4, (3, 5)), (16, (2, 2))]:
        gen = DefaultAnchorGenerator(
            sizes=[[8 * stride]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[stride], offset=0.0
        )
        ref = gen([torch.zeros(1, 1, *size)])[0].tensor
        torch.testing.assert_close(grid_anchors(stride, size, (8 * stride,)), ref)
    # a generator's own cell anchors (two sizes, an offset) in place of sizes and ratios
    gen = DefaultAnchorGenerator(sizes=[[12, 17]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[8],
                                 offset=0.5)
    ref = gen([torch.zeros(1, 1, 3, 4)])[0].tensor
    own = grid_anchors(8, (3, 4), (), offset=0.5, cell_anchors=next(iter(gen.cell_anchors)))
    torch.testing.assert_close(own, ref)
    torch.testing.assert_close(grid_anchors(8, (3, 4), (12, 17), offset=0.5), ref)
    with pytest.raises(ValueError, match=r"\[A, 4\] xyxy"):
        grid_anchors(8, (3, 4), (), cell_anchors=torch.zeros(3, 5))  # rotated anchors


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if inter > 0 else 0.0


def test_fgfi_mask_hand_made_boxes():
    # one 4 x 4 anchor per cell, centred at (4x, 4y): anchor (x, y) = [4x-2, 4y-2, 4x+2, 4y+2]
    boxes = [
        torch.tensor(
            [
                [2.0, 2.0, 10.0, 6.0],  # IoU 0.5 with anchors (1,1) and (2,1) -> both
                [3.0, 3.0, 5.0, 5.0],  # overlapping, inside anchor (1,1) only
                [16.0, 16.0, 22.0, 22.0],  # over the 20 x 20 padded image's corner: (4,4)
            ]
        ),
        torch.zeros(0, 4),
    ]
    m = fgfi_mask(boxes, 4, (5, 5), level_strides=None, anchor_sizes=(4.0,), aspect_ratios=(1.0,))
    exp = torch.zeros(2, 5, 5)
    for r, c in [(1, 1), (1, 2), (4, 4)]:
        exp[0, r, c] = 1.0
    torch.testing.assert_close(m, exp)
    # psi = 1: only each GT's best anchors (IoU > max is never true) -> nothing
    assert (
        float(
            fgfi_mask(
                boxes,
                4,
                (5, 5),
                psi=1.0,
                level_strides=None,
                anchor_sizes=(4.0,),
                aspect_ratios=(1.0,),
            ).sum()
        )
        == 0
    )


def test_fgfi_mask_brute_force_with_default_anchors_and_levels():
    boxes = torch.tensor(  # mixed sizes (levels 0 and 1); several cross the 64 x 64 padded image
        [
            [3.0, 5.0, 40.0, 30.0],
            [10.0, 12.0, 130.0, 90.0],
            [30.0, 2.0, 70.0, 160.0],
            [50.0, 40.0, 75.0, 66.0],
            [0.0, 0.0, 120.0, 120.0],
            [-10.0, 20.0, 100.0, 150.0],
            [12.0, 14.0, 58.5, 61.0],
        ]
    )
    stride, (h, w) = 8, (8, 8)
    got = fgfi_mask([boxes], stride, (h, w), level_strides=(4, 8))
    assert set(assign_levels(boxes, 2).tolist()) == {0, 1}
    ratios = (0.5, 1.0, 2.0)
    exp = torch.zeros(1, h, w)
    for bx in boxes.tolist():
        scale = math.sqrt((bx[2] - bx[0] + 1) * (bx[3] - bx[1] + 1))
        level = min(max(math.floor(math.log2(scale / 56 + 1e-6)), 0), 1)
        if level != 1:  # stride 8 is index 1 of (4, 8)
            continue
        ious = {}
        for y in range(h):
            for x in range(w):
                for r in ratios:
                    aw = math.sqrt(64.0 * 64.0 / r)
                    ah = r * aw
                    a = [x * 8 - aw / 2, y * 8 - ah / 2, x * 8 + aw / 2, y * 8 + ah / 2]
                    ious[(y, x, r)] = _iou(a, bx)
        thr = 0.5 * max(ious.values())
        for (y, x, _), v in ious.items():
            if v > thr:
                exp[0, y, x] = 1.0
    assert float(exp.sum()) > 0
    torch.testing.assert_close(got, exp)
