"""Distribution metrics on feature batches (KD^2M, Montesuma 2025): MMD, Gaussian W2/KL, OT."""

import itertools
import math

import pytest
import torch

from nst_det.losses import (
    class_gaussian_kl_loss,
    class_gaussian_w2_loss,
    class_w2_loss,
    diag_gaussian_kl,
    diag_gaussian_w2,
    gaussian_kl_loss,
    gaussian_w2_loss,
    mmd_loss,
    sinkhorn_loss,
    w2_loss,
)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- MMD
def test_mmd_linear_is_squared_distance_of_means():
    x, y = _rand(6, 4, seed=1), _rand(9, 4, seed=2) + 1
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum()
    torch.testing.assert_close(mmd_loss(x, y, kernel="linear"), expected)


def test_mmd_rbf_matches_double_loop_with_default_bandwidth():
    x, y = _rand(5, 3, seed=3), _rand(4, 3, seed=4) * 2
    z = list(x) + list(y)
    d2 = [[float(((a - b) ** 2).sum()) for b in z] for a in z]
    sigma2 = sum(map(sum, d2)) / (len(z) * (len(z) - 1))

    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma2))

    expected = (
        sum(k(a, b) for a in x for b in x) / 25
        + sum(k(a, b) for a in y for b in y) / 16
        - 2 * sum(k(a, b) for a in x for b in y) / 20
    )
    assert mmd_loss(x, y).item() == pytest.approx(expected, rel=1e-10)
    assert mmd_loss(x, x.clone()).item() == pytest.approx(0, abs=1e-12)
    # 4-D feature maps are average-pooled to vectors first
    maps = x.view(5, 3, 1, 1).expand(5, 3, 2, 2)
    torch.testing.assert_close(mmd_loss(maps, y, sigma2=0.5), mmd_loss(x, y, sigma2=0.5))


def test_mmd_gradcheck_and_dimension_check():
    x, y = _rand(4, 3, seed=5).requires_grad_(), _rand(5, 3, seed=6)
    assert torch.autograd.gradcheck(lambda v: mmd_loss(v, y, sigma2=1.3), (x,))
    with pytest.raises(ValueError, match="project"):
        mmd_loss(_rand(4, 3), _rand(4, 5))


# ---------------------------------------------------------------- Gaussian W2 / KL
def test_diag_gaussian_w2_hand_values():
    mu1, s1 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    mu2, s2 = torch.tensor([3.0, 4.0]), torch.tensor([2.0, 1.0])
    assert diag_gaussian_w2(mu1, s1, mu2, s2).item() == pytest.approx(25 + 1)
    # samples: x has mean 0, std 1; y has mean 3, std 2 (population std)
    x = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [5.0]], dtype=torch.float64)
    assert gaussian_w2_loss(x, y).item() == pytest.approx(9 + 1, rel=1e-7)


def test_diag_gaussian_kl_closed_form_and_direction():
    one = torch.tensor([1.0], dtype=torch.float64)
    # KL(N(0,1) || N(1,4)) = ln 2 + (1 + 1) / 8 - 1/2
    kl = diag_gaussian_kl(0 * one, one, one, 2 * one).item()
    assert kl == pytest.approx(math.log(2) - 0.25, rel=1e-12)
    mu1, mu2 = _rand(5, seed=7), _rand(5, seed=8)
    s1, s2 = _rand(5, seed=9).exp(), _rand(5, seed=10).exp()
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu1, s1), torch.distributions.Normal(mu2, s2)
    ).sum()
    torch.testing.assert_close(diag_gaussian_kl(mu1, s1, mu2, s2), ref)
    # the loss is KL(N_student || N_teacher) with population statistics
    x, y = _rand(8, 5, seed=11), 2 * _rand(8, 5, seed=12) + 1
    fit_x = (x.mean(0), x.std(0, correction=0))
    fit_y = (y.mean(0), y.std(0, correction=0))
    expected = diag_gaussian_kl(*fit_x, *fit_y)
    torch.testing.assert_close(gaussian_kl_loss(x, y), expected, rtol=1e-6, atol=1e-8)
    assert gaussian_kl_loss(x, x.clone()).item() == pytest.approx(0, abs=1e-12)
    assert gaussian_w2_loss(x, x.clone()).item() == pytest.approx(0, abs=1e-12)


