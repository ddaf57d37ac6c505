"""MMD^2 for the degree-2 polynomial kernel k(x, y) = (x.y)^2, optionally of L2-normalised rows.

The one implementation behind NST's poly kernel (Huang & Wang 2017, arXiv 1707.01219: the
paper's best kernel; samples = L2-normalised channel maps) and :func:`~.mmd.mmd2`'s poly kernel
with degree 2, c = 0 (Gretton et al. 2012). For x with m samples and y with n samples of
dimension D, per batch index::

    MMD^2 = ||x x^T||_F^2 / m^2 + ||y y^T||_F^2 / n^2 - 2 ||x y^T||_F^2 / (m n)
          = ||x^T x / m - y^T y / n||_F^2

Two exact forms, and this module is the one place that picks between them (:func:`cheaper_form`):

* "samples": the three [m, m], [m, n], [n, n] Gram matrices (C x C for NST at detection sizes),
  y y^T from three half-size blocks (it is symmetric), a fused hand-written backward, and, with
  ``normalise_eps``, the row normalisation folded into the Gram matrices: no normalised copy of x
  or y is ever made.
* "features": the [D, D] second-moment matrices (N x N for NST on 7x7 maps); plain autograd.
"""

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._utils import normalise_rows

__all__ = ["FORMS", "cheaper_form", "poly2_mmd2"]

FORMS = ("auto", "samples", "features")


def cheaper_form(m: int, n: int, d: int, with_grad: bool) -> str:
    """The evaluation form ("samples" or "features") with fewer matmul flops, backward included.

    Args:
        m, n: sample counts of x and y (Cs, Ct for NST); d: their dimension (N = H*W for NST).
        with_grad: whether x's backward will run.
    """
    # samples: x x^T, x y^T, 3/4 of y y^T (see _gram_sq_norm); backward kxx x and kxy y.
    # features: y^T y, x^T x; autograd's backward of the baddbmm adds two x-sized products.
    samples = d * (m * m + m * n + 0.75 * n * n + (m * m + m * n if with_grad else 0))
    features = d * d * (m + n + (2 * m if with_grad else 0))
    return "features" if features < samples else "samples"


