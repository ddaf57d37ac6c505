"""tools/train_net.py's main through detectron2's `_distributed_worker`, world size 1.

    python -m gpu_check_lib.nccl_launch BACKEND_FILE <tools/train_net.py arguments>

detectron2's `launch(..., num_gpus_per_machine=1)` calls main in-process and never starts a
process group; with several GPUs it spawns one `_distributed_worker` per GPU, which joins an
NCCL (gloo without a GPU) group and then runs main. This spawns exactly that worker once, so
one GPU exercises the multi-GPU launch path; the worker writes the backend it joined to
BACKEND_FILE before training.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_main(backend_file: str, args):
    """Runs in the spawned worker, inside the process group detectron2 set up."""
    import torch.distributed as dist
    import train_net

    Path(backend_file).write_text(str(dist.get_backend()) + "\n")
    return train_net.launched_main(args)


def launch(backend_file: str, argv: list) -> None:
    sys.path.insert(0, str(TOOLS))
    import torch.multiprocessing as mp
    import train_net
    from detectron2.engine.launch import DEFAULT_TIMEOUT, _distributed_worker

    args = train_net.argument_parser().parse_args(argv)
    print("Command Line Args:", args, flush=True)
    mp.start_processes(
        _distributed_worker, nprocs=1, start_method="spawn", daemon=False,
        args=(worker_main, 1, 1, 0, f"tcp://127.0.0.1:{_free_port()}",
              (backend_file, args), DEFAULT_TIMEOUT))


if __name__ == "__main__":
    from gpu_check_lib import nccl_launch  # the worker function pickles by this module's name

    nccl_launch.launch(sys.argv[1], sys.argv[2:])
