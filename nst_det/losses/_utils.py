"""Helpers shared by the transfer losses: precision policy, input preparation, spatial matching."""

import functools

import torch
import torch.nn.functional as F


def full_precision(fn):
    """Run ``fn`` with autocast off and its floating tensor arguments upcast to >= float32.

    Transfer losses are differences of near-equal sums (MMD^2, Gram differences), so fp16/bf16
    would lose most significant digits. float64 is kept (and wins if any argument is float64)
    so that ``torch.autograd.gradcheck`` can run in double precision.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        floats = [
            a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()
        ]
        if not floats:
            return fn(*args, **kwargs)
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in floats) else torch.float32

        def cast(a):
            return a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a

        with torch.autocast(device_type=floats[0].device.type, enabled=False):
            return fn(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper


def match_spatial(a: torch.Tensor, b: torch.Tensor):
    """Bring two maps [B, *, Ha, Wa] and [B, *, Hb, Wb] to a common (H, W), per dimension.

    Each of H and W is resolved separately: the larger extent is adaptive-average-pooled down to
    the smaller one, so H != W and, e.g., (Hs > Ht, Ws < Wt) are handled without assuming square
    maps. Pooling (not interpolation) is used because it never invents detail the smaller map lacks.
    """
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def check_maps(f_s: torch.Tensor, f_t: torch.Tensor, name: str) -> None:
    """Raise a ValueError unless f_s, f_t are 4-D maps with the same batch size."""
    if f_s.dim() != 4 or f_t.dim() != 4:
        raise ValueError(
            f"{name} expects feature maps [B, C, H, W]; got {tuple(f_s.shape)} and "
            f"{tuple(f_t.shape)}"
        )
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"{name}: batch sizes differ ({f_s.shape[0]} vs {f_t.shape[0]})")


def as_vectors(x: torch.Tensor, name: str) -> torch.Tensor:
    """[n, D] stays; [n, C, *spatial] is global-average-pooled to [n, C] (pooled features)."""
    if x.dim() < 2:
        raise ValueError(f"{name} expects [n, D] or [n, C, *spatial]; got {tuple(x.shape)}")
    return x if x.dim() == 2 else x.flatten(2).mean(-1)


def normalise_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row of x [..., n, D] divided by its L2 norm, clamped below at eps (F.normalize)."""
    return F.normalize(x, p=2, dim=-1, eps=eps)


def check_vectors(x_s: torch.Tensor, x_t: torch.Tensor, name: str) -> None:
    """Raise a ValueError unless the two feature batches share their feature dimension."""
    if x_s.shape[-1] != x_t.shape[-1]:
        raise ValueError(
            f"{name}: feature dimensions differ ({x_s.shape[-1]} vs {x_t.shape[-1]}); "
            "project the student features to the teacher's dimension first (e.g. nn.Linear)"
        )


def prepare_vectors(x_s: torch.Tensor, x_t: torch.Tensor, name: str):
    """Pooled [b, D] student and detached teacher features with matching D (KD^2M losses).

    Maps [b, C, *spatial] are global-average-pooled to [b, C] (:func:`as_vectors`); a
    ValueError names ``name`` when the feature dimensions differ.
    """
    x_s = as_vectors(x_s, name)
    x_t = as_vectors(x_t, name).detach()
    check_vectors(x_s, x_t, name)
    return x_s, x_t