def test_gaussian_kl_of_a_single_image_is_zero_not_gap_over_eps():
    x, y = _rand(1, 5, seed=17).requires_grad_(), _rand(1, 5, seed=18)
    loss = gaussian_kl_loss(x, y)  # no variance on either side: it was ~3e9
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    two = _rand(2, 5, seed=19)  # two images have a variance: the formula again
    fit = [(v.mean(0), (v.var(0, correction=0) + 1e-8).sqrt()) for v in (two, 2 * two + 1)]
    torch.testing.assert_close(gaussian_kl_loss(two, 2 * two + 1), diag_gaussian_kl(*fit[0],
                                                                                     *fit[1]))


def test_gaussian_losses_gradcheck_and_teacher_detached():
    x, y = _rand(6, 3, seed=13).requires_grad_(), _rand(6, 3, seed=14).requires_grad_()
    for fn in (gaussian_w2_loss, gaussian_kl_loss):
        assert torch.autograd.gradcheck(lambda v, fn=fn: fn(v, y), (x,))
        fn(x, y).backward()
        assert y.grad is None


def test_class_conditional_gaussian_equals_per_class_loop():
    x, y = _rand(12, 4, seed=15), _rand(12, 4, seed=16)
    labels = torch.tensor([0, 2, 2, 5, 0, 5, 5, 2, 0, 7, 0, 2])  # class 7 has a single sample
    per_w2 = {c: gaussian_w2_loss(x[labels == c], y[labels == c]) for c in (0, 2, 5, 7)}
    per_kl = {c: gaussian_kl_loss(x[labels == c], y[labels == c]) for c in (0, 2, 5)}
    torch.testing.assert_close(class_gaussian_w2_loss(x, y, labels), sum(per_w2.values()))
    torch.testing.assert_close(
        class_gaussian_w2_loss(x, y, labels, reduction="mean"), sum(per_w2.values()) / 4
    )
    # the KL skips the single-sample class by default (its variance would be only eps)
    torch.testing.assert_close(class_gaussian_kl_loss(x, y, labels), sum(per_kl.values()))
    empty = class_gaussian_kl_loss(x[:2], y[:2], torch.tensor([0, 1]))
    assert empty.item() == 0


# ---------------------------------------------------------------- exact OT / Sinkhorn
def test_exact_w2_of_shifted_cloud_is_shift_squared():
    x = _rand(7, 3, seed=17)
    shift = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    y = (x + shift)[torch.randperm(7)]
    xs = x.clone().requires_grad_()
    loss = w2_loss(xs, y)
    assert loss.item() == pytest.approx(float(shift @ shift), rel=1e-9)
    loss.backward()
    # envelope gradient with the identity plan: 2 (x_i - y_pi(i)) / n
    torch.testing.assert_close(xs.grad, (-2 * shift / 7).expand(7, 3))


def test_exact_w2_matches_best_permutation():
    x, y = _rand(5, 2, seed=18), _rand(5, 2, seed=19)
    cost = torch.cdist(x, y) ** 2
    best = min(sum(cost[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    assert w2_loss(x, y).item() == pytest.approx(float(best) / 5, rel=1e-9)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")  # reg=1e-3 converges slowly
def test_sinkhorn_approaches_exact_ot_as_reg_shrinks():
    x, y = _rand(8, 2, seed=20), _rand(8, 2, seed=21) + 0.5
    exact = w2_loss(x, y).item()
    small = sinkhorn_loss(x, y, reg=1e-3, num_iter=20000).item()
    large = sinkhorn_loss(x, y, reg=0.5).item()
    assert small == pytest.approx(exact, rel=1e-2)
    assert large > small + 1e-3  # blurrier plan, higher transport cost
    assert small >= exact - 1e-9  # <P, M> of any coupling is >= the optimum


def test_class_w2_sums_per_class_ot():
    x, y = _rand(9, 3, seed=22), _rand(9, 3, seed=23)
    labels = torch.tensor([1, 1, 4, 4, 4, 1, 9, 9, 4])
    expected = sum(w2_loss(x[labels == c], y[labels == c]) for c in (1, 4, 9))
    torch.testing.assert_close(class_w2_loss(x, y, labels), expected)


def test_ot_losses_float32_and_teacher_detached():
    x = _rand(16, 32, seed=24, dtype=torch.float32).requires_grad_()
    y = _rand(16, 32, seed=25, dtype=torch.float32).requires_grad_()
    for fn in (w2_loss, sinkhorn_loss):
        loss = fn(x, y)
        assert loss.dtype == torch.float32
        loss.backward()
        assert y.grad is None and x.grad.abs().sum() > 0
        x.grad = None
