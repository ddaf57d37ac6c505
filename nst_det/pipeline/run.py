"""Run a pipeline plan: each stage once, skipping finished ones, with progress and an ETA.

A stage is finished when its folder holds `stage.json` (written atomically at its end, with its
metrics and wall-clock time), so an interrupted pipeline resumes at the first unfinished stage,
and a training stage itself resumes from its last checkpoint. detectron2's own log of a stage
goes to `<stage>/log.txt`; the console shows one progress line per ~10% of a stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from detectron2.engine import HookBase, launch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..config import load_config
from ..engine import TRAINER_REGISTRY
from ..utils.atomic import atomic_write
from .plan import Stage

STAGE_FILE = "stage.json"
# prior seconds per iteration on a 2-core CPU, per stage kind; replaced by measurements as the
# pipeline runs (used only for the ETA)
_PRIOR_SEC_PER_ITER = {"cls": 0.3, "det": 0.6}
_PRIOR_SEC_FIXED = {"train": 15.0, "evaluate": 30.0, "convert": 3.0, "export": 40.0,
                    "report": 30.0}


def stage_result(stage: Stage) -> dict | None:
    """The stage's stage.json, or None when it has not finished."""
    path = os.path.join(stage.out_dir, STAGE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _route_logs(log_file: str) -> None:
    """Send detectron2/fvcore/nst_det logging of this stage to its own file, not the console."""
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s]: %(message)s"))
    for name in ("detectron2", "fvcore", "nst_det", "d2"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _Progress(HookBase):
    """Print `iter i/N (x%) s/it | stage ETA | pipeline ETA` about ten times per stage.

    `later` = (seconds of later training stages at `rate` s/it, seconds of other later stages,
    rate): later training is rescaled by how fast this stage actually runs.
    """

    def __init__(self, label: str, later: tuple):
        self._label, self._later = label, later
        self._start = None

    def _later_seconds(self, per_iter: float) -> float:
        train, other, rate = self._later
        return train * per_iter / rate + other

    def before_train(self):
        self._start, self._first = time.perf_counter(), self.trainer.iter

    def after_step(self):
        done = self.trainer.iter + 1
        total = self.trainer.max_iter
        if comm.is_main_process() and (done % max(1, total // 10) == 0 or done == total):
            per_iter = (time.perf_counter() - self._start) / max(1, done - self._first)
            left = per_iter * (total - done)
            print(f"    {self._label}: iter {done}/{total} ({100 * done // total}%) "
                  f"{per_iter:.2f} s/it | stage ETA {_fmt(left)} | pipeline ETA "
                  f"{_fmt(left + self._later_seconds(per_iter))}", flush=True)


def _train_worker(stage_dict: dict, progress_label: str, later: tuple) -> None:
    """Train + evaluate one stage (run under detectron2's launch, once per process)."""
    stage = Stage(**stage_dict)
    cfg = load_config(stage.config, stage.opts)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    _route_logs(os.path.join(cfg.OUTPUT_DIR, f"log.rank{comm.get_rank()}.txt"))
    if comm.is_main_process():
        with atomic_write(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
    trainer = TRAINER_REGISTRY.get(cfg.NST_DET.TRAINER)(cfg)
    trainer.register_hooks([_Progress(progress_label, later)])
    trainer.resume_or_load(resume=True)
    trainer.train()
    # DefaultTrainer.train() returns results only with TEST.EXPECTED_RESULTS; EvalHook keeps them
    results = getattr(trainer, "_last_eval_results", None) or {}
    if comm.is_main_process():
        with atomic_write(os.path.join(cfg.OUTPUT_DIR, "final_metrics.json"), "w") as f:
            json.dump(results, f, indent=2)


def _evaluate_worker(stage_dict: dict) -> None:
    """Evaluate one stage's model as its config builds it (run under detectron2's launch)."""
    stage = Stage(**stage_dict)
    cfg = load_config(stage.config, stage.opts)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    _route_logs(os.path.join(cfg.OUTPUT_DIR, f"log.rank{comm.get_rank()}.txt"))
    trainer_cls = TRAINER_REGISTRY.get(cfg.NST_DET.TRAINER)
    results = trainer_cls.test(cfg, trainer_cls.build_model(cfg)) or {}
    if comm.is_main_process():
        with atomic_write(os.path.join(cfg.OUTPUT_DIR, "final_metrics.json"), "w") as f:
            json.dump(results, f, indent=2)


class PipelineRunner:
    """Runs stages in order; `handlers` maps a non-train stage kind to a function(stage) -> dict."""

    def __init__(self, stages: list, launch_args: argparse.Namespace, handlers: dict):
        self.stages, self.launch_args, self.handlers = stages, launch_args, handlers
        self._rate = dict(_PRIOR_SEC_PER_ITER)  # measured seconds per iteration, per stage kind

    def _estimate(self, stage: Stage) -> float:
        if stage.kind == "train":
            return stage.iters * self._rate[stage.meta["stage"]] + _PRIOR_SEC_FIXED["train"]
        return _PRIOR_SEC_FIXED[stage.kind]

    def _later(self, index: int) -> tuple:
        """(later training seconds, later other seconds, this stage's s/it) for _Progress."""
        later = [s for s in self.stages[index + 1:] if stage_result(s) is None]
        train = sum(self._estimate(s) for s in later if s.kind == "train")
        other = sum(self._estimate(s) for s in later if s.kind != "train")
        return train, other, self._rate[self.stages[index].meta["stage"]]

    def run(self) -> None:
        t0 = time.perf_counter()
        for i, stage in enumerate(self.stages):
            label = f"[{i + 1}/{len(self.stages)} {stage.name}]"
            if stage_result(stage) is not None:
                print(f"{label} done earlier: skipped", flush=True)
                continue
            remaining = sum(self._estimate(s) for s in self.stages[i:] if stage_result(s) is None)
            print(f"{label} starting ({stage.kind}); pipeline ETA {_fmt(remaining)}", flush=True)
            start = time.perf_counter()
            if stage.kind in ("train", "evaluate"):
                metrics = self._run_train(i, stage, label)
            else:
                metrics = self.handlers[stage.kind](stage) or {}
            seconds = time.perf_counter() - start
            if stage.kind == "train" and stage.iters >= 20:
                # evaluation and start-up ride on the per-iteration rate: good enough for an ETA
                self._rate[stage.meta["stage"]] = seconds / stage.iters
            os.makedirs(stage.out_dir, exist_ok=True)
            with atomic_write(os.path.join(stage.out_dir, STAGE_FILE), "w") as f:
                json.dump({"name": stage.name, "kind": stage.kind, "seconds": seconds,
                           "meta": stage.meta, "metrics": metrics}, f, indent=2)
            print(f"{label} finished in {_fmt(seconds)} {_summary(metrics)}", flush=True)
        print(f"pipeline finished in {_fmt(time.perf_counter() - t0)}", flush=True)

    def _run_train(self, index: int, stage: Stage, label: str) -> dict:
        a = self.launch_args
        worker, args = ((_train_worker, (vars(stage), label, self._later(index)))
                        if stage.kind == "train" else (_evaluate_worker, (vars(stage),)))
        launch(worker, a.num_gpus, num_machines=a.num_machines, machine_rank=a.machine_rank,
               dist_url=a.dist_url, args=args)
        with open(os.path.join(stage.out_dir, "final_metrics.json")) as f:
            return json.load(f)


def _summary(metrics: dict) -> str:
    flat = {}
    for values in metrics.values():
        if isinstance(values, dict):
            flat.update({k: v for k, v in values.items() if k in ("top1", "AP50", "AP")})
    return " ".join(f"{k}={v:.2f}" for k, v in flat.items())
