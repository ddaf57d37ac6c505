"""The detection-distillation losses under CPU bf16 autocast and with bf16 inputs: each comes
out float32, finite, and equal to its float32 value.
"""

import torch
from _det_loss_cases import FGD_BOXES, _rand

from nst_det.losses import (
    DeFeatAdapter,
    FGDGlobal,
    FGFIAdapter,
    MGDGenerator,
    ReviewKDFusion,
    cwd_loss,
    defeat_loss,
    dkd_loss,
    fgd_loss,
    fgfi_loss,
    hcl_loss,
    mgd_loss,
    pkd_loss,
    reviewkd_loss,
)


def _float32_cases():
    torch.manual_seed(0)
    s = _rand(2, 3, 6, 8, seed=59, dtype=torch.float32)
    t = _rand(2, 4, 6, 8, seed=60, dtype=torch.float32)
    t3 = _rand(2, 3, 6, 8, seed=61, dtype=torch.float32)
    boxes = [b.float() for b in FGD_BOXES]
    mgd = MGDGenerator(3, 4)
    fgd = FGDGlobal(3, 4)
    de, fi = DeFeatAdapter(3, 4), FGFIAdapter(3, 4)
    rk = ReviewKDFusion([3, 3], [4, 4], mid_channels=8)
    zs, zt = _rand(4, 5, seed=62, dtype=torch.float32), _rand(4, 5, seed=63, dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 4])
    return {
        "cwd": lambda: cwd_loss(s, t3),
        "pkd": lambda: pkd_loss(s, t3),
        "mgd": lambda: mgd_loss(s, t, module=mgd, generator=torch.Generator().manual_seed(0)),
        "fgd": lambda: fgd_loss(s, t, boxes, 4, module=fgd),
        "defeat": lambda: defeat_loss(s, t, boxes, 4, module=de),
        "fgfi": lambda: fgfi_loss(s, t, boxes, 4, module=fi, level_strides=None),
        "reviewkd": lambda: reviewkd_loss([s, s[..., ::2, ::2]], [t, t[..., ::2, ::2]], module=rk),
        "dkd": lambda: dkd_loss(zs, zt, y),
    }


def test_bf16_autocast_on_cpu_gives_float32_finite_losses():
    for name, fn in _float32_cases().items():
        ref = fn()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn()
        assert got.dtype == torch.float32, name
        assert torch.isfinite(got), name
        torch.testing.assert_close(got, ref, msg=name)


def test_bf16_inputs_are_upcast():
    s = _rand(2, 3, 4, 4, seed=64, dtype=torch.float32).bfloat16()
    t = _rand(2, 3, 4, 4, seed=65, dtype=torch.float32).bfloat16()
    module = DeFeatAdapter(3, 3)
    fusion = ReviewKDFusion([3], [3], mid_channels=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for got in (
            cwd_loss(s, t),
            pkd_loss(s, t),
            defeat_loss(s, t, [torch.zeros(0, 4)] * 2, 4, module=module),
            hcl_loss([s], [t]),
            reviewkd_loss([s], [t], module=fusion),
        ):
            assert got.dtype == torch.float32 and torch.isfinite(got)
