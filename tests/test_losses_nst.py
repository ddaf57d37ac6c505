"""NST / MMD^2 (Huang & Wang 2017): value, invariances, gradients, precision and cost form."""

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nst_det.losses import mmd2, nst_loss
from nst_det.losses.mmd import _cheaper_form
from nst_det.losses.nst import nst_samples

# (kernel, kernel_args) covering every kernel and the non-default poly parameters.
KERNELS = [
    ("linear", {}),
    ("poly", {}),
    ("poly", {"degree": 3, "c": 0.5}),
    ("poly", {"degree": 2, "c": 1.0}),
    ("gaussian", {"sigma2": 0.7}),
    ("gaussian", {}),  # data-driven bandwidth
]
KERNEL_IDS = ["linear", "poly2", "poly3c.5", "poly2c1", "gauss0.7", "gauss_auto"]


def _k(kernel, args, x, y, sigma2):
    """The kernel on two vectors, written from the paper's definitions."""
    if kernel == "linear":
        return float(x @ y)
    if kernel == "poly":
        return (float(x @ y) + args.get("c", 0.0)) ** args.get("degree", 2)
    return math.exp(-float(((x - y) ** 2).sum()) / (2 * sigma2))


def brute_nst(f_s, f_t, kernel, args):
    """Double-loop MMD^2 of L2-normalised channel rows, batch mean (maps of equal H, W)."""
    vals = []
    for b in range(f_s.shape[0]):
        s = [r / max(float(r.norm()), 1e-10) for r in f_s[b].reshape(f_s.shape[1], -1)]
        t = [r / max(float(r.norm()), 1e-10) for r in f_t[b].reshape(f_t.shape[1], -1)]
        sigma2 = args.get("sigma2")
        if kernel == "gaussian" and sigma2 is None:
            z = s + t
            pairs = [
                float(((z[i] - z[j]) ** 2).sum()) for i in range(len(z)) for j in range(len(z))
            ]
            sigma2 = sum(pairs) / (len(z) * (len(z) - 1))  # distinct pairs (diagonal adds 0)
        tt = sum(_k(kernel, args, a, c, sigma2) for a in t for c in t) / len(t) ** 2
        ss = sum(_k(kernel, args, a, c, sigma2) for a in s for c in s) / len(s) ** 2
        st = sum(_k(kernel, args, a, c, sigma2) for a in s for c in t) / (len(s) * len(t))
        vals.append(tt + ss - 2 * st)
    return sum(vals) / len(vals)


def _maps(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _forms(kernel, args):
    if kernel == "poly" and not args:
        return ["auto", "samples", "features"]
    return ["auto", "samples"]


@pytest.mark.parametrize(("kernel", "args"), KERNELS, ids=KERNEL_IDS)
def test_matches_brute_force_double_loop(kernel, args):
    f_s, f_t = _maps(2, 3, 2, 3, seed=1), _maps(2, 5, 2, 3, seed=2)
    expected = brute_nst(f_s, f_t, kernel, args)
    for form in _forms(kernel, args):
        got = nst_loss(f_s, f_t, kernel, form=form, **args)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12), form


@pytest.mark.parametrize(("kernel", "args"), KERNELS, ids=KERNEL_IDS)
def test_mmd_of_identical_maps_is_zero_and_values_nonnegative(kernel, args):
    f = _maps(3, 6, 3, 4, seed=3)
    for form in _forms(kernel, args):
        assert nst_loss(f, f.clone(), kernel, form=form, **args).item() == pytest.approx(
            0, abs=1e-12
        )
    for seed in range(5):
        f_s, f_t = _maps(2, 4, 3, 5, seed=seed, dtype=torch.float32), _maps(2, 7, 3, 5, seed=99)
        per_image = nst_loss(f_s, f_t.float(), kernel, reduction="none", **args)
        assert per_image.shape == (2,)
        assert (per_image >= 0).all()
        assert per_image.sum() > 1e-4  # distinct random maps really differ
    # float32 round-off on a near-zero difference must not produce a negative "squared" distance
    near = f + 1e-7 * _maps(*f.shape, seed=4)
    assert (nst_loss(near.float(), f.float(), kernel, reduction="none", **args) >= 0).all()


