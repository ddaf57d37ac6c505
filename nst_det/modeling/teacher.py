"""The frozen teacher detector: its own config file + weights + overrides, loaded strictly.

MODEL.TEACHER.CONFIG_FILE is a yacs `.yaml` file, a LazyConfig `.py` file (its `model` is
instantiated; MODEL.TEACHER.OPTS are then LazyConfig's `key=value` overrides), or a detectron2
model-zoo name of either kind (e.g. "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"), found
through `detectron2.model_zoo` when the installed detectron2 ships its configs.

detectron2's checkpointer only *warns* about missing or unexpected keys, so a teacher whose
weights silently failed to load would distil random features. Here every mismatch is an error
that names the keys.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Dict, Mapping

import detectron2
import numpy as np
import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from torch import nn

from ..checkpoint.remote import resolve_weights
from ..checkpoint.weights_file import load_weights_file
from ..config import load_config
from ..distill.core import freeze

__all__ = [
    "TeacherWeightsError",
    "build_lazy_teacher_cfg",
    "build_teacher",
    "build_teacher_cfg",
    "freeze",
    "is_lazy_config",
    "load_state_dict_strict",
    "read_weights",
    "resolve_teacher_config",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 10  # keys named per category in an error message
_ZOO_PROBE = "Base-RCNN-FPN.yaml"  # in every detectron2 release's configs/


class TeacherWeightsError(ValueError):
    """Teacher weights that do not match the teacher model exactly."""


def _zoo_config_file(name: str) -> str | None:
    """detectron2.model_zoo.get_config_file(name), or None when the install has no such config."""
    try:
        from detectron2.model_zoo import get_config_file
    except ImportError:  # upstream's model_zoo imports pkg_resources, gone from setuptools >= 81
        get_config_file = None
    if get_config_file is not None:
        try:
            return get_config_file(name)
        except RuntimeError:  # "<name> not available in Model Zoo!"
            return None
    # the same file get_config_file returns: the configs packaged in detectron2.model_zoo
    spec = importlib.util.find_spec("detectron2.model_zoo")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "configs", name)
        if os.path.isfile(path):
            return path
    return None


def resolve_teacher_config(path: str) -> str:
    """The local file of MODEL.TEACHER.CONFIG_FILE: `path` itself, or a model-zoo config's file.

    A relative path is resolved against the working directory, as detectron2 does; a name that is
    not a file is looked up in detectron2's model zoo (`detectron2.model_zoo.get_config_file`).

    Raises:
        ValueError: `path` is empty. FileNotFoundError: neither a file nor a zoo config; the
        message says when this detectron2 ships no zoo configs at all (the v0.6 sdist has none).
    """
    if not path:
        raise ValueError("MODEL.TEACHER.CONFIG_FILE is empty: a distillation model needs a teacher")
    if PathManager.isfile(path):
        return path
    zoo = _zoo_config_file(path)
    if zoo is not None:
        return zoo
    if _zoo_config_file(_ZOO_PROBE) is None:
        raise FileNotFoundError(
            f"teacher config not found: MODEL.TEACHER.CONFIG_FILE={path!r} is not a file, and "
            f"this detectron2 ({detectron2.__version__}, {os.path.dirname(detectron2.__file__)})"
            " ships no model-zoo configs (an install from the v0.6 sdist has none), so zoo names"
            " cannot be resolved: give the config file's path instead, e.g. a copy of "
            f"configs/{path} from detectron2's source with the files it inherits from"
        )
    raise FileNotFoundError(
        f"teacher config not found: MODEL.TEACHER.CONFIG_FILE={path!r} is neither a file nor a "
        "config of detectron2's model zoo (names are relative to its configs/ folder, e.g. "
        "'COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml' or "
        "'new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py')"
    )


def is_lazy_config(path: str) -> bool:
    """Whether a teacher config path is a LazyConfig (Python) file rather than a yacs YAML."""
    return str(path).endswith(".py")


def build_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """The teacher's own frozen yacs config: MODEL.TEACHER.CONFIG_FILE, then MODEL.TEACHER.OPTS.

    The teacher runs on the student's device; its MODEL.WEIGHTS is cleared because its weights
    are loaded strictly by :func:`build_teacher` (never through detectron2's lenient checkpointer).
    CONFIG_FILE is resolved by :func:`resolve_teacher_config` (a file or a model-zoo name); a
    LazyConfig `.py` teacher has :func:`build_lazy_teacher_cfg` instead.
    """
    path = resolve_teacher_config(cfg.MODEL.TEACHER.CONFIG_FILE)
    if is_lazy_config(path):
        raise ValueError(f"teacher config {path} is a LazyConfig (.py) file, not a yacs config: "
                         "see build_lazy_teacher_cfg (build_teacher handles both)")
    tcfg = load_config(path, cfg.MODEL.TEACHER.OPTS, opts_name="MODEL.TEACHER.OPTS",
                       register_data=False)
    if tcfg.MODEL.TEACHER.CONFIG_FILE:
        raise ValueError(
            f"teacher config {path} itself has a teacher (MODEL.TEACHER.CONFIG_FILE="
            f"{tcfg.MODEL.TEACHER.CONFIG_FILE!r}): a teacher must be a plain detector"
        )
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = ""
    tcfg.freeze()
    return tcfg


def build_lazy_teacher_cfg(cfg: CfgNode):
    """The LazyConfig of a `.py` MODEL.TEACHER.CONFIG_FILE with MODEL.TEACHER.OPTS applied.

    OPTS are LazyConfig overrides, one `key=value` string each (e.g.
    "model.roi_heads.num_classes=20"), applied by `LazyConfig.apply_overrides`.

    Returns:
        The omegaconf config; its `model` is what the teacher is instantiated from.
    """
    path = resolve_teacher_config(cfg.MODEL.TEACHER.CONFIG_FILE)
    if not is_lazy_config(path):
        raise ValueError(f"teacher config {path} is not a LazyConfig (.py) file")
    opts = [str(o) for o in cfg.MODEL.TEACHER.OPTS]
    bad = [o for o in opts if "=" not in o]
    if bad:
        raise ValueError(
            f"MODEL.TEACHER.OPTS of the LazyConfig teacher {path} are LazyConfig overrides, one "
            f"'key=value' string each (e.g. 'model.roi_heads.num_classes=20'); got {bad} in "
            f"{opts}"
        )
    lcfg = LazyConfig.apply_overrides(LazyConfig.load(path), opts)
    if "model" not in lcfg:
        raise ValueError(f"LazyConfig teacher {path} defines no `model`")
    return lcfg


def _instantiate_lazy_teacher(cfg: CfgNode) -> nn.Module:
    """`instantiate(model)` of the LazyConfig teacher, checked to be a plain detectron2 detector."""
    path = cfg.MODEL.TEACHER.CONFIG_FILE
    model = instantiate(build_lazy_teacher_cfg(cfg).model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"LazyConfig teacher {path}: `model` instantiates a "
                         f"{type(model).__name__}, not an nn.Module")
    needs = ("backbone", "pixel_mean", "pixel_std", "preprocess_image")
    lacking = [a for a in needs if not hasattr(model, a)]
    if lacking or not hasattr(model.backbone, "output_shape"):
        raise ValueError(
            f"LazyConfig teacher {path}: its {type(model).__name__} is not a detectron2 detector "
            f"(needs {list(needs)} and backbone.output_shape(); lacks "
            f"{lacking or ['backbone.output_shape']})"
        )
    if hasattr(model, "distill"):
        raise ValueError(f"LazyConfig teacher {path} is itself a distilling model "
                         f"({type(model).__name__}): a teacher must be a plain detector")
    return model


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
    # detectron2's own checkpoints from before anchors became non-persistent buffers (its model
    # zoo's yacs-config weights) still hold them; detectron2's checkpointer drops them likewise
    state = {k: v for k, v in state.items() if "anchor_generator.cell_anchors." not in k}
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

    A yacs teacher is `build_model` of :func:`build_teacher_cfg`; a LazyConfig one is
    `instantiate(model)` of :func:`build_lazy_teacher_cfg`, its BatchNorm / SyncBatchNorm layers
    then converted to FrozenBatchNorm2d (its statistics never change). Either runs on the
    student's MODEL.DEVICE.

    Args:
        cfg: the student's config (uses MODEL.TEACHER.{CONFIG_FILE, WEIGHTS, OPTS}, MODEL.DEVICE).
    Returns:
        The teacher (a detectron2 meta-architecture, e.g. GeneralizedRCNN) in eval mode, no grad.
    """
    source = cfg.MODEL.TEACHER.CONFIG_FILE
    path = resolve_teacher_config(source)
    if path != source:
        source = f"{source}: {path}"  # a model-zoo name, and its file
    if is_lazy_config(path):
        model = _instantiate_lazy_teacher(cfg)
        state = read_weights(cfg.MODEL.TEACHER.WEIGHTS)
        load_state_dict_strict(model, state, cfg.MODEL.TEACHER.WEIGHTS)
        model = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
        model.to(torch.device(cfg.MODEL.DEVICE))
        arch = f"{type(model).__name__} (LazyConfig)"
    else:
        tcfg = build_teacher_cfg(cfg)
        state = read_weights(cfg.MODEL.TEACHER.WEIGHTS)
        model = build_model(tcfg)
        load_state_dict_strict(model, state, cfg.MODEL.TEACHER.WEIGHTS)
        arch = tcfg.MODEL.META_ARCHITECTURE
    logger.info("Teacher %s (%s) loaded strictly from %s", arch, source,
                cfg.MODEL.TEACHER.WEIGHTS)
    return freeze(model)
