"""Classification student -> detectron2 backbone weights, by explicit renaming tables.

Input: a ClassificationTrainer checkpoint (`student.*` keys) or a torchvision-style state dict
(e.g. torchvision's published resnet18). Output: `{"model": {d2 key: tensor}, "__author__":
"nst_det", "matching_heuristics": True}`, saved as .pth. Keys carry no `backbone.` prefix:
detectron2's DetectionCheckpointer matches them by suffix (as for its own converted torchvision
and MSRA models), so one file serves C4 (`backbone.res4...`, `roi_heads.res5...`) and FPN
(`backbone.bottom_up.res2...`) models alike.

Every converted key is checked against a freshly built detectron2 backbone of the same kind
(detectron2's ResNet of the detected depth with STRIDE_IN_1X1 False, or nst_det's Inception-BN
backbone): a backbone key left without a value, a value without a backbone key, or a shape
mismatch is an error. Keys not converted (the classifier head, BN step counters, distiller-only
modules such as FitNet regressors) are returned with the reason.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from ..checkpoint.remote import resolve_weights
from ..checkpoint.weights_file import load_weights_file
from ..utils.atomic import atomic_write
from .backbone.inception_bn import InceptionBNBackbone

__all__ = ["RESNET_RENAMES", "INCEPTION_BN_RENAMES", "DROPPED", "classifier_file_to_d2",
           "convert_student", "convert_torchvision", "detect_family", "reference_backbone",
           "resnet_depth", "resolve_detection_weights", "save_d2_weights", "student_family"]

logger = logging.getLogger(__name__)

_BN = r"(weight|bias|running_mean|running_var)"

# torchvision ResNet -> detectron2 ResNet (layerN is detectron2's res(N+1); bnK follows convK)
RESNET_RENAMES: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"^conv1\.weight$", lambda m: "stem.conv1.weight"),
    (rf"^bn1\.{_BN}$", lambda m: f"stem.conv1.norm.{m[1]}"),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.weight$",
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (rf"^layer(\d)\.(\d+)\.bn(\d)\.{_BN}$",
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.weight$",
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (rf"^layer(\d)\.(\d+)\.downsample\.1\.{_BN}$",
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
]

# nst_det Inception-BN classifier -> nst_det Inception-BN backbone: the same stage modules
INCEPTION_BN_RENAMES: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"^((stem|stage[2-5])\..+)$", lambda m: m[1]),
]

# keys that are deliberately not converted, with the reason
DROPPED: list[tuple[str, str]] = [
    (r"^fc\.", "classifier head"),
    (r"\.num_batches_tracked$", "BN step counter (not used by FrozenBN)"),
]

# top-level modules of torchvision classifiers' trunks (MobileNet, EfficientNet, ConvNeXt: features;
# RegNet: stem/trunk_output); their backbone keys are the classifier's keys, nothing renamed
_TORCHVISION_TRUNKS = ("features.", "stem.", "trunk_output.")
_TORCHVISION_HEADS = r"^(classifier|fc|head|heads)\."

_RESNET_DEPTHS = {  # (blocks per stage, bottleneck) -> depth
    ((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152,
}


def detect_family(state: dict) -> str:
    """"resnet" (torchvision ResNet keys), "inception_bn" (nst_det Inception-BN keys), or
    "torchvision" (any other torchvision classifier: its keys are the backbone's own)."""
    if "layer1.0.conv1.weight" in state:
        return "resnet"
    if "stage5.inception5b.b1x1.conv.weight" in state:
        return "inception_bn"
    if any(k.startswith(_TORCHVISION_TRUNKS) for k in state):
        return "torchvision"
    raise ValueError("not a torchvision classifier or nst_det Inception-BN state dict; first "
                     f"keys: {sorted(state)[:8]}")


def resnet_depth(state: dict) -> int:
    """The depth of a torchvision ResNet state dict, from its block counts."""
    blocks = tuple(
        len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    if (blocks, bottleneck) not in _RESNET_DEPTHS:
        raise ValueError(f"unsupported ResNet: blocks {blocks}, bottleneck {bottleneck}")
    return _RESNET_DEPTHS[(blocks, bottleneck)]


def reference_backbone(family: str, state: dict) -> torch.nn.Module:
    """The detectron2 backbone (all stages, BN) whose parameters the converted keys must fill."""
    if family == "inception_bn":
        return InceptionBNBackbone(out_features=("stage2", "stage3", "stage4", "stage5"),
                                   norm="BN")
    cfg = get_cfg()
    depth = resnet_depth(state)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision: stride in the 3x3 conv
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def _rename(key: str, table) -> str | None:
    for pattern, fn in table:
        m = re.match(pattern, key)
        if m:
            return fn(m)
    return None


def convert_torchvision(state: dict, arch: str | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A torchvision classifier's state dict as TorchvisionBackbone weights: the same keys, the
    head and BN step counters dropped. With `arch`, checked strictly against that backbone
    (every node up to the last map): a missing key or a shape mismatch is an error."""
    converted, skipped = {}, {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            skipped[key] = "BN step counter (not used by FrozenBN)"
        elif re.match(_TORCHVISION_HEADS, key):
            skipped[key] = "classifier head"
        else:
            converted[key] = value
    if arch:
        from ..modeling.backbone.torchvision_backbone import TorchvisionBackbone
        from ..modeling.torchvision_graph import build_torchvision_model, node_shapes

        last = list(node_shapes(build_torchvision_model(arch)))[-1]
        reference = TorchvisionBackbone(arch, [last])
        unused = reference.load_classifier_state_dict(converted)  # strict: raises on a gap
        for key in unused:
            skipped[key] = f"not part of the {arch} backbone"
            converted.pop(key)
    return converted, skipped


def student_family(state: dict, family: str | None = None, arch: str | None = None) -> str:
    """The family `convert_student` converts `state` as: `family`; "torchvision" when `arch`
    names a torchvision model (a ResNet named so keeps torchvision's keys, for nst_det's
    torchvision backbone); else detected from the keys."""
    if arch and family not in (None, "torchvision"):
        raise ValueError(f"an architecture name ({arch!r}) applies to the torchvision family only,"
                         f" not to {family!r}: leave it out, or use the torchvision family")
    return family or ("torchvision" if arch else detect_family(state))


def convert_student(state: dict, family: str | None = None, arch: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert a classifier state dict to detectron2 backbone keys (no prefix).

    Args:
        state: torchvision ResNet or nst_det Inception-BN state dict (no `student.` prefix).
        family: "resnet" | "inception_bn" | "torchvision"; detected from the keys if None, and
            "torchvision" when `arch` is given.
        arch: torchvision family only: the model name, for a strict check (`convert_torchvision`);
            a ResNet named here keeps torchvision's keys (nst_det's torchvision backbone).
    Returns:
        (converted {d2 key: tensor}, not converted {source key: reason}).
    Raises:
        ValueError: a key no table covers, or a mismatch against the reference backbone
            (missing / unexpected keys or shapes, all listed).
    """
    family = student_family(state, family, arch)
    if family == "torchvision":
        return convert_torchvision(state, arch)
    table = {"resnet": RESNET_RENAMES, "inception_bn": INCEPTION_BN_RENAMES}[family]
    converted, skipped, unknown = {}, {}, []
    for key, value in state.items():
        reason = next((r for p, r in DROPPED if re.search(p, key)), None)
        if reason:
            skipped[key] = reason
            continue
        new = _rename(key, table)
        if new is None:
            unknown.append(key)
        else:
            converted[new] = value
    if unknown:
        raise ValueError(f"no renaming rule for {len(unknown)} keys: {sorted(unknown)[:20]}")

    reference = {k: v for k, v in reference_backbone(family, state).state_dict().items()
                 if not k.endswith("num_batches_tracked")}
    missing = sorted(set(reference) - set(converted))
    extra = sorted(set(converted) - set(reference))
    shapes = [f"{k}: {tuple(converted[k].shape)} vs {tuple(reference[k].shape)}"
              for k in sorted(set(converted) & set(reference))
              if converted[k].shape != reference[k].shape]
    if missing or extra or shapes:
        raise ValueError(
            f"conversion does not match the detectron2 {family} backbone: missing {missing[:20]}, "
            f"unexpected {extra[:20]}, shape mismatches {shapes[:20]}")
    return converted, skipped


def save_d2_weights(converted: dict[str, torch.Tensor], path: str) -> None:
    """Write detectron2-loadable weights (matched by DetectionCheckpointer's heuristics),
    atomically: a crash mid-write leaves no partial file at `path`."""
    with atomic_write(path) as f:
        torch.save({"model": {k: v.detach().cpu() for k, v in converted.items()},
                    "__author__": "nst_det", "matching_heuristics": True}, f)


def classifier_file_to_d2(src: str, dst: str, family: str | None = None,
                          arch: str | None = None, what: str = "classifier weights") -> dict:
    """Classification weights file `src` -> detectron2 backbone weights at `dst` (written
    atomically): the one route from a classifier to a detector backbone, which
    tools/convert_student_to_d2.py and a pipeline's classification stage take.

    family, arch: as `convert_student` (family detected from the keys when None). `what` names
    the file in errors. Returns {"file", "family", "converted" (count), "not_converted"
    ({key: reason}: the classifier head, BN step counters, distiller-only modules)}.
    """
    from .classification.weights import read_classifier_file

    # (the training checkpoint, its head and optimizer state, would be lost)
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"the detectron2 weights would replace their source {src}: give "
                         "another output file")
    state, not_student = read_classifier_file(src, what)
    family = student_family(state, family, arch)
    converted, skipped = convert_student(state, family, arch)
    skipped.update({k: "not part of the student (distiller-only module)" for k in not_student})
    save_d2_weights(converted, dst)
    return {"file": dst, "family": family, "converted": len(converted),
            "not_converted": dict(sorted(skipped.items()))}


def resolve_detection_weights(path: str, key: str = "MODEL.WEIGHTS") -> str:
    """`resolve_weights`, and a downloaded torchvision ResNet classifier (e.g. torchvision's
    `resnet18-f37072fd.pth`) converted once into detectron2 backbone weights.

    The conversion (`convert_student`) is cached beside the download as `<name>.d2.pth`, written
    atomically. Local files and other downloads are returned as they are: a local classifier is
    converted with `classifier_file_to_d2` (tools/convert_student_to_d2.py).
    """
    local = resolve_weights(path, key)
    if local == path or not str(path).startswith(("https://", "http://")) \
            or not local.endswith(".pth"):
        return local
    converted = local[: -len(".pth")] + ".d2.pth"
    if os.path.isfile(converted):
        return converted
    state = load_weights_file(local, key)  # one clear error for a damaged or foreign file
    if not (isinstance(state, dict) and "layer1.0.conv1.weight" in state):
        return local  # not a torchvision ResNet classifier: a detectron2 checkpoint, say
    weights, _ = convert_student(state, "resnet")
    save_d2_weights(weights, converted)
    logger.info(f"{key}={path}: torchvision ResNet converted to detectron2 names -> {converted}")
    return converted
