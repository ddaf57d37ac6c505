#!/usr/bin/env python
"""Export a (student) detector: a student-only checkpoint, TorchScript or ONNX, then verify it.

    tools/export_model.py --config-file <train cfg> --format onnx --output out/export \
        MODEL.WEIGHTS output/.../model_final.pth

The detector is rebuilt from the student-only config (no teacher is built or loaded), its weights
are loaded strictly (teacher tensors, if any, are dropped and counted), the export is written
atomically into --output, and the export's detections are compared with the eager model's on
sample test images. `verification.json` and `export_info.json` are written next to the export;
the exit code is non-zero when the verification fails.
"""

import argparse
import json
import os
import sys

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from nst_det.config import load_config
from nst_det.export import (
    eager_runner,
    export_onnx,
    export_torchscript,
    onnx_runner,
    preprocess,
    save_student_checkpoint,
    student_state_dict,
    torchscript_runner,
    verify,
)
from nst_det.export.student import load_student_detector
from nst_det.utils.atomic import atomic_write


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, choices=["checkpoint", "torchscript", "onnx"])
    parser.add_argument("--output", required=True, help="folder to write the export into")
    parser.add_argument("--num-images", type=int, default=3, help="test images to verify on")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def export_config(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"  # export and its verification run on the CPU
    return cfg


def sample_images(cfg, count):
    """The first `count` images of the first test set, preprocessed like at test time."""
    if not cfg.DATASETS.TEST:
        sys.exit("DATASETS.TEST is empty: the export is verified on test images")
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:count]
    return [
        preprocess(read_image(r["file_name"], format=cfg.INPUT.FORMAT),
                   cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        for r in records
    ]


def export(cfg, fmt, out_dir, num_images):
    """Write one export into out_dir and verify it; returns the verification summary."""
    try:
        model = load_student_detector(cfg)
    except (FileNotFoundError, KeyError) as e:
        sys.exit(str(e))
    images = sample_images(cfg, num_images)
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "checkpoint":
        path, cfg_path = save_student_checkpoint(cfg, student_state_dict(model), out_dir)
        reloaded_cfg = get_cfg()
        reloaded_cfg.merge_from_file(cfg_path)  # stock keys only: must merge into get_cfg()
        reloaded = build_model(reloaded_cfg)
        reloaded.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
        candidate = eager_runner(reloaded)
    elif fmt == "torchscript":
        path = os.path.join(out_dir, "model.ts")
        export_torchscript(model, images[0], path)
        candidate = torchscript_runner(path)
    else:
        path = os.path.join(out_dir, "model.onnx")
        export_onnx(model, images[0], path)
        candidate = onnx_runner(path)
    summary = verify(eager_runner(model), candidate, images)
    summary.update(format=fmt, file=os.path.basename(path), size_bytes=os.path.getsize(path))
    info = {
        "format": fmt,
        "file": os.path.basename(path),
        "size_bytes": os.path.getsize(path),
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "class_names": list(MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", [])),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with atomic_write(os.path.join(out_dir, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    with atomic_write(os.path.join(out_dir, "verification.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None):
    args = parse_args(argv)
    cfg = export_config(args)
    summary = export(cfg, args.format, args.output, args.num_images)
    print(
        f"[export] {args.format}: {summary['file']} {summary['size_bytes'] / 1e6:.2f} MB; "
        f"verified on {len(summary['images'])} images ({summary['total_detections']} detections): "
        f"max |box - eager| = {summary['max_box_dev']:.2e} px (tol {summary['box_atol_px']}), "
        f"max |score - eager| = {summary['max_score_dev']:.2e} (tol {summary['score_atol']}) -> "
        f"{'PASSED' if summary['passed'] else 'FAILED'}"
    )
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
