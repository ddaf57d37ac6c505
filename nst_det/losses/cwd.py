"""Channel-wise distillation, CWD (Shu et al., ICCV 2021, arXiv 2011.13256)."""

import torch
import torch.nn.functional as F

from ._det_utils import check_same_shape
from ._utils import full_precision
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["cwd_loss"]


@TRANSFER_LOSS_REGISTRY.register(name="cwd")
@full_precision
def cwd_loss(f_s: torch.Tensor, f_t: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise KL divergence between spatial distributions of each channel.

    Shu et al. 2021, "Channel-wise Knowledge Distillation for Dense Prediction". Every channel
    of every image is turned into a distribution over its H*W positions, softmax(x / tau); the
    loss is KL(teacher || student) summed over positions, times tau^2, averaged over the B*C
    channel maps (the normalisation of mmrazor's ``ChannelWiseDivergence``, which keeps the
    teacher-entropy term, so the value is a true KL >= 0 and 0 for equal inputs).
    The reference weights it by 10 on all five FPN outputs (mmrazor v1 configs), tau = 1.

    Args:
        f_s: [B, C, H, W] student map (gradients flow).
        f_t: [B, C, H, W] teacher map (detached); the same shape (the caller aligns channels).
        tau: softmax temperature (> 0).
    Returns:
        Scalar: tau^2 / (B*C) * sum_{b,c} KL(softmax(t_bc / tau) || softmax(s_bc / tau)).
    """
    check_same_shape(f_s, f_t, "cwd_loss")
    if tau <= 0:
        raise ValueError(f"cwd_loss: tau must be > 0; got {tau}")
    b, c = f_s.shape[:2]
    log_p_s = F.log_softmax(f_s.flatten(2) / tau, dim=-1)
    log_p_t = F.log_softmax(f_t.detach().flatten(2) / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * (tau * tau) / (b * c)


cwd_loss.same_channels = True  # no adapter: the core refuses pairs of other widths when built
