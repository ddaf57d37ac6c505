"""Similarity-Preserving KD loss (Tung & Mori 2019, arXiv 1907.09682)."""

import torch
import torch.nn.functional as F

from ._utils import full_precision
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["sp_loss"]


def _batch_similarity(f: torch.Tensor) -> torch.Tensor:
    """Row-L2-normalised b x b Gram matrix of the flattened activations [b, ...]."""
    q = f.flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1)


@TRANSFER_LOSS_REGISTRY.register(name="sp")
@full_precision
def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving loss || G_t - G_s ||_F^2 / b^2.

    Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation". Q = activations flattened
    to [b, C*H*W]; G = Q Q^T with each row L2-normalised. Only b x b matrices are compared, so
    channel counts and spatial sizes of student and teacher may differ freely.

    Args:
        f_s: [b, ...] student activations, e.g. [b, Cs, Hs, Ws] (gradients flow).
        f_t: [b, ...] teacher activations, e.g. [b, Ct, Ht, Wt] (detached).
    Returns:
        Scalar loss (gamma = 3000 is the usual weight in public code).
    """
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"sp_loss: batch sizes differ ({f_s.shape[0]} vs {f_t.shape[0]})")
    b = f_s.shape[0]
    diff = _batch_similarity(f_t.detach()) - _batch_similarity(f_s)
    return diff.pow(2).sum() / (b * b)
