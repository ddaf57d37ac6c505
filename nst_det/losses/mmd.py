"""Maximum Mean Discrepancy (biased V-statistic) with batched matrix products.

The core :func:`mmd2` is shared by NST (samples = L2-normalised channel maps of one image,
Huang & Wang 2017) and by distribution matching of pooled features (samples = images of a batch,
Montesuma 2025, KD^2M). For x with m samples and y with n samples of dimension D::

    MMD^2 = 1/m^2 sum k(x_i, x_i') + 1/n^2 sum k(y_j, y_j') - 2/(m n) sum k(x_i, y_j)

Two exact evaluation forms exist:

* "samples": kernel matrices between samples, [m, m], [m, n], [n, n] (C x C for NST);
  cost 2 D (m^2 + m n + n^2) flops (less for poly degree 2, which exploits the symmetry of
  y y^T and has a fused backward); works for every kernel.
* "features": for k(x, y) = (x.y)^2 only, MMD^2 = || X^T X / m - Y^T Y / n ||_F^2 with D x D
  second-moment matrices (N x N for NST); cost 2 D^2 (m + n) flops.

Poly degree 2 with c = 0, both forms and the choice between them, is :mod:`.poly2`'s.

The linear kernel needs neither: MMD^2 = || mean(x) - mean(y) ||^2, cost O((m + n) D).
Nothing of size m x n x D is ever formed.
"""

from typing import Optional, Union

import torch

from ._utils import full_precision, normalise_rows, prepare_vectors
from .poly2 import FORMS, cheaper_form, poly2_mmd2
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = [
    "linear_kernel",
    "poly_kernel",
    "gaussian_kernel",
    "mean_pairwise_sq_dist",
    "mmd2",
    "mmd_loss",
]

