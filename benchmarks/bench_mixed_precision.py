"""Mixed precision and memory layout: distillation steps in fp32 / autocast, NCHW / channels_last.

    .venv/bin/python benchmarks/bench_mixed_precision.py                 # CPU: bfloat16 autocast
    .venv/bin/python benchmarks/bench_mixed_precision.py --device cuda   # GPU: float16 autocast

For the toy classification distiller (R-18 student, R-34 teacher, NST + KD) and the toy detection
distiller (R-18 FPN student, R-50 FPN teacher, NST on p2-p6), it times whole training steps
(forward of student and teacher, losses, backward, optimizer step) for four variants, interleaved
step by step on the same batch, and prints each median against fp32 NCHW. It also checks, under
autocast, that the student's and teacher's features are low precision while loss_nst is float32
and finite (the NST loss disables autocast inside). Random weights: timing does not depend on them.

detectron2 v0.6 runs SOLVER.AMP.ENABLED through its AMPTrainer, which needs CUDA (float16 with a
gradient scaler); on a CPU this script measures what bfloat16 autocast would give.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nst_det.config import load_config

REPO = Path(__file__).resolve().parents[1]
Q = REPO / "configs" / "quick_schedules"


def classification_setup(device: str, tmp: str):
    """The toy KD+NST classification distiller and a batch of 32 random 48 px images."""
    teacher_file = str(Path(tmp) / "teacher_r34.pth")
    torch.save(torchvision.models.resnet34(num_classes=5).state_dict(), teacher_file)
    cfg = load_config(str(Q / "cls_R18_KD_NST_toy.yaml"),
                      ["MODEL.DEVICE", device, "MODEL.TEACHER.WEIGHTS", teacher_file])
    batch = [{"image": torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8), "label": i % 5}
             for i in range(cfg.SOLVER.IMS_PER_BATCH)]
    model = build_model(cfg)
    # forward_features calls the blocks one by one: watch the first block of the last stage
    return model, batch, (model.student.layer4[0], model.teacher.layer4[0])


def detection_setup(device: str, tmp: str):
    """The toy NST detection distiller (R-50 FPN teacher) and four toy training images."""
    opts = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", ""]
    teacher_cfg_file = str(Q / "faster_rcnn_R_50_FPN_toy_teacher.yaml")
    teacher_file = str(Path(tmp) / "teacher_det.pth")
    torch.save({"model": build_model(load_config(teacher_cfg_file, opts)).state_dict()},
               teacher_file)
    cfg = load_config(str(Q / "faster_rcnn_R_18_FPN_toy_nst.yaml"), [
        *opts, "MODEL.TEACHER.CONFIG_FILE", teacher_cfg_file, "MODEL.TEACHER.WEIGHTS",
        teacher_file, "DATALOADER.NUM_WORKERS", "0"])
    mapper = DatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[: cfg.SOLVER.IMS_PER_BATCH]
    model = build_model(cfg)
    return model, [mapper(r) for r in records], (model.backbone, model.teacher.backbone)


def _autocast(device: str, enabled: bool):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=enabled)


def check_precision(model, batch, device: str, parts: tuple) -> str:
    """Under autocast: the dtypes of the (student, teacher) feature modules' outputs and of
    loss_nst."""
    seen = {}

    def keep(name):
        def hook(_module, _inputs, output):
            out = next(iter(output.values())) if isinstance(output, dict) else output
            seen[name] = out.dtype
        return hook

    handles = [part.register_forward_hook(keep(name))
               for name, part in zip(("student", "teacher"), parts)]
    try:
        with EventStorage(0), _autocast(device, True):
            losses = model(batch)
    finally:
        for h in handles:
            h.remove()
    nst = losses["loss_nst"]
    if nst.dtype != torch.float32 or not torch.isfinite(nst):
        raise AssertionError(f"loss_nst under autocast is {nst.dtype} / {nst.item()}")
    return (f"student features {seen.get('student')}, teacher features {seen.get('teacher')}, "
            f"loss_nst {nst.dtype} (finite)")


def time_variants(model, batch, device: str, iters: int) -> dict:
    """Median step seconds of fp32 / autocast x NCHW / channels_last, interleaved."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step(amp: bool):
        with _autocast(device, amp):
            losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    variants = [(amp, layout) for layout in ("NCHW", "channels_last") for amp in (False, True)]
    times = {v: [] for v in variants}
    with EventStorage(0):
        for layout in ("NCHW", "channels_last"):  # warm-up each layout once
            model.to(memory_format=torch.channels_last if layout != "NCHW"
                     else torch.contiguous_format)
            step(False)
            step(True)
        for _ in range(iters):
            for amp, layout in variants:
                model.to(memory_format=torch.channels_last if layout != "NCHW"
                         else torch.contiguous_format)
                if device.startswith("cuda"):  # the layout copy is not part of the step
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(amp)
                times[amp, layout].append(time.perf_counter() - start)
    model.to(memory_format=torch.contiguous_format)
    return {v: statistics.median(t) for v, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.iters < 1:
        parser.error("--iters must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    amp_name = "bf16 autocast" if args.device == "cpu" else "fp16 autocast"
    print(f"device {args.device}, {torch.get_num_threads()} threads, {args.iters} interleaved "
          "steps per variant, medians; speed-up against fp32 NCHW")
    with tempfile.TemporaryDirectory() as tmp:
        setups = {"classification (R-34 -> R-18, NST+KD, 32 x 48 px)": classification_setup,
                  "detection (R-50 FPN -> R-18 FPN, NST p2-p6, 4 toy images)": detection_setup}
        for name, setup in setups.items():
            model, batch, parts = setup(args.device, tmp)
            model.train()
            print(f"\n{name}\n  under {amp_name}: "
                  f"{check_precision(model, batch, args.device, parts)}")
            med = time_variants(model, batch, args.device, args.iters)
            base = med[False, "NCHW"]
            for (amp, layout), sec in med.items():
                label = f"{amp_name if amp else 'fp32'}, {layout}"
                print(f"  {label:32s} {1e3 * sec:8.1f} ms/step  {base / sec:5.2f}x")


if __name__ == "__main__":
    main()
