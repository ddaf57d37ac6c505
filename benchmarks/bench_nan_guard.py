"""Cost of the NaN guard: its checks against a training step, on a plain detector and under KD.

    .venv/bin/python benchmarks/bench_nan_guard.py [--iters 20] [--device cpu|cuda]

It times the guard's work itself, on the step's real outputs, and the training step, and prints
the ratio of the medians (timing whole steps with and without the guard cannot resolve a cost this
small on a shared machine):
- plain: toy R-18 FPN detector; the guard checks its loss dict;
- KD: the toy R-18 FPN NST + KD distiller (random R-50 FPN teacher); the guard also checks the
  output of each of the teacher's `teacher_parts` (its forward hooks), then the loss dict.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_distill_overhead import build_pair  # benchmarks/, this script's folder
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nst_det.config import load_config
from nst_det.engine.nan_guard import check_finite_losses, outputs_finite, teacher_parts

REPO = Path(__file__).resolve().parents[1]
Q = REPO / "configs" / "quick_schedules"


def _median_ms(fn, times: int, device: str) -> float:
    samples = []
    for _ in range(times):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def measure(model, batch, iters: int, device: str) -> tuple:
    """(step ms, guard ms): medians of a training step and of the guard's checks on its outputs
    (the teacher parts' outputs, captured in one forward, then the loss dict)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    teacher = getattr(model, "teacher", None)
    captured = []
    hooks = [part.register_forward_hook(lambda m, i, out: captured.append(out))
             for part in (teacher_parts(teacher) if teacher is not None else [])]

    def step():
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    def guard():
        flags = [f for f in map(outputs_finite, captured) if f is not None]
        known = torch.stack(flags).all() if flags else None  # the hooks' running `&`
        check_finite_losses(losses, known)

    with EventStorage(0):
        step()  # warm-up
        step_ms = _median_ms(step, iters, device)
        captured.clear()
        losses = model(batch)  # one forward: its losses and the teacher parts' outputs
        for hook in hooks:
            hook.remove()
        guard_ms = _median_ms(guard, 200, device)
    return step_ms, guard_ms, len(captured)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.iters < 1:
        parser.error("--iters must be at least 1")

    cfg = load_config(str(Q / "faster_rcnn_R_18_FPN_toy.yaml"), ["MODEL.DEVICE", args.device])
    plain = build_model(cfg).train()
    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(r) for r in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
    with tempfile.TemporaryDirectory() as tmp:
        _, kd, _ = build_pair(args.device, tmp, Q / "faster_rcnn_R_18_FPN_toy_kd_nst.yaml",
                              Q / "faster_rcnn_R_50_FPN_toy_teacher.yaml")
    for name, model in (("plain R-18 FPN", plain), ("R-18 FPN NST + KD, R-50 teacher", kd)):
        step_ms, guard_ms, parts = measure(model.train(), batch, args.iters, args.device)
        checked = f"loss dict + {parts} teacher outputs" if parts else "loss dict"
        print(f"{name} (toy, batch 2): step {step_ms:.1f} ms (median of {args.iters}); "
              f"guard on {checked} {guard_ms * 1e3:.0f} us (median of 200); "
              f"cost {100 * guard_ms / step_ms:.3f}% of a step (target < 1%)")


if __name__ == "__main__":
    main()
