"""What runs inside one stage's submitit job (`StageJob`), on a workstation or a SLURM node.

A job runs its stage and, on global rank 0, writes the stage's record (`records.STAGE_FILE`)
atomically at the end. A multi-task job joins its process group from submitit's environment. A
job asked to stop (SIGINT, SIGTERM) raises inside the stage, so atomic writes remove their
temporaries; what a hard kill left is swept when the stage starts again. On a time limit or
preemption submitit calls `checkpoint()` and requeues the job, which resumes from the stage's
last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid

import submitit
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..utils.atomic import atomic_write, exit_on_sigterm, remove_stale_temps
from ..utils.dist import init_from_submitit, release_process_group
from .plan import Stage
from .records import PROGRESS_FILE, STAGE_FILE, STARTED_FILE, runs_of, started_from

__all__ = ["StageJob", "run_stage"]


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
    evaluate an "evaluate" stage with its MODEL.WEIGHTS, through tools/train_net.py's `main`
    (logs, config.yaml and seed as detectron2 sets them up); returns the metrics. The stage's
    OUTPUT_DIR is its `out_dir` (the plan's)."""
    from ..engine.train_or_evaluate import main

    if stage.kind not in ("train", "evaluate"):
        raise ValueError(f"stage {stage.name}: no handler for its kind {stage.kind!r}")
    train = stage.kind == "train"
    hooks = [_ProgressFile(os.path.join(stage.out_dir, PROGRESS_FILE))] if train else []
    results = main(argparse.Namespace(config_file=stage.config, opts=list(stage.opts),
                                      eval_only=not train, resume=train), hooks)
    final = os.path.join(stage.out_dir, "model_final.pth")
    if train and comm.is_main_process() and not os.path.isfile(final):  # never recorded done
        raise RuntimeError(f"stage {stage.name}: training ended without {final}")
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
        definition: `records.definition` of the stage, recorded: the runner redoes the stage
            when it changes.
    """

    def __init__(self, stage: Stage, handler=None, inputs=(), threads: int = 0, others=(),
                 definition=None):
        self.stage, self.handler, self.inputs = stage, handler, list(inputs)
        self.threads, self.others, self.definition = threads, list(others), definition

    def __call__(self) -> dict:
        exit_on_sigterm()  # submitit ignores SIGTERM; a stage must unwind on it
        start, env, stage = time.perf_counter(), submitit.JobEnvironment(), self.stage
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if env.global_rank == 0:  # this job owns the folder: what a hard kill left goes
            os.makedirs(stage.out_dir, exist_ok=True)
            remove_stale_temps(stage.out_dir, below=True, exclude=self.others, any_writer=True)
            with atomic_write(os.path.join(stage.out_dir, STARTED_FILE), "w") as f:
                json.dump(started_from(self.inputs, self.definition), f)
        init_from_submitit(env)
        metrics = (self.handler or run_stage)(stage) or {}
        if env.global_rank == 0:
            record = {"name": stage.name, "kind": stage.kind,
                      "seconds": time.perf_counter() - start, "meta": stage.meta,
                      "metrics": metrics, "job_id": env.job_id, "run_id": uuid.uuid4().hex,
                      "inputs": runs_of(self.inputs), "definition": self.definition}
            if stage.d2_backbone:  # before the record: a stage recorded done has its backbone
                from ..modeling.convert import classifier_file_to_d2

                record["d2_backbone"] = classifier_file_to_d2(**stage.d2_backbone)
            with atomic_write(os.path.join(stage.out_dir, STAGE_FILE), "w") as f:
                json.dump(record, f, indent=2)
        return metrics

    def checkpoint(self, *args, **kwargs):
        """Requeue as is: the stage resumes from its own last checkpoint."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
