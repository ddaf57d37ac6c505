"""Feature-map distillation losses without GT boxes: CWD, PKD, MGD.

Every value is checked against the formula written out here (loops, plain torch ops, the
modules' weights applied with F.conv2d), never through the code under test.
"""

import pytest
import torch
import torch.nn.functional as F
from _det_loss_cases import D, _rand

import nst_det.losses as L
from nst_det.losses import MGDGenerator, cwd_loss, mgd_loss, pkd_loss


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
    # 3 images: the paper's "/ 2" is a constant, not the batch size
    s, t = _rand(3, 3, 4, 5, seed=5), _rand(3, 3, 4, 5, seed=6)
    got = pkd_loss(s, t).item()
    assert got == pytest.approx(_pkd_reference(s, t), rel=1e-10)
    # MSE/2 of standardised maps = (n-1)/n * (1 - r), r the mean per-channel Pearson correlation
    n = 3 * 4 * 5
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


def test_pkd_is_zero_not_nan_for_one_value_per_channel():
    # one image, a 1x1 level: a correlation of one value is undefined; the loss must not be NaN
    s = _rand(1, 3, 1, 1, seed=11).requires_grad_(True)
    loss = pkd_loss(s, _rand(1, 3, 1, 1, seed=12))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # two values per channel use the std again
    s2, t2 = _rand(2, 3, 1, 1, seed=13), _rand(2, 3, 1, 1, seed=14)
    assert pkd_loss(s2, t2).item() == pytest.approx(_pkd_reference(s2, t2), rel=1e-10)


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