def linear_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = x.y for all pairs.

    Args:
        x: [..., m, D]; y: [..., n, D].
    Returns:
        [..., m, n] kernel matrix.
    """
    return torch.matmul(x, y.transpose(-1, -2))


def poly_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 2, c: float = 0.0) -> torch.Tensor:
    """k(x, y) = (x.y + c)^degree for all pairs (Huang & Wang 2017, NST's best: d=2, c=0).

    Args:
        x: [..., m, D]; y: [..., n, D].
    Returns:
        [..., m, n] kernel matrix.
    """
    return (torch.matmul(x, y.transpose(-1, -2)) + c).pow(degree)


def gaussian_kernel(
    x: torch.Tensor, y: torch.Tensor, sigma2: Union[float, torch.Tensor]
) -> torch.Tensor:
    """k(x, y) = exp(-||x - y||^2 / (2 sigma2)) for all pairs (Huang & Wang 2017).

    Squared distances are ||x||^2 + ||y||^2 - 2 x.y from one matrix product (clamped at 0
    against round-off), never from an [m, n, D] difference tensor.

    Args:
        x: [..., m, D]; y: [..., n, D].
        sigma2: bandwidth sigma^2, a float or a tensor broadcastable to [..., 1, 1].
    Returns:
        [..., m, n] kernel matrix.
    """
    xx = x.pow(2).sum(-1).unsqueeze(-1)
    yy = y.pow(2).sum(-1).unsqueeze(-2)
    d2 = (xx + yy - 2 * torch.matmul(x, y.transpose(-1, -2))).clamp_min(0)
    return torch.exp(-d2 / (2 * sigma2))


def mean_pairwise_sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared distance over all distinct pairs of the pooled samples z = x U y.

    This is the data-driven default bandwidth sigma^2 of the Gaussian/RBF kernel. It uses
    sum_{i,j} ||z_i - z_j||^2 = 2 M sum_i ||z_i||^2 - 2 ||sum_i z_i||^2 (M = m + n samples),
    so it costs O(M D) and forms neither a pairwise matrix nor a concatenated copy. Clamped
    below at 1e-12 so that identical samples give a finite kernel.

    Args:
        x: [..., m, D]; y: [..., n, D].
    Returns:
        [...] sigma^2 per leading index (not detached; callers detach it).
    """
    m = x.shape[-2] + y.shape[-2]
    sq_norms = x.pow(2).sum((-1, -2)) + y.pow(2).sum((-1, -2))
    total = 2 * m * sq_norms - 2 * (x.sum(-2) + y.sum(-2)).pow(2).sum(-1)
    return (total / (m * (m - 1))).clamp_min(1e-12)


# the form rule lives in poly2 (its only user); kept under this name for existing callers
_cheaper_form = cheaper_form


def _normalised(x, y, eps):
    """x, y with L2-normalised rows when eps is given (kernels that cannot fold it)."""
    return (x, y) if eps is None else (normalise_rows(x, eps), normalise_rows(y, eps))


def _mean_kernel_terms(kxx, kyy, kxy):
    """Combine [B, *, *] kernel matrices into the per-batch MMD^2 [B]."""
    return kxx.mean((-1, -2)) + kyy.mean((-1, -2)) - 2 * kxy.mean((-1, -2))


def _mmd2_linear(x, y, form, eps):
    """[B] MMD^2 for k = x.y: the squared distance of the sample means (cheaper than both forms)."""
    x, y = _normalised(x, y, eps)
    return (x.mean(1) - y.mean(1)).pow(2).sum(-1)


def _mmd2_poly(x, y, form, eps, degree=2, c=0.0):
    """[B] MMD^2 for k = (x.y + c)^degree; degree 2 with c 0 is poly2_mmd2's (either form)."""
    if int(degree) != degree or degree < 1 or c < 0:
        # Positive-definiteness (hence MMD^2 >= 0) needs a positive integer degree and c >= 0.
        raise ValueError(f"poly kernel needs an integer degree >= 1 and c >= 0; got {degree}, {c}")
    degree = int(degree)
    if c == 0 and degree == 1:
        return _mmd2_linear(x, y, form, eps)
    if c == 0 and degree == 2:
        return poly2_mmd2(x, y, form=form, normalise_eps=eps)
    if form == "features":
        raise ValueError(
            "form='features' exists only for the linear kernel and poly (degree 2, c 0)"
        )
    x, y = _normalised(x, y, eps)
    return _mean_kernel_terms(
        poly_kernel(x, x, degree, c), poly_kernel(y, y, degree, c), poly_kernel(x, y, degree, c)
    )


def _mmd2_gaussian(x, y, form, eps, sigma2=None):
    """[B] MMD^2 for the Gaussian kernel; sigma2=None: detached mean pairwise squared distance."""
    if form == "features":
        raise ValueError("form='features' does not exist for the gaussian kernel")
    x, y = _normalised(x, y, eps)
    if sigma2 is None:
        # Data-driven bandwidth, detached: the loss is minimised at a fixed kernel, not by
        # moving the bandwidth (which would let the student inflate distances to shrink MMD).
        sigma2 = mean_pairwise_sq_dist(x.detach(), y.detach()).view(-1, 1, 1)
    elif not torch.is_tensor(sigma2) and sigma2 <= 0:
        raise ValueError(f"sigma2 must be > 0; got {sigma2}")
    return _mean_kernel_terms(
        gaussian_kernel(x, x, sigma2), gaussian_kernel(y, y, sigma2), gaussian_kernel(x, y, sigma2)
    )


_KERNELS = {
    "linear": _mmd2_linear,
    "poly": _mmd2_poly,
    "gaussian": _mmd2_gaussian,
    "rbf": _mmd2_gaussian,
}


def mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: str = "poly",
    *,
    form: str = "auto",
    normalise_eps: Optional[float] = None,
    **kernel_args,
) -> torch.Tensor:
    """Biased (V-statistic) MMD^2 between two sample sets, batched over leading dimensions.

    Gretton et al. 2012; used by NST (Huang & Wang 2017) and KD^2M (Montesuma 2025).
    The value is clamped at 0 (it is >= 0 in exact arithmetic for these positive-definite
    kernels; round-off can make it -1e-8).

    Args:
        x: [..., m, D] samples (gradients flow).
        y: [..., n, D] samples with the same leading shape and D. Detach it yourself if it is a
            teacher; terms with no grad cost no backward.
        kernel: "linear", "poly" (``degree=2``, ``c=0.0``) or "gaussian"/"rbf" (``sigma2=None``:
            the detached mean squared distance over distinct pairs of x U y, per leading index).
        form: "auto" (fewest flops), "samples" ([m, n] kernel matrices) or "features"
            ([D, D] second moments; poly degree 2 with c=0 only). Ignored by "linear".
        normalise_eps: None, or every sample (row) of x and y is L2-normalised first, its norm
            clamped below at this eps (NST's samples). Poly degree 2 with c 0 folds it into
            its Gram matrices (:func:`~.poly2.poly2_mmd2`); other kernels normalise a copy.
    Returns:
        [...] MMD^2 per leading index.
    """
    if kernel not in _KERNELS:
        raise ValueError(f"Unknown MMD kernel {kernel!r}; choose from {sorted(_KERNELS)}")
    if form not in FORMS:
        raise ValueError(f"Unknown form {form!r}; choose from {FORMS}")
    if x.dim() < 2 or x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"mmd2: incompatible sample sets {tuple(x.shape)} and {tuple(y.shape)}")
    lead = x.shape[:-2]
    xb = x.reshape(-1, *x.shape[-2:])
    yb = y.reshape(-1, *y.shape[-2:])
    out = _KERNELS[kernel](xb, yb, form, normalise_eps, **kernel_args)
    return out.clamp_min(0).reshape(lead)


@TRANSFER_LOSS_REGISTRY.register(name="mmd")
@full_precision
def mmd_loss(
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    kernel: str = "rbf",
    sigma2: Optional[float] = None,
) -> torch.Tensor:
    """MMD^2 between the distributions of student and teacher features of a batch (KD^2M).

    Montesuma 2025 (arXiv 2504.01757): each image's pooled feature vector is one sample.
    The RBF bandwidth default is our documented rule (mean squared distance over distinct pairs
    of the pooled student+teacher samples, detached); the KD^2M reference code instead uses
    sigma = mean pairwise distance including the zero diagonal. Pass ``sigma2`` to fix it.

    Args:
        x_s: [b, D] student features ([b, C, *spatial] is average-pooled to [b, C]).
        x_t: [b', D] teacher features (detached).
        kernel: "linear" or "rbf" (also "gaussian", "poly").
        sigma2: RBF bandwidth sigma^2, or None for the data-driven default.
    Returns:
        Scalar MMD^2 (float32, or float64 for float64 inputs).
    """
    x_s, x_t = prepare_vectors(x_s, x_t, "mmd_loss")
    kwargs = {"sigma2": sigma2} if kernel in ("rbf", "gaussian") else {}
    return mmd2(x_s, x_t, kernel, **kwargs)


mmd_loss.same_channels = True  # pooled C-dim vectors, no adapter: refused for other widths