@pytest.mark.parametrize(("kernel", "args"), KERNELS, ids=KERNEL_IDS)
def test_invariant_to_channel_permutation(kernel, args):
    f_s, f_t = _maps(2, 4, 3, 3, seed=5), _maps(2, 6, 3, 3, seed=6)
    ref = nst_loss(f_s, f_t, kernel, **args)
    ps, pt = torch.randperm(4), torch.randperm(6)
    torch.testing.assert_close(nst_loss(f_s[:, ps], f_t[:, pt], kernel, **args), ref)
    # ... but not to moving spatial positions in the student only (the value must depend on it)
    moved = nst_loss(f_s.flip(-1), f_t, kernel, **args)
    assert abs(moved.item() - ref.item()) > 1e-6


def test_linear_kernel_is_squared_distance_of_channel_means():
    f_s, f_t = _maps(3, 4, 2, 5, seed=7), _maps(3, 9, 2, 5, seed=8)
    s = f_s.flatten(2) / f_s.flatten(2).norm(dim=2, keepdim=True)
    t = f_t.flatten(2) / f_t.flatten(2).norm(dim=2, keepdim=True)
    expected = ((s.mean(1) - t.mean(1)) ** 2).sum(1).mean()
    torch.testing.assert_close(nst_loss(f_s, f_t, "linear"), expected)


def test_poly_kernel_is_gram_matching_identity():
    f_s, f_t = _maps(2, 5, 3, 2, seed=9), _maps(2, 8, 3, 2, seed=10)
    s = f_s.flatten(2) / f_s.flatten(2).norm(dim=2, keepdim=True)
    t = f_t.flatten(2) / f_t.flatten(2).norm(dim=2, keepdim=True)
    gram_s = torch.einsum("bcn,bcm->bnm", s, s) / 5
    gram_t = torch.einsum("bcn,bcm->bnm", t, t) / 8
    expected = ((gram_s - gram_t) ** 2).sum((1, 2)).mean()
    for form in ("samples", "features", "auto"):
        torch.testing.assert_close(nst_loss(f_s, f_t, "poly", form=form), expected)


def test_channel_and_spatial_forms_agree_at_realistic_shapes():
    f_s, f_t = _maps(2, 48, 7, 9, seed=11), _maps(2, 96, 7, 9, seed=12)
    a = nst_loss(f_s, f_t, form="samples")
    b = nst_loss(f_s, f_t, form="features")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # float32 too, where the two forms accumulate different round-off
    a32 = nst_loss(f_s.float(), f_t.float(), form="samples")
    b32 = nst_loss(f_s.float(), f_t.float(), form="features")
    torch.testing.assert_close(a32, b32, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a32.double(), a, rtol=1e-4, atol=1e-7)


def test_auto_form_follows_the_flop_count():
    # classification 7x7 maps: the N x N form; detection maps: the C x C form
    assert _cheaper_form(512, 1024, 49, with_grad=True) == "features"
    assert _cheaper_form(256, 512, 38 * 50, with_grad=True) == "samples"
    assert _cheaper_form(1024, 1024, 50 * 84, with_grad=False) == "samples"


@pytest.mark.parametrize(
    ("s_hw", "t_hw", "pool_s", "pool_t"),
    [
        ((6, 10), (3, 5), (2, 2), (1, 1)),  # student larger in both dimensions
        ((6, 5), (3, 10), (2, 1), (1, 2)),  # student taller, teacher wider: pooled per dimension
        ((2, 8), (4, 4), (1, 2), (2, 1)),
        ((4, 6), (4, 6), (1, 1), (1, 1)),
    ],
)
def test_mismatched_nonsquare_sizes_pool_per_dimension(s_hw, t_hw, pool_s, pool_t):
    f_s, f_t = _maps(2, 3, *s_hw, seed=13), _maps(2, 4, *t_hw, seed=14)

    def block_mean(f, ph, pw):  # exact average pooling by reshaping (independent of torch pools)
        b, c, h, w = f.shape
        return f.reshape(b, c, h // ph, ph, w // pw, pw).mean((3, 5))

    expected = brute_nst(block_mean(f_s, *pool_s), block_mean(f_t, *pool_t), "poly", {})
    assert nst_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("kernel", "args"), KERNELS[:5], ids=KERNEL_IDS[:5])