def _row_norms_of_gram(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """Row L2 norms behind a Gram matrix (its diagonal), clamped at eps: [B, n, n] -> [B, n]."""
    return gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(eps)


def _scale_gram(gram: torch.Tensor, left: Optional[torch.Tensor], right: Optional[torch.Tensor]):
    """gram_ij / (left_i right_j): [B, m, n], [B, m], [B, n] -> [B, m, n]; None: unscaled."""
    if left is None:
        return gram
    return gram / (left.unsqueeze(2) * right.unsqueeze(1))


def _gram_sq_norm(y: torch.Tensor, eps: Optional[float]):
    """||y y^T||_F^2 per batch: [B, n, D] -> ([B], row norms [B, n] or None).

    With ``eps``, y's rows count as L2-normalised (norms clamped at eps), the division folded
    into the small products, and the norms used are returned too. y y^T is symmetric, so with y
    split into row halves a, b it equals ||a a^T||^2 + ||b b^T||^2 + 2 ||a b^T||^2: 3/4 of the
    full product's flops.
    """
    def norms(gram):
        return None if eps is None else _row_norms_of_gram(gram, eps)

    def sq_sum(gram, left, right):
        return _scale_gram(gram, left, right).pow(2).sum((1, 2))

    h = y.shape[1] // 2
    if h < 32:  # small: one product is cheaper than three
        gyy = torch.bmm(y, y.transpose(1, 2))
        ny = norms(gyy)
        return sq_sum(gyy, ny, ny), ny
    a, b = y[:, :h], y[:, h:]
    gaa, gbb = torch.bmm(a, a.transpose(1, 2)), torch.bmm(b, b.transpose(1, 2))
    na, nb = norms(gaa), norms(gbb)
    total = (sq_sum(gaa, na, na) + sq_sum(gbb, nb, nb)
             + 2 * sq_sum(torch.bmm(a, b.transpose(1, 2)), na, nb))
    return total, (None if na is None else torch.cat([na, nb], 1))


class _Poly2SamplesMMD(torch.autograd.Function):
    """[B] MMD^2 for k = (s.t)^2 from Gram matrices; y constant; rows optionally normalised.

    Without normalisation (s = x, t = y), the closed form dL/dx = A x + B y with
    A = 4 kxx / m^2, B = -4 kxy / (m n) is one fused product; autograd on the plain expression
    would spend two products on x x^T and accumulate three x-sized gradients.

    With ``eps`` (s = x / |x|, t = y / |y|, norms clamped at eps as in F.normalize), a normalised
    Gram is the raw one divided by the outer product of the row norms, which are the raw Gram's
    diagonal, so no normalised [B, C, N] copy is made in forward or backward (at FPN p2 of an
    800x1333 image those passes cost about as much as one of the products). Through the
    normalisation dx_i = (dL/ds_i - r_i s_i) / |x_i| with r_i = dL/ds_i . s_i
    = sum_j A_ij kss_ij + B_ij kst_ij (r_i = 0 where |x_i| is clamped): still one fused product
    M1 x + M2 y with C x C matrices. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, y, eps):
        m, n = x.shape[1], y.shape[1]
        gxx = torch.bmm(x, x.transpose(1, 2))
        nx = None if eps is None else _row_norms_of_gram(gxx, eps)
        kyy_sum, ny = _gram_sq_norm(y, eps)
        kxx = _scale_gram(gxx, nx, nx)
        kxy = _scale_gram(torch.bmm(x, y.transpose(1, 2)), nx, ny)
        ctx.eps = eps
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
        g = grad.view(-1, 1, 1)  # scale the small matrices, not the [B, m, D] result
        a = kxx * (g * 4.0 / (m * m))
        b = kxy * (g * (-4.0 / (m * n)))
        if ctx.eps is not None:
            r = (a * kxx).sum(2) + (b * kxy).sum(2)
            r = torch.where(nx > ctx.eps, r, torch.zeros_like(r))
            a = _scale_gram(a - torch.diag_embed(r), nx, nx)
            b = _scale_gram(b, nx, ny)
        return torch.baddbmm(torch.bmm(b, y), a, x), None, None


def poly2_mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    form: str = "auto",
    normalise_eps: Optional[float] = None,
) -> torch.Tensor:
    """Biased MMD^2 with k(x, y) = (x.y)^2 (Gretton et al. 2012; NST's kernel, Huang & Wang 2017).

    Args:
        x: [B, m, D] samples (gradients flow).
        y: [B, n, D] samples. Detach it if it is a teacher: a constant y takes the fused
            "samples" path; a y that needs grad gets plain autograd.
        form: "auto" (fewest flops, :func:`cheaper_form`), "samples" or "features".
        normalise_eps: None, or every row of x and y is L2-normalised first (norm floor eps, as
            F.normalize), folded into the Gram matrices on the fused path.
    Returns:
        [B] MMD^2 (not clamped; round-off can make it -1e-8).
    """
    if form not in FORMS:
        raise ValueError(f"Unknown form {form!r}; choose from {FORMS}")
    if form == "auto":
        form = cheaper_form(x.shape[1], y.shape[1], x.shape[2], x.requires_grad)
    if form == "samples" and not y.requires_grad:  # the usual case: y is the detached teacher
        return _Poly2SamplesMMD.apply(x, y, normalise_eps)
    if normalise_eps is not None:
        x, y = normalise_rows(x, normalise_eps), normalise_rows(y, normalise_eps)
    if form == "features":
        # ||X^T X/m - Y^T Y/n||_F^2: one D x D product per side, fused into one baddbmm.
        gy = torch.bmm(y.transpose(1, 2), y)
        diff = torch.baddbmm(
            gy, x.transpose(1, 2), x, beta=1.0 / y.shape[1], alpha=-1.0 / x.shape[1]
        )
        return diff.pow(2).sum((1, 2))
    m, n = x.shape[1], y.shape[1]

    def sq_sum(a, b):
        return torch.bmm(a, b.transpose(1, 2)).pow(2).sum((1, 2))

    return sq_sum(x, x) / (m * m) + sq_sum(y, y) / (n * n) - 2 * sq_sum(x, y) / (m * n)
