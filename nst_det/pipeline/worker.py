"""What runs inside one stage's submitit job (`StageJob`), on a workstation or a SLURM node.

A job runs its stage and, on global rank 0, writes the stage's record (`records.STAGE_FILE`)
atomically at the end. A multi-task job joins its process group from submitit's environment. A
job asked to stop (SIGINT, SIGTERM) raises inside the stage, so atomic writes remove their
temporaries; what a hard kill left is swept when the stage starts again. On a time limit or
preemption submitit calls `checkpoint()` and requeues the job, which resumes from the stage's
last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import contextmanager

import submitit
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..utils.atomic import atomic_write, exit_on_sigterm, remove_stale_temps
from ..utils.dist import init_from_submitit, release_process_group
from .plan import Stage
from .records import PROGRESS_FILE, STAGE_FILE, runs_of

__all__ = ["StageJob", "run_stage"]


@contextmanager
def _stage_log(log_file: str):
    """Within the block, detectron2/fvcore/nst_det INFO logs also go to `log_file`.

    Only this handler (and a level lowered to INFO) is added and undone on exit: detectron2's
    `setup_logger` is cached and never re-adds its handlers, so removing others' would silence
    detectron2 for the rest of a process that runs stages in-process (tests).
    """
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s]: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("detectron2", "fvcore", "nst_det", "d2")]
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
    """Writes progress.json (iteration, max_iter, s/it) ~20 times a stage: the runner alone
    prints progress and the pipeline ETA."""

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
    """Train + evaluate a "train" stage (it always resumes: its job may be a requeue), or
    evaluate an "evaluate" stage with its MODEL.WEIGHTS, through the function
    `tools/train_net.py` runs; returns the metrics, also written to final_metrics.json."""
    from ..config import load_config
    from ..engine.train_or_evaluate import train_or_evaluate

    if stage.kind not in ("train", "evaluate"):
        raise ValueError(f"stage {stage.name}: no handler for its kind {stage.kind!r}")
    cfg = load_config(stage.config, stage.opts)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    train, main = stage.kind == "train", comm.is_main_process()
    with _stage_log(os.path.join(cfg.OUTPUT_DIR, f"log.rank{comm.get_rank()}.txt")):
        logging.getLogger("nst_det").info("stage %s: rank %d of world size %d", stage.name,
                                          comm.get_rank(), comm.get_world_size())
        if train and main:
            with atomic_write(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
                f.write(cfg.dump())
        if train:
            seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
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


class StageJob(submitit.helpers.Checkpointable):
    """One stage as a submitit job.

    Args:
        stage: the stage (plain data from the plan).
        handler: function(stage) -> metrics for the other kinds (export, report, ...); None
            runs `run_stage`.
        inputs: the stages it reads: their run ids go into its record, so that the runner
            redoes it when one of them has run again since.
        threads: torch threads per task (0: as given).
        others: the other stages' folders, never swept by this job.
    """

    def __init__(self, stage: Stage, handler=None, inputs=(), threads: int = 0, others=()):
        self.stage, self.handler, self.inputs = stage, handler, list(inputs)
        self.threads, self.others = threads, list(others)

    def __call__(self) -> dict:
        exit_on_sigterm()  # submitit ignores SIGTERM; a stage must unwind on it
        start, env, stage = time.perf_counter(), submitit.JobEnvironment(), self.stage
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if env.global_rank == 0:  # this job owns the folder: what a hard kill left goes
            os.makedirs(stage.out_dir, exist_ok=True)
            remove_stale_temps(stage.out_dir, below=True, exclude=self.others, any_writer=True)
        init_from_submitit(env)
        metrics = (self.handler or run_stage)(stage) or {}
        if env.global_rank == 0:
            record = {"name": stage.name, "kind": stage.kind,
                      "seconds": time.perf_counter() - start, "meta": stage.meta,
                      "metrics": metrics, "job_id": env.job_id, "run_id": uuid.uuid4().hex,
                      "inputs": runs_of(self.inputs)}
            if stage.d2_backbone:  # before the record: a stage recorded done has its backbone
                from ..modeling.convert import classifier_file_to_d2

                record["d2_backbone"] = classifier_file_to_d2(**stage.d2_backbone)
            with atomic_write(os.path.join(stage.out_dir, STAGE_FILE), "w") as f:
                json.dump(record, f, indent=2)
        return metrics

    def checkpoint(self, *args, **kwargs):
        """Requeue as is: the stage resumes from its own last checkpoint."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
