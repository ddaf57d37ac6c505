"""Masked generative distillation, MGD (Yang et al., ECCV 2022, arXiv 2205.01529)."""

from typing import Optional

import torch
from torch import nn

from ._det_utils import channel_align
from ._utils import check_maps, full_precision
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = ["MGDGenerator", "mgd_loss", "mgd_random_mask"]


class MGDGenerator(nn.Module):
    """MGD's student-side modules: optional 1x1 align conv, then the generator.

    The align conv (Cs -> Ct, with bias) exists only when the channel counts differ; the
    generator is Conv3x3(Ct, Ct) - ReLU - Conv3x3(Ct, Ct), PyTorch default init, as in yzd-v/MGD
    ``FeatureLoss`` and mmrazor ``MGDConnector``. Trained with the student, dropped at export.

    Args:
        student_channels: Cs.
        teacher_channels: Ct.
    Shapes:
        ``align``: [B, Cs, H, W] -> [B, Ct, H, W]; ``generation``: [B, Ct, H, W] -> same.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.align = channel_align(student_channels, teacher_channels)
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Generate the teacher map from the aligned student map x, masked by ``keep``."""
        x = self.align(x)
        if keep is not None:
            x = x * keep
        return self.generation(x)


def mgd_random_mask(
    like: torch.Tensor, mask_ratio: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Random keep-mask [B, 1, H, W] for ``like`` [B, C, H, W]: 1 where rand >= mask_ratio.

    One uniform draw per image and position, shared by all channels. The references drop a
    position when rand > 1 - ratio; keeping it when rand >= ratio has the same keep probability
    1 - ratio, and makes ratio 0 keep every position and ratio 1 drop every one.
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1]; got {mask_ratio}")
    b, _, h, w = like.shape
    device = like.device if generator is None else generator.device
    rand = torch.rand((b, 1, h, w), generator=generator, device=device).to(like.device)
    return (rand >= mask_ratio).to(like.dtype)


@TRANSFER_LOSS_REGISTRY.register(name="mgd")
@full_precision
def mgd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    module: nn.Module,
    mask_ratio: float = 0.45,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """MGD: the teacher map generated from a randomly masked student map, sum squared error / B.

    Yang et al. 2022, "Masked Generative Distillation". With M a random spatial keep-mask
    (:func:`mgd_random_mask`, ratio lambda = ``mask_ratio``) and G the generator of ``module``,
    the loss is sum_{b,c,h,w} (G(align(S) * M) - T)^2 / B (yzd-v/MGD ``get_dis_loss``).
    Defaults of the references: lambda 0.45 with weight alpha 5e-7 (Faster/Mask R-CNN),
    lambda 0.65 with alpha 2e-5 (one-stage detectors), on every FPN output.

    Args:
        f_s: [B, Cs, H, W] student map (gradients flow, also into ``module``).
        f_t: [B, Ct, H, W] teacher map (detached).
        module: an :class:`MGDGenerator` (Cs, Ct); it runs in float32 like the loss.
        mask_ratio: fraction lambda of positions masked out, in [0, 1].
        generator: optional torch.Generator for the mask draw (default: the global RNG).
    Returns:
        Scalar sum of squared errors divided by the batch size.
    """
    check_maps(f_s, f_t, "mgd_loss")
    if f_s.shape[-2:] != f_t.shape[-2:]:
        raise ValueError(
            f"mgd_loss: spatial sizes differ ({tuple(f_s.shape[-2:])} vs {tuple(f_t.shape[-2:])})"
        )
    keep = mgd_random_mask(f_s, mask_ratio, generator)
    gen = _generate(module, f_s, keep)
    f_t = f_t.detach()
    if gen.shape != f_t.shape:
        raise ValueError(f"mgd_loss: generated {tuple(gen.shape)} vs teacher {tuple(f_t.shape)}")
    return (gen - f_t).pow(2).sum() / f_s.shape[0]


def _generate(module: nn.Module, f_s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """module(f_s, keep) in the module's parameter dtype, cast back to f_s's dtype."""
    p = next(module.parameters(), None)
    if p is not None and p.dtype != f_s.dtype:
        return module(f_s.to(p.dtype), keep.to(p.dtype)).to(f_s.dtype)
    return module(f_s, keep)


mgd_loss.build_module = MGDGenerator
