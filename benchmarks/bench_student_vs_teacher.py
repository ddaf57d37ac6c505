"""What distillation buys: the exported student detector against the teacher detector.

    .venv/bin/python benchmarks/bench_student_vs_teacher.py --pipeline output/pipeline \
        [--images 20] [--rounds 3] [--threads N]

Reads a finished pipeline run (`make demo`): the exported best student (`export/checkpoint/`,
`export/onnx/model.onnx`) and the teacher detector (`det_teacher/`). Both run at the same input
size (the teacher's test size; the student's export must agree, else it is an error) on the same
test images, as eager PyTorch and as ONNX Runtime (the teacher is exported to a temporary folder
for that). Variants are timed interleaved, image by image, for `--rounds` passes, and the median
per-image time is reported, so machine noise hits them alike. AP50 comes from the stages'
stage.json files of that run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import nst_det  # noqa: F401  (registers nst_det's backbones for configs that use them)
from nst_det.config import load_config
from nst_det.export import eager_runner, export_onnx, onnx_runner
from nst_det.export.api import sample_images
from nst_det.export.student import load_student_detector


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run the pipeline (make demo) to the end first")
    with open(path) as f:
        return json.load(f)


def _load_exported_student(checkpoint_dir: str):
    """The stock-detectron2 student written by the export stage (config.yaml + model_final.pth)."""
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(checkpoint_dir, "config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    state = torch.load(os.path.join(checkpoint_dir, "model_final.pth"), weights_only=True)
    model.load_state_dict(state["model"], strict=True)
    return cfg, model.eval()


def _time_interleaved(runners: dict, images: list, rounds: int) -> dict:
    """Median seconds per image for each runner, alternating runners image by image."""
    for run in runners.values():  # warm-up (first-call allocations, ORT graph optimisation)
        run(images[0])
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for image in images:
            for name, run in runners.items():
                start = time.perf_counter()
                run(image)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="output/pipeline", help="a finished pipeline run")
    parser.add_argument("--images", type=int, default=20, help="test images to time on")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = args.pipeline
    export_result = _read_json(os.path.join(root, "export", "stage.json"))["metrics"]
    student_stage = export_result["student"]
    student_ap50 = _read_json(os.path.join(root, student_stage, "stage.json"))
    teacher_ap50 = _read_json(os.path.join(root, "det_teacher", "stage.json"))

    s_cfg, student = _load_exported_student(os.path.join(root, "export", "checkpoint"))
    t_cfg = load_config(os.path.join(root, "det_teacher", "config.yaml"),
                        ["MODEL.WEIGHTS", os.path.join(root, "det_teacher", "model_final.pth"),
                         "MODEL.DEVICE", "cpu"])
    teacher = load_student_detector(t_cfg)  # the teacher detector is a plain detector itself
    for key in ("MIN_SIZE_TEST", "MAX_SIZE_TEST", "FORMAT"):
        if s_cfg.INPUT[key] != t_cfg.INPUT[key]:
            raise ValueError(f"INPUT.{key} differs between the exported student "
                             f"({s_cfg.INPUT[key]}) and the teacher ({t_cfg.INPUT[key]}): "
                             "the comparison needs one input size")
    images = sample_images(t_cfg, args.images)
    with tempfile.TemporaryDirectory(prefix="teacher_onnx_") as tmp:
        teacher_onnx = os.path.join(tmp, "model.onnx")
        export_onnx(teacher, images[0], teacher_onnx)
        student_onnx = os.path.join(root, "export", "onnx", "model.onnx")
        runners = {
            ("teacher", "eager"): eager_runner(teacher),
            ("student", "eager"): eager_runner(student),
            ("teacher", "onnxruntime"): onnx_runner(teacher_onnx),
            ("student", "onnxruntime"): onnx_runner(student_onnx),
        }
        seconds = _time_interleaved(runners, images, args.rounds)
        sizes = {"teacher": os.path.getsize(teacher_onnx), "student": os.path.getsize(student_onnx)}

    params = {"teacher": sum(p.numel() for p in teacher.parameters()),
              "student": sum(p.numel() for p in student.parameters())}
    ap50 = {"teacher": teacher_ap50["metrics"]["bbox"]["AP50"],
            "student": student_ap50["metrics"]["bbox"]["AP50"]}
    names = {"teacher": f"teacher R-{t_cfg.MODEL.RESNETS.DEPTH} (det_teacher)",
             "student": f"student R-{s_cfg.MODEL.RESNETS.DEPTH} ({student_stage}, exported)"}
    h, w = images[0].shape[1:]
    print(f"input {w}x{h} px (test size {t_cfg.INPUT.MIN_SIZE_TEST}), {len(images)} images x "
          f"{args.rounds} rounds, {torch.get_num_threads()} torch threads, CPU\n")
    print("| detector | runtime | img/s | ms/img | params (M) | ONNX file (MB) | VOC07 AP50 |")
    print("|---|---|---|---|---|---|---|")
    for (who, runtime), sec in seconds.items():
        print(f"| {names[who]} | {runtime} | {1 / sec:.1f} | {1e3 * sec:.1f} | "
              f"{params[who] / 1e6:.2f} | {sizes[who] / 1e6:.1f} | {ap50[who]:.1f} |")
    for runtime in ("eager", "onnxruntime"):
        speedup = seconds["teacher", runtime] / seconds["student", runtime]
        print(f"\nstudent / teacher ({runtime}): {speedup:.2f}x the images per second, "
              f"{params['student'] / params['teacher']:.2f}x the parameters, "
              f"AP50 {ap50['student'] - ap50['teacher']:+.1f}")


if __name__ == "__main__":
    main()
