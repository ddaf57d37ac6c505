"""The "inheriting strategy" of FGD / MGD: the student's neck and heads start from the teacher's.

yzd-v/FGD and yzd-v/MGD (`init_student=True`) and mmrazor's MGD configs (`init_cfg` Pretrained
with prefix ``neck.`` / ``bbox_head.``) copy every non-backbone teacher weight into the student
before training; their published one-stage numbers use it. In detectron2 terms the neck is the
backbone minus its ``bottom_up`` network (an FPN's lateral / output convs and top block) and the
heads are the meta-architecture's head modules (R-CNN: ``proposal_generator``, ``roi_heads``;
RetinaNet: ``head``). The bottom-up network, the student's own, is never copied; a backbone
without one (C4: the backbone is the ResNet itself) has no neck, and is refused.

Unlike the references (mmcv's lenient `load_state_dict`), every student neck/head tensor must
find a teacher tensor of its name and shape, or building fails; teacher tensors the student has
no place for (e.g. a Mask R-CNN teacher's mask head) are left out and logged.

The copy happens when the student is built, so it is only the student's initialisation: a
checkpoint loaded afterwards (a resumed training checkpoint, or MODEL.WEIGHTS keys that name
neck/head tensors) overwrites it.
"""

from __future__ import annotations

import logging
from typing import Dict, Mapping, Sequence

import torch
from torch import nn

__all__ = ["inherit_neck_head", "neck_head_state"]

logger = logging.getLogger(__name__)

_BOTTOM_UP = "bottom_up."  # detectron2's FPN keeps the bottom-up network under this name
_LISTED = 5  # keys named per kind of mismatch


def neck_head_state(modules: Mapping[str, nn.Module | None],
                    heads: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The neck and head tensors of a detector, keyed as in the detector's own state_dict.

    Args:
        modules: {name: module} with "backbone" and each of `heads` (a built detector's
            attributes, or the module arguments of its `from_config`); a None module (e.g. no
            proposal_generator) has no tensors.
        heads: the head module names.
    Returns:
        {"backbone.<key>" (not under bottom_up) and "<head>.<key>": tensor}: parameters and
        persistent buffers, sharing storage with the modules (copying into them sets them).
    """
    state = {}
    for name in ("backbone", *heads):
        module = modules.get(name)
        if module is None:
            continue
        for key, value in module.state_dict().items():
            if name == "backbone" and key.startswith(_BOTTOM_UP):
                continue
            state[f"{name}.{key}"] = value
    return state


def _listed(keys: Sequence[str]) -> str:
    """The first keys, comma-separated, with their count."""
    more = ", ..." if len(keys) > _LISTED else ""
    return f"({len(keys)}): {', '.join(keys[:_LISTED])}{more}"


def _mismatch(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor]) -> str:
    """'' when every student tensor has a teacher tensor of its name and shape, else the first
    differences, one kind a line."""
    shapes = [f"{k}: student {tuple(v.shape)} vs teacher {tuple(teacher[k].shape)}"
              for k, v in student.items() if k in teacher and v.shape != teacher[k].shape]
    kinds = (("different shapes", shapes),
             ("not in the teacher", [k for k in student if k not in teacher]))
    return "\n".join(f"  {what} {_listed(keys)}" for what, keys in kinds if keys)


def inherit_neck_head(student: Mapping[str, nn.Module | None], teacher: nn.Module,
                      heads: Sequence[str]) -> int:
    """Copy the teacher's neck and head tensors into the student's modules of the same names.

    Args:
        student: {name: module} of the student ("backbone" and `heads`), see `neck_head_state`.
        teacher: the teacher detector (its `backbone` and `heads` attributes are read, never
            changed); the student's tensors are copies, not the teacher's storage.
        heads: the head module names (R-CNN: proposal_generator, roi_heads; RetinaNet: head).
    Returns:
        The number of tensors copied.
    Raises:
        ValueError: the student's backbone has no `bottom_up` network (no neck: every tensor
            of it would count as neck), a student neck/head tensor has no teacher tensor of its
            name and shape (the message names the first ones), or there is nothing to copy.
            Teacher tensors the student lacks (e.g. a mask head) are not copied, and logged.
    """
    backbone = student.get("backbone")
    if not hasattr(backbone, "bottom_up"):
        raise ValueError(
            "MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD copies the neck of an FPN-style backbone (the "
            f"backbone without its bottom_up network); the student's {type(backbone).__name__} "
            "has no bottom_up, so its whole bottom-up network would be replaced by the teacher's. "
            "Turn it off for a C4 / single-level student")
    s_state = neck_head_state(student, heads)
    t_state = neck_head_state({n: getattr(teacher, n, None) for n in ("backbone", *heads)}, heads)
    problem = _mismatch(s_state, t_state)
    if problem:
        raise ValueError(
            "MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD copies the teacher's neck (backbone without "
            f"bottom_up) and heads {list(heads)} into the student, so it needs a teacher with the "
            "student's neck/head tensor names and shapes (e.g. the same FPN channels, anchors "
            f"and classes); they differ:\n{problem}")
    if not s_state:
        raise ValueError("MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD is on but the student has no "
                         f"neck or head tensors (backbone without bottom_up, {list(heads)})")
    extra = [k for k in t_state if k not in s_state]
    if extra:  # e.g. a Mask R-CNN teacher's mask head for a Faster R-CNN student
        logger.warning("MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD: teacher tensors the student has "
                       "no place for, not copied %s", _listed(extra))
    with torch.no_grad():  # in place: the student's parameters stay its own leaves
        for key, value in s_state.items():
            value.copy_(t_state[key])
    return len(s_state)
