"""What a pipeline run was, in words, from each stage's own config (nothing toy-specific), and
the readers report.md's sections share: stages by meta, metrics.json rows, tables, headings."""

from __future__ import annotations

import functools
import json
import logging
import os

from detectron2.data import MetadataCatalog
from tabulate import tabulate

from ..config import load_config
from .plan import Stage

logger = logging.getLogger(__name__)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READING = "docs/reading_the_report.md"  # how to read each report section, in the repository
_CLASSIFIERS = {"inception_bn": "Inception-BN", "mobilenet_v3_large": "MobileNetV3-Large",
                "mobilenet_v3_small": "MobileNetV3-Small"}
# a GitHub-markdown table of already formatted cells (no number parsing: "1.0" stays)
markdown_table = functools.partial(tabulate, tablefmt="github", disable_numparse=True)


def section(title: str, anchor: str, *body: str) -> list[str]:
    """A report section's lines: its heading, a line pointing to where READING explains it
    (`anchor`: the GitHub anchor of that part's heading), then `body`."""
    return [f"## {title}", "", f"How to read this section: `{READING}#{anchor}` in the nst_det "
            "repository.", "", *body]


def select(stages: list, **meta) -> list:
    """The stages whose meta has each of the given values."""
    return [s for s in stages if all(s.meta.get(k) == v for k, v in meta.items())]


def stage_config(stage: Stage):
    """The config a stage ran with: its written config.yaml (parsed once per file version: a
    report reads each several times), else the plan's config file with the stage's overrides."""
    written = os.path.join(stage.out_dir, "config.yaml")
    if os.path.isfile(written):
        return _written_config(written, os.stat(written).st_mtime_ns).clone()
    config = stage.config if os.path.isabs(stage.config) else os.path.join(REPO, stage.config)
    return load_config(config, stage.opts)


@functools.lru_cache(maxsize=64)
def _written_config(path: str, mtime_ns: int):  # mtime_ns: a stage run again is read again
    return load_config(path)


def classifier_name(arch: str) -> str:
    """'resnet18' -> 'R-18', 'inception_bn' -> 'Inception-BN', torchvision names as they are."""
    arch = arch.split(":", 1)[-1]
    if arch.startswith("resnet") and arch[6:].isdigit():
        return f"R-{arch[6:]}"
    return _CLASSIFIERS.get(arch, arch)


def backbone_name(cfg) -> str:
    """A detector's backbone in the paper's words, e.g. 'R-50'."""
    name = cfg.MODEL.BACKBONE.NAME
    if "resnet" in name:
        return f"R-{cfg.MODEL.RESNETS.DEPTH}"
    if "torchvision" in name:  # nst_det's torchvision backbones
        return classifier_name(cfg.MODEL.TORCHVISION.ARCH)
    return "Inception-BN" if "inception" in name.lower() else name


def detector_name(cfg) -> str:
    """e.g. 'Faster R-CNN, R-18 FPN backbone'."""
    arch = cfg.MODEL.META_ARCHITECTURE  # GeneralizedRCNN, RetinaNet or their Distillation*
    arch = "RetinaNet" if "RetinaNet" in arch else "Faster R-CNN" if "RCNN" in arch else arch
    layout = "FPN" if "fpn" in cfg.MODEL.BACKBONE.NAME.lower() else "C4"
    return f"{arch}, {backbone_name(cfg)} {layout} backbone"


def distillation_summary(cfg) -> str:
    """The transfer losses a config turns on, with their feature pairs, or ''."""
    nst, kd, transfer, d = cfg.MODEL.NST, cfg.MODEL.KD, cfg.MODEL.TRANSFER, cfg.MODEL.DISTILL
    pairs = ", ".join(f"{s}→{t}" for s, t in zip(d.STUDENT_FEATURES, d.TEACHER_FEATURES))
    parts = [f"NST ({nst.KERNEL} kernel, MODEL.NST.LOSS_WEIGHT {nst.LOSS_WEIGHT:g}) on "
             f"student→teacher features {pairs}"] if nst.LOSS_WEIGHT > 0 else []
    if kd.LOSS_WEIGHT > 0:
        parts.append(f"KD (weight {kd.LOSS_WEIGHT:g}, T = {kd.TEMPERATURE:g})")
    parts += [f"{name} (weight {weight:g}) on {pairs}"
              for name, weight in zip(transfer.NAMES, transfer.WEIGHTS) if weight > 0]
    return "; ".join(parts)


def set_list(names) -> str:
    """Data set names as a markdown list: "`a`, `b`" (or "none")."""
    return ", ".join(f"`{n}`" for n in names) or "none"


def evaluator_label(test_set: str) -> tuple[str, str]:
    """(evaluator type, a label such as 'VOC2007 metric') of a registered test set."""
    meta = MetadataCatalog.get(test_set)
    kind = meta.get("evaluator_type", "")
    if kind == "pascal_voc":
        return kind, f"VOC{meta.get('year', '')} metric"
    return kind, f"{kind or 'detection'} metric"


def metrics_rows(run_dir: str) -> list[dict]:
    """detectron2's per-iteration scalars: the rows of a run's metrics.json ([] without one),
    parsed once per file version (the table, the methods section and the curves read it)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    return list(_metrics_file(path, os.stat(path).st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _metrics_file(path: str, mtime_ns: int) -> tuple:  # mtime_ns: a grown file is read again
    """One row per iteration, in order: a resumed run writes again the iterations after its last
    checkpoint (its values win); a line a killed writer cut short is skipped, with a warning."""
    rows = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except ValueError:
                logger.warning("%s line %d is not JSON (cut short by a kill?): skipped",
                               path, number)
                continue
            if row:
                rows.setdefault(row.get("iteration", -1), {}).update(row)
    return tuple(rows[k] for k in sorted(rows))
