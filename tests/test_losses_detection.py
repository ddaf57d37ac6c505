"""Detection-distillation losses (CWD, PKD, MGD, FGD, DeFeat, FGFI, ReviewKD, DKD) and GT masks.

Every value is checked against the formula written out here (loops, plain torch ops, the
modules' weights applied with F.conv2d), never through the code under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import nst_det.losses as L
from nst_det.losses import (
    DeFeatAdapter,
    FGDGlobal,
    FGFIAdapter,
    MGDGenerator,
    ReviewKDFusion,
    assign_levels,
    build_transfer_loss,
    cwd_loss,
    defeat_fg_mask,
    defeat_loss,
    dkd_loss,
    dkd_parts,
    fgd_loss,
    fgd_masks,
    fgfi_loss,
    fgfi_mask,
    get_transfer_loss,
    grid_anchors,
    hcl_loss,
    kd_loss,
    mgd_loss,
    pkd_loss,
    reviewkd_loss,
)

D = torch.float64


def _rand(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _perturb(module, seed):
    """Give every parameter of module random values (zero-initialised convs included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ---------------------------------------------------------------- hand-made boxes
# FGD level: stride 4, 6 x 8 grid (a 24 x 32 padded image).
FGD_BOXES = [
    torch.tensor(
        [
            [4.0, 4.0, 12.0, 8.0],  # A: grid (1,1)-(3,2): cols 1..3, rows 1..2, 1/6
            [8.0, 4.0, 10.0, 6.0],  # B inside A's right part: cols 2..3, rows 1..2, 1/4
            [28.0, 20.0, 32.0, 24.0],  # on the padded image's corner: cell (5, 7), 1/(2*2)
            [-4.0, -4.0, 2.0, 2.0],  # partly outside: rows/cols -1..1 -> 1/9 on (0..1, 0..1)
        ],
        dtype=D,
    ),
    torch.zeros(0, 4, dtype=D),
]


def _fgd_expected():
    fg = torch.zeros(2, 6, 8, dtype=D)
    fg[0, 0, 0] = fg[0, 0, 1] = fg[0, 1, 0] = 1 / 9
    fg[0, 1, 1] = fg[0, 2, 1] = 1 / 6  # A beats the outside box (1/6 > 1/9)
    fg[0, 1:3, 2:4] = 1 / 4  # B, the smaller box, wins over A
    fg[0, 5, 7] = 1 / 4
    bg = (fg == 0).to(D)
    bg[0] /= 38  # 48 cells, 10 covered
    bg[1] /= 48
    return fg, bg


# ---------------------------------------------------------------- CWD
def _cwd_reference(s, t, tau):
    b, c = s.shape[:2]
    total = 0.0
    for i in range(b):
        for j in range(c):
            ps = torch.exp(s[i, j].flatten() / tau)
            pt = torch.exp(t[i, j].flatten() / tau)
            ps, pt = ps / ps.sum(), pt / pt.sum()
            total += float((pt * torch.log(pt / ps)).sum())
    return total * tau * tau / (b * c)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_cwd_matches_channel_kl_formula(tau):
    s, t = _rand(2, 3, 4, 5, seed=1), _rand(2, 3, 4, 5, seed=2)
    assert cwd_loss(s, t, tau=tau).item() == pytest.approx(_cwd_reference(s, t, tau), rel=1e-10)
    # KL(T || S), not the reverse
    assert cwd_loss(s, t, tau=tau).item() != pytest.approx(_cwd_reference(t, s, tau), rel=1e-3)


def test_cwd_zero_for_equal_inputs_and_temperature_identity():
    s, t = _rand(2, 4, 3, 3, seed=3), _rand(2, 4, 3, 3, seed=4)
    assert cwd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    # a per-channel constant shift does not change a spatial softmax
    assert cwd_loss(s + 5.0, s).item() == pytest.approx(0.0, abs=1e-12)
    for tau in (0.5, 3.0):
        lhs = cwd_loss(s, t, tau=tau).item()
        rhs = tau**2 * cwd_loss(s / tau, t / tau, tau=1.0).item()
        assert lhs == pytest.approx(rhs, rel=1e-12)


def test_cwd_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        cwd_loss(_rand(1, 3, 4, 4), _rand(1, 4, 4, 4))


# ---------------------------------------------------------------- PKD
def _pkd_reference(s, t):
    def norm(f):
        out = torch.empty_like(f)
        for c in range(f.shape[1]):
            x = f[:, c]
            n = x.numel()
            m = x.sum() / n
            std = torch.sqrt(((x - m) ** 2).sum() / (n - 1))
            out[:, c] = (x - m) / (std + 1e-6)
        return out

    return float(((norm(s) - norm(t)) ** 2).mean()) / 2


def test_pkd_matches_formula_and_pearson_form():
    s, t = _rand(2, 3, 4, 5, seed=5), _rand(2, 3, 4, 5, seed=6)
    got = pkd_loss(s, t).item()
    assert got == pytest.approx(_pkd_reference(s, t), rel=1e-10)
    # MSE/2 of standardised maps = (n-1)/n * (1 - r), r the mean per-channel Pearson correlation
    n = 2 * 4 * 5
    r = sum(
        float(torch.corrcoef(torch.stack([s[:, c].flatten(), t[:, c].flatten()]))[0, 1])
        for c in range(3)
    )
    assert got == pytest.approx((n - 1) / n * (1 - r / 3), rel=1e-5)


def test_pkd_invariant_to_positive_channel_scale_and_shift():
    s, t = _rand(2, 3, 4, 4, seed=7), _rand(2, 3, 4, 4, seed=8)
    a = torch.tensor([0.5, 2.0, 7.0], dtype=D).view(1, 3, 1, 1)
    b = torch.tensor([-3.0, 0.1, 10.0], dtype=D).view(1, 3, 1, 1)
    base = pkd_loss(s, t).item()
    assert pkd_loss(a * s + b, t).item() == pytest.approx(base, rel=1e-5)
    assert pkd_loss(s, a * t + b).item() == pytest.approx(base, rel=1e-5)
    assert pkd_loss(s, 3 * s + 1).item() == pytest.approx(0.0, abs=1e-6)
    # a negative scale is not an invariance: it flips the correlation
    assert pkd_loss(-s, t).item() != pytest.approx(base, rel=1e-2)


def test_pkd_resizes_student_bilinearly_to_teacher_size():
    s, t = _rand(2, 3, 4, 6, seed=9), _rand(2, 3, 8, 5, seed=10)
    s_up = F.interpolate(s, size=(8, 5), mode="bilinear", align_corners=False)
    assert pkd_loss(s, t).item() == pytest.approx(_pkd_reference(s_up, t), rel=1e-10)


# ---------------------------------------------------------------- MGD
def _mgd_generate(module, x):
    if isinstance(module.align, torch.nn.Conv2d):
        x = F.conv2d(x, module.align.weight, module.align.bias)
    g1, g2 = module.generation[0], module.generation[2]
    return F.conv2d(
        F.relu(F.conv2d(x, g1.weight, g1.bias, padding=1)), g2.weight, g2.bias, padding=1
    )


def test_mgd_ratio_zero_keeps_everything_and_ratio_one_masks_everything():
    torch.manual_seed(0)
    module = MGDGenerator(3, 5).double()
    assert isinstance(MGDGenerator(4, 4).align, torch.nn.Identity)
    s = _rand(2, 3, 4, 5, seed=11).requires_grad_()
    t = _rand(2, 5, 4, 5, seed=12).requires_grad_()
    full = mgd_loss(s, t, module=module, mask_ratio=0.0)
    expected = float(((_mgd_generate(module, s) - t) ** 2).sum().detach()) / 2
    assert full.item() == pytest.approx(expected, rel=1e-10)

    masked = mgd_loss(s, t, module=module, mask_ratio=1.0)
    zeros = torch.zeros(2, 5, 4, 5, dtype=D)
    g1, g2 = module.generation[0], module.generation[2]
    gen0 = F.conv2d(
        F.relu(F.conv2d(zeros, g1.weight, g1.bias, padding=1)), g2.weight, g2.bias, padding=1
    )
    assert masked.item() == pytest.approx(float(((gen0 - t) ** 2).sum().detach()) / 2, rel=1e-10)
    masked.backward()
    assert t.grad is None
    assert float(s.grad.abs().sum()) == 0.0  # nothing of the student reaches the generator
    assert float(module.generation[2].weight.grad.abs().sum()) > 0


def test_mgd_random_mask_matches_seeded_draw_and_ratio():
    module = MGDGenerator(4, 4).double()
    s, t = _rand(2, 4, 5, 6, seed=13), _rand(2, 4, 5, 6, seed=14)
    got = mgd_loss(s, t, module=module, mask_ratio=0.45, generator=torch.Generator().manual_seed(3))
    rand = torch.rand((2, 1, 5, 6), generator=torch.Generator().manual_seed(3))
    keep = (rand >= 0.45).to(D)
    expected = float(((_mgd_generate(module, s * keep) - t) ** 2).sum().detach()) / 2
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # the mask is shared over channels and keeps about 1 - ratio of the positions
    big = torch.ones(4, 3, 64, 64)
    m = L.mgd.mgd_random_mask(big, 0.65, torch.Generator().manual_seed(0))
    assert m.shape == (4, 1, 64, 64)
    assert float(m.mean()) == pytest.approx(0.35, abs=0.02)


def test_mgd_gradients_reach_student_align_and_generator_not_teacher():
    module = MGDGenerator(3, 4)
    s = _rand(2, 3, 4, 4, seed=15, dtype=torch.float32).requires_grad_()
    t = _rand(2, 4, 4, 4, seed=16, dtype=torch.float32).requires_grad_()
    mgd_loss(s, t, module=module, mask_ratio=0.5).backward()
    assert t.grad is None and float(s.grad.abs().sum()) > 0
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.parameters())


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


