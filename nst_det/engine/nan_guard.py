"""Stop training on the first non-finite loss, before that step's update is applied.

A forward hook on the (unwrapped) model inspects the loss dict of every training forward. It
raises inside `model(data)`, i.e. before backward and optimizer.step, so the weights of the last
good iteration are what a checkpoint or a post-mortem sees. Under DDP the verdict is reduced
across ranks so that every rank stops at the same iteration instead of one hanging in allreduce.
Cost: one small stack + isfinite + one host sync per iteration (benchmarks/bench_nan_guard.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage


def _current_iteration() -> str:
    try:
        return str(get_event_storage().iter)
    except AssertionError:  # no EventStorage outside a training loop
        return "unknown"


def check_finite_losses(loss_dict: dict) -> None:
    """Raise FloatingPointError naming the iteration and the losses if any loss is NaN/inf."""
    values = [v for v in loss_dict.values() if torch.is_tensor(v)]
    if not values:
        return
    finite = torch.isfinite(torch.stack([v.detach().float().sum() for v in values])).all()
    if comm.get_world_size() > 1:
        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag.bool()
    if not bool(finite):
        shown = {k: (float(v.detach().float().sum()) if torch.is_tensor(v) else v)
                 for k, v in loss_dict.items()}
        raise FloatingPointError(
            f"Non-finite loss at iteration {_current_iteration()} (on this or another rank): "
            f"{shown}. Training stopped before this step was applied; the last checkpoint is "
            "intact. Lower SOLVER.BASE_LR or a loss weight, or check the input data"
        )


def install_nan_guard(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Check every training forward's loss dict of `model` (DDP-wrapped or not)."""
    inner = model.module if hasattr(model, "module") else model

    def hook(module, inputs, output):
        if module.training and isinstance(output, dict):
            check_finite_losses(output)

    return inner.register_forward_hook(hook)
