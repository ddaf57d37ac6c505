"""Cost of the NaN guard: toy R-18 FPN detector training steps with and without it.

    .venv/bin/python benchmarks/bench_nan_guard.py [--iters 20] [--device cpu|cuda]

It times the guard's check itself on the step's real loss dict, and the training step, and prints
the ratio of the medians (timing whole steps with and without the guard cannot resolve a cost this
small on a shared machine).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nst_det.config import load_config
from nst_det.engine.nan_guard import check_finite_losses

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    cfg = load_config(str(REPO / "configs/quick_schedules/faster_rcnn_R_18_FPN_toy.yaml"),
                      ["MODEL.DEVICE", args.device])
    model = build_model(cfg).train()
    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(r) for r in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with EventStorage(0):
        step()  # warm-up
        step_times = [step() for _ in range(args.iters)]
        losses = model(batch)
        guard_times = []
        for _ in range(1000):
            start = time.perf_counter()
            check_finite_losses(losses)  # what the guard's hook runs on every training forward
            guard_times.append(time.perf_counter() - start)
    step_ms = statistics.median(step_times) * 1e3
    guard_ms = statistics.median(guard_times) * 1e3
    print(f"training step (R-18 FPN toy, batch 2): {step_ms:.1f} ms (median of {args.iters})")
    print(f"NaN guard check on its loss dict:      {guard_ms * 1e3:.1f} us (median of 1000)")
    print(f"guard cost: {100 * guard_ms / step_ms:.3f}% of a step (target < 1%)")

if __name__ == "__main__":
    main()
