"""Small helpers shared by the detection-distillation losses (CWD ... DKD)."""

from typing import List, Sequence

import torch
from torch import nn

from ._utils import check_maps


def run_module(module: nn.Module, x):
    """``module(x)`` in the module's parameter dtype, the result cast back to x's dtype.

    The losses run with autocast off and their inputs upcast to float32 (float64 stays float64,
    for gradcheck); a float32 module fed float64 inputs (or the reverse) would otherwise raise.
    ``x`` may be a tensor or a list of tensors (ReviewKD's fusion takes all levels at once).
    """
    p = next(module.parameters(), None)
    xs = x if isinstance(x, (list, tuple)) else [x]
    if p is None or all(t.dtype == p.dtype for t in xs):
        return module(x)
    src = xs[0].dtype
    if isinstance(x, (list, tuple)):
        return [y.to(src) for y in module([t.to(p.dtype) for t in xs])]
    return module(x.to(p.dtype)).to(src)


def channel_align(student_channels: int, teacher_channels: int) -> nn.Module:
    """[B, Cs, H, W] -> [B, Ct, H, W]: a 1x1 convolution, or the identity when Cs == Ct."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)


def adapted_pair(f_s: torch.Tensor, f_t: torch.Tensor, module: nn.Module, name: str):
    """(adapted student, detached teacher) maps, both [B, Ct, H, W]: the student map [B, Cs, H, W]
    through the loss's adapter ``module``; a ValueError naming the loss unless the shapes agree."""
    check_maps(f_s, f_t, name)
    f_s = run_module(module, f_s)
    if f_s.shape != f_t.shape:
        raise ValueError(
            f"{name}: adapted student {tuple(f_s.shape)} vs teacher {tuple(f_t.shape)}"
        )
    return f_s, f_t.detach()


def box_list(gt_boxes: Sequence, batch: int, device, name: str) -> List[torch.Tensor]:
    """The batch's GT boxes as B float32 (float64 kept) tensors [Ni, 4] on ``device``.

    Each entry may be a tensor [Ni, 4] (xyxy pixels of the padded input) or a detectron2
    ``Boxes`` (its ``.tensor`` is used); an image without boxes is a [0, 4] tensor.
    """
    if len(gt_boxes) != batch:
        raise ValueError(f"{name}: {len(gt_boxes)} box lists for a batch of {batch} images")
    out = []
    for b in gt_boxes:
        b = getattr(b, "tensor", b)
        b = torch.as_tensor(b, device=device)
        b = b.to(torch.float64 if b.dtype == torch.float64 else torch.float32).reshape(-1, 4)
        out.append(b)
    return out


def check_same_shape(f_s: torch.Tensor, f_t: torch.Tensor, name: str) -> None:
    """Raise a ValueError unless student and teacher maps are both [B, C, H, W] of one shape."""
    if f_s.dim() != 4 or f_s.shape != f_t.shape:
        raise ValueError(
            f"{name} expects student and teacher maps [B, C, H, W] of the same shape; got "
            f"{tuple(f_s.shape)} and {tuple(f_t.shape)} (align channels / sizes first)"
        )
