"""PKD: distillation via Pearson correlation (Cao et al., NeurIPS 2022, arXiv 2207.02039)."""

import torch
import torch.nn.functional as F

from ._utils import check_maps, full_precision
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["pkd_loss", "pkd_standardise"]

_EPS = 1e-6  # added to the standard deviation, as mmrazor's PKDLoss.norm does


def pkd_standardise(f: torch.Tensor) -> torch.Tensor:
    """Each channel of f [B, C, H, W] to zero mean, unit std over (B, H, W) jointly.

    The statistics are taken over the whole batch and all positions of one channel; the std is
    the unbiased one, and 1e-6 is added to it (mmrazor ``PKDLoss.norm``). No affine. A channel
    of one value (B*H*W = 1, e.g. one image's 1x1 top level) standardises to 0, not NaN: one
    value has no correlation to transfer.
    """
    mean = f.mean(dim=(0, 2, 3), keepdim=True)
    if f.numel() == f.shape[1]:  # the unbiased std of one value is 0/0
        return (f - mean) / _EPS  # exactly 0, and still on the autograd graph
    std = f.std(dim=(0, 2, 3), keepdim=True, unbiased=True)
    return (f - mean) / (std + _EPS)


@TRANSFER_LOSS_REGISTRY.register(name="pkd")
@full_precision
def pkd_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the channel-standardised maps, halved.

    Cao et al. 2022, "PKD: General Distillation Framework for Object Detectors via Pearson
    Correlation Coefficient". After standardising each channel (:func:`pkd_standardise`), the
    MSE/2 equals (n - 1) / n * (1 - r) up to the eps, r the Pearson correlation between the two
    maps of a channel and n = B*H*W its values (the std is the unbiased one; on FPN-sized maps
    this is 1 - r), so the loss ignores each channel's scale and offset. mmrazor's ``PKDLoss``
    (``resize_stu=True``): a student map of another H x W is bilinearly resized to the teacher's
    first. Reference weights: 6 on p2-p5 (Faster R-CNN), 10 on the first 4 levels (RetinaNet).

    Args:
        f_s: [B, C, Hs, Ws] student map (gradients flow).
        f_t: [B, C, Ht, Wt] teacher map (detached); channel counts must match.
    Returns:
        Scalar: mean over B*C*Ht*Wt of (norm(s) - norm(t))^2, divided by 2.
    """
    check_maps(f_s, f_t, "pkd_loss")
    if f_s.shape[1] != f_t.shape[1]:
        raise ValueError(
            f"pkd_loss: channel counts differ ({f_s.shape[1]} vs {f_t.shape[1]}); align them first"
        )
    f_t = f_t.detach()
    if f_s.shape[-2:] != f_t.shape[-2:]:
        f_s = F.interpolate(f_s, size=f_t.shape[-2:], mode="bilinear", align_corners=False)
    return F.mse_loss(pkd_standardise(f_s), pkd_standardise(f_t)) / 2


pkd_loss.same_channels = True  # no adapter: the core refuses pairs of other widths when built
