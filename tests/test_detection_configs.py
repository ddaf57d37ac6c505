"""Every detection config builds its student, and its teacher pairing is valid (no weights)."""

from __future__ import annotations

import functools
import os

import pytest
from _detection_common import REPO
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from nst_det import add_nst_config
from nst_det.distill import build_feature_pairs
from nst_det.losses import get_transfer_loss
from nst_det.modeling.roi_logits import check_kd_heads
from nst_det.modeling.teacher import build_teacher_cfg

CONFIGS = sorted(
    [p for p in (REPO / "configs" / "VOC-Detection").rglob("*.yaml") if "Base" not in p.name]
    + [p for p in (REPO / "configs" / "quick_schedules").glob("faster_rcnn_*.yaml")]
    + [p for p in (REPO / "configs" / "quick_schedules").glob("retinanet_*.yaml")]
)
# each distilling meta-architecture and the detectron2 class its student is
STUDENT_ARCH = {"DistillationRCNN": "GeneralizedRCNN", "DistillationRetinaNet": "RetinaNet"}


def _load(path):
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


@functools.cache
def _build_teacher(config_yaml: str):
    """A teacher built from its dumped config (cached: a few teachers serve many students)."""
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_other_cfg(cfg.load_cfg(config_yaml))
    return build_model(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_detection_config_builds(path):
    cfg = _load(path)
    distill = cfg.MODEL.META_ARCHITECTURE in STUDENT_ARCH
    student_cfg = cfg.clone()  # no teacher weights needed here
    student_cfg.MODEL.META_ARCHITECTURE = STUDENT_ARCH.get(cfg.MODEL.META_ARCHITECTURE,
                                                           cfg.MODEL.META_ARCHITECTURE)
    student = build_model(student_cfg)
    if student_cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        assert student.num_classes == cfg.MODEL.RETINANET.NUM_CLASSES
    else:
        assert student.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if not distill:
        return
    cwd = os.getcwd()
    os.chdir(REPO)  # teacher config paths are relative to the repository root
    try:
        tcfg = build_teacher_cfg(cfg)
    finally:
        os.chdir(cwd)
    teacher = _build_teacher(tcfg.dump())
    weights = [float(w) for w in cfg.MODEL.TRANSFER.WEIGHTS]  # a YAML "5e-07" would be a string
    assert all(isinstance(w, float) for w in cfg.MODEL.TRANSFER.WEIGHTS), cfg.MODEL.TRANSFER
    if cfg.MODEL.KD.LOSS_WEIGHT > 0 and hasattr(student, "roi_heads"):
        check_kd_heads(student.roi_heads, teacher.roi_heads)
    feature_losses = cfg.MODEL.NST.LOSS_WEIGHT > 0 or any(
        w > 0 and not getattr(get_transfer_loss(n), "on_logits", False)
        for n, w in zip(cfg.MODEL.TRANSFER.NAMES, weights))
    if not feature_losses:  # logits only (KD, DKD): no feature pairs to check
        assert cfg.MODEL.KD.LOSS_WEIGHT > 0 or any(w > 0 for w in weights)
        return
    pairs = build_feature_pairs(
        cfg.MODEL.DISTILL.STUDENT_FEATURES, cfg.MODEL.DISTILL.TEACHER_FEATURES,
        cfg.MODEL.DISTILL.FEATURE_WEIGHTS, student.backbone.output_shape(),
        teacher.backbone.output_shape(),
    )
    assert pairs


def test_a_misspelt_teacher_override_names_the_teacher_opts_and_file():
    from nst_det.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "quick_schedules",
                                   "faster_rcnn_R_18_FPN_toy_nst.yaml"))
    cfg.MODEL.TEACHER.OPTS = ["MODEL.RESNETS.DEPTHH", "50"]
    with pytest.raises(KeyError, match=r"MODEL\.TEACHER\.OPTS: .*DEPTHH"):
        build_teacher_cfg(cfg)
    cfg.MODEL.TEACHER.OPTS = ["MODEL.RESNETS.DEPTH"]
    with pytest.raises(ValueError, match=r"MODEL\.TEACHER\.OPTS: 1 items"):
        build_teacher_cfg(cfg)
