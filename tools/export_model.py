#!/usr/bin/env python
"""Export a (student) detector: a student-only checkpoint, TorchScript or ONNX, then verify it.

    tools/export_model.py --config-file <train cfg> --format onnx --output out/export \
        MODEL.WEIGHTS output/.../model_final.pth

The detector is rebuilt from the student-only config (no teacher is built or loaded), its weights
are loaded strictly (teacher and distillation-module tensors, if any, are dropped), the export is
written atomically into --output, and the export's detections are compared with the eager
model's on sample test images. `verification.json` and `export_info.json` are written next to
the export. An export that fails the verification is not written (the folder keeps its previous
export) and the exit code is non-zero.
"""

import argparse
import sys

from nst_det.checkpoint.weights_file import WeightsFileError
from nst_det.config import load_config
from nst_det.export.api import export_and_verify
from nst_det.utils.atomic import exit_on_sigterm


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return int(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, choices=["checkpoint", "torchscript", "onnx"])
    parser.add_argument("--output", required=True, help="folder to write the export into")
    parser.add_argument("--num-images", type=_positive, default=3,
                        help="test images to verify on (>= 1)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def export_config(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"  # export and its verification run on the CPU
    return cfg


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = export_config(args)
        summary = export_and_verify(cfg, args.format, args.output, args.num_images)
    except (FileNotFoundError, KeyError, ValueError, WeightsFileError) as e:
        sys.exit(str(e))
    print(
        f"[export] {args.format}: {summary['file']} {summary['size_bytes'] / 1e6:.2f} MB; "
        f"verified on {len(summary['images'])} images ({summary['total_detections']} detections): "
        f"max |box - eager| = {summary['max_box_dev']:.2e} px (tol {summary['box_atol_px']}), "
        f"max |score - eager| = {summary['max_score_dev']:.2e} (tol {summary['score_atol']}) -> "
        "PASSED"
    )
    if not summary["total_detections"]:
        print("[export] warning: the model detected nothing on these images, so the comparison "
              "checked no box: verify on more images (--num-images) or a trained model")
    return 0


if __name__ == "__main__":
    exit_on_sigterm()  # `kill` stops it like Ctrl-C: nothing half-written is left behind
    sys.exit(main())
