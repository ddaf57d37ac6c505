"""Decoupled knowledge distillation, DKD (Zhao et al., CVPR 2022, arXiv 2203.08679)."""

from typing import Tuple

import torch
import torch.nn.functional as F

from ._utils import full_precision
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["dkd_loss", "dkd_parts"]

_MASK = 1000.0  # subtracted from the target logit (after / T) for NCKD, as mdistiller does


def _check(logits_s, logits_t, target, T):
    if logits_s.dim() != 2 or logits_s.shape != logits_t.shape or logits_s.shape[1] < 2:
        raise ValueError(
            f"dkd expects two [N, K >= 2] logits; got {tuple(logits_s.shape)}, "
            f"{tuple(logits_t.shape)}"
        )
    if target.shape != (logits_s.shape[0],):
        raise ValueError(
            f"dkd: target must be [N] = [{logits_s.shape[0]}]; got {tuple(target.shape)}"
        )
    if T <= 0:
        raise ValueError(f"dkd: temperature T must be > 0; got {T}")


def _binary_log_probs(z: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """log [p_target, 1 - p_target] of softmax(z), [N, 2], computed without log(0)."""
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    log_target = z.gather(1, gt[:, None]) - lse
    log_other = torch.logsumexp(z.scatter(1, gt[:, None], float("-inf")), 1, keepdim=True) - lse
    return torch.cat([log_target, log_other], dim=1)


@full_precision
def dkd_parts(
    logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, T: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DKD's two terms (TCKD, NCKD), each summed per row, averaged over rows, times T^2.

    TCKD = KL(b_t || b_s) with b = [p_target, 1 - p_target] from softmax(z / T);
    NCKD = KL(p^_t || p^_s) with p^ = softmax(z / T - 1000 * onehot(target)), i.e. the
    distribution over the non-target classes (mdistiller ``dkd_loss``). The binary log
    probabilities are taken with logsumexp rather than log of a sum of probabilities.

    Args:
        logits_s: [N, K] student logits (gradients flow).
        logits_t: [N, K] teacher logits (detached).
        target: [N] target class indices (int64).
        T: temperature.
    Returns:
        (tckd, nckd) scalars.
    """
    _check(logits_s, logits_t, target, T)
    target = target.long()
    zs, zt = logits_s / T, logits_t.detach() / T
    n = zs.shape[0]
    log_bs, log_bt = _binary_log_probs(zs, target), _binary_log_probs(zt, target)
    tckd = F.kl_div(log_bs, log_bt, reduction="sum", log_target=True) * (T * T) / n
    gt = F.one_hot(target, zs.shape[1]).to(zs.dtype)
    log_ps = F.log_softmax(zs - _MASK * gt, dim=1)
    pt = F.softmax(zt - _MASK * gt, dim=1)
    nckd = F.kl_div(log_ps, pt, reduction="sum") * (T * T) / n
    return tckd, nckd


@TRANSFER_LOSS_REGISTRY.register(name="dkd")
def dkd_loss(
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 0.25,
    T: float = 1.0,
) -> torch.Tensor:
    """Decoupled KD: alpha * TCKD + beta * NCKD (:func:`dkd_parts`).

    Zhao et al. 2022, "Decoupled Knowledge Distillation". Classical KD equals
    TCKD + (1 - p_t) * NCKD per sample (p_t the teacher's target probability); DKD drops the
    (1 - p_t) coupling and weights the two terms freely. Detection defaults (mdistiller
    ``detection/model/config.py``): alpha 1, beta 0.25, T 1, on the (K+1)-way RoI class logits
    (background index K counts as a class) of the student's sampled proposals.

    Args:
        logits_s: [N, K] student logits (gradients flow).
        logits_t: [N, K] teacher logits (detached).
        target: [N] target class indices.
        alpha, beta: weights of TCKD and NCKD.
        T: temperature.
    Returns:
        Scalar loss (float32 under autocast).
    """
    tckd, nckd = dkd_parts(logits_s, logits_t, target, T=T)
    return alpha * tckd + beta * nckd


dkd_loss.on_logits = True  # on class logits with targets, not on feature pairs (see distill.core)
