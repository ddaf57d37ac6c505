"""What the report measures from a finished run's files, not read from its records: parameters,
CPU time per image, detections on test images, and backbone features with their MMD.

Each function loads a stage's `config.yaml` + `model_final.pth` as the export does (the student
alone, teacher and distillation modules dropped) and reads the run's first test images.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image

from ..config import load_config
from ..export import eager_runner, preprocess, rescale_boxes
from ..export.student import load_student_detector
from ..losses import nst_loss
from .plan import Stage

__all__ = ["load_detector", "test_images", "params_and_speed", "detections", "features_and_mmd"]

FILES = ("model_final.pth", "config.yaml")  # what a measurement needs in a stage's folder


def load_detector(stage: Stage):
    """(cfg, detector in eval mode on the CPU) of a finished stage."""
    cfg = load_config(os.path.join(stage.out_dir, "config.yaml"),
                      ["MODEL.WEIGHTS", os.path.join(stage.out_dir, "model_final.pth"),
                       "MODEL.DEVICE", "cpu"])
    return cfg, load_student_detector(cfg)


def test_images(cfg, count: int) -> tuple[list, list]:
    """The first `count` test images: (HxWx3 arrays in cfg.INPUT.FORMAT, 3xhxw float tensors at
    the test size)."""
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:count]
    images = [read_image(r["file_name"], format=cfg.INPUT.FORMAT) for r in records]
    tensors = [preprocess(im, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) for im in images]
    return images, tensors


def _ms_per_image(model, tensors) -> float:
    run = eager_runner(model)
    run(tensors[0])  # warm-up
    times = []
    for t in tensors:
        start = time.perf_counter()
        run(t)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def params_and_speed(teacher: Stage, student: Stage, images: int = 10) -> dict | str:
    """{"params": {"teacher", "student"} (millions), "speed": {...} (median CPU ms per image)},
    or why it cannot be measured here (a run's weights, config or test images are missing)."""
    for stage in (teacher, student):
        for name in FILES:
            if not os.path.isfile(os.path.join(stage.out_dir, name)):
                return f"{os.path.join(stage.out_dir, name)} is not there"
    try:
        t_cfg, t_model = load_detector(teacher)
        _, tensors = test_images(t_cfg, images)
        _, s_model = load_detector(student)
    except OSError as e:  # e.g. the test images are on another machine
        return f"{type(e).__name__}: {e}"
    models = {"teacher": t_model, "student": s_model}
    # timed in one run, one after the other, so both see the same machine load
    return {"params": {k: sum(p.numel() for p in m.parameters()) / 1e6
                       for k, m in models.items()},
            "speed": {k: _ms_per_image(m, tensors) for k, m in models.items()}}


def detections(stage: Stage, count: int = 4, min_score: float = 0.5) -> tuple:
    """(cfg, [(image HxWx3 in cfg.INPUT.FORMAT, Instances with score >= min_score in the
    image's own coordinates)]) on the stage's first `count` test images."""
    from detectron2.structures import Boxes, Instances

    cfg, model = load_detector(stage)
    images, tensors = test_images(cfg, count)
    run = eager_runner(model)
    found = []
    for image, tensor in zip(images, tensors):
        det = run(tensor)
        keep = det["scores"] >= min_score
        boxes = rescale_boxes(det["boxes"][keep], tensor.shape[1:], image.shape[:2])
        found.append((image, Instances(image.shape[:2], pred_boxes=Boxes(boxes),
                                       scores=det["scores"][keep],
                                       pred_classes=det["classes"][keep])))
    return cfg, found


def features_and_mmd(teacher: Stage, students: dict, s_feature: str, t_feature: str,
                     images: int = 8) -> tuple[dict, dict]:
    """Backbone features of the teacher and each student detector ({name: stage}).

    Returns ({"teacher" and each name: CxHxW feature of the first test image}, {name: mean over
    `images` test images of MMD^2 (poly kernel) between the student's `s_feature` and the
    teacher's `t_feature`}): what detection-stage NST minimises."""
    models = {"teacher": load_detector(teacher)[1]}
    for name, stage in students.items():
        cfg, models[name] = load_detector(stage)
    _, tensors = test_images(cfg, images)

    def feature(key, tensor):
        model = models[key]
        batch = model.preprocess_image([{"image": tensor}]).tensor
        return model.backbone(batch)[t_feature if key == "teacher" else s_feature]

    with torch.no_grad():
        first = {key: feature(key, tensors[0])[0] for key in models}
        teacher_feats = [feature("teacher", t) for t in tensors]
        mmd = {name: statistics.mean(float(nst_loss(feature(name, t), ft, kernel="poly"))
                                     for t, ft in zip(tensors, teacher_feats))
               for name in students}
    return first, mmd
