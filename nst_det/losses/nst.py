"""Neuron Selectivity Transfer loss (Huang & Wang 2017, arXiv 1707.01219)."""

import torch

from ._utils import check_maps, full_precision, match_spatial, normalise_rows
from .mmd import mmd2
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["nst_loss", "nst_samples"]

# Row-normalisation floor: a dead (all-zero) channel stays a zero sample instead of NaN.
_NORM_EPS = 1e-10


def nst_samples(f: torch.Tensor) -> torch.Tensor:
    """NST samples of a map: [B, C, H, W] -> [B, C, H*W], each channel row L2-normalised."""
    return normalise_rows(f.flatten(2), _NORM_EPS)


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

    Alignment is the caller's job where it knows the geometry: the distillation core aligns
    each pair once with ``distill.align_pair`` (stride-aware pooling, padding crop) for every
    distilling model, classifier or detector, so the maps arrive with equal sizes and nothing
    is pooled here. Only for a direct call with maps of different sizes is the mismatch
    resolved here, per dimension before flattening: in H and in W separately, the larger map is
    adaptive-average-pooled down to the smaller extent (so e.g. 38x50 vs 19x25, or Hs > Ht with
    Ws < Wt, all work; square maps are never assumed).

    Cost: batched matrix products only. ``form="auto"`` picks, by flop count, the C x C form
    (kernel matrices between channels) or, for poly degree 2 with c = 0, the N x N form
    ||S^T S / Cs - T^T T / Ct||_F^2; linear uses ||mean(S) - mean(T)||^2. No [B, C, C, N]
    tensor is formed. In the C x C form of poly degree 2 (the paper's kernel, and the detection
    case) the row normalisation is folded into the Gram matrices (``poly2.poly2_mmd2``): no
    normalised copy of the maps either. Computation is float32 even under autocast (float64
    stays float64).

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
    # a no-op (no pooling, no copy) for maps of equal size, e.g. pairs from align_pair
    f_s, f_t = match_spatial(f_s, f_t.detach())
    # mmd2 normalises the channel rows (folded into the Gram matrices for poly degree 2)
    per_image = mmd2(
        f_s.flatten(2), f_t.flatten(2), kernel, form=form, normalise_eps=_NORM_EPS, **kernel_args
    )
    return per_image.mean() if reduction == "mean" else per_image
