"""Multi-process helpers: wrapping the model in DDP (GPU or CPU) and ending a run cleanly."""

from __future__ import annotations

import torch.distributed as dist
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def build_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """`model` wrapped in DistributedDataParallel when more than one process runs, else itself.

    `device_ids` is given only for a model on a GPU: DDP rejects device_ids for a CPU
    model, and detectron2's `create_ddp_model` (v0.6 and upstream main 02b5c4e alike) always
    passes it, which breaks CPU (gloo) runs. `broadcast_buffers=False` unless given, as
    detectron2's DefaultTrainer wraps its model (so training behaves as it did before).

    The GPU is the one the model is on (built on the current device, which detectron2's
    launch() and nst_det's pipeline worker set to the local rank), not `comm.get_local_rank()`:
    that needs detectron2's per-machine group, which v0.6 can create only inside launch().
    """
    if comm.get_world_size() == 1:
        return model
    kwargs.setdefault("broadcast_buffers", False)
    device = next(model.parameters()).device
    if "device_ids" not in kwargs and device.type == "cuda":
        kwargs["device_ids"] = [device.index]
    return DistributedDataParallel(model, **kwargs)


def broadcast_buffers(model: nn.Module) -> None:
    """Set every rank's buffers (BN running statistics, ...) of `model` to rank 0's; a no-op
    in one process. Every rank must call it (a collective)."""
    if comm.get_world_size() == 1:
        return
    for buffer in unwrap_ddp(model).buffers():
        dist.broadcast(buffer.data, src=0)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, or `model` itself."""
    return model.module if isinstance(model, (DistributedDataParallel, nn.DataParallel)) \
        else model


def release_process_group() -> None:
    """Wait for every rank, then destroy the default process group (no-op in a single process).

    detectron2's launch leaves the group alive until the interpreter exits; gloo's threads then
    race the exit and a rank can abort with "terminate called without an active exception",
    which fails the whole run although training finished.
    """
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()


def init_from_submitit(env) -> None:
    """Join the process group of a submitit job of several tasks (`submitit.JobEnvironment`).

    Every task is a process the scheduler started (srun, or submitit's local controller), so
    nothing is spawned here, unlike detectron2's launch(): the group meets at the first node on
    a port derived from the job id (jobs side by side on a node do not meet), and the GPU is the
    task's local rank. detectron2's per-machine group is created where its public API can
    (`comm.create_local_process_group`, after v0.6); on v0.6 nothing nst_det runs needs it.
    """
    if env.num_tasks <= 1:
        return
    import torch

    cuda = torch.cuda.is_available()
    master = "127.0.0.1" if env.num_nodes == 1 else env.hostnames[0]
    port = 20000 + int("".join(c for c in str(env.job_id) if c.isdigit()) or 0) % 20000
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{master}:{port}",
                            world_size=env.num_tasks, rank=env.global_rank)
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(env.num_tasks // env.num_nodes)
    if cuda:
        torch.cuda.set_device(env.local_rank)
    comm.synchronize()