def test_gradcheck(kernel, args):
    f_t = _maps(2, 4, 2, 3, seed=15)
    for form in _forms(kernel, args):
        f_s = _maps(2, 2, 4, 3, seed=16).requires_grad_()  # pooled 4x3 -> 2x3 inside
        assert torch.autograd.gradcheck(
            lambda x, form=form: nst_loss(x, f_t, kernel, form=form, **args), (f_s,)
        )


def test_data_driven_bandwidth_is_detached():
    f_s, f_t = _maps(2, 3, 3, 3, seed=17), _maps(2, 4, 3, 3, seed=18)
    x = f_s.clone().requires_grad_()
    nst_loss(x, f_t, "gaussian").backward()
    # the same gradient as with the bandwidth frozen at its (per-image) data-driven value
    s = f_s.flatten(2) / f_s.flatten(2).norm(dim=2, keepdim=True)
    t = f_t.flatten(2) / f_t.flatten(2).norm(dim=2, keepdim=True)
    z = torch.cat([s, t], 1)
    sigma2 = torch.cdist(z, z).pow(2).sum((1, 2)) / (7 * 6)
    y = f_s.clone().requires_grad_()
    nst_loss(y, f_t, "gaussian", sigma2=sigma2.view(2, 1, 1)).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_gradient_reaches_only_the_student():
    f_s = _maps(2, 4, 5, 3, seed=19, dtype=torch.float32).requires_grad_()
    f_t = _maps(2, 6, 5, 3, seed=20, dtype=torch.float32).requires_grad_()
    for kernel in ("poly", "linear", "gaussian"):
        f_s.grad = None
        nst_loss(f_s, f_t, kernel).backward()
        assert f_t.grad is None
        assert f_s.grad is not None and f_s.grad.abs().sum() > 0
        assert torch.isfinite(f_s.grad).all()


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["samples", "features"])
def test_half_input_under_autocast_matches_fp32(amp_dtype, form):
    s32 = _maps(2, 64, 6, 8, seed=21, dtype=torch.float32)
    t32 = _maps(2, 96, 6, 8, seed=22, dtype=torch.float32)
    f_s, f_t = s32.half(), t32.half()
    ref = nst_loss(f_s.float(), f_t.float(), form=form)
    with torch.autocast("cpu", dtype=amp_dtype):
        got = nst_loss(f_s, f_t, form=form)
    assert got.dtype == torch.float32
    # float32 throughout: agreement to float32 round-off (bf16/fp16 matmuls miss this by ~1e-3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)
    # and within fp16 input quantisation of the float64 value of the unrounded maps
    exact = nst_loss(s32.double(), t32.double(), form=form)
    assert got.item() == pytest.approx(exact.item(), rel=1e-2)


