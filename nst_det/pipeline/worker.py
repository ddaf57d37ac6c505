"""What runs inside one stage's submitit job: `StageJob`, on a workstation or a SLURM node.

A job trains + evaluates (or only evaluates, exports, reports) one stage and, on its
global rank 0, writes the stage's `stage.json` atomically at its end: the file that marks the
stage finished. Multi-task jobs (one task per GPU, possibly on several nodes) set up
detectron2's distributed state from submitit's JobEnvironment, so nothing is spawned inside a
job. A job asked to stop (SIGINT, SIGTERM: Ctrl-C, `scancel`, the runner) raises inside the
stage, so atomic writes remove their temporary files; what a hard kill leaves is removed when
the stage starts again (`remove_stale_temps`). On a time limit or preemption (SLURM's USR2
signal), submitit calls `checkpoint()` and requeues the job, which resumes from the stage's
last checkpoint (the trainers' exact resume).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import submitit
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..utils.atomic import atomic_write, exit_on_sigterm, remove_stale_temps
from .plan import Stage

STAGE_FILE = "stage.json"
PROGRESS_FILE = "progress.json"  # a training stage's iteration count and speed, for the runner
SUMMARY_KINDS = ("export", "report")  # stages that summarise every training run


def stage_result(stage: Stage) -> dict | None:
    """The stage's stage.json, or None when it has not finished."""
    path = os.path.join(stage.out_dir, STAGE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished_results(stages) -> dict:
    """name -> stage.json of each finished stage of `stages` (one read each)."""
    return {s.name: r for s in stages if (r := stage_result(s)) is not None}


def runs_of(stages) -> dict:
    """name -> run id (a fresh one each time a stage finishes) of each of `stages`; None for a
    stage that has not finished (or finished before run ids were recorded)."""
    return {s.name: (stage_result(s) or {}).get("run_id") for s in stages}


_STAGE_LOGGERS = ("detectron2", "fvcore", "nst_det", "d2")


@contextmanager
def _stage_log(log_file: str):
    """Within the block, detectron2/fvcore/nst_det logging (INFO and up) also goes to `log_file`.

    Only what this adds is changed, and it is undone on exit: handlers someone else installed
    stay where they are. In particular detectron2's `setup_logger` is `lru_cache`d and never
    adds its handlers a second time, so removing them (as this once did) would silence
    detectron2 for the rest of a process that runs a stage in-process (tests, DebugExecutor).
    A logger's level is lowered to INFO only where it would drop INFO records, and restored.
    """
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s]: %(message)s"))
    loggers = [logging.getLogger(name) for name in _STAGE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if not logger.isEnabledFor(logging.INFO):
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()


class _ProgressFile(HookBase):
    """Write `progress.json` (iteration, max_iter, s/it) ~20 times per stage, for the runner.

    The runner alone prints progress and the one pipeline ETA; a stage only reports its pace.
    """

    def __init__(self, path: str):
        self._path = path

    def before_train(self):
        self._start, self._first = time.perf_counter(), self.trainer.iter

    def after_step(self):
        done, total = self.trainer.iter + 1, self.trainer.max_iter
        if comm.is_main_process() and (done % max(1, total // 20) == 0 or done == total):
            per_iter = (time.perf_counter() - self._start) / max(1, done - self._first)
            with atomic_write(self._path, "w") as f:
                json.dump({"iter": done, "max_iter": total, "sec_per_iter": per_iter,
                           "start_iter": self._first}, f)


def run_stage(stage: Stage) -> dict:
    """Train + evaluate a "train" stage (every task of its job runs this), or evaluate an
    "evaluate" stage's model with its MODEL.WEIGHTS as `train_net.py --eval-only` does; returns
    the metrics, also written to the stage's final_metrics.json."""
    from ..config import load_config
    from ..engine.train_or_evaluate import train_or_evaluate
    from ..utils.dist import release_process_group

    if stage.kind not in ("train", "evaluate"):
        raise ValueError(f"stage {stage.name}: no handler for its kind {stage.kind!r}")
    cfg = load_config(stage.config, stage.opts)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    train, main = stage.kind == "train", comm.is_main_process()
    with _stage_log(os.path.join(cfg.OUTPUT_DIR, f"log.rank{comm.get_rank()}.txt")):
        logging.getLogger("nst_det").info("stage %s: rank %d of world size %d", stage.name,
                                          comm.get_rank(), comm.get_world_size())
        if train:
            if main:
                with atomic_write(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
                    f.write(cfg.dump())
            seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
        # a training stage always resumes: its job may be a requeue, or a rerun after a stop
        hooks = [_ProgressFile(os.path.join(cfg.OUTPUT_DIR, PROGRESS_FILE))] if train else []
        results = train_or_evaluate(cfg, eval_only=not train, resume=train, hooks=hooks)
        final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if train and main and not os.path.isfile(final):  # the stage's product: never done
            raise RuntimeError(f"stage {stage.name}: training ended without {final}")
        if main:
            with atomic_write(os.path.join(cfg.OUTPUT_DIR, "final_metrics.json"), "w") as f:
                json.dump(results, f, indent=2)
    release_process_group()
    return results


def init_distributed(env) -> None:
    """detectron2's distributed state for a job of several tasks, from submitit's environment.

    One process per task (per GPU), all started by the scheduler (srun, or submitit's local
    controller): the process group is joined at the first node's address on a port derived from
    the job id, and the GPU is the task's local rank, as detectron2's launch() sets them up.
    """
    if env.num_tasks <= 1:
        return
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    master = "127.0.0.1" if env.num_nodes == 1 else env.hostnames[0]
    # one port per job, so jobs side by side on a node do not meet each other
    port = 20000 + int("".join(c for c in str(env.job_id) if c.isdigit()) or 0) % 20000
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{master}:{port}",
                            world_size=env.num_tasks, rank=env.global_rank)
    _local_process_group(env.num_tasks // env.num_nodes)
    if cuda:
        torch.cuda.set_device(env.local_rank)
    comm.synchronize()


def _local_process_group(per_node: int) -> None:
    """detectron2's per-machine process group (`comm.get_local_rank()`), where it has a public
    way to make one: `comm.create_local_process_group` (detectron2 after v0.6).

    detectron2 v0.6 has none: only its launch() sets the group, by assigning a private module
    global, which nst_det does not do. Nothing nst_det runs needs the group on v0.6: the only
    caller of get_local_rank() there is detectron2's create_ddp_model, and nst_det wraps models
    with build_ddp_model, which takes the GPU set from submitit's local rank (init_distributed).
    Code that calls `comm.get_local_rank()` in a multi-task job on v0.6 gets detectron2's own
    "Local process group is not created" assertion.
    """
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(per_node)


class StageJob(submitit.helpers.Checkpointable):
    """One stage as a submitit job.

    Args:
        stage: the stage (plain data from the plan).
        handler: function(stage) -> metrics (export, report, ...); None for training and
            evaluation stages, which run `run_stage`.
        inputs: the stages it reads (`stage.after`); their run ids go into stage.json, so
            that the runner redoes this stage when one of them has run again since.
        threads: torch threads per task.
        others: the other stages' folders (never swept by this job).
    """

    def __init__(self, stage: Stage, handler=None, inputs=(), threads: int = 0, others=()):
        self.stage, self.handler, self.inputs = stage, handler, list(inputs)
        self.threads, self.others = threads, list(others)

    def __call__(self) -> dict:
        # submitit logs and ignores SIGTERM (SLURM sends it before USR2 on some preemptions);
        # here it must stop the stage so that its temporary files are removed
        exit_on_sigterm()
        start = time.perf_counter()
        env = submitit.JobEnvironment()
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        stage = self.stage
        if env.global_rank == 0:
            os.makedirs(stage.out_dir, exist_ok=True)
            # what a hard kill left (this job owns the folder, whoever wrote them)
            remove_stale_temps(stage.out_dir, below=True, exclude=self.others, any_writer=True)
        init_distributed(env)
        run = self.handler or run_stage
        metrics = run(stage) or {}
        if env.global_rank == 0:
            record = {"name": stage.name, "kind": stage.kind,
                      "seconds": time.perf_counter() - start, "meta": stage.meta,
                      "metrics": metrics, "job_id": env.job_id, "run_id": uuid.uuid4().hex,
                      "inputs": runs_of(self.inputs)}
            if stage.d2_backbone:  # before stage.json: a stage recorded done has its backbone
                from ..modeling.convert import classifier_file_to_d2

                record["d2_backbone"] = classifier_file_to_d2(**stage.d2_backbone)
            with atomic_write(os.path.join(stage.out_dir, STAGE_FILE), "w") as f:
                json.dump(record, f, indent=2)
        return metrics

    def checkpoint(self, *args, **kwargs):
        """Requeue as is: the stage resumes from its own last checkpoint (trainer resume)."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def stage_paths(folder: str | Path, job_id: str) -> dict:
    """submitit's log files of a job (its first task) in a stage's job folder.

    The names are submitit's folder convention, `<job id>_<task>_log.out` / `.err`, the paths a
    submitted job's public `job.paths` gives (tests/test_public_api_only.py checks they agree);
    the runner often has only the job id, read back from job.json, not the Job object.
    """
    folder = Path(folder).expanduser().absolute()
    return {kind: str(folder / f"{job_id}_0_log.{ext}")
            for kind, ext in (("stdout", "out"), ("stderr", "err"))}
