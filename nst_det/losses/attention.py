"""Attention Transfer loss (Zagoruyko & Komodakis 2017, arXiv 1612.03928)."""

import torch
import torch.nn.functional as F

from ._utils import check_maps, full_precision, match_spatial
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["attention_map", "at_loss"]


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """a = sum_c |F_c|^p (Zagoruyko & Komodakis 2017): [B, C, H, W] -> [B, 1, H, W]."""
    return f.abs().pow(p).sum(1, keepdim=True)


@TRANSFER_LOSS_REGISTRY.register(name="at")
@full_precision
def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Activation-based attention transfer (p = 2 by default).

    Zagoruyko & Komodakis 2017, "Paying More Attention to Attention". Each attention map
    a = sum_c |F_c|^p is flattened and L2-normalised per image; the loss is the mean over
    B*N entries of (a_s - a_t)^2, as in the authors' code (weight ~1e3 there). Channel counts
    may differ. Spatial mismatch: the attention maps (not the features) are adaptive-average-
    pooled per dimension down to the smaller H and W, i.e. activation energy is averaged.

    Args:
        f_s: [B, Cs, Hs, Ws] student features (gradients flow).
        f_t: [B, Ct, Ht, Wt] teacher features (detached).
        p: exponent of the attention map.
    Returns:
        Scalar loss.
    """
    check_maps(f_s, f_t, "at_loss")
    a_s, a_t = match_spatial(attention_map(f_s, p), attention_map(f_t.detach(), p))
    a_s = F.normalize(a_s.flatten(1), dim=1)
    a_t = F.normalize(a_t.flatten(1), dim=1)
    return (a_s - a_t).pow(2).mean()
