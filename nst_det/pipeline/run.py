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
import subprocess
import sys
import time

from detectron2.engine import HookBase, launch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..config import load_config
from ..engine import TRAINER_REGISTRY
from ..utils.atomic import atomic_write
from ..utils.dist import release_process_group
from .plan import Stage

STAGE_FILE = "stage.json"
# prior seconds per iteration on a 2-core CPU, per stage kind; replaced by measurements as the
# pipeline runs (used only for the ETA)
_PRIOR_SEC_PER_ITER = {"cls": 0.3, "det": 0.6}
_PRIOR_SEC_FIXED = {"train": 15.0, "evaluate": 30.0, "convert": 3.0, "export": 40.0,
                    "report": 30.0, "calibrate": 60.0}


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
    release_process_group()


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
    release_process_group()


SUMMARY_KINDS = ("export", "report")  # stages that summarise every training run


def spawn_train_worker(stage: Stage, label: str, later: tuple, threads: int):
    """Start `nst_det.pipeline.worker` for one training stage; returns the Popen handle."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    payload = json.dumps({"stage": vars(stage), "label": label, "later": list(later),
                          "threads": threads})
    # the upstream deprecation notices tools/run_pipeline.py silences; given as -W options
    # because they are raised while the package imports, before the worker's own code runs
    quiet = ["-W", "ignore:`torch.jit.script` is deprecated", "-W", "ignore:torch.meshgrid"]
    return subprocess.Popen([sys.executable, *quiet, "-m", "nst_det.pipeline.worker", payload],
                            env=env)


class PipelineRunner:
    """Runs each stage of a plan once, in dependency order (`Stage.after`), skipping done ones.

    jobs == 1: one stage at a time, training in this process through detectron2's launch, so
    --num-gpus / --num-machines apply (paper scale). jobs > 1 (CPU toy runs): up to `jobs`
    training stages at once, each in its own process with cpu_count // jobs threads: a toy
    detector's step keeps only ~1.3 of 2 cores busy (python-side RPN/RoI work), so two
    single-thread runs side by side finish sooner than the same two runs one after the other.
    Conversion, export and report run in this process. `handlers` maps a non-training stage kind
    to a function(stage) -> metrics dict; `spawn` starts a training stage's process (tests
    replace it).
    """

    def __init__(self, stages: list, launch_args: argparse.Namespace, handlers: dict,
                 jobs: int = 1, spawn=spawn_train_worker):
        self.stages, self.launch_args, self.handlers = stages, launch_args, handlers
        self.jobs, self._spawn = max(1, jobs), spawn
        self._threads = max(1, (os.cpu_count() or 1) // self.jobs)
        self._rate = dict(_PRIOR_SEC_PER_ITER)  # measured seconds per iteration, per stage kind
        # what export / report were built from: when the plan has grown (e.g. more seeds), they
        # are redone even if an earlier, smaller run finished them
        self._trained = sorted(s.name for s in stages if s.kind in ("train", "evaluate"))
        names = {s.name for s in stages}
        unknown = {s.name: [d for d in s.after if d not in names] for s in stages}
        unknown = {k: v for k, v in unknown.items() if v}
        if unknown:
            raise ValueError(f"stages wait for stages that are not in the plan: {unknown}")

    def _done(self, stage: Stage) -> bool:
        result = stage_result(stage)
        if result is None:
            return False
        return stage.kind not in SUMMARY_KINDS or result.get("built_from") == self._trained

    def _estimate(self, stage: Stage) -> float:
        if stage.kind == "train":
            return stage.iters * self._rate[stage.meta["stage"]] + _PRIOR_SEC_FIXED["train"]
        return _PRIOR_SEC_FIXED[stage.kind]

    def _critical_path(self, stage: Stage) -> float:
        """Estimated seconds of the longest chain of stages from `stage` to the end."""
        later = [s for s in self.stages if stage.name in s.after]
        return self._estimate(stage) + max(map(self._critical_path, later), default=0.0)

    def _remaining(self, pending: list) -> float:
        """Estimated seconds for the pending stages, training shared among the jobs."""
        train = sum(self._estimate(s) for s in pending if s.kind == "train")
        return train / self.jobs + sum(self._estimate(s) for s in pending if s.kind != "train")

    def _later(self, stage: Stage, pending: list) -> tuple:
        """(later training seconds, later other seconds, this stage's s/it) for _Progress."""
        later = [s for s in pending if s is not stage]
        train = sum(self._estimate(s) for s in later if s.kind == "train") / self.jobs
        other = sum(self._estimate(s) for s in later if s.kind != "train")
        return train, other, self._rate[stage.meta["stage"]]

    def run(self) -> None:
        t0 = time.perf_counter()
        labels = {s.name: f"[{i + 1}/{len(self.stages)} {s.name}]"
                  for i, s in enumerate(self.stages)}
        pending, finished = [], set()
        for stage in self.stages:
            if self._done(stage):
                print(f"{labels[stage.name]} done earlier: skipped", flush=True)
                finished.add(stage.name)
            else:
                pending.append(stage)
        running = {}  # name -> (process, stage, start time)
        try:
            self._run_pending(pending, finished, running, labels)
        except BaseException:  # incl. Ctrl-C: no stage process may outlive the runner
            for process, *_ in running.values():
                process.terminate()
            for process, *_ in running.values():
                process.wait()
            raise
        print(f"pipeline finished in {_fmt(time.perf_counter() - t0)}", flush=True)

    def _run_pending(self, pending: list, finished: set, running: dict, labels: dict) -> None:
        while pending or running:
            ready = [s for s in pending if set(s.after) <= finished
                     and not (s.kind == "train" and self.jobs > 1 and len(running) >= self.jobs)]
            # the stage heading the longest chain of work first (e.g. the teacher detector
            # before a student pretraining that nothing waits for)
            stage = max(ready, key=self._critical_path, default=None)
            if stage is None:  # everything left waits for a running stage
                if not running:
                    raise RuntimeError("the plan's stages wait for each other: "
                                       f"{[(s.name, s.after) for s in pending]}")
                finished.add(self._wait_for_one(running, labels))
                continue
            later = self._later(stage, pending) if stage.kind == "train" else None
            print(f"{labels[stage.name]} starting ({stage.kind}); pipeline ETA "
                  f"{_fmt(self._remaining(pending))}", flush=True)
            pending.remove(stage)
            start = time.perf_counter()
            if stage.kind == "train" and self.jobs > 1:
                process = self._spawn(stage, labels[stage.name], later, self._threads)
                running[stage.name] = (process, stage, start)
                continue
            if stage.kind in ("train", "evaluate"):
                metrics = self._run_in_process(stage, labels[stage.name], later)
            else:
                metrics = self.handlers[stage.kind](stage) or {}
            self._finish(stage, metrics, time.perf_counter() - start, labels[stage.name])
            finished.add(stage.name)

    def _wait_for_one(self, running: dict, labels: dict) -> str:
        """Block until a spawned stage ends; record it, or stop everything if it failed."""
        while True:
            for name, (process, stage, start) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[name]
                if code != 0:  # run() stops the other stages (a rerun resumes them)
                    raise RuntimeError(
                        f"stage {name} failed (exit code {code}); its log is in "
                        f"{os.path.join(stage.out_dir, 'log.rank0.txt')}. Finished stages are "
                        "kept: run the same command again to resume.")
                self._finish(stage, _final_metrics(stage), time.perf_counter() - start,
                             labels[name])
                return name
            time.sleep(0.5)

    def _finish(self, stage: Stage, metrics: dict, seconds: float, label: str) -> None:
        if stage.kind == "train" and stage.iters >= 20:
            # evaluation and start-up ride on the per-iteration rate: good enough for an ETA
            self._rate[stage.meta["stage"]] = seconds / stage.iters
        os.makedirs(stage.out_dir, exist_ok=True)
        extra = {"built_from": self._trained} if stage.kind in SUMMARY_KINDS else {}
        with atomic_write(os.path.join(stage.out_dir, STAGE_FILE), "w") as f:
            json.dump({"name": stage.name, "kind": stage.kind, "seconds": seconds,
                       "meta": stage.meta, "metrics": metrics, **extra}, f, indent=2)
        print(f"{label} finished in {_fmt(seconds)} {_summary(metrics)}", flush=True)

    def _run_in_process(self, stage: Stage, label: str, later) -> dict:
        a = self.launch_args
        worker, args = ((_train_worker, (vars(stage), label, later))
                        if stage.kind == "train" else (_evaluate_worker, (vars(stage),)))
        launch(worker, a.num_gpus, num_machines=a.num_machines, machine_rank=a.machine_rank,
               dist_url=a.dist_url, args=args)
        return _final_metrics(stage)


def _final_metrics(stage: Stage) -> dict:
    path = os.path.join(stage.out_dir, "final_metrics.json")
    if not os.path.isfile(path):
        raise RuntimeError(f"stage {stage.name} ended without writing {path}")
    with open(path) as f:
        return json.load(f)


def _summary(metrics: dict) -> str:
    flat = {}
    for values in metrics.values():
        if isinstance(values, dict):
            flat.update({k: v for k, v in values.items() if k in ("top1", "AP50", "AP")})
    return " ".join(f"{k}={v:.2f}" for k, v in flat.items())
