"""SOLVER.AMP.ENABLED on a CPU: bfloat16 autocast around the training forward.

detectron2 v0.6 implements SOLVER.AMP.ENABLED with its AMPTrainer, which needs CUDA (float16 and a
gradient scaler). On a CPU with bfloat16 support, autocast speeds training up as well
(benchmarks/bench_mixed_precision.py), and bfloat16 has float32's exponent range, so no gradient
scaler is needed: only the forward pass runs under autocast, backward and the optimizer step are
the usual ones. Evaluation (model.eval()) stays in float32.
"""

from __future__ import annotations

import torch
from torch import nn


class TrainingAutocast(nn.Module):
    """`module` called under torch.autocast while it is in training mode.

    The step trainer (SimpleTrainer) is given this wrapper; `ReliableTrainer.model`, its
    checkpointer, hooks and evaluation keep the module itself, so checkpoints hold the module's
    own state_dict keys, exactly as without autocast (this wrapper's own keys would carry a
    "module." prefix). The module is not modified: calling it directly runs in float32.

    Args:
        module: the model (or its DDP wrapper) the step trainer calls.
        device_type, dtype: as for torch.autocast.
    """

    def __init__(self, module: nn.Module, device_type: str = "cpu",
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module = module
        self.device_type, self.dtype = device_type, dtype

    def forward(self, *args, **kwargs):
        # the module's own mode decides: evaluation hooks switch the module, not this wrapper
        with torch.autocast(device_type=self.device_type, dtype=self.dtype,
                            enabled=self.module.training):
            return self.module(*args, **kwargs)


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 / AMX); without it,
    bfloat16 autocast is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
