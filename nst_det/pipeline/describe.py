"""What a pipeline run was, in words, read from each stage's own files (for report.md).

Backbone, detector and classifier names, the transfer losses and feature pairs a config turns
on, the data sets and their metric, and the training precision: nothing here is toy-specific,
so the same report describes a toy run and a paper-scale one. Also the two readers the report's
sections share: a run's metrics.json rows and a markdown table.
"""

from __future__ import annotations

import functools
import json
import os

from detectron2.data import MetadataCatalog
from tabulate import tabulate

from ..config import load_config
from .plan import Stage

__all__ = ["stage_config", "classifier_name", "backbone_name", "detector_name",
           "distillation_summary", "set_list", "evaluator_label", "training_precision",
           "metrics_rows", "markdown_table"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DETECTORS = {"GeneralizedRCNN": "Faster R-CNN", "DistillationRCNN": "Faster R-CNN",
              "RetinaNet": "RetinaNet", "DistillationRetinaNet": "RetinaNet"}
_CLASSIFIERS = {"inception_bn": "Inception-BN", "mobilenet_v3_large": "MobileNetV3-Large",
                "mobilenet_v3_small": "MobileNetV3-Small"}


def stage_config(stage: Stage):
    """The config a stage ran with: its OUTPUT_DIR's config.yaml (written by the run), else
    the plan's config file (relative to the repository) with the stage's overrides."""
    written = os.path.join(stage.out_dir, "config.yaml")
    if os.path.isfile(written):
        # a report reads each stage's config several times; parsing the YAML took ~2 s of a
        # CI-scale report's 13 s. Keyed by the file's mtime, so a stage run again is read again
        return _written_config(written, os.stat(written).st_mtime_ns).clone()
    config = stage.config if os.path.isabs(stage.config) else os.path.join(REPO, stage.config)
    return load_config(config, stage.opts)


@functools.lru_cache(maxsize=64)
def _written_config(path: str, mtime_ns: int):
    del mtime_ns  # part of the cache key only
    return load_config(path)


def classifier_name(arch: str) -> str:
    """'resnet18' -> 'R-18', 'inception_bn' -> 'Inception-BN', torchvision names as they are."""
    arch = arch.split(":", 1)[-1]
    if arch.startswith("resnet") and arch[6:].isdigit():
        return f"R-{arch[6:]}"
    return _CLASSIFIERS.get(arch, arch)


def backbone_name(cfg) -> str:
    """A detector's backbone in the paper's words, e.g. 'R-50' (from its config)."""
    name = cfg.MODEL.BACKBONE.NAME
    if "resnet" in name:
        return f"R-{cfg.MODEL.RESNETS.DEPTH}"
    if "inception" in name.lower():
        return "Inception-BN"
    if "torchvision" in name:  # nst_det's torchvision backbones
        return classifier_name(cfg.MODEL.TORCHVISION.ARCH)
    return name


def detector_name(cfg) -> str:
    """e.g. 'Faster R-CNN, R-18 FPN backbone' (from the config)."""
    arch = _DETECTORS.get(cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.META_ARCHITECTURE)
    layout = "FPN" if "fpn" in cfg.MODEL.BACKBONE.NAME.lower() else "C4"
    return f"{arch}, {backbone_name(cfg)} {layout} backbone"


def distillation_summary(cfg) -> str:
    """The transfer losses a config turns on, with their feature pairs, or ''."""
    parts = []
    pairs = ", ".join(f"{s}→{t}" for s, t in zip(cfg.MODEL.DISTILL.STUDENT_FEATURES,
                                                  cfg.MODEL.DISTILL.TEACHER_FEATURES))
    if cfg.MODEL.NST.LOSS_WEIGHT > 0:
        parts.append(f"NST ({cfg.MODEL.NST.KERNEL} kernel, MODEL.NST.LOSS_WEIGHT "
                     f"{cfg.MODEL.NST.LOSS_WEIGHT:g}) on student→teacher features {pairs}")
    if cfg.MODEL.KD.LOSS_WEIGHT > 0:
        parts.append(f"KD (weight {cfg.MODEL.KD.LOSS_WEIGHT:g}, T = "
                     f"{cfg.MODEL.KD.TEMPERATURE:g})")
    for name, weight in zip(cfg.MODEL.TRANSFER.NAMES, cfg.MODEL.TRANSFER.WEIGHTS):
        if weight > 0:
            parts.append(f"{name} (weight {weight:g}) on {pairs}")
    return "; ".join(parts)


def set_list(names) -> str:
    """Data set names as a markdown list: "`a`, `b`" (or "none")."""
    return ", ".join(f"`{n}`" for n in names) or "none"


def evaluator_label(test_set: str) -> tuple[str, str]:
    """(evaluator type, a label such as 'VOC2007 test') of a registered test set."""
    meta = MetadataCatalog.get(test_set)
    kind = meta.get("evaluator_type", "")
    if kind == "pascal_voc":
        return kind, f"VOC{meta.get('year', '')} metric"
    return kind, f"{kind or 'detection'} metric"


def training_precision(stage: Stage) -> str:
    """How a stage trained: float32, bfloat16 or float16 autocast, and the memory layout."""
    cfg = stage_config(stage)
    layout = ", channels_last" if cfg.NST_DET.CHANNELS_LAST else ""
    if not cfg.SOLVER.AMP.ENABLED:
        return f"float32{layout}"
    if cfg.MODEL.DEVICE.startswith("cuda"):
        return f"float16 autocast (SOLVER.AMP.ENABLED, detectron2's AMPTrainer){layout}"
    return f"bfloat16 autocast on the CPU (SOLVER.AMP.ENABLED){layout}; evaluation in float32"


def metrics_rows(run_dir: str) -> list[dict]:
    """detectron2's per-iteration scalars: the rows of a run's metrics.json ([] without one)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown_table(header: list, rows: list) -> str:
    """A GitHub-markdown table of already formatted cells (no number parsing: "1.0" stays)."""
    return tabulate(rows, header, tablefmt="github", disable_numparse=True)
