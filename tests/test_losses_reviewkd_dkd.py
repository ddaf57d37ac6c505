"""ReviewKD (attention-based fusion, HCL pyramid loss) and DKD (decoupled logit KD).

Every value is checked against the formula written out here (loops, plain torch ops, the
modules' weights applied with F.conv2d), never through the code under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _det_loss_cases import _perturb, _rand

from nst_det.losses import ReviewKDFusion, dkd_loss, dkd_parts, hcl_loss, kd_loss, reviewkd_loss


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
