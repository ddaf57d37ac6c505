"""Classic transfer losses: KD, FitNet, AT (Zagoruyko & Komodakis 2017), SP (Tung & Mori 2019)."""

import math

import pytest
import torch
import torch.nn.functional as F

from nst_det.losses import FitNetRegressor, at_loss, fitnet_loss, kd_loss, sp_loss


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- KD
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_identical_logits_is_zero(T):
    z = _rand(5, 7)
    assert kd_loss(z, z.clone(), T=T).item() == pytest.approx(0, abs=1e-12)


def test_kd_two_class_known_value_with_temperature_and_batchmean():
    # teacher softmax (0.75, 0.25), student (0.5, 0.5): KL = .75 ln 1.5 + .25 ln .5
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert kd_loss(s, t, T=1.0).item() == pytest.approx(kl, rel=1e-12)
    # at T = 2 the same distributions come from logits 2x larger, and the loss is scaled by T^2
    assert kd_loss(2 * s, 2 * t, T=2.0).item() == pytest.approx(4 * kl, rel=1e-12)
    # batchmean: a second, identical row halves the mean
    s2, t2 = torch.cat([s, t]), torch.cat([t, t])
    assert kd_loss(s2, t2, T=1.0).item() == pytest.approx(kl / 2, rel=1e-12)
    # direction is KL(teacher || student), not the reverse
    assert kd_loss(t, s, T=1.0).item() != pytest.approx(kl, rel=1e-3)


def test_kd_gradient_only_to_student_and_gradcheck():
    s, t = _rand(3, 4, seed=1).requires_grad_(), _rand(3, 4, seed=2).requires_grad_()
    kd_loss(s, t, T=3.0).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, T=3.0), (s.detach().requires_grad_(),))


def test_kd_half_input_under_autocast():
    s, t = _rand(4, 10, seed=3, dtype=torch.float32), _rand(4, 10, seed=4, dtype=torch.float32)
    ref = kd_loss(s.half().float(), t.half().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kd_loss(s.half(), t.half())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_kd_rejects_bad_shapes():
    with pytest.raises(ValueError):
        kd_loss(_rand(2, 3), _rand(2, 4))


# ---------------------------------------------------------------- FitNet
def test_fitnet_is_mean_squared_error():
    f_s, f_t = _rand(2, 3, 4, 5, seed=5), _rand(2, 3, 4, 5, seed=6)
    expected = ((f_s - f_t) ** 2).sum().item() / f_s.numel()
    assert fitnet_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-12)


def test_fitnet_regressor_maps_channels_and_receives_gradients():
    reg = FitNetRegressor(3, 5).double()
    assert reg(_rand(2, 3, 4, 6)).shape == (2, 5, 4, 6)
    f_s = _rand(2, 3, 4, 6, seed=7).requires_grad_()
    f_t = _rand(2, 5, 4, 6, seed=8).requires_grad_()
    loss = fitnet_loss(f_s, f_t, regressor=reg)
    torch.testing.assert_close(loss, F.mse_loss(reg(f_s), f_t))
    loss.backward()
    assert f_t.grad is None
    assert reg.conv.weight.grad.abs().sum() > 0 and f_s.grad.abs().sum() > 0


def test_fitnet_identity_regressor_and_spatial_pooling():
    reg = FitNetRegressor(3, 3, bias=False).double()
    with torch.no_grad():
        reg.conv.weight.copy_(torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1))
    f_s, f_t = _rand(1, 3, 4, 6, seed=9), _rand(1, 3, 2, 3, seed=10)
    pooled = f_s.reshape(1, 3, 2, 2, 3, 2).mean((3, 5))
    expected = ((pooled - f_t) ** 2).mean().item()
    assert fitnet_loss(f_s, f_t, regressor=reg).item() == pytest.approx(expected, rel=1e-12)
    assert fitnet_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-12)


def test_fitnet_channel_mismatch_without_regressor_raises():
    with pytest.raises(ValueError, match="regressor"):
        fitnet_loss(_rand(1, 3, 2, 2), _rand(1, 4, 2, 2))


# ---------------------------------------------------------------- AT
def test_at_hand_computed_value():
    f_s = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    f_t = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    f_s[0, 0, 0, 0] = 3.0  # attention (9, 0, 0, 0) -> normalised (1, 0, 0, 0)
    f_t[0, 1, 0, 1] = -2.0  # attention (0, 4, 0, 0) -> normalised (0, 1, 0, 0)
    # mean over the 4 positions of the squared difference: (1 + 1) / 4
    assert at_loss(f_s, f_t).item() == pytest.approx(0.5, rel=1e-12)


def test_at_formula_scale_invariance_and_gradients():
    f_s, f_t = _rand(2, 3, 3, 4, seed=11), _rand(2, 6, 3, 4, seed=12)
    a_s = (f_s**2).sum(1).flatten(1)
    a_t = (f_t**2).sum(1).flatten(1)
    a_s, a_t = a_s / a_s.norm(dim=1, keepdim=True), a_t / a_t.norm(dim=1, keepdim=True)
    assert at_loss(f_s, f_t).item() == pytest.approx(((a_s - a_t) ** 2).mean().item(), rel=1e-12)
    assert at_loss(f_s, -3 * f_s).item() == pytest.approx(0, abs=1e-14)
    x = f_s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: at_loss(v, f_t), (x,))


def test_at_spatial_mismatch_pools_attention_per_dimension():
    f_s, f_t = _rand(2, 3, 4, 3, seed=13), _rand(2, 5, 2, 6, seed=14)
    a_s = (f_s**2).sum(1).reshape(2, 2, 2, 3).mean(2).flatten(1)  # H 4 -> 2
    a_t = (f_t**2).sum(1).reshape(2, 2, 3, 2).mean(3).flatten(1)  # W 6 -> 3
    a_s, a_t = a_s / a_s.norm(dim=1, keepdim=True), a_t / a_t.norm(dim=1, keepdim=True)
    assert at_loss(f_s, f_t).item() == pytest.approx(((a_s - a_t) ** 2).mean().item(), rel=1e-12)


# ---------------------------------------------------------------- SP
def test_sp_hand_computed_value():
    # student rows orthogonal -> G_s = I; teacher rows identical -> each row (1, 1)/sqrt(2)
    f_s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64).view(2, 2, 1, 1)
    f_t = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64).view(2, 3, 1, 1)
    expected = (2 * (1 - 1 / math.sqrt(2)) ** 2 + 2 * 0.5) / 4
    assert sp_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-12)


def test_sp_brute_force_with_different_channels_and_sizes():
    f_s, f_t = _rand(4, 3, 5, 2, seed=15), _rand(4, 7, 2, 3, seed=16)

    def sim(f):
        q = f.reshape(4, -1)
        g = torch.tensor([[float(q[i] @ q[j]) for j in range(4)] for i in range(4)], dtype=q.dtype)
        return g / g.norm(dim=1, keepdim=True)

    expected = ((sim(f_t) - sim(f_s)) ** 2).sum().item() / 16
    assert sp_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-10)
    assert sp_loss(f_s, 5 * f_s).item() == pytest.approx(0, abs=1e-14)
    x = f_s.clone().requires_grad_()
    f_t.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: sp_loss(v, f_t), (x,))
    sp_loss(x, f_t).backward()
    assert f_t.grad is None
