"""Ending a launched multi-process run cleanly."""

from __future__ import annotations

import torch.distributed as dist
from detectron2.utils import comm


def release_process_group() -> None:
    """Wait for every rank, then destroy the default process group (no-op in a single process).

    detectron2's launch leaves the group alive until the interpreter exits; gloo's threads then
    race the exit and a rank can abort with "terminate called without an active exception",
    which fails the whole run although training finished.
    """
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()
