"""Detection losses masked by the GT boxes: FGD, DeFeat, FGFI, and their adapters.

Every value is checked against the formula written out here (loops, plain torch ops, the
modules' weights applied with F.conv2d), never through the code under test.
"""

import pytest
import torch
import torch.nn.functional as F
from _det_loss_cases import DEFEAT_BOXES, FGD_BOXES, D, _fgd_expected, _perturb, _rand

from nst_det.losses import (
    DeFeatAdapter,
    FGDGlobal,
    FGFIAdapter,
    MGDGenerator,
    cwd_loss,
    defeat_loss,
    fgd_loss,
    fgfi_loss,
    mgd_loss,
)


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


# ---------------------------------------------------------------- the batch
FGFI_BOXES = [torch.tensor([[2.0, 2.0, 10.0, 6.0], [16.0, 16.0, 22.0, 22.0]]), torch.zeros(0, 4)]
FGFI_KW = dict(level_strides=None, anchor_sizes=(4.0,), aspect_ratios=(1.0,))
# name: (student and teacher shapes, boxes per image, loss(s, t, boxes)); the value tests above
# use 2 images, where "/ 2" and "/ batch size" agree
BATCH_CASES = {
    "cwd": ((3, 4, 5), (3, 4, 5), None, lambda s, t, b: cwd_loss(s, t, tau=2.0)),
    "mgd": ((3, 4, 5), (4, 4, 5), None, lambda s, t, b: mgd_loss(
        s, t, module=_perturb(MGDGenerator(3, 4).double(), seed=40), mask_ratio=0.0)),
    "fgd": ((3, 6, 8), (4, 6, 8), FGD_BOXES, lambda s, t, b: fgd_loss(
        s, t, b, 4, module=_perturb(FGDGlobal(3, 4).double(), seed=41), alpha=1, beta=1,
        gamma=1, lambda_=1)),
    "defeat": ((3, 8, 8), (5, 8, 8), [b.double() for b in DEFEAT_BOXES],
               lambda s, t, b: defeat_loss(s, t, b, 4, module=_perturb(
                   DeFeatAdapter(3, 5).double(), seed=42))),
    "fgfi": ((3, 5, 5), (4, 5, 5), FGFI_BOXES, lambda s, t, b: fgfi_loss(
        s, t, b, 4, module=_perturb(FGFIAdapter(3, 4).double(), seed=43), **FGFI_KW)),
}


@pytest.mark.parametrize("name", sorted(BATCH_CASES))
def test_each_loss_is_a_mean_over_images_three_copies_of_a_batch_give_its_value(name):
    s_shape, t_shape, boxes, loss = BATCH_CASES[name]
    s, t = _rand(2, *s_shape, seed=44), _rand(2, *t_shape, seed=45)
    one = loss(s, t, boxes).item()
    three = loss(torch.cat([s] * 3), torch.cat([t] * 3), boxes and boxes * 3).item()
    assert one > 0 and three == pytest.approx(one, rel=1e-10)
