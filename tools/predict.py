#!/usr/bin/env python
"""Run a detector on images and write them with detections drawn, plus detections.json.

    # an exported model (reads export_info.json beside it)
    tools/predict.py --model out/export/model.onnx --input img.jpg dir/ --output out/pred
    # an eager model from a config and weights
    tools/predict.py --config-file cfg.yaml --input dir/ --output out/pred MODEL.WEIGHTS m.pth
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from detectron2.data import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from nst_det.checkpoint.weights_file import WeightsFileError
from nst_det.config import load_config
from nst_det.data.from_config import thing_classes
from nst_det.export import (
    eager_runner,
    file_sha256,
    onnx_runner,
    preprocess,
    rescale_boxes,
    torchscript_runner,
)
from nst_det.export.student import load_student_detector
from nst_det.utils.atomic import atomic_write

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model.ts or model.onnx written by tools/export_model.py")
    source.add_argument("--config-file", help="a config; the eager model loads MODEL.WEIGHTS")
    parser.add_argument("--input", nargs="+", required=True, help="images and/or folders")
    parser.add_argument("--output", required=True, help="folder for drawn images + detections.json")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def list_images(inputs):
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            sys.exit(f"--input {item}: no such file or folder")
    if not files:
        sys.exit(f"--input {inputs}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for path in files:  # before anything is written: a text file named .jpg, a broken PNG
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as e:
            sys.exit(f"--input {path}: not a readable image ({e}); nothing was written")
    return files


def drawn_names(files, output: str) -> list:
    """The file each input's drawing is written to in `output`: `<stem>.jpg`, `<stem>_<n>.jpg`
    when inputs share a stem (a.jpg and a.png, or dir1/a.jpg and dir2/a.jpg). Exits before
    anything is written when `output` holds an input image: its drawing could replace it."""
    inputs = {p.resolve() for p in files}
    held = sorted(p for p in inputs if p.parent == Path(output).resolve())
    if held:
        sys.exit(f"--output {output} holds input images (e.g. {held[0]}), which the drawn "
                 "images could replace: choose another --output folder")
    names, taken = [], set()
    for path in files:
        name, n = f"{path.stem}.jpg", 0
        while name in taken:
            n += 1
            name = f"{path.stem}_{n}.jpg"
        taken.add(name)
        names.append(name)
    return names


def build_runner(args):
    """(runner, input format, min size, max size, class names) for --model or --config-file."""
    if args.model:
        info_path = Path(args.model).with_name("export_info.json")
        verification = Path(args.model).with_name("verification.json")  # written last
        if not (verification.is_file() and info_path.is_file()):
            sys.exit(f"{args.model} is not a finished export ({verification.name} is missing: "
                     "the export was interrupted or never ran): export the model with "
                     "tools/export_model.py")
        if not json.loads(verification.read_text()).get("passed"):
            sys.exit(f"{args.model} failed its verification against the eager model "
                     f"(see {verification}): export it again or use --config-file")
        info = json.loads(info_path.read_text())
        if Path(args.model).name != info["file"] or info["format"] not in ("onnx", "torchscript"):
            sys.exit(f"{args.model}: its folder's export_info.json describes a {info['format']} "
                     f"export, {info['file']}: give that file to --model (a .onnx or .ts file), "
                     "or a checkpoint export's config.yaml to --config-file")
        size, recorded = os.path.getsize(args.model), info.get("sha256")  # (older: size only)
        if size != info.get("size_bytes", size) or (recorded and recorded != file_sha256(
                args.model)):
            sys.exit(f"{args.model} is not the file its export verified ({size} bytes, "
                     f"export_info.json records {info.get('size_bytes')} and its sha256): copied "
                     "short or changed since; copy the export folder again or export again")
        runner = onnx_runner(args.model) if args.model.endswith(".onnx") else torchscript_runner(
            args.model
        )
        floor = info.get("score_thresh_test", 0.0)
        if args.score_thresh < floor:
            print(f"[predict] warning: --score-thresh {args.score_thresh} is below the "
                  f"{floor} traced into {args.model}: no detection scores below {floor}")
        return (runner, info["input_format"], info["min_size_test"], info["max_size_test"],
                info["class_names"])
    try:
        cfg = load_config(args.config_file, args.opts)
        cfg.MODEL.DEVICE = "cpu"
        model = load_student_detector(cfg)
    except (FileNotFoundError, KeyError, ValueError, WeightsFileError) as e:
        sys.exit(str(e))
    names = thing_classes(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else []
    info = Path(args.config_file).with_name("export_info.json")
    if not names and info.is_file():  # an exported checkpoint's config.yaml: its test set may
        names = json.loads(info.read_text())["class_names"]  # be one its dropped keys registered
    return eager_runner(model), cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, \
        cfg.INPUT.MAX_SIZE_TEST, names


def draw(image_rgb, detections, class_names):
    """The image with boxes, class names and scores drawn by detectron2's Visualizer."""
    h, w = image_rgb.shape[:2]
    instances = Instances((h, w), pred_boxes=Boxes(detections["boxes"]),
                          scores=detections["scores"], pred_classes=detections["classes"])
    visualizer = Visualizer(image_rgb, Metadata(thing_classes=list(class_names)))
    return visualizer.draw_instance_predictions(instances).get_image()


def main(argv=None):
    args = parse_args(argv)
    runner, input_format, min_size, max_size, class_names = build_runner(args)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        sys.exit(f"--output {args.output} is a file: give a folder")
    files = list_images(args.input)
    names = drawn_names(files, args.output)
    os.makedirs(args.output, exist_ok=True)
    results = []
    for path, name in zip(files, names):
        image = read_image(str(path), format=input_format)
        tensor = preprocess(image, min_size, max_size)
        det = runner(tensor)
        keep = det["scores"] >= args.score_thresh
        det = {k: v[keep] for k, v in det.items()}
        det["boxes"] = rescale_boxes(det["boxes"], tensor.shape[1:], image.shape[:2])
        rgb = image[:, :, ::-1] if input_format == "BGR" else image
        drawn = draw(np.ascontiguousarray(rgb), det, class_names)
        with atomic_write(Path(args.output) / name) as f:
            Image.fromarray(drawn).save(f, format="JPEG", quality=90)
        results.append({
            "file": str(path),
            "drawn": name,
            "detections": [
                {"box": [round(float(v), 2) for v in box], "score": round(float(score), 4),
                 "class": int(cls), "class_name": class_names[cls] if cls < len(class_names)
                 else str(cls)}
                for box, score, cls in zip(det["boxes"], det["scores"], det["classes"])
            ],
        })
    with atomic_write(Path(args.output) / "detections.json", "w") as f:
        json.dump(results, f, indent=2)
    total = sum(len(r["detections"]) for r in results)
    print(f"[predict] {len(results)} images, {total} detections >= {args.score_thresh} -> "
          f"{args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
