"""The frozen teacher detector: its own config file + weights + overrides, loaded strictly.

detectron2's checkpointer only *warns* about missing or unexpected keys, so a teacher whose
weights silently failed to load would distil random features. Here every mismatch is an error
that names the keys.
"""

from __future__ import annotations

import logging
from typing import Dict, Mapping

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from torch import nn

from ..checkpoint.remote import resolve_weights
from ..checkpoint.weights_file import load_weights_file
from ..config import add_nst_config
from ..distill.core import freeze

__all__ = [
    "TeacherWeightsError",
    "build_teacher",
    "build_teacher_cfg",
    "freeze",
    "load_state_dict_strict",
    "read_weights",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 10  # keys named per category in an error message


class TeacherWeightsError(ValueError):
    """Teacher weights that do not match the teacher model exactly."""


def build_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """The teacher's own frozen config: MODEL.TEACHER.CONFIG_FILE, then MODEL.TEACHER.OPTS.

    The teacher runs on the student's device; its MODEL.WEIGHTS is cleared because its weights
    are loaded strictly by :func:`build_teacher` (never through detectron2's lenient checkpointer).
    A relative CONFIG_FILE is resolved against the working directory, as detectron2 does.
    """
    path = cfg.MODEL.TEACHER.CONFIG_FILE
    if not path:
        raise ValueError("MODEL.TEACHER.CONFIG_FILE is empty: a distillation model needs a teacher")
    if not PathManager.isfile(path):
        raise FileNotFoundError(f"teacher config not found: MODEL.TEACHER.CONFIG_FILE={path!r}")
    tcfg = get_cfg()
    add_nst_config(tcfg)
    tcfg.merge_from_file(path)
    tcfg.merge_from_list(list(cfg.MODEL.TEACHER.OPTS))
    if tcfg.MODEL.TEACHER.CONFIG_FILE:
        raise ValueError(
            f"teacher config {path} itself has a teacher (MODEL.TEACHER.CONFIG_FILE="
            f"{tcfg.MODEL.TEACHER.CONFIG_FILE!r}): a teacher must be a plain detector"
        )
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = ""
    tcfg.freeze()
    return tcfg


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """Read a detectron2 checkpoint into a flat {name: tensor} dict on the CPU.

    `.pth` (torch.save, optionally {"model": state_dict, ...}) is read with
    `torch.load(weights_only=True)`, which executes no pickled code. `.pkl` (detectron2's model-zoo
    format, {"model": {name: ndarray}}) needs pickle itself: only load .pkl files you trust.

    Raises:
        WeightsFileError (nst_det.checkpoint.weights_file; a FileNotFoundError when there is no
        file): missing, empty, truncated, damaged or not weights. TeacherWeightsError: not a state
        dict, or a .pkl that relies on detectron2's fuzzy name matching ("matching_heuristics").
    """
    if not path:
        raise FileNotFoundError("MODEL.TEACHER.WEIGHTS is empty: train the teacher first")
    local = PathManager.get_local_path(resolve_weights(path, "MODEL.TEACHER.WEIGHTS"))
    data = load_weights_file(local, "MODEL.TEACHER.WEIGHTS", allow_pickle=True)
    if isinstance(data, Mapping) and data.get("matching_heuristics", False):
        raise TeacherWeightsError(
            f"{path!r} asks for detectron2's fuzzy name matching; a teacher needs a checkpoint "
            "with exact detectron2 parameter names (a trained detector's model_final.pth)"
        )
    state = data.get("model", data) if isinstance(data, Mapping) else None
    if not isinstance(state, Mapping):
        raise TeacherWeightsError(f"{path!r} holds no state dict (got {type(data).__name__})")
    out = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not torch.is_tensor(v):
            raise TeacherWeightsError(f"{path!r}: {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v
    return out


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str):
    """Load `state` into `model`, requiring exactly the same names and shapes.

    Raises:
        TeacherWeightsError naming every missing, unexpected and shape-mismatched key (up to 10
        per kind, with counts).
    """
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    mismatched = {
        k: (tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    }
    if missing or unexpected or mismatched:
        lines = [f"teacher weights {source!r} do not match the teacher model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        if mismatched:
            shown = [f"{k} {s} vs model {m}" for k, (s, m) in sorted(mismatched.items())]
            lines.append(f"  shape mismatches ({len(shown)}): {_listed(shown)}")
        lines.append("  check MODEL.TEACHER.CONFIG_FILE / OPTS against the run that wrote them")
        raise TeacherWeightsError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def build_teacher(cfg: CfgNode) -> nn.Module:
    """Build the teacher detector of `cfg.MODEL.TEACHER`, load its weights strictly, freeze it.

    Args:
        cfg: the student's config (uses MODEL.TEACHER.{CONFIG_FILE, WEIGHTS, OPTS}, MODEL.DEVICE).
    Returns:
        The teacher (a detectron2 meta-architecture, e.g. GeneralizedRCNN) in eval mode, no grad.
    """
    tcfg = build_teacher_cfg(cfg)
    state = read_weights(cfg.MODEL.TEACHER.WEIGHTS)
    model = build_model(tcfg)
    load_state_dict_strict(model, state, cfg.MODEL.TEACHER.WEIGHTS)
    logger.info(
        "Teacher %s (%s) loaded strictly from %s",
        tcfg.MODEL.META_ARCHITECTURE,
        cfg.MODEL.TEACHER.CONFIG_FILE,
        cfg.MODEL.TEACHER.WEIGHTS,
    )
    return freeze(model)
