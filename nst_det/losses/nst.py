"""Neuron Selectivity Transfer loss (Huang & Wang 2017, arXiv 1707.01219)."""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._utils import check_maps, full_precision, match_spatial
from .mmd import _cheaper_form, _gram_sq_norm, mmd2, row_norms_of_gram, scale_gram
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["nst_loss", "nst_samples"]

# Row-normalisation floor: a dead (all-zero) channel stays a zero sample instead of NaN.
_NORM_EPS = 1e-10


def nst_samples(f: torch.Tensor) -> torch.Tensor:
    """NST samples of a map: [B, C, H, W] -> [B, C, H*W], each channel row L2-normalised."""
    return F.normalize(f.flatten(2), p=2, dim=2, eps=_NORM_EPS)


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
        nx = row_norms_of_gram(gxx, _NORM_EPS)
        kyy_sum, ny = _gram_sq_norm(y, _NORM_EPS)  # symmetric: 3/4 of a full product
        kxx = scale_gram(gxx, nx, nx)
        kxy = scale_gram(torch.bmm(x, y.transpose(1, 2)), nx, ny)
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
        m1 = scale_gram(a - torch.diag_embed(r), nx, nx)
        m2 = scale_gram(b, nx, ny)
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
