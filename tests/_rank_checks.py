"""What each of two launched processes runs for tests/test_two_ranks.py (a module of its own:
spawned processes import the function by name). Each rank writes what it saw to
<out>/rank<r>.json."""

from __future__ import annotations

import json
import logging
import math
import os
from types import SimpleNamespace

import torch


def rank_checks(out: str) -> None:
    from detectron2.utils import comm

    from nst_det.engine import reliable
    from nst_det.engine.nan_guard import check_finite_losses
    from nst_det.utils.dist import broadcast_buffers

    rank, seen = comm.get_rank(), {}
    # 1. BN statistics differ per rank (each its own batches); evaluation uses rank 0's
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(float(rank + 1))
    broadcast_buffers(torch.nn.Sequential(bn))
    seen["running_mean"] = bn.running_mean.tolist()
    # 2. only rank 1's loss is NaN, and its teacher's output was: every rank's message says so
    losses = {"loss_cls": torch.tensor(0.5), "loss_nst": torch.tensor(math.nan if rank else 0.1)}
    try:
        check_finite_losses(losses, teacher_finite=torch.tensor(rank == 0), output_dir=out)
    except FloatingPointError as e:
        seen["nan_message"] = str(e)
    # 3. rank 1 skipped two images, rank 0 one of them (positions go round the ranks, epoch
    # after epoch): rank 0 reports the images of both after a finished run, each once
    cfg = SimpleNamespace(OUTPUT_DIR=out, NST_DET=SimpleNamespace(SKIP_BAD_IMAGES=True))
    with open(os.path.join(out, f"skipped_images.rank{rank}.txt"), "w") as f:
        f.write("a.jpg\terror\nb.jpg\terror\na.jpg\terror\n" if rank else "b.jpg\terror\n")
    comm.synchronize()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    reliable.logger.addHandler(handler)
    try:
        reliable._report_skipped_images(SimpleNamespace(cfg=cfg, iter=4, max_iter=4))
    finally:
        reliable.logger.removeHandler(handler)
    seen["skip_report"] = [r.getMessage() for r in records]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


def train_then_dump_buffers(config_file: str, data_prefix: str, data_dir: str, out: str) -> None:
    """Train the config (its last evaluation included) and write this rank's model buffers."""
    from detectron2.config import get_cfg
    from detectron2.utils import comm

    from nst_det import add_nst_config
    from nst_det.data.datasets import register_toy_voc
    from nst_det.engine import DetectionTrainer
    from nst_det.utils.dist import unwrap_ddp

    register_toy_voc(data_prefix, data_dir, seed=1, num_trainval=8, num_test=4)
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(config_file)
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    buffers = {k: v for k, v in unwrap_ddp(trainer.model).named_buffers() if "running" in k}
    torch.save(buffers, os.path.join(out, f"buffers.rank{comm.get_rank()}.pt"))
