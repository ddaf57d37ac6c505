"""Export a student detector in one format and verify it against the eager model."""

import hashlib
import json
import os

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from ..checkpoint.weights_file import load_weights_file
from ..config import add_nst_config
from ..utils.atomic import atomic_file_set, atomic_write
from .runtime import eager_runner, onnx_runner, preprocess, torchscript_runner
from .student import (
    load_student_detector,
    nst_det_parts,
    save_student_checkpoint,
    student_state_dict,
    uses_nst_backbone,
)
from .tracing import export_onnx, export_torchscript
from .verify import verify


def sample_images(cfg, count, start=0):
    """`count` images of the first test set from its `start`-th, preprocessed like at test
    time."""
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: the export is verified on test images")
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])[start:start + count]
    return [
        preprocess(read_image(r["file_name"], format=cfg.INPUT.FORMAT),
                   cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        for r in records
    ]


def file_sha256(path: str) -> str:
    """The hex sha256 of a file's bytes (recorded in export_info.json, checked by readers)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# test images the verification goes on with when the first ones gave no detection to compare
MORE_IMAGES = 16
MARKER = "verification.json"  # written last: an export folder without it holds no export
TRAINING_RUN_FILES = ("last_checkpoint", "metrics.json")  # what detectron2 training writes


class ExportVerificationError(ValueError):
    """An export that does not match the eager model; `summary` is its verification (`verify`).
    Nothing of it was written: the folder keeps its previous export, if any."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def _mismatch(summary: dict) -> str:
    worst = max(summary["images"], key=lambda r: (r["count_ref"] != r["count_out"],
                                                  not r["classes_equal"], r["max_box_dev"]))
    if worst["count_ref"] != worst["count_out"]:
        return f"{worst['count_out']} detections where the eager model has {worst['count_ref']}"
    if not worst["classes_equal"]:
        return "other classes than the eager model's"
    return (f"boxes up to {summary['max_box_dev']:.3g} px (tolerance {summary['box_atol_px']}) "
            f"and scores up to {summary['max_score_dev']:.3g} (tolerance "
            f"{summary['score_atol']}) from the eager model's")


EXPORT_FILES = ("model_final.pth", "config.yaml", "model.ts", "model.onnx")


def _check_out_dir(out_dir: str) -> None:
    """Raise ValueError unless out_dir is new, empty of what an export writes, or an export's:
    a training run's model_final.pth and config.yaml, or a user's copies of them (perhaps the
    very MODEL.WEIGHTS being exported), would be replaced."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export folder {out_dir} is a file: give a folder")
    for mark in TRAINING_RUN_FILES:
        if os.path.isfile(os.path.join(out_dir, mark)):
            raise ValueError(f"export folder {out_dir} is a training run's (it holds {mark}): "
                             "the export would replace its model_final.pth and config.yaml. "
                             "Choose another output folder")
    held = [f for f in EXPORT_FILES if os.path.isfile(os.path.join(out_dir, f))]
    if held and not os.path.isfile(os.path.join(out_dir, "export_info.json")):
        raise ValueError(f"export folder {out_dir} holds {held}, not from an export (no "
                         "export_info.json): the export would replace them. Choose another "
                         "output folder")


def export_and_verify(cfg, fmt: str, out_dir: str, num_images: int = 3) -> dict:
    """Write one export ("checkpoint" | "torchscript" | "onnx") of cfg's student into out_dir.

    The export is compared with the eager model on the first `num_images` test images (and
    `MORE_IMAGES` more when those gave no detection: empty outputs compare no box);
    `export_info.json` and `verification.json` are written next to it. Everything is written
    into a temporary folder inside out_dir and moved into place only once verified,
    `verification.json` last (`atomic_file_set`): an interrupted export leaves either the
    previous export or files without `verification.json`, which readers treat as no export.
    Returns:
        the verification summary (see `verify`), with format, file and size_bytes added.
    Raises ValueError, before anything is read or written, for a folder holding a training
    run's or other files the export would replace (`_check_out_dir`), and
    ExportVerificationError, having written nothing, for an export unlike the eager model.
    """
    _check_out_dir(out_dir)
    if num_images < 1:
        raise ValueError(f"the export is verified on test images: give 1 or more, not "
                         f"{num_images}")
    if fmt != "checkpoint" and (cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON):
        raise ValueError(f"the {fmt} export traces boxes, scores and classes only: a model "
                         "with MODEL.MASK_ON / KEYPOINT_ON exports as --format checkpoint")
    model = load_student_detector(cfg)
    images = sample_images(cfg, num_images)
    if not images:
        raise ValueError(f"test set {cfg.DATASETS.TEST[0]} has no images to verify the export on")
    # export_info.json first: an export stopped while moving into place is still known as one
    with atomic_file_set(out_dir, MARKER, first="export_info.json") as staging:
        if fmt == "checkpoint":
            final_weights = os.path.join(os.path.abspath(out_dir), "model_final.pth")
            path, cfg_path = save_student_checkpoint(cfg, student_state_dict(model), staging,
                                                     weights_path=final_weights)
            reloaded_cfg = get_cfg()
            if uses_nst_backbone(cfg):  # the backbone's own keys (MODEL.TORCHVISION, ...)
                add_nst_config(reloaded_cfg)
            reloaded_cfg.merge_from_file(cfg_path)  # else stock keys only, as in get_cfg()
            reloaded = build_model(reloaded_cfg)
            exported = load_weights_file(path, "exported checkpoint")
            reloaded.load_state_dict(exported["model"], strict=True)
            candidate = eager_runner(reloaded)
        elif fmt == "torchscript":
            path = os.path.join(staging, "model.ts")
            export_torchscript(model, images[0], path)
            candidate = torchscript_runner(path)
        else:
            path = os.path.join(staging, "model.onnx")
            export_onnx(model, images[0], path)
            candidate = onnx_runner(path)
        summary = verify(eager_runner(model), candidate, images, more_images=lambda: sample_images(
            cfg, MORE_IMAGES, start=len(images)))
        if not summary["passed"]:  # leaving the block removes the staging folder, nothing else
            raise ExportVerificationError(
                f"the {fmt} export of {cfg.MODEL.WEIGHTS} does not match the eager model on "
                f"{len(summary['images'])} test images ({_mismatch(summary)}). Nothing was written "
                f"to {out_dir}; its previous export, if any, is kept", summary)
        digest = file_sha256(path)  # binds both records to these very bytes
        summary.update(format=fmt, file=os.path.basename(path), size_bytes=os.path.getsize(path),
                       sha256=digest)
        info = {
            "format": fmt,
            "file": os.path.basename(path),
            "size_bytes": os.path.getsize(path),
            "sha256": digest,
            "input_format": cfg.INPUT.FORMAT,
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
            "class_names": list(MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes",
                                                                              [])),
            "parameters": sum(p.numel() for p in model.parameters()),
            # the scores below it were dropped inside the traced model (predict's floor)
            "score_thresh_test": (cfg.MODEL.RETINANET.SCORE_THRESH_TEST
                                  if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE
                                  else cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
            # parts of a checkpoint export that only `import nst_det` registers (else: stock
            # detectron2 builds it); a traced model needs neither
            "needs_nst_det": nst_det_parts(cfg) if fmt == "checkpoint" else [],
        }
        with atomic_write(os.path.join(staging, "export_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        with atomic_write(os.path.join(staging, MARKER), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
