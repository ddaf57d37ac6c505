"""What distillation buys: the exported student detector against the teacher detector.

    .venv/bin/python benchmarks/bench_student_vs_teacher.py --pipeline output/pipeline \
        [--images 20] [--rounds 3] [--threads N]
    .venv/bin/python benchmarks/bench_student_vs_teacher.py --configs \
        [--student configs/quick_schedules/faster_rcnn_MNV3_FPN_toy_pretrained.yaml ...] \
        [--teacher configs/quick_schedules/faster_rcnn_R_50_FPN_toy_teacher.yaml]

--configs: speed and size only, no finished run needed: every --student config (default: the
toy MobileNetV3-Large FPN and R-18 FPN students) and the teacher config (default: the toy
pipeline's R-34 FPN teacher detector) are built with random weights (or their MODEL.WEIGHTS with
--weights), exported to ONNX in a temporary folder and timed side by side in one run. The
untrained detectors keep RPN.POST_NMS_TOPK_TEST proposals each, so the heads cost what they cost
at test time; AP50 is not measured in this mode.

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
from detectron2.modeling import build_model

import nst_det  # noqa: F401  (registers nst_det's backbones for configs that use them)
from nst_det.config import load_config
from nst_det.export import eager_runner, export_onnx, onnx_runner
from nst_det.export.api import sample_images
from nst_det.export.student import detectron2_meta_architecture, load_student_detector


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run the pipeline (make demo) to the end first")
    with open(path) as f:
        return json.load(f)


def _load_exported_student(checkpoint_dir: str):
    """The student written by the export stage (config.yaml + model_final.pth); nst_det's config
    reads it, since a torchvision-backbone student keeps its MODEL.TORCHVISION keys."""
    cfg = load_config(os.path.join(checkpoint_dir, "config.yaml"))
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


Q = "configs/quick_schedules"
# the toy pipeline's teacher detector: R-34 FPN (plan.TOY_CONFIGS.det_teacher_opts)
TOY_TEACHER = (f"{Q}/faster_rcnn_R_50_FPN_toy_teacher.yaml",
               ["MODEL.RESNETS.DEPTH", "34", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
TOY_STUDENTS = [f"{Q}/faster_rcnn_MNV3_FPN_toy_pretrained.yaml",
                f"{Q}/faster_rcnn_R_18_FPN_toy_pretrained.yaml"]


def _backbone_name(cfg) -> str:
    """e.g. "R-34 FPN", "mobilenet_v3_large FPN"."""
    name = cfg.MODEL.BACKBONE.NAME
    arch = (cfg.MODEL.TORCHVISION.ARCH if "torchvision" in name
            else "InceptionBN" if "inception" in name else f"R-{cfg.MODEL.RESNETS.DEPTH}")
    return f"{arch}{' FPN' if 'fpn' in name else ''}"


def _build(config: str, opts: list, with_weights: bool):
    """A detector of `config` on the CPU, eval mode: random weights unless `with_weights`."""
    cfg = load_config(config, [*opts, "MODEL.DEVICE", "cpu"])
    if with_weights:
        return cfg, load_student_detector(cfg)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.META_ARCHITECTURE = detectron2_meta_architecture(cfg.MODEL.META_ARCHITECTURE)
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


def _table(entries: dict, images: list, rounds: int, tmp: str, ap50: dict | None = None):
    """Time every (name -> (cfg, model, onnx path or None)) eager and in ONNX Runtime; print."""
    runners, sizes, params = {}, {}, {}
    for name, (_cfg, model, onnx_path) in entries.items():
        if onnx_path is None:
            onnx_path = os.path.join(tmp, f"{len(sizes)}.onnx")
            export_onnx(model, images[0], onnx_path)
        runners[name, "eager"] = eager_runner(model)
        runners[name, "onnxruntime"] = onnx_runner(onnx_path)
        sizes[name] = os.path.getsize(onnx_path)
        params[name] = sum(p.numel() for p in model.parameters())
    order = {key: i for i, key in enumerate(runners)}  # eager rows first, then ONNX Runtime
    seconds = _time_interleaved(runners, images, rounds)
    sizes_px = sorted({f"{im.shape[2]}x{im.shape[1]}" for im in images})
    print(f"input {', '.join(sizes_px)} px (W x H), {len(images)} images x {rounds} rounds, "
          f"{torch.get_num_threads()} torch threads, CPU\n")
    print("| detector | runtime | img/s | ms/img | params (M) | ONNX file (MB) | AP50 |")
    print("|---|---|---|---|---|---|---|")
    for (who, runtime), sec in sorted(seconds.items(), key=lambda kv: (kv[0][1], order[kv[0]])):
        ap = f"{ap50[who]:.1f}" if ap50 else "n/a"
        print(f"| {who} | {runtime} | {1 / sec:.1f} | {1e3 * sec:.1f} | "
              f"{params[who] / 1e6:.2f} | {sizes[who] / 1e6:.1f} | {ap} |")
    teacher = next(iter(entries))
    for who in list(entries)[1:]:
        for runtime in ("eager", "onnxruntime"):
            speedup = seconds[teacher, runtime] / seconds[who, runtime]
            line = (f"{who} / {teacher} ({runtime}): {speedup:.2f}x the images per second, "
                    f"{params[who] / params[teacher]:.2f}x the parameters")
            if ap50:
                line += f", AP50 {ap50[who] - ap50[teacher]:+.1f}"
            print(line)


def pipeline_mode(args):
    """The exported best student of a finished pipeline run against its teacher detector."""
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
    _check_same_input(t_cfg, {"exported student": s_cfg})
    images = sample_images(t_cfg, args.images)
    names = {"teacher": f"teacher {_backbone_name(t_cfg)} (det_teacher)",
             "student": f"student {_backbone_name(s_cfg)} ({student_stage}, exported)"}
    ap50 = {names["teacher"]: teacher_ap50["metrics"]["bbox"]["AP50"],
            names["student"]: student_ap50["metrics"]["bbox"]["AP50"]}
    with tempfile.TemporaryDirectory(prefix="teacher_onnx_") as tmp:
        _table({names["teacher"]: (t_cfg, teacher, None),
                names["student"]: (s_cfg, student,
                                   os.path.join(root, "export", "onnx", "model.onnx"))},
               images, args.rounds, tmp, ap50)


def _check_same_input(t_cfg, students: dict) -> None:
    for name, s_cfg in students.items():
        for key in ("MIN_SIZE_TEST", "MAX_SIZE_TEST", "FORMAT"):
            if s_cfg.INPUT[key] != t_cfg.INPUT[key]:
                raise ValueError(f"INPUT.{key} differs between the {name} ({s_cfg.INPUT[key]}) "
                                 f"and the teacher ({t_cfg.INPUT[key]}): the comparison needs "
                                 "one input size")


def configs_mode(args):
    """Students and teacher built from their configs, side by side in one run."""
    teacher_cfg_file = args.teacher or TOY_TEACHER[0]
    teacher_opts = args.teacher_opts.split() if args.teacher_opts is not None else (
        TOY_TEACHER[1] if args.teacher is None else [])
    t_cfg, teacher = _build(teacher_cfg_file, teacher_opts, args.weights)
    entries = {f"teacher {_backbone_name(t_cfg)}": (t_cfg, teacher, None)}
    for config in args.student or TOY_STUDENTS:
        s_cfg, student = _build(config, [], args.weights)
        _check_same_input(t_cfg, {config: s_cfg})
        label = f"student {_backbone_name(s_cfg)}"
        if label in entries:  # two configs of one backbone: name the row by its file too
            label = f"{label} ({os.path.basename(config)})"
        entries[label] = (s_cfg, student, None)
    images = sample_images(t_cfg, args.images)
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        _table(entries, images, args.rounds, tmp)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="output/pipeline", help="a finished pipeline run")
    parser.add_argument("--configs", action="store_true",
                        help="build students and teacher from configs (no pipeline run needed)")
    parser.add_argument("--student", action="append", default=None, metavar="CONFIG",
                        help="--configs: a student config (repeatable)")
    parser.add_argument("--teacher", default=None, metavar="CONFIG",
                        help="--configs: the teacher config")
    parser.add_argument("--teacher-opts", default=None,
                        help="--configs: teacher overrides, 'KEY VALUE ...' (default for the toy "
                             "teacher: R-34)")
    parser.add_argument("--weights", action="store_true",
                        help="--configs: load each config's MODEL.WEIGHTS (else random weights)")
    parser.add_argument("--images", type=int, default=20, help="test images to time on")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.images < 1 or args.rounds < 1:
        parser.error("--images and --rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.configs:
        configs_mode(args)
    else:
        pipeline_mode(args)


if __name__ == "__main__":
    main()