DEFEAT_BOXES = [
    torch.tensor(
        [
            [6.5, 4.5, 14.7, 11.9],  # level 0; trunc(/4) = (1,1,3,2): row 1, cols 1..2
            [0.0, 0.0, 150.0, 150.0],  # level 1 (p3): not on p2
            [20.0, 8.0, 21.0, 30.0],  # thinner than a cell: single cell (2, 5)
            [28.0, 28.0, 40.0, 40.0],  # over the padded image's corner: (7, 7)
            [-6.0, 12.0, 5.0, 17.0],  # partly left of the image: (3, 0)
        ]
    ),
    torch.zeros(0, 4),
]


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


# ---------------------------------------------------------------- FGD loss
def _fgd_attention_ref(f, temp):
    b, c, h, w = f.shape
    sp = torch.empty(b, h, w, dtype=f.dtype)
    ch = torch.empty(b, c, dtype=f.dtype)
    for i in range(b):
        a = f[i].abs()
        e = torch.exp(a.mean(0) / temp)
        sp[i] = h * w * e / e.sum()
        e = torch.exp(a.mean((1, 2)) / temp)
        ch[i] = c * e / e.sum()
    return sp, ch


def _gc_ref(block, x):
    b, c, h, w = x.shape
    logits = F.conv2d(x, block.conv_mask.weight, block.conv_mask.bias).reshape(b, h * w)
    wts = torch.softmax(logits, dim=1)
    ctx = torch.einsum("bcn,bn->bc", x.reshape(b, c, h * w), wts).reshape(b, c, 1, 1)
    c1, ln, c2 = block.channel_add[0], block.channel_add[1], block.channel_add[3]
    z = F.conv2d(ctx, c1.weight, c1.bias)
    mu = z.mean(dim=(1, 2, 3), keepdim=True)
    var = ((z - mu) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    z = (z - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias
    z = F.conv2d(F.relu(z), c2.weight, c2.bias)
    return x + z


def _fgd_terms_ref(s, t, module, temp):
    s = F.conv2d(s, module.align.weight, module.align.bias)
    b = s.shape[0]
    fg, bg = _fgd_expected()
    sp_t, ch_t = _fgd_attention_ref(t, temp)
    sp_s, ch_s = _fgd_attention_ref(s, temp)
    wsq = sp_t[:, None] * ch_t[:, :, None, None] * (s - t) ** 2
    l_fg = float((wsq * fg[:, None]).sum()) / b
    l_bg = float((wsq * bg[:, None]).sum()) / b
    l_at = float((ch_s - ch_t).abs().sum() + (sp_s - sp_t).abs().sum()) / b
    l_gl = float(((_gc_ref(module.student, s) - _gc_ref(module.teacher, t)) ** 2).sum()) / b
    return l_fg, l_bg, l_at, l_gl


def test_fgd_loss_each_term_matches_formula():
    module = _perturb(FGDGlobal(3, 4).double(), seed=18)
    s, t = _rand(2, 3, 6, 8, seed=19), _rand(2, 4, 6, 8, seed=20)
    with torch.no_grad():
        terms = _fgd_terms_ref(s, t, module, 0.5)
    for k, ref in enumerate(terms):
        w = [0.0, 0.0, 0.0, 0.0]
        w[k] = 1.0
        got = fgd_loss(
            s, t, FGD_BOXES, 4, module=module, alpha=w[0], beta=w[1], gamma=w[2], lambda_=w[3]
        )
        assert got.item() == pytest.approx(ref, rel=1e-9), k
    default = fgd_loss(s, t, FGD_BOXES, 4, module=module).item()
    weights = (5e-5, 2.5e-5, 5e-5, 5e-7)
    assert default == pytest.approx(sum(a * b for a, b in zip(weights, terms)), rel=1e-9)


def test_fgd_fresh_module_global_blocks_start_as_identity():
    module = FGDGlobal(4, 4).double()
    assert isinstance(module.align, torch.nn.Identity)
    s, t = _rand(1, 4, 3, 3, seed=21), _rand(1, 4, 3, 3, seed=22)
    got = fgd_loss(
        s, t, [torch.zeros(0, 4)], 8, module=module, alpha=0, beta=0, gamma=0, lambda_=1.0
    )
    assert got.item() == pytest.approx(float(((s - t) ** 2).sum()), rel=1e-12)


def test_fgd_gradients_reach_student_and_all_modules_not_teacher():
    module = _perturb(FGDGlobal(3, 4), seed=23)
    s = _rand(2, 3, 6, 8, seed=24, dtype=torch.float32).requires_grad_()
    t = _rand(2, 4, 6, 8, seed=25, dtype=torch.float32).requires_grad_()
    boxes = [b.float() for b in FGD_BOXES]
    fgd_loss(s, t, boxes, 4, module=module, alpha=1, beta=1, gamma=1, lambda_=1).backward()
    assert t.grad is None and float(s.grad.abs().sum()) > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


# ---------------------------------------------------------------- DeFeat loss
def test_defeat_loss_matches_decoupled_formula():
    module = DeFeatAdapter(3, 5).double()
    conv = module.conv
    assert conv.kernel_size == (3, 3) and float(conv.weight.detach().abs().max()) <= 2e-4
    _perturb(module, seed=26)
    s, t = _rand(2, 3, 8, 8, seed=27), _rand(2, 5, 8, 8, seed=28)
    boxes = [b.double() for b in DEFEAT_BOXES]
    a = F.conv2d(s, conv.weight.detach(), conv.bias.detach(), padding=1)
    m = torch.zeros(2, 1, 8, 8, dtype=D)
    for r, c in [(1, 1), (1, 2), (2, 5), (7, 7), (3, 0)]:
        m[0, 0, r, c] = 1.0
    sq = (a - t) ** 2
    fg = float((sq * m).sum()) / max(1.0, 2 * 5 * float(m.sum()))
    bg = float((sq * (1 - m)).sum()) / max(1.0, 2 * 5 * float((1 - m).sum()))
    got = defeat_loss(s, t, boxes, 4, module=module)
    assert got.item() == pytest.approx(3.0 * fg + 12.0 * bg, rel=1e-10)
    got = defeat_loss(s, t, boxes, 4, module=module, fg_weight=1.0, bg_weight=0.0)
    assert got.item() == pytest.approx(fg, rel=1e-10)
    # no box on this level: fg term is 0, bg covers everything
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    bg_all = float(sq.sum()) / (2 * 5 * 128)
    assert defeat_loss(s, t, empty, 4, module=module).item() == pytest.approx(
        12 * bg_all, rel=1e-10
    )


def test_defeat_gradients_reach_student_and_adapter_not_teacher():
    module = DeFeatAdapter(3, 4)
    s = _rand(2, 3, 8, 8, seed=29, dtype=torch.float32).requires_grad_()
    t = _rand(2, 4, 8, 8, seed=30, dtype=torch.float32).requires_grad_()
    defeat_loss(s, t, DEFEAT_BOXES, 4, module=module).backward()
    assert t.grad is None and float(s.grad.abs().sum()) > 0
    assert float(module.conv.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------- FGFI loss
def test_fgfi_loss_matches_imitation_formula_and_empty_case():
    module = _perturb(FGFIAdapter(3, 4).double(), seed=31)
    assert isinstance(FGFIAdapter(3, 4, relu=False).act, torch.nn.Identity)
    s, t = _rand(2, 3, 5, 5, seed=32), _rand(2, 4, 5, 5, seed=33)
    boxes = [torch.tensor([[2.0, 2.0, 10.0, 6.0], [16.0, 16.0, 22.0, 22.0]]), torch.zeros(0, 4)]
    kw = dict(level_strides=None, anchor_sizes=(4.0,), aspect_ratios=(1.0,))
    m = torch.zeros(2, 1, 5, 5, dtype=D)
    for r, c in [(1, 1), (1, 2), (4, 4)]:
        m[0, 0, r, c] = 1.0
    a = F.relu(F.conv2d(s, module.conv.weight, module.conv.bias, padding=1)).detach()
    expected = float((((a - t) ** 2) * m).sum()) / (2 * 3)
    assert fgfi_loss(s, t, boxes, 4, module=module, **kw).item() == pytest.approx(
        expected, rel=1e-10
    )
    zero = fgfi_loss(s, t, [torch.zeros(0, 4)] * 2, 4, module=module, **kw)
    assert zero.item() == 0.0


def test_fgfi_gradients_reach_student_and_adapter_not_teacher():
    module = FGFIAdapter(3, 4)
    with torch.no_grad():
        module.conv.bias.fill_(0.5)  # keep the ReLU open
    s = _rand(1, 3, 8, 8, seed=34, dtype=torch.float32).requires_grad_()
    t = _rand(1, 4, 8, 8, seed=35, dtype=torch.float32).requires_grad_()
    fgfi_loss(s, t, [torch.tensor([[8.0, 8.0, 20.0, 30.0]])], 4, module=module).backward()
    assert t.grad is None and float(s.grad.abs().sum()) > 0
    assert float(module.conv.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("loss, adapter", [(defeat_loss, DeFeatAdapter),
                                           (fgfi_loss, FGFIAdapter)])
def test_an_adapter_to_the_wrong_width_is_refused_naming_the_loss(loss, adapter):
    s, t = _rand(1, 3, 8, 8, seed=36), _rand(1, 4, 8, 8, seed=37)
    with pytest.raises(ValueError, match=rf"{loss.__name__}: adapted student \(1, 5, 8, 8\)"):
        loss(s, t, [torch.zeros(0, 4)], 4, module=adapter(3, 5).double())


def test_fgd_and_mgd_align_channels_only_when_the_widths_differ():
    for module in (FGDGlobal, MGDGenerator):
        assert isinstance(module(4, 4).align, torch.nn.Identity)
        conv = module(3, 4).align
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 4, (1, 1))


# ---------------------------------------------------------------- ReviewKD
def _block_mean(f, size):
    b, c, h, w = f.shape
    return f.reshape(b, c, size, h // size, size, w // size).mean((3, 5))


def test_hcl_loss_pyramid_weights_and_skipping_rule():
    s8, t8 = _rand(2, 3, 8, 8, seed=36), _rand(2, 3, 8, 8, seed=37)
    s4, t4 = _rand(2, 3, 4, 4, seed=38), _rand(2, 3, 4, 4, seed=39)
    s2, t2 = _rand(2, 3, 2, 6, seed=40), _rand(2, 3, 2, 6, seed=41)

    def mse(a, b):
        return float(((a - b) ** 2).mean())

    l8 = (
        mse(s8, t8)
        + 0.5 * mse(_block_mean(s8, 4), _block_mean(t8, 4))
        + 0.25 * mse(_block_mean(s8, 2), _block_mean(t8, 2))
        + 0.125 * mse(s8.mean((2, 3)), t8.mean((2, 3)))
    ) / 1.875
    # H = 4: the 4x4 pool is skipped and 2x2, 1x1 take weights 0.5, 0.25
    l4 = (
        mse(s4, t4)
        + 0.5 * mse(_block_mean(s4, 2), _block_mean(t4, 2))
        + 0.25 * mse(s4.mean((2, 3)), t4.mean((2, 3)))
    ) / 1.75
    # H = 2 (W = 6): only the 1x1 pool, weight 0.5
    l2 = (mse(s2, t2) + 0.5 * mse(s2.mean((2, 3)), t2.mean((2, 3)))) / 1.5
    got = hcl_loss([s8, s4, s2], [t8, t4, t2]).item()
    assert got == pytest.approx(l8 + l4 + l2, rel=1e-10)
    assert hcl_loss([s8], [s8.clone()]).item() == 0.0


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def test_reviewkd_fusion_chain_matches_manual_coarse_to_fine():
    module = _perturb(ReviewKDFusion([3, 5, 4], [6, 6, 6], mid_channels=4).double(), seed=42)
    module.eval()
    abfs = module.abfs
    assert abfs[2].att_conv is None and abfs[0].att_conv is not None
    s = [_rand(2, 3, 8, 8, seed=43), _rand(2, 5, 4, 4, seed=44), _rand(2, 4, 2, 3, seed=45)]
    t = [_rand(2, 6, 8, 8, seed=46), _rand(2, 6, 4, 4, seed=47), _rand(2, 6, 2, 3, seed=48)]
    outs, res = [None] * 3, None
    for i in (2, 1, 0):
        a = abfs[i]
        x = _bn(F.conv2d(s[i], a.conv1[0].weight), a.conv1[1])
        if res is not None:
            y = F.interpolate(res, size=x.shape[-2:], mode="nearest")
            conv = a.att_conv[0]
            att = torch.sigmoid(F.conv2d(torch.cat([x, y], 1), conv.weight, conv.bias))
            x = x * att[:, :1] + y * att[:, 1:]
        outs[i] = _bn(F.conv2d(x, a.conv2[0].weight, padding=1), a.conv2[1])
        res = x
    got = module(s)
    for g, e in zip(got, outs):
        torch.testing.assert_close(g, e)
    assert reviewkd_loss(s, t, module=module).item() == pytest.approx(
        hcl_loss(outs, t).item(), rel=1e-10
    )


def test_reviewkd_gradients_and_attributes():
    assert reviewkd_loss.over_all_pairs is True
    module = reviewkd_loss.build_module([3, 3], [4, 4])
    assert isinstance(module, ReviewKDFusion)
    s = [
        _rand(2, 3, 4, 4, seed=49, dtype=torch.float32).requires_grad_(),
        _rand(2, 3, 2, 2, seed=50, dtype=torch.float32).requires_grad_(),
    ]
    t = [
        _rand(2, 4, 4, 4, seed=51, dtype=torch.float32).requires_grad_(),
        _rand(2, 4, 2, 2, seed=52, dtype=torch.float32).requires_grad_(),
    ]
    reviewkd_loss(s, t, module=module).backward()
    assert all(x.grad is None for x in t)
    assert all(float(x.grad.abs().sum()) > 0 for x in s)
    for name, p in module.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


# ---------------------------------------------------------------- DKD
def _softmax(row, T):
    e = [math.exp(v / T) for v in row]
    z = sum(e)
    return [v / z for v in e]


def _dkd_reference(zs, zt, y, T):
    tckd = nckd = 0.0
    for rs, rt, k in zip(zs.tolist(), zt.tolist(), y.tolist()):
        ps, pt = _softmax(rs, T), _softmax(rt, T)
        bs, bt = [ps[k], 1 - ps[k]], [pt[k], 1 - pt[k]]
        tckd += sum(q * math.log(q / p) for q, p in zip(bt, bs))
        others = [j for j in range(len(rs)) if j != k]
        hs = [ps[j] / (1 - ps[k]) for j in others]
        ht = [pt[j] / (1 - pt[k]) for j in others]
        nckd += sum(q * math.log(q / p) for q, p in zip(ht, hs))
    n = len(y)
    return tckd * T * T / n, nckd * T * T / n


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_parts_match_formula(T):
    zs, zt = _rand(5, 6, seed=53) * 2, _rand(5, 6, seed=54) * 2
    y = torch.tensor([0, 5, 2, 2, 3])
    tckd, nckd = dkd_parts(zs, zt, y, T=T)
    ref_t, ref_n = _dkd_reference(zs, zt, y, T)
    assert tckd.item() == pytest.approx(ref_t, rel=1e-9)
    assert nckd.item() == pytest.approx(ref_n, rel=1e-9)
    got = dkd_loss(zs, zt, y, alpha=1.5, beta=0.25, T=T).item()
    assert got == pytest.approx(1.5 * ref_t + 0.25 * ref_n, rel=1e-9)
    assert dkd_loss(zs, zt, y, T=T).item() == pytest.approx(ref_t + 0.25 * ref_n, rel=1e-9)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_decomposes_into_tckd_plus_weighted_nckd(T):
    zs, zt = _rand(6, 5, seed=55) * 3, _rand(6, 5, seed=56) * 3
    y = torch.tensor([1, 0, 4, 4, 2, 3])
    gap = 0.0
    for i in range(6):
        tckd, nckd = dkd_parts(zs[i : i + 1], zt[i : i + 1], y[i : i + 1], T=T)
        p_t = float(torch.softmax(zt[i] / T, 0)[y[i]])
        kd = kd_loss(zs[i : i + 1], zt[i : i + 1], T=T).item()
        assert kd == pytest.approx(tckd.item() + (1 - p_t) * nckd.item(), rel=1e-9)
        gap += abs(kd - (tckd.item() + nckd.item()))
    # DKD with alpha = beta = 1 drops the (1 - p_t) coupling: it is not KD
    assert gap > 1e-3
    full = dkd_loss(zs, zt, y, alpha=1.0, beta=1.0, T=T).item()
    assert full != pytest.approx(kd_loss(zs, zt, T=T).item(), rel=1e-3)


def test_dkd_gradient_only_to_student_and_extreme_logits_finite():
    zs = _rand(4, 5, seed=57).requires_grad_()
    zt = _rand(4, 5, seed=58).requires_grad_()
    y = torch.tensor([0, 1, 2, 3])
    dkd_loss(zs, zt, y).backward()
    assert zt.grad is None and float(zs.grad.abs().sum()) > 0
    big = torch.tensor([[200.0, -200.0, 0.0]])  # p_target rounds to 1 in float32
    loss = dkd_loss(big.float(), (big * 0.5).float(), torch.tensor([0]))
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- precision, registry
def _float32_cases():
    torch.manual_seed(0)
    s = _rand(2, 3, 6, 8, seed=59, dtype=torch.float32)
    t = _rand(2, 4, 6, 8, seed=60, dtype=torch.float32)
    t3 = _rand(2, 3, 6, 8, seed=61, dtype=torch.float32)
    boxes = [b.float() for b in FGD_BOXES]
    mgd = MGDGenerator(3, 4)
    fgd = FGDGlobal(3, 4)
    de, fi = DeFeatAdapter(3, 4), FGFIAdapter(3, 4)
    rk = ReviewKDFusion([3, 3], [4, 4], mid_channels=8)
    zs, zt = _rand(4, 5, seed=62, dtype=torch.float32), _rand(4, 5, seed=63, dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 4])
    return {
        "cwd": lambda: cwd_loss(s, t3),
        "pkd": lambda: pkd_loss(s, t3),
        "mgd": lambda: mgd_loss(s, t, module=mgd, generator=torch.Generator().manual_seed(0)),
        "fgd": lambda: fgd_loss(s, t, boxes, 4, module=fgd),
        "defeat": lambda: defeat_loss(s, t, boxes, 4, module=de),
        "fgfi": lambda: fgfi_loss(s, t, boxes, 4, module=fi, level_strides=None),
        "reviewkd": lambda: reviewkd_loss([s, s[..., ::2, ::2]], [t, t[..., ::2, ::2]], module=rk),
        "dkd": lambda: dkd_loss(zs, zt, y),
    }


def test_bf16_autocast_on_cpu_gives_float32_finite_losses():
    for name, fn in _float32_cases().items():
        ref = fn()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn()
        assert got.dtype == torch.float32, name
        assert torch.isfinite(got), name
        torch.testing.assert_close(got, ref, msg=name)


def test_bf16_inputs_are_upcast():
    s = _rand(2, 3, 4, 4, seed=64, dtype=torch.float32).bfloat16()
    t = _rand(2, 3, 4, 4, seed=65, dtype=torch.float32).bfloat16()
    module = DeFeatAdapter(3, 3)
    fusion = ReviewKDFusion([3], [3], mid_channels=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for got in (
            cwd_loss(s, t),
            pkd_loss(s, t),
            defeat_loss(s, t, [torch.zeros(0, 4)] * 2, 4, module=module),
            hcl_loss([s], [t]),
            reviewkd_loss([s], [t], module=fusion),
        ):
            assert got.dtype == torch.float32 and torch.isfinite(got)


def test_registry_names_build_modules_and_binding():
    table = {
        "cwd": cwd_loss,
        "pkd": pkd_loss,
        "mgd": mgd_loss,
        "fgd": fgd_loss,
        "defeat": defeat_loss,
        "fgfi": fgfi_loss,
        "reviewkd": reviewkd_loss,
        "dkd": dkd_loss,
    }
    for name, fn in table.items():
        assert get_transfer_loss(name) is fn
        assert name in L.__doc__
    builders = {"mgd": MGDGenerator, "fgd": FGDGlobal, "defeat": DeFeatAdapter, "fgfi": FGFIAdapter}
    for name, cls in builders.items():
        m = table[name].build_module(3, 4)
        assert isinstance(m, cls)
    for name in ("cwd", "pkd", "dkd"):
        assert not hasattr(table[name], "build_module")
    fn = build_transfer_loss("fgd", alpha=1e-3, temperature=0.5)
    assert fn.keywords == {"alpha": 1e-3, "temperature": 0.5}
    with pytest.raises(TypeError):
        build_transfer_loss("mgd", mask_ration=0.5)
