"""Knowledge Distillation loss (Hinton, Vinyals & Dean 2015, arXiv 1503.02531)."""

import torch
import torch.nn.functional as F

from ._utils import full_precision
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["kd_loss"]


@TRANSFER_LOSS_REGISTRY.register(name="kd")
@full_precision
def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over rows.

    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network". The T^2 factor keeps
    the gradient scale independent of T (the NST paper's KD weight 16 at T = 4 is this factor).

    Args:
        logits_s: [B, K] student logits (gradients flow).
        logits_t: [B, K] teacher logits (detached).
        T: softmax temperature (> 0).
    Returns:
        Scalar: summed KL per row, mean over the B rows ("batchmean"), times T^2.
    """
    if logits_s.shape != logits_t.shape or logits_s.dim() != 2:
        raise ValueError(
            f"kd_loss expects two [B, K] logits; got {tuple(logits_s.shape)}, "
            f"{tuple(logits_t.shape)}"
        )
    if T <= 0:
        raise ValueError(f"temperature T must be > 0; got {T}")
    log_p_s = F.log_softmax(logits_s / T, dim=1)
    log_p_t = F.log_softmax(logits_t.detach() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)
