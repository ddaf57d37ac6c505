"""Run a pipeline plan as submitit jobs, on this machine or on SLURM, skipping finished stages.

The plan is data (`plan.Stage`), handed to existing launchers: each unfinished stage is one
submitit job (`worker.StageJob`). On SLURM the plan is submitted at once, each stage `afterok`
the unfinished stages it reads, and SLURM cancels the dependents of a failed one. Locally,
`graphlib.TopologicalSorter` releases a stage once the stages it reads have finished; ready
stages start in plan order, at most `jobs` training or calibration stages at a time. A stage is
finished when its record (`stage.json`) exists, the stages it reads are the runs it recorded and
its definition is the one recorded, so a rerun redoes only what is unfinished or stale: training
resumes from its last checkpoint, or, for a stale stage, starts afresh beside the previous run.
One local run at a time works in a plan's folders (a file lock, and no job of an earlier run).
"""

from __future__ import annotations

import contextlib
import graphlib
import json
import os
import signal
import subprocess
import time
from unittest import mock

import submitit
from filelock import FileLock, Timeout
from tabulate import tabulate

from ..utils.atomic import atomic_write, remove_stale_temps
from .cluster import SLURM_ACTIVE, ClusterSettings, local_job_alive, squeue, stage_executor
from .plan import Stage
from .records import (
    PROGRESS_FILE,
    STAGE_FILE,
    STARTED_FILE,
    SUMMARY_KINDS,
    definition,
    stage_result,
    started_from,
)
from .worker import StageJob

__all__ = ["STAGE_FILE", "PipelineRunner", "stage_result"]

JOB_FILE = "job.json"  # in a stage's submitit folder: the last job submitted for it
LOCK_FILE = ".pipeline.lock"  # in the plan's root folder: held by the local run using it
TRAINING = ("train", "evaluate")  # the kinds that get a training stage's processes and GPUs
HEAVY = (*TRAINING, "calibrate")  # the kinds --jobs limits (others are short, single-threaded)
# for the ETA (2-core CPU): seconds per iteration until a stage of the kind reports its pace,
# and a stage's seconds besides its iterations (start-up, evaluation, writing)
PRIOR_SEC_PER_ITER = {"cls": 0.3, "det": 0.6}
SEC_PER_STAGE = 30.0


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent, or being replaced right now
        return None


