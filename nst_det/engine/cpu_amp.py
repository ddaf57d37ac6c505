"""SOLVER.AMP.ENABLED on a CPU: bfloat16 autocast around the training forward.

detectron2 v0.6 implements SOLVER.AMP.ENABLED with its AMPTrainer, which needs CUDA (float16 and a
gradient scaler). On a CPU with bfloat16 support, autocast speeds training up as well
(benchmarks/bench_mixed_precision.py), and bfloat16 has float32's exponent range, so no gradient
scaler is needed: only the forward pass runs under autocast, backward and the optimizer step are
the usual ones. Evaluation (model.eval()) stays in float32.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def autocast_training_forward(model: nn.Module, device_type: str = "cpu",
                              dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Make `model.forward` run under torch.autocast while the model is in training mode.

    Only the instance's forward is wrapped: parameters, state_dict and hooks are unchanged, so
    checkpoints are the same as without autocast. Returns the model.
    """
    forward = model.forward

    @functools.wraps(forward)
    def forward_under_autocast(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype, enabled=model.training):
            return forward(*args, **kwargs)

    model.forward = forward_under_autocast
    return model


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 / AMX); without it,
    bfloat16 autocast is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