def test_autocast_would_otherwise_lower_precision():
    """Guards the test above: under CPU autocast a bare bmm really runs in bfloat16."""
    x = _maps(1, 64, 48, seed=23, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.bmm(x, x.transpose(1, 2)).dtype == torch.bfloat16


def test_zero_channel_is_finite():
    f_s = _maps(2, 4, 3, 3, seed=24).requires_grad_()
    f_t = _maps(2, 5, 3, 3, seed=25)
    f_t[:, 1] = 0  # a dead (all-zero after ReLU) teacher channel
    with torch.no_grad():
        f_s[:, 2] = 0
    loss = nst_loss(f_s, f_t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f_s.grad).all()
    assert loss.item() == pytest.approx(brute_nst(f_s.detach(), f_t, "poly", {}), rel=1e-9)


def test_reduction_and_argument_errors():
    f_s, f_t = _maps(3, 2, 2, 2, seed=26), _maps(3, 3, 2, 2, seed=27)
    per = nst_loss(f_s, f_t, reduction="none")
    assert per.shape == (3,)
    torch.testing.assert_close(per.mean(), nst_loss(f_s, f_t))
    with pytest.raises(ValueError, match="cubic"):
        nst_loss(f_s, f_t, "cubic")
    with pytest.raises(ValueError, match="batch"):
        nst_loss(f_s, f_t[:2])
    with pytest.raises(ValueError, match="features"):
        nst_loss(f_s, f_t, "gaussian", form="features")
    with pytest.raises(ValueError, match="degree"):
        nst_loss(f_s, f_t, "poly", degree=1.5)
    with pytest.raises(TypeError):
        nst_loss(f_s, f_t, "poly", sigma2=1.0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    ("kernel", "form"),
    [("poly", "samples"), ("poly", "features"), ("gaussian", "auto"), ("linear", "auto")],
)
def test_never_materialises_a_b_c_c_n_tensor(kernel, form):
    b, cs, ct, h, w = 2, 16, 24, 6, 5
    f_s = _maps(b, cs, h, w, seed=28, dtype=torch.float32).requires_grad_()
    f_t = _maps(b, ct, h, w, seed=29, dtype=torch.float32)
    n = h * w
    with _LargestTensor() as probe:
        nst_loss(f_s, f_t, kernel, form=form).backward()
    # inputs, N x N or C x C matrices; far below the smallest broadcast temporary [B, Cs, Ct, N]
    bound = max(b * ct * n, b * n * n, b * ct * ct)
    assert 0 < probe.largest <= bound < b * cs * ct * n // 10


def test_mmd2_batches_over_leading_dimensions():
    x, y = _maps(2, 3, 4, 5, seed=30), _maps(2, 3, 6, 5, seed=31)
    out = mmd2(x, y, "gaussian", sigma2=2.0)
    assert out.shape == (2, 3)
    for i, j in itertools.product(range(2), range(3)):
        torch.testing.assert_close(
            out[i, j], mmd2(x[i, j][None], y[i, j][None], "gaussian", sigma2=2.0)[0]
        )


def test_fused_poly_path_matches_autograd_when_y_needs_grad():
    # y without grad takes the hand-written backward; y with grad takes plain autograd
    x = _maps(2, 40, 30, seed=32).requires_grad_()
    y = _maps(2, 70, 30, seed=33)
    fused = mmd2(x, y, "poly", form="samples")
    (gx_fused,) = torch.autograd.grad(fused.sum(), x)
    y.requires_grad_()
    plain = mmd2(x, y, "poly", form="samples")
    gx_plain, gy = torch.autograd.grad(plain.sum(), (x, y))
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(gx_fused, gx_plain)
    assert gy.abs().sum() > 0


def test_poly2_folds_normalisation_into_the_gram_matrices(monkeypatch):
    # enough teacher channels for the symmetric split; dead, sub-eps and large rows on both sides
    f_s = _maps(2, 40, 5, 6, seed=34)
    f_t = _maps(2, 70, 5, 6, seed=35)
    f_s[:, 3], f_t[:, 7] = 0, 0
    f_s[:, 5] *= 1e-12  # |row| ~ 5e-12 < eps: clamped, as F.normalize does
    f_s[:, 8] *= 1e3
    x = f_s.clone().requires_grad_()
    ref = mmd2(nst_samples(x), nst_samples(f_t), "poly", form="samples")
    (g_ref,) = torch.autograd.grad(ref.sum(), x)

    def no_normalised_copy(f):
        raise AssertionError("the poly-2 path must not normalise the [B, C, N] maps")

    monkeypatch.setattr("nst_det.losses.nst.nst_samples", no_normalised_copy)
    x = f_s.clone().requires_grad_()
    got = nst_loss(x, f_t, form="samples", reduction="none")
    (g_got,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-12)
    assert g_got[:, 8].abs().sum() > 0 and torch.isfinite(g_got).all()