def _wait_until(ended, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not ended():
        time.sleep(0.2)


class PipelineRunner:
    """Runs each unfinished stage of a plan once as a submitit job, in dependency order.

    Args:
        stages: the plan (`Stage.after` names the stages whose outputs a stage reads).
        handlers: stage kind -> function(stage) -> metrics for the kinds other than train and
            evaluate (pickled into the job: module-level functions or closures over data).
        settings: `ClusterSettings`.
        root: the folder a local run holds (`LOCK_FILE`), the whole plan's output root even when
            running part of it (default: the stages' common folder).
    """

    def __init__(self, stages: list, handlers: dict, settings: ClusterSettings | None = None,
                 root: str | None = None):
        if not stages or len({s.name for s in stages}) < len(stages):
            raise ValueError("a plan needs stages, each named once; got "
                             f"{[s.name for s in stages]}")
        folders = [os.path.abspath(s.out_dir) for s in stages]
        if len(set(folders)) < len(folders):  # each job sweeps and records its own folder
            raise ValueError("each stage needs its own out_dir; shared: "
                             f"{sorted({d for d in folders if folders.count(d) > 1})}")
        self.stages, self.handlers = stages, handlers
        self.root = root or os.path.commonpath(folders)
        self.settings = settings or ClusterSettings()
        self.slurm, self.jobs = self.settings.cluster == "slurm", max(1, self.settings.jobs)
        self._by_name = {s.name: s for s in stages}
        unknown = {s.name: [d for d in s.after if d not in self._by_name] for s in stages}
        if any(unknown.values()):
            raise ValueError("stages wait for stages that are not in the plan: "
                             f"{ {k: v for k, v in unknown.items() if v} }")
        try:
            self._order = list(graphlib.TopologicalSorter(
                {s.name: s.after for s in stages}).static_order())
        except graphlib.CycleError as e:
            raise ValueError(f"the plan's stages wait for each other: {e.args[1]}") from None
        self._labels = {s.name: f"[{i + 1}/{len(stages)} {s.name}]" for i, s in enumerate(stages)}
        self._pace = dict(PRIOR_SEC_PER_ITER)  # latest s/it reported per stage kind
        self._started, self._waiting = {}, {}  # name -> submitit job (SLURM: its id) / Stage

    # ---- what a stage is ------------------------------------------------------------------
    def _done_stages(self) -> set:
        """The stages finished from the inputs they would read now: a record, every input
        done, the inputs' run ids the ones it recorded (a stage run again, or a plan grown by
        more seeds, redoes what reads it) and its definition the one recorded."""
        done, results = set(), {s.name: stage_result(s) for s in self.stages}
        for name in self._order:
            after, result = self._by_name[name].after, results[name]
            if result is None or not set(after) <= done:
                continue
            recorded = result.get("inputs")
            if recorded is None:  # written before inputs were recorded: summaries redone
                fresh = self._by_name[name].kind not in SUMMARY_KINDS
            else:
                fresh = recorded == {n: results[n].get("run_id") for n in after}
            defined = result.get("definition")  # None: recorded before definitions were
            if fresh and defined in (None, definition(self._by_name[name], self.root)):
                done.add(name)
        return done

    def _job_folder(self, stage: Stage) -> str:
        return os.path.join(stage.out_dir, "submitit")

    def _record(self, stage: Stage) -> dict | None:
        return _read_json(os.path.join(self._job_folder(stage), JOB_FILE))

    def _logs(self, stage: Stage, job_id: str) -> str:
        return (f"{submitit.Job(self._job_folder(stage), job_id).paths.stderr} and "
                f"{os.path.join(stage.out_dir, 'log.txt')}")

    def _submit(self, stage: Stage, after_ids=()):
        inputs = [self._by_name[n] for n in stage.after]
        started = _read_json(os.path.join(stage.out_dir, STARTED_FILE))
        finished = stage_result(stage) is not None
        # a finished stage submitted is stale, and so is a training run started from other
        # inputs or another definition: it would resume the previous run's weights (kept aside)
        if stage.kind == "train" and (finished or started not in (
                None, started_from(inputs, definition(stage, self.root)))):
            aside = f"{os.path.normpath(stage.out_dir)}.superseded-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(stage.out_dir, aside)
            print(f"{self._labels[stage.name]} redone from scratch (it or what it reads changed); "
                  f"its previous run moved to {aside}", flush=True)
        elif finished:  # stale: a failed redo must not read as finished
            os.remove(os.path.join(stage.out_dir, STAGE_FILE))
        kind = stage.meta.get("stage", "other") if stage.kind in TRAINING else "other"
        executor, threads = stage_executor(self.settings, kind, self._job_folder(stage),
                                           f"nst_det:{stage.name}", after_ids)
        work = StageJob(stage, self.handlers.get(stage.kind), inputs, threads=threads,
                        others=[s.out_dir for s in self.stages if s is not stage],
                        definition=definition(stage, self.root))
        # a local job's processes inherit this environment at submission (submitit's `setup`
        # would put a shell between the runner and the job, which Ctrl-C would not stop)
        threads_env = {} if self.slurm else {v: str(threads) for v in ("OMP_NUM_THREADS",
                                                                        "MKL_NUM_THREADS")}
        with mock.patch.dict(os.environ, threads_env):
            job = executor.submit(work)
        with atomic_write(os.path.join(self._job_folder(stage), JOB_FILE), "w") as f:
            json.dump({"cluster": self.settings.cluster, "job_id": str(job.job_id),
                       "submitted": time.time()}, f)
        return job

    def states(self) -> dict:
        """name -> (state, job id or "", logs); state: pending/queued/running/done/failed, or
        stale: finished from other inputs or another definition, so the next run redoes it."""
        records = {s.name: self._record(s) for s in self.stages}
        slurm_states = squeue([r["job_id"] for r in records.values()
                               if r and r["cluster"] == "slurm"])
        out, done = {}, self._done_stages()
        for stage in self.stages:
            record = records[stage.name]
            job_id = record["job_id"] if record else ""
            if stage.name in done:
                state = "done"
            elif record is None:
                state = "pending"
            elif record["cluster"] == "slurm":
                slurm_state, reason = slurm_states.get(job_id, ("", ""))
                # an input failed: it never ran
                state = "pending" if reason == "DependencyNeverSatisfied" else \
                    SLURM_ACTIVE.get(slurm_state, "failed")
            else:
                state = "running" if local_job_alive(job_id) else "failed"
            if state == "failed" and stage_result(stage) is not None:
                state = "stale"
            out[stage.name] = (state, job_id, self._logs(stage, job_id) if record else "")
        return out

    def status(self) -> str:
        """A table of each stage's state, job id and log (`run_pipeline.py --status`)."""
        return tabulate([(name, *row) for name, row in self.states().items()],
                        headers=["stage", "state", "job", "log"], tablefmt="plain",
                        disable_numparse=True)

    # ---- the run ----------------------------------------------------------------------------
    def run(self, wait: bool = True) -> None:
        """Submit the unfinished stages and (with `wait`) follow them until all have ended.

        Raises RuntimeError naming each failed stage (job id, logs) and the stages not run
        because of it. Any exception, Ctrl-C or SIGTERM cancels the jobs this call started.
        """
        with contextlib.nullcontext() if self.slurm else self._claim_folders():
            t0, done = time.perf_counter(), self._done_stages()
            for name in [s.name for s in self.stages if s.name in done]:
                print(f"{self._labels[name]} done earlier: skipped", flush=True)
            self._started = {}
            self._waiting = {s.name: s for s in self.stages if s.name not in done}
            try:
                if self.slurm:
                    self._submit_all()
                    if not wait:
                        print("submitted; follow it with --status", flush=True)
                        return
                failed = self._follow()
            except BaseException:  # incl. Ctrl-C/SIGTERM: no job of this run may outlive it
                self._stop_started()
                raise
        if failed:
            raise RuntimeError("\n".join(failed) + "\nFinished stages are kept: run the same "
                               "command again to resume.")
        print(f"pipeline finished in {_fmt(time.perf_counter() - t0)}", flush=True)

    @contextlib.contextmanager
    def _claim_folders(self):
        """Local: hold the plan's folders for this run. Refused while another run holds them, or
        while a job of an earlier run (its runner killed) or of a SLURM run still works there:
        the same stage would run twice into one folder, each job sweeping the other's files."""
        root = self.root
        os.makedirs(root, exist_ok=True)
        lock = FileLock(os.path.join(root, LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RuntimeError(f"another pipeline run is using {root} (it holds {lock.lock_file}):"
                               " follow it with --status, or wait for it to end") from None
        try:
            busy = [f"{name} (job {job})" for name, (state, job, _) in self.states().items()
                    if state in ("queued", "running")]
            if busy:
                raise RuntimeError(f"stages of {root} still have a job of an earlier run: "
                                   f"{', '.join(busy)}; wait for them (--status) or stop them "
                                   "(kill or scancel the job), then run again")
            yield
        finally:
            lock.release()

    def _submit_all(self) -> None:
        """SLURM: every unfinished stage at once, `afterok` on the unfinished ones it reads; a
        stage whose job is still queued or running (an earlier call's) keeps that job."""
        job_ids, records = {}, {n: self._record(s) for n, s in self._waiting.items()}
        active = squeue([r["job_id"] for r in records.values() if r])
        for name in [n for n in self._order if n in self._waiting]:  # inputs first
            stage, record = self._waiting.pop(name), records[name]
            if record and active.get(record["job_id"], ("",))[0] in SLURM_ACTIVE:
                job_id, what = record["job_id"], "already submitted (job {})"
            else:  # not submitted yet, or its job ended without finishing the stage
                after = [job_ids[d] for d in stage.after if d in job_ids]
                job_id = str(self._submit(stage, after).job_id)
                what = "submitted (job {}" + (f", after {','.join(after)})" if after else ")")
            job_ids[name] = job_id
            self._started[name] = job_id
            print(f"{self._labels[name]} {what.format(job_id)}", flush=True)

    def _follow(self) -> list:
        """Watch the started stages (and, locally, start each waiting one once the waiting
        ones it reads have finished) until none is left; returns the failure messages."""
        order, sorter = {s.name: i for i, s in enumerate(self.stages)}, None
        if not self.slurm:
            sorter = graphlib.TopologicalSorter({n: [d for d in s.after if d in self._waiting]
                                                 for n, s in self._waiting.items()})
            sorter.prepare()
        ready, failed, blocked, shown = [], [], set(), {}
        while True:
            # in plan (= dependency) order, so a failure is seen before its dependents end
            for name, job_id in sorted(self._poll_ended(), key=lambda e: order[e[0]]):
                stage, result = self._by_name[name], stage_result(self._by_name[name])
                if result is not None:
                    print(f"{self._labels[name]} finished in {_fmt(result['seconds'])} "
                          f"{_summary(result['metrics'])}", flush=True)
                    if sorter is not None:
                        sorter.done(name)
                elif name not in blocked:  # (else SLURM cancelled it: an input failed)
                    later = self._dependents(name)
                    blocked |= later
                    for d in later:
                        self._waiting.pop(d, None)
                    logs = self._logs(stage, job_id)
                    failed.append(f"stage {name} failed (job {job_id}); see {logs}" + (
                        f"; not run because of it: {', '.join(sorted(later))}" if later else ""))
                    print(f"{self._labels[name]} FAILED (job {job_id}); see {logs}", flush=True)
            if sorter is not None:
                ready = self._start_ready(sorted(
                    ready + [self._by_name[n] for n in sorter.get_ready()],
                    key=lambda s: order[s.name]))
            self._show_progress(shown)
            if not self._started and not ready:
                return failed
            time.sleep(2.0 if self.slurm else 0.5)

    def _dependents(self, name: str) -> set:
        out, frontier = set(), {name}
        while frontier:
            frontier = {s.name for s in self.stages if set(s.after) & frontier} - out
            out |= frontier
        return out

    def _poll_ended(self) -> list:
        """(name, job id) of the started jobs that have ended since the last call."""
        if self.slurm:
            states = squeue(list(self._started.values()))
            ended = [(n, j) for n, j in self._started.items()
                     if states.get(j, ("",))[0] not in SLURM_ACTIVE]
        else:
            ended = [(n, str(j.job_id)) for n, j in self._started.items() if j.done()]
        for name, _ in ended:
            del self._started[name]
        return ended

    def _start_ready(self, ready: list) -> list:
        """Local: submit the `ready` stages in their order, up to `jobs` training stages at a
        time; returns those still waiting for a slot."""
        slots = self.jobs - sum(self._by_name[n].kind in HEAVY for n in self._started)
        left = []
        for stage in ready:
            if stage.kind in HEAVY and slots <= 0:
                left.append(stage)
                continue
            slots -= stage.kind in HEAVY
            self._started[stage.name] = self._submit(stage)
            del self._waiting[stage.name]
            print(f"{self._labels[stage.name]} starting ({stage.kind}); pipeline ETA "
                  f"{_fmt(self._eta())}", flush=True)
        return left

    # ---- the one pipeline ETA ----------------------------------------------------------------
    def _progress(self, stage: Stage) -> dict | None:
        return _read_json(os.path.join(stage.out_dir, PROGRESS_FILE)) \
            if stage.kind == "train" else None

    def _eta(self) -> float | None:
        """Seconds the unfinished stages still need: the training iterations left (at the
        stage's own pace once it reports one, else its kind's latest) and SEC_PER_STAGE each,
        shared among the slots (`jobs` locally, the running stages on SLURM). None while a
        training stage of unknown length (paper scale: its config's schedule) has not reported."""
        left = 0.0
        for name in [*self._waiting, *self._started]:
            stage, left = self._by_name[name], left + SEC_PER_STAGE
            progress = self._progress(stage)  # None: not a training stage, or not started
            if progress:
                left += (progress["max_iter"] - progress["iter"]) * progress["sec_per_iter"]
            elif stage.kind == "train" and not stage.iters:
                return None
            elif stage.kind == "train":
                left += stage.iters * self._pace.get(stage.meta.get("stage"), 1.0)
        return left / (max(1, len(self._started)) if self.slurm else self.jobs)

    def _show_progress(self, shown: dict) -> None:
        """One line per new ~10% of a running training stage, with the pipeline ETA."""
        for name in list(self._started):
            progress = self._progress(self._by_name[name])
            if not progress:
                continue
            done, total, pace = progress["iter"], progress["max_iter"], progress["sec_per_iter"]
            tenth = done * 10 // max(1, total)
            if tenth <= shown.get(name, 0):  # (0 until the first tenth is done)
                continue
            shown[name] = tenth
            self._pace[self._by_name[name].meta.get("stage")] = pace
            print(f"    {self._labels[name]}: iter {done}/{total} ({100 * done // total}%) "
                  f"{pace:.2f} s/it | stage ETA {_fmt(pace * (total - done))} | pipeline ETA "
                  f"{_fmt(self._eta())}", flush=True)

    # ---- stopping ---------------------------------------------------------------------------
    def _stop_started(self) -> None:
        """Ask this run's jobs to stop (so they clean up), wait for them, sweep what is left."""
        started, self._started = self._started, {}
        jobs = list(started.values())
        if self.slurm and jobs:
            subprocess.run(["scancel", *jobs], capture_output=True)
            _wait_until(lambda: not any(s in SLURM_ACTIVE for s, _ in squeue(jobs).values()), 60)
        elif jobs:
            # 1. Ctrl-C in a terminal reached the jobs too: they stop by themselves, unless a
            # second signal interrupts their clean-up. 2. SIGTERM to submitit's controller, which
            # forwards it to the tasks: they unwind as on Ctrl-C, even when started with SIGINT
            # ignored (nohup, `&` in a script). 3. submitit's cancel (SIGINT, then SIGKILL).
            for stop, grace in ((None, 2.0), (_sigterm, 20.0), (lambda j: j.cancel(), 5.0)):
                for job in jobs:
                    if stop and not job.done():
                        stop(job)
                _wait_until(lambda: all(j.done() for j in jobs), grace)
        for name in started:
            remove_stale_temps(self._by_name[name].out_dir, below=True, any_writer=True,
                               exclude=[s.out_dir for s in self.stages if s.name != name])


def _sigterm(job) -> None:
    try:
        os.kill(int(job.job_id), signal.SIGTERM)
    except (OSError, ValueError):  # ended meanwhile
        pass


def _summary(metrics: dict) -> str:
    flat = {}
    for values in metrics.values():
        if isinstance(values, dict):
            flat.update({k: v for k, v in values.items() if k in ("top1", "AP50", "AP")})
    return " ".join(f"{k}={v:.2f}" for k, v in flat.items())
