"""FitNet hint loss and its regressor (Romero et al. 2015, arXiv 1412.6550)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import check_maps, full_precision, match_spatial
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["FitNetRegressor", "fitnet_loss"]


class FitNetRegressor(nn.Module):
    """1x1 convolution mapping student channels Cs to teacher channels Ct (FitNet's regressor).

    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets". It belongs to the student side
    (trained with it, dropped at export).

    Args:
        in_channels: Cs.
        out_channels: Ct.
        bias: whether the convolution has a bias.
        norm: append a BatchNorm2d (as several public re-implementations do); off by default.
    Shapes:
        [B, Cs, H, W] -> [B, Ct, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias and not norm)
        self.norm = nn.BatchNorm2d(out_channels) if norm else nn.Identity()
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


@full_precision
def _hint_mse(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Mean squared error after per-dimension spatial matching (float32 or float64)."""
    f_s, f_t = match_spatial(f_s, f_t)
    return F.mse_loss(f_s, f_t)


@TRANSFER_LOSS_REGISTRY.register(name="fitnet")
def fitnet_loss(
    f_s: torch.Tensor, f_t: torch.Tensor, regressor: Optional[nn.Module] = None
) -> torch.Tensor:
    """FitNet hint loss: mean squared error between regressor(student) and teacher features.

    Romero et al. 2015 use (1/2)||u_h - r(v_g)||^2; here the squared error is averaged over all
    B*Ct*H*W elements (the scale is absorbed by the loss weight). Spatial mismatch is resolved
    per dimension by adaptive average pooling of the larger map (see ``match_spatial``).

    Args:
        f_s: [B, Cs, Hs, Ws] student features (gradients flow, also into ``regressor``).
        f_t: [B, Ct, Ht, Wt] teacher features (detached).
        regressor: module mapping Cs -> Ct, e.g. :class:`FitNetRegressor`; required if Cs != Ct.
            It runs under the caller's autocast/precision; the error is computed in float32.
    Returns:
        Scalar mean squared error.
    """
    check_maps(f_s, f_t, "fitnet_loss")
    if regressor is not None:
        f_s = regressor(f_s)
    if f_s.shape[1] != f_t.shape[1]:
        raise ValueError(
            f"fitnet_loss: student has {f_s.shape[1]} channels, teacher {f_t.shape[1]}; "
            "pass regressor=FitNetRegressor(Cs, Ct)"
        )
    return _hint_mse(f_s, f_t.detach())


fitnet_loss.build_module = FitNetRegressor  # the core builds one regressor per feature pair
