"""Stop training on the first non-finite loss, before that step's update is applied.

A forward hook on the (unwrapped) model inspects the loss dict of every training forward. It
raises inside `model(data)`, i.e. before backward and optimizer.step, so the weights of the last
good iteration are what a checkpoint or a post-mortem sees. Under DDP the verdict is reduced
across ranks so that every rank stops at the same iteration instead of one hanging in allreduce.
Cost: one small stack + isfinite + one host sync per iteration (benchmarks/bench_nan_guard.py).
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage


def _current_iteration() -> str:
    try:
        return str(get_event_storage().iter)
    except AssertionError:  # no EventStorage outside a training loop
        return "unknown"


_WEIGHT_KEYS = {"loss_nst": "MODEL.NST.LOSS_WEIGHT", "loss_kd": "MODEL.KD.LOSS_WEIGHT"}


def _checkpoint_note(output_dir: str | None) -> str:
    """What the message says about checkpoints: only one that exists is mentioned."""
    tag = os.path.join(output_dir, "last_checkpoint") if output_dir else None
    if tag and os.path.isfile(tag):
        with open(tag) as f:
            name = f.read().strip()
        if name and os.path.isfile(os.path.join(output_dir, name)):
            return (f"The last checkpoint, {os.path.join(output_dir, name)}, is intact: fix the "
                    "cause, then continue from it with --resume.")
    return "No checkpoint had been saved yet."


def _tensors(output):
    if torch.is_tensor(output):
        yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from _tensors(value)


def check_finite_losses(loss_dict: dict, teacher_finite: torch.Tensor | bool | None = None,
                        output_dir: str | None = None) -> None:
    """Raise FloatingPointError if any loss is NaN/inf, naming the iteration and the losses (on
    every rank, with several processes: each names the ranks that saw them).

    Args:
        teacher_finite: whether every output of the teacher in this forward was finite (None:
            no teacher, or not known); the message then says where to look.
        output_dir: the run's OUTPUT_DIR: the message names its last checkpoint if there is one.
    """
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
        bad = {k: v for k, v in shown.items() if isinstance(v, float) and not math.isfinite(v)}
        seen = [(comm.get_rank(), bad, None if teacher_finite is None else bool(teacher_finite))]
        if comm.get_world_size() > 1:  # every rank is here (the verdict was reduced): each
            seen = comm.all_gather(seen[0])  # names what its ranks saw, not only its own log
        seen = [s for s in seen if s[1]]
        several = comm.get_world_size() > 1
        named = "; ".join(", ".join(f"{k} = {v}" for k, v in losses.items())
                          + (f" on rank {rank}" if several else "") for rank, losses, _ in seen)
        bad = sorted({k for _, losses, _ in seen for k in losses})
        flags = [flag for _, _, flag in seen if flag is not None]
        teacher_finite = all(flags) if flags else None
        if several:
            shown = f"rank {comm.get_rank()}'s: {shown}"
        if teacher_finite is None:
            teacher = ""
        elif bool(teacher_finite):
            teacher = "The teacher's outputs are finite: the student or the loss diverged. "
        else:
            teacher = ("The teacher's output is non-finite: check MODEL.TEACHER.WEIGHTS (NaN/inf "
                       "in the teacher's weights) and its config. ")
        weights = [f"{_WEIGHT_KEYS[k]} ({k})" for k in bad if k in _WEIGHT_KEYS]
        if teacher_finite is not None and not bool(teacher_finite):
            advice = "The learning rate and loss weights are not the cause."  # it is the input
        else:
            advice = ("Lower SOLVER.BASE_LR" + (f" or {', '.join(weights)}" if weights else "")
                      + ", or check the input data")
        raise FloatingPointError(
            f"Non-finite loss at iteration {_current_iteration()}: {named} (all losses: {shown}). "
            f"{teacher}Training stopped before this step was applied. "
            f"{_checkpoint_note(output_dir)} {advice}"
        )


def outputs_finite(output) -> torch.Tensor | None:
    """Whether every floating-point tensor in a module's output (tensor, or dicts / lists of
    them) is finite: a 0-dim bool tensor on their device (no host sync), None if it has none."""
    flags = [t.detach().isfinite().all() for t in _tensors(output) if t.is_floating_point()]
    return torch.stack(flags).all() if flags else None


def teacher_parts(teacher: torch.nn.Module) -> list:
    """The teacher modules whose outputs the guard checks: the teacher, its direct children (the
    parts a distiller calls, e.g. a detector's backbone) and their children outside the backbone
    (KD on RoI logits calls the teacher's box head and predictor directly)."""
    backbone = getattr(teacher, "backbone", None)
    return [teacher, *teacher.children(), *(grandchild for child in teacher.children()
                                             if child is not backbone
                                             for grandchild in child.children())]


class _Handles:
    """Removes every hook the guard installed."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def install_nan_guard(model: torch.nn.Module, output_dir: str | None = None) -> _Handles:
    """Check every training forward's loss dict of `model` (DDP-wrapped or not).

    When the model has a `teacher` module, forward hooks on its `teacher_parts` record whether
    their outputs were finite, so that a non-finite loss says whether the teacher produced it.
    `output_dir`: see `check_finite_losses`. Returns an object whose `remove()` removes the
    hooks.
    """
    inner = model.module if hasattr(model, "module") else model
    teacher = getattr(inner, "teacher", None)
    state = {"teacher_finite": None}
    handles = []

    def reset(module, inputs):
        state["teacher_finite"] = None

    def teacher_hook(module, inputs, output):
        finite = outputs_finite(output)
        if finite is not None:
            previous = state["teacher_finite"]
            state["teacher_finite"] = finite if previous is None else previous & finite

    def hook(module, inputs, output):
        if module.training and isinstance(output, dict):
            known = state["teacher_finite"] if isinstance(teacher, torch.nn.Module) else None
            check_finite_losses(output, known, output_dir)

    if isinstance(teacher, torch.nn.Module):
        handles.append(inner.register_forward_pre_hook(reset))
        for part in teacher_parts(teacher):
            handles.append(part.register_forward_hook(teacher_hook))
    handles.append(inner.register_forward_hook(hook))
    return _Handles(handles)
