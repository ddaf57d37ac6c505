"""Neuron Selectivity Transfer loss (Huang & Wang 2017, arXiv 1707.01219)."""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._utils import check_maps, full_precision, match_spatial
from .mmd import _cheaper_form, mmd2
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["nst_loss", "nst_samples"]

# Row-normalisation floor: a dead (all-zero) channel stays a zero sample instead of NaN.
_NORM_EPS = 1e-10


def nst_samples(f: torch.Tensor) -> torch.Tensor:
    """NST samples of a map: [B, C, H, W] -> [B, C, H*W], each channel row L2-normalised."""
    return F.normalize(f.flatten(2), p=2, dim=2, eps=_NORM_EPS)


def _row_norms(gram: torch.Tensor) -> torch.Tensor:
    """Clamped L2 norms of the rows behind a Gram matrix: [B, C, C] -> [B, C]."""
    return gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(_NORM_EPS)


def _scaled(gram: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """gram_ij / (left_i right_j): [B, m, n], [B, m], [B, n] -> [B, m, n]."""
    return gram / (left.unsqueeze(2) * right.unsqueeze(1))


def _teacher_terms(y: torch.Tensor):
    """Row norms [B, n] and sum_ij k(t_i, t_j) [B] of the normalised teacher rows.

    y y^T is symmetric: with the rows split in halves a, b, three products (a a^T, b b^T, a b^T)
    cover it, 3/4 of the full product's flops.
    """
    h = y.shape[1] // 2
    if h < 32:  # small: one product is cheaper than three
        gyy = torch.bmm(y, y.transpose(1, 2))
        ny = _row_norms(gyy)
        return ny, _scaled(gyy, ny, ny).pow(2).sum((1, 2))
    a, b = y[:, :h], y[:, h:]
    gaa, gbb = torch.bmm(a, a.transpose(1, 2)), torch.bmm(b, b.transpose(1, 2))
    na, nb = _row_norms(gaa), _row_norms(gbb)
    cross = _scaled(torch.bmm(a, b.transpose(1, 2)), na, nb).pow(2).sum((1, 2))
    total = _scaled(gaa, na, na).pow(2).sum((1, 2)) + _scaled(gbb, nb, nb).pow(2).sum((1, 2))
    return torch.cat([na, nb], 1), total + 2 * cross


class _NSTPoly2(torch.autograd.Function):
    """[B] NST MMD^2 for k = (s.t)^2 from raw maps x [B, m, N], y [B, n, N]; y constant.

    Row normalisation is folded into the small Gram matrices (a normalised Gram is the raw one
    divided by the outer product of the row norms, which are the raw Gram's diagonal), so no
    normalised [B, C, N] copy is made in forward or backward: at FPN p2 of an 800x1333 image
    those passes cost about as much as one of the matrix products. Backward, with s = x / |x|:
    dL/ds = A s + B t, A = 4 kss / m^2, B = -4 kst / (m n); through the normalisation
    dx_i = (dL/ds_i - r_i s_i) / |x_i| with r_i = dL/ds_i . s_i = sum_j A_ij kss_ij + B_ij kst_ij
    (r_i = 0 where |x_i| is clamped at eps, as in F.normalize): one fused product M1 x + M2 y
    with C x C matrices. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, y):
        m, n = x.shape[1], y.shape[1]
        gxx = torch.bmm(x, x.transpose(1, 2))
        nx = _row_norms(gxx)
        ny, kyy_sum = _teacher_terms(y)
        kxx = _scaled(gxx, nx, nx)
        kxy = _scaled(torch.bmm(x, y.transpose(1, 2)), nx, ny)
        ctx.save_for_backward(x, y, kxx, kxy, nx, ny)
        return (
            kxx.pow(2).sum((1, 2)) / (m * m)
            + kyy_sum / (n * n)
            - 2 * kxy.pow(2).sum((1, 2)) / (m * n)
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, kxx, kxy, nx, ny = ctx.saved_tensors
        m, n = x.shape[1], y.shape[1]
        g = grad.view(-1, 1, 1)  # scale the small matrices, not the [B, m, N] result
        a = kxx * (g * 4.0 / (m * m))
        b = kxy * (g * (-4.0 / (m * n)))
        r = (a * kxx).sum(2) + (b * kxy).sum(2)
        r = torch.where(nx > _NORM_EPS, r, torch.zeros_like(r))
        m1 = _scaled(a - torch.diag_embed(r), nx, nx)
        m2 = _scaled(b, nx, ny)
        return torch.baddbmm(torch.bmm(m2, y), m1, x), None


@TRANSFER_LOSS_REGISTRY.register(name="nst")
@full_precision
def nst_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    kernel: str = "poly",
    *,
    form: str = "auto",
    reduction: str = "mean",
    **kernel_args,
) -> torch.Tensor:
    """Neuron Selectivity Transfer: MMD^2 between the student's and teacher's channel maps.

    Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer".
    For each image, every channel's spatial map (flattened to N = H*W values, L2-normalised) is
    one sample; the loss is the true MMD^2 between the Cs student samples and the Ct teacher
    samples, including the (constant, detached) teacher-teacher term, so the value is >= 0.
    The paper's lambda/2 weight is not applied here.

    Spatial mismatch is resolved per dimension before flattening: in H and in W separately,
    the larger map is adaptive-average-pooled down to the smaller extent (so e.g. 38x50 vs 19x25,
    or Hs > Ht with Ws < Wt, all work; square maps are never assumed).

    Cost: batched matrix products only. ``form="auto"`` picks, by flop count, the C x C form
    (kernel matrices between channels) or, for poly degree 2 with c = 0, the N x N form
    ||S^T S / Cs - T^T T / Ct||_F^2; linear uses ||mean(S) - mean(T)||^2. No [B, C, C, N]
    tensor is formed. In the C x C form of poly degree 2 (the paper's kernel, and the detection
    case) the row normalisation is folded into the Gram matrices (`_NSTPoly2`): no normalised
    copy of the maps either. Computation is float32 even under autocast (float64 stays float64).

    Args:
        f_s: [B, Cs, Hs, Ws] student features (gradients flow).
        f_t: [B, Ct, Ht, Wt] teacher features (detached). Cs != Ct is allowed.
        kernel: "poly" (``degree=2``, ``c=0.0``), "linear" or "gaussian" (``sigma2``: float;
            default None = per image, the mean squared distance over all distinct pairs of the
            pooled Cs + Ct normalised samples, detached).
        form: "auto", "samples" (C x C) or "features" (N x N; poly degree 2, c=0 only).
        reduction: "mean" over the batch, or "none" for the per-image [B] values.
    Returns:
        Scalar batch-mean MMD^2 (or [B] with reduction="none"), float32 (float64 for float64 input).
    """
    check_maps(f_s, f_t, "nst_loss")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    f_s, f_t = match_spatial(f_s, f_t.detach())
    poly2 = kernel == "poly" and kernel_args.get("degree", 2) == 2 and not kernel_args.get("c")
    if poly2 and form == "auto":
        form = _cheaper_form(f_s.shape[1], f_t.shape[1], f_s[0, 0].numel(), f_s.requires_grad)
    if poly2 and form == "samples" and set(kernel_args) <= {"degree", "c"}:
        # clamped like mmd2: >= 0 exactly, round-off can make it -1e-8
        per_image = _NSTPoly2.apply(f_s.flatten(2), f_t.flatten(2)).clamp_min(0)
    else:
        per_image = mmd2(nst_samples(f_s), nst_samples(f_t), kernel, form=form, **kernel_args)
    return per_image.mean() if reduction == "mean" else per_image
