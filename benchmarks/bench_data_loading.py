"""Is data loading a bottleneck of the toy runs? Loader throughput against training throughput.

    .venv/bin/python benchmarks/bench_data_loading.py [--batches 20] [--workers 0 1]

For the toy detection and classification configs, it times the training data stream alone
(nst_det's resumable loader: read JPEG, augment, batch) and a training step alone, and prints
images per second for both: the loader keeps up when its rate is well above the step's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from detectron2.utils.events import EventStorage

from nst_det.config import load_config
from nst_det.engine import TRAINER_REGISTRY

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "detection (R-18 FPN toy)": "configs/quick_schedules/faster_rcnn_R_18_FPN_toy.yaml",
    "classification (R-18 toy)": "configs/quick_schedules/cls_R18_toy.yaml",
}


def loader_rate(trainer_cls, cfg, batches: int) -> float:
    """Images per second of the training stream alone (after the first batch)."""
    stream = iter(trainer_cls.build_train_loader(cfg))
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * cfg.SOLVER.IMS_PER_BATCH / (time.perf_counter() - start)


def step_rate(trainer_cls, cfg, steps: int) -> float:
    """Images per second of training steps on one fixed batch (no data loading)."""
    model = trainer_cls.build_model(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    batch = next(iter(trainer_cls.build_train_loader(cfg)))
    times = []
    with EventStorage(0):
        for _ in range(steps + 1):
            start = time.perf_counter()
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    return cfg.SOLVER.IMS_PER_BATCH / statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    for name, config in CONFIGS.items():
        for workers in args.workers:
            cfg = load_config(str(REPO / config), ["DATALOADER.NUM_WORKERS", str(workers)])
            trainer_cls = TRAINER_REGISTRY.get(cfg.NST_DET.TRAINER)
            loading = loader_rate(trainer_cls, cfg, args.batches)
            training = step_rate(trainer_cls, cfg, args.steps)
            print(f"{name}, {workers} workers: loader {loading:7.1f} img/s, training step "
                  f"{training:6.1f} img/s -> loader/step = {loading / training:5.1f}x")


if __name__ == "__main__":
    main()
