"""Student-only detector checkpoints: stock-detectron2 config + weights, no teacher, no optimizer.

A distillation meta-architecture's state_dict never contains the teacher (it is held outside the
module tree), so the student's weights are the model's weights; what changes is the config: only
keys that stock detectron2 knows are kept, and the meta-architecture becomes the detectron2 class
the distiller derives from (its inference path is unchanged).
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    RPN_HEAD_REGISTRY,
    build_model,
)

from ..checkpoint.weights_file import load_weights_file, state_dict_from
from ..utils.atomic import atomic_write

# keys a student-only checkpoint must never carry (teacher weights live under these prefixes)
TEACHER_KEY_PREFIXES = ("teacher.", "_teacher.", "teacher_model.")
# training-only modules of the distillation core (e.g. FitNet regressors): not the student's
DISTILL_ONLY_PREFIXES = ("distill.",)
# config namespaces that nst_det's own backbones read (kept when such a backbone is used)
NST_BACKBONE_NAMESPACES = ("TORCHVISION", "INCEPTION_BN")
# the parts of a detector config named in a detectron2 registry (the meta-architecture is
# mapped back to detectron2's own by `student_config`)
REGISTERED_PARTS = (("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY),
                    ("MODEL.PROPOSAL_GENERATOR.NAME", PROPOSAL_GENERATOR_REGISTRY),
                    ("MODEL.RPN.HEAD_NAME", RPN_HEAD_REGISTRY),
                    ("MODEL.ROI_HEADS.NAME", ROI_HEADS_REGISTRY),
                    ("MODEL.ROI_BOX_HEAD.NAME", ROI_BOX_HEAD_REGISTRY))


def _stock_subset(ours: CfgNode, stock: CfgNode) -> CfgNode:
    """The keys of `ours` that also exist in `stock` (recursively), with the values of `ours`."""
    out = CfgNode()
    for key, default in stock.items():
        if key not in ours:
            out[key] = default
        elif isinstance(default, CfgNode):
            out[key] = _stock_subset(ours[key], default)
        else:
            out[key] = ours[key]
    return out


def detectron2_meta_architecture(name: str) -> str:
    """The nearest class in `name`'s MRO that is a meta-architecture of detectron2 itself."""
    cls = META_ARCH_REGISTRY.get(name)
    for base in cls.__mro__:
        if base.__module__.startswith("detectron2.") and base.__name__ in META_ARCH_REGISTRY:
            return base.__name__
    raise ValueError(
        f"MODEL.META_ARCHITECTURE={name} does not derive from a detectron2 meta-architecture; "
        "it cannot be exported as a stock detectron2 model"
    )


def nst_det_parts(cfg: CfgNode) -> list[str]:
    """"KEY=Name" of each part of cfg's detector that nst_det registers rather than detectron2
    (e.g. a torchvision backbone, or BasicRes5ROIHeads of an R-18/34 C4 detector): building the
    exported student then needs `import nst_det` (export_info.json's `needs_nst_det`)."""
    parts = []
    for key, registry in REGISTERED_PARTS:
        node = cfg
        for part in key.split("."):
            node = node[part]
        # an empty or unregistered name is not built by this meta-architecture (RetinaNet's
        # ROI_BOX_HEAD.NAME "", say): neither detectron2's nor nst_det's
        if node and node in registry and not registry.get(node).__module__.startswith(
                "detectron2."):
            parts.append(f"{key}={node}")
    return parts


def uses_nst_backbone(cfg: CfgNode) -> bool:
    """Whether cfg's backbone is one of nst_det's (its exported config then keeps its keys)."""
    return not BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME).__module__.startswith("detectron2.")


def student_config(cfg: CfgNode) -> CfgNode:
    """A config that stock detectron2 (`get_cfg()`, no nst_det) can merge, and build unless it
    names a part nst_det registers (`nst_det_parts`).

    Teacher and distillation keys are dropped; the meta-architecture is mapped back to detectron2's.
    A backbone registered by nst_det (torchvision networks, Inception-BN) keeps its own keys
    (MODEL.TORCHVISION / MODEL.INCEPTION_BN): such a config is read with `import nst_det` and
    `nst_det.config.load_config(path)` (or get_cfg() + add_nst_config(cfg) + merge_from_file).
    A part nst_det registers under a stock key (BasicRes5ROIHeads) needs `import nst_det` only.
    """
    out = _stock_subset(cfg, get_cfg())
    if uses_nst_backbone(cfg):
        for key in NST_BACKBONE_NAMESPACES:
            if key in cfg.MODEL:
                out.MODEL[key] = cfg.MODEL[key].clone()
    out.MODEL.META_ARCHITECTURE = detectron2_meta_architecture(cfg.MODEL.META_ARCHITECTURE)
    out.MODEL.WEIGHTS = ""
    return out


def student_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, checked to contain no teacher tensor."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()
             if not k.startswith(DISTILL_ONLY_PREFIXES)}
    leaked = [k for k in state if k.startswith(TEACHER_KEY_PREFIXES)]
    if leaked:
        raise RuntimeError(f"teacher tensors found in the student's state_dict: {leaked[:5]}")
    return state


def save_student_checkpoint(
    cfg: CfgNode, state: Mapping[str, torch.Tensor], out_dir: str,
    weights_path: str | None = None,
) -> tuple[str, str]:
    """Write `model_final.pth` ({"model": state}) and `config.yaml` atomically into out_dir.

    Args:
        weights_path: what the config's MODEL.WEIGHTS names, when the files are written into a
            staging folder and moved to their final place afterwards (default: the checkpoint).
    Returns:
        (checkpoint path, config path). The config's MODEL.WEIGHTS points at the checkpoint.
    """
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "model_final.pth")
    cfg_path = os.path.join(out_dir, "config.yaml")
    with atomic_write(ckpt_path) as f:
        torch.save({"model": dict(state)}, f)
    exported = student_config(cfg)
    exported.MODEL.WEIGHTS = weights_path or os.path.abspath(ckpt_path)
    with atomic_write(cfg_path, "w") as f:
        f.write(exported.dump())
    return ckpt_path, cfg_path


def load_student_detector(cfg: CfgNode) -> torch.nn.Module:
    """Build the student-only detector of `cfg` and load cfg.MODEL.WEIGHTS into it strictly.

    Teacher tensors in the file (if any) are dropped. Raises WeightsFileError (a
    FileNotFoundError for a missing file) naming the file and the problem when it cannot be read
    as weights, and KeyError naming the keys when the weights do not match the student.
    """
    weights = cfg.MODEL.WEIGHTS
    # one error for a missing, truncated or wrong-format file, before the model is built
    state = state_dict_from(load_weights_file(weights, "MODEL.WEIGHTS"), weights, "MODEL.WEIGHTS")
    model = build_model(student_config(cfg))
    state = {k: v for k, v in state.items()
             if not k.startswith(TEACHER_KEY_PREFIXES + DISTILL_ONLY_PREFIXES)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    # (load_state_dict would raise a bare RuntimeError on these, strict or not)
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise KeyError(
            f"{weights} does not match the student of {cfg.MODEL.META_ARCHITECTURE}: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}, shapes (file vs model) "
            f"{shapes[:10]} (e.g. another NUM_CLASSES or backbone than the weights')"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()
