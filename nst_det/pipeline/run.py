"""Run a pipeline plan as submitit jobs, on this machine or on SLURM, skipping finished stages.

Every unfinished stage becomes one submitit job (`worker.StageJob`). On SLURM the whole plan is
submitted at once: a stage depends (`afterok`) on the unfinished stages it reads, so SLURM runs
independent stages side by side and cancels the dependents of a stage that failed
(`--kill-on-invalid-dep=yes`). With the local executor (a workstation, `make demo`) a stage is
submitted when the stages it reads have finished, at most `jobs` training stages at a time.

A stage is finished when its folder holds `stage.json` (written atomically by its job) and the
stages it reads are finished and are the runs it recorded there, so a rerun resubmits only what
is not finished or was built from an older run (and reuses SLURM jobs still queued or running),
and a training stage resumes from its last checkpoint. The runner is the only process that prints:
one line per stage start and end, ~10 progress lines per training stage (read from the
stage's `progress.json`), each with the one pipeline ETA. `status()` lists every stage as
pending / queued / running / done / failed with its job id and log. Executors and job states
of either cluster come from `cluster.py`.

Locally, ready stages start in the plan's order (the plan lists a long chain's head early, e.g.
the teacher detector before the classification students): no priority of the runner's own.
"""

from __future__ import annotations

import graphlib
import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager

from ..utils.atomic import atomic_write, remove_stale_temps
from .cluster import SLURM_ACTIVE, ClusterSettings, local_job_alive, squeue, stage_executor
from .plan import Stage
from .worker import (
    PROGRESS_FILE,
    STAGE_FILE,
    SUMMARY_KINDS,
    StageJob,
    stage_paths,
    stage_result,
)

__all__ = ["STAGE_FILE", "PipelineRunner", "stage_result"]

JOB_FILE = "job.json"  # in a stage's submitit folder: the last job submitted for it
HEAVY = ("train", "evaluate")  # the kinds --jobs limits (others are short, single-threaded)
# for the ETA only: seconds per iteration until a stage of the kind reports its pace (a 2-core
# CPU), and seconds a stage takes besides its iterations
PRIOR_SEC_PER_ITER = {"cls": 0.3, "det": 0.6}
FIXED_SEC = {"train": 15.0, "evaluate": 30.0, "export": 40.0, "report": 30.0, "calibrate": 60.0}
OTHER_SEC = 5.0


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _kind(stage: Stage) -> str:
    return stage.meta.get("stage", "other") if stage.kind in HEAVY else "other"


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent, or being replaced right now
        return None


class PipelineRunner:
    """Runs each unfinished stage of a plan once as a submitit job, in dependency order.

    Args:
        stages: the plan (`Stage.after` names the stages whose outputs a stage reads).
        handlers: stage kind -> function(stage) -> metrics, for the non-training kinds
            (pickled into the job: module-level functions or closures over plain data).
        settings: `ClusterSettings`.
    """

    def __init__(self, stages: list, handlers: dict, settings: ClusterSettings | None = None):
        self.stages, self.handlers = stages, handlers
        self.settings = settings or ClusterSettings()
        self.slurm = self.settings.cluster == "slurm"
        self.jobs = max(1, self.settings.jobs)
        self._by_name = {s.name: s for s in stages}
        self._pace = dict(PRIOR_SEC_PER_ITER)  # latest s/it reported per stage kind (cls, det)
        unknown = {s.name: [d for d in s.after if d not in self._by_name] for s in stages}
        unknown = {k: v for k, v in unknown.items() if v}
        if unknown:
            raise ValueError(f"stages wait for stages that are not in the plan: {unknown}")
        self._labels = {s.name: f"[{i + 1}/{len(stages)} {s.name}]"
                        for i, s in enumerate(stages)}

    # ---- what a stage is -------------------------------------------------------------------
    def _done_stages(self) -> set:
        """The stages finished from the inputs they would read now.

        A stage is done when its stage.json exists, every stage it reads (`after`) is done, and
        the run ids it recorded of those are still theirs: a training stage run again (its
        folder removed) or a grown plan (more seeds in the report) redoes what reads it.
        """
        done, results = set(), {s.name: stage_result(s) for s in self.stages}
        for stage in self._in_dependency_order(self.stages):
            result = results[stage.name]
            if result is None or not set(stage.after) <= done:
                continue
            recorded = result.get("inputs")
            if recorded is None:  # written before inputs were recorded: summaries are redone
                fresh = stage.kind not in SUMMARY_KINDS
            else:  # every input is done here, so each has its stage.json
                fresh = recorded == {n: results[n].get("run_id") for n in stage.after}
            if fresh:
                done.add(stage.name)
        return done

    @staticmethod
    def _job_folder(stage: Stage) -> str:
        return os.path.join(stage.out_dir, "submitit")

    def _record(self, stage: Stage) -> dict | None:
        return _read_json(os.path.join(self._job_folder(stage), JOB_FILE))

    def _logs(self, stage: Stage, job_id: str) -> str:
        return (f"{stage_paths(self._job_folder(stage), job_id)['stderr']} and "
                f"{os.path.join(stage.out_dir, 'log.rank0.txt')}")

    # ---- submission ---------------------------------------------------------------------------
    def _submit(self, stage: Stage, after_ids=()):
        executor, threads = stage_executor(self.settings, _kind(stage), self._job_folder(stage),
                                           f"nst_det:{stage.name}", after_ids)
        others = [s.out_dir for s in self.stages if s is not stage]
        # a local job's processes take their environment from this one at submission (submitit's
        # `setup` would put a shell between the runner and the job, which Ctrl-C would not stop)
        threads_env = {} if self.slurm else {"OMP_NUM_THREADS": str(threads),
                                             "MKL_NUM_THREADS": str(threads)}
        with _environ(**threads_env):
            job = executor.submit(StageJob(stage, self.handlers.get(stage.kind),
                                           [self._by_name[n] for n in stage.after],
                                           threads=threads, others=others))
        with atomic_write(os.path.join(self._job_folder(stage), JOB_FILE), "w") as f:
            json.dump({"cluster": self.settings.cluster, "job_id": str(job.job_id),
                       "submitted": time.time()}, f)
        return job

    # ---- state ------------------------------------------------------------------------------
    def states(self) -> dict:
        """name -> (state, job id or "", logs); state: pending/queued/running/done/failed."""
        records = {s.name: self._record(s) for s in self.stages}
        slurm_ids = [r["job_id"] for r in records.values() if r and r["cluster"] == "slurm"]
        slurm_states = squeue(slurm_ids) if slurm_ids and shutil.which("squeue") else {}
        out, done = {}, self._done_stages()
        for stage in self.stages:
            record = records[stage.name]
            job_id = record["job_id"] if record else ""
            log = self._logs(stage, job_id) if record else ""
            if stage.name in done:
                state = "done"
            elif record is None:
                state = "pending"
            elif record["cluster"] == "slurm":
                slurm_state, reason = slurm_states.get(job_id, ("", ""))
                state = SLURM_ACTIVE.get(slurm_state, "failed")
                if reason == "DependencyNeverSatisfied":  # an input failed: it never ran
                    state = "pending"
            else:
                state = "running" if local_job_alive(record["job_id"]) else "failed"
            out[stage.name] = (state, job_id, log)
        return out

    def status(self) -> str:
        """A table: each stage's state, job id and log (for `run_pipeline.py --status`)."""
        states = self.states()
        width = max(len(n) for n in states)
        lines = [f"{'stage':<{width}}  {'state':<8} {'job':<10} log"]
        for name, (state, job_id, log) in states.items():
            lines.append(f"{name:<{width}}  {state:<8} {job_id:<10} {log}")
        return "\n".join(lines)

    # ---- the run ----------------------------------------------------------------------------
    def run(self, wait: bool = True) -> None:
        """Submit the unfinished stages and (with `wait`) follow them until all have ended.

        Raises RuntimeError naming each failed stage (job id, logs) and the stages that did not
        run because of it. Any exception or Ctrl-C/SIGTERM cancels the jobs this call started.
        """
        t0 = time.perf_counter()
        self._started = {}  # name -> (job or job id, start time)
        self._finished = set()
        pending, done = [], self._done_stages()
        for stage in self.stages:
            if stage.name in done:
                print(f"{self._labels[stage.name]} done earlier: skipped", flush=True)
                self._finished.add(stage.name)
            else:
                pending.append(stage)
        self._in_dependency_order(pending)  # refuses a plan whose stages wait for each other
        try:
            if self.slurm:
                self._submit_all(pending)
                if not wait:
                    print("submitted; follow it with --status", flush=True)
                    self._started = {}
                    return
            failed = self._follow(pending)
        except BaseException:  # incl. Ctrl-C/SIGTERM: no job of this run may outlive it
            self._stop_started()
            raise
        if failed:
            raise RuntimeError("\n".join(failed) + "\nFinished stages are kept: run the same "
                               "command again to resume.")
        print(f"pipeline finished in {_fmt(time.perf_counter() - t0)}", flush=True)

    def _submit_all(self, pending: list) -> None:
        """SLURM: every unfinished stage at once, `afterok` on the unfinished ones it reads."""
        job_ids, active = {}, squeue([r["job_id"] for r in map(self._record, pending) if r])
        for stage in self._in_dependency_order(pending):
            record = self._record(stage)
            if record and active.get(record["job_id"], ("",))[0] in SLURM_ACTIVE:
                job_ids[stage.name] = record["job_id"]  # still queued or running: keep it
                print(f"{self._labels[stage.name]} already submitted (job {record['job_id']})",
                      flush=True)
                self._started[stage.name] = (record["job_id"], time.time())
                continue
            after = [job_ids[d] for d in stage.after if d in job_ids]
            job = self._submit(stage, after)
            job_ids[stage.name] = str(job.job_id)
            self._started[stage.name] = (str(job.job_id), time.time())
            print(f"{self._labels[stage.name]} submitted (job {job.job_id}"
                  f"{', after ' + ','.join(after) if after else ''})", flush=True)

    def _in_dependency_order(self, stages: list) -> list:
        """`stages` with each after the ones of them it reads (graphlib); a cycle is refused."""
        names = {s.name for s in stages}
        graph = {s.name: [d for d in s.after if d in names] for s in stages}
        try:
            return [self._by_name[n] for n in graphlib.TopologicalSorter(graph).static_order()]
        except graphlib.CycleError as e:
            raise RuntimeError(f"the plan's stages wait for each other: {e.args[1]}") from None

    def _follow(self, pending: list) -> list:
        """Start (locally) and watch the stages until none is left; returns failure messages."""
        waiting = {s.name: s for s in pending if s.name not in self._started}
        order = {s.name: i for i, s in enumerate(self.stages)}
        blocked, failed, shown = set(), [], {}
        while waiting or self._started:
            # in plan (= dependency) order, so a failure is seen before its dependents end
            ended = sorted(self._poll_ended(), key=lambda e: order[e[0]])
            for name, job_id in ended:
                stage = self._by_name[name]
                result = stage_result(stage)
                if result is not None:
                    self._finished.add(name)
                    print(f"{self._labels[name]} finished in {_fmt(result['seconds'])} "
                          f"{_summary(result['metrics'])}", flush=True)
                    continue
                if name in blocked:  # SLURM cancelled it: a stage it reads failed
                    continue
                later = self._dependents(name)
                blocked |= later
                for d in later:
                    waiting.pop(d, None)
                failed.append(f"stage {name} failed (job {job_id}); see {self._logs(stage, job_id)}"
                              + (f"; not run because of it: {', '.join(sorted(later))}"
                                 if later else ""))
                print(f"{self._labels[name]} FAILED (job {job_id}); see "
                      f"{self._logs(stage, job_id)}", flush=True)
            if not self.slurm:
                self._start_ready(waiting)
            self._show_progress(shown, waiting)
            if waiting or self._started:
                time.sleep(2.0 if self.slurm else 0.5)
        return failed

    def _dependents(self, name: str) -> set:
        out, frontier = set(), {name}
        while frontier:
            frontier = {s.name for s in self.stages if set(s.after) & frontier} - out
            out |= frontier
        return out

    def _poll_ended(self) -> list:
        """(name, job id) of the started jobs that have ended since the last call."""
        ended = []
        if self.slurm:
            states = squeue([job_id for job_id, _ in self._started.values()])
            for name, (job_id, _) in list(self._started.items()):
                if states.get(job_id, ("",))[0] not in SLURM_ACTIVE:
                    del self._started[name]
                    ended.append((name, job_id))
            return ended
        for name, (job, _) in list(self._started.items()):
            if job.done():
                del self._started[name]
                ended.append((name, str(job.job_id)))
        return ended

    def _start_ready(self, waiting: dict) -> None:
        """Local: submit the stages whose inputs are done, in plan order, up to `jobs`
        training stages at a time."""
        slots = self.jobs - sum(self._by_name[n].kind in HEAVY for n in self._started)
        for stage in [s for s in waiting.values() if set(s.after) <= self._finished]:
            if stage.kind in HEAVY:
                if slots <= 0:
                    continue
                slots -= 1
            job = self._submit(stage)
            del waiting[stage.name]
            self._started[stage.name] = (job, time.time())
            print(f"{self._labels[stage.name]} starting ({stage.kind}); pipeline ETA "
                  f"{_fmt(self._eta(waiting))}", flush=True)

    def _progress(self, stage: Stage) -> dict | None:
        return _read_json(os.path.join(stage.out_dir, PROGRESS_FILE)) \
            if stage.kind == "train" else None

    def _estimate(self, stage: Stage) -> float:
        """Seconds a whole stage is expected to take (its kind's latest pace)."""
        fixed = FIXED_SEC.get(stage.kind, OTHER_SEC)
        if stage.kind != "train":
            return fixed
        return stage.iters * self._pace.get(stage.meta.get("stage"), 1.0) + fixed

    def _eta(self, waiting: dict) -> float:
        """The one pipeline ETA: the seconds the unfinished stages still need, shared among
        the slots (`jobs` locally, the running stages on SLURM)."""
        left = sum(self._estimate(s) for s in waiting.values())
        for name, (_, started) in self._started.items():
            stage = self._by_name[name]
            progress = self._progress(stage)
            if progress:  # iterations still to run, and about half the fixed part (evaluation)
                left += progress["sec_per_iter"] * (progress["max_iter"] - progress["iter"]) \
                    + FIXED_SEC["train"] / 2
            else:
                left += max(1.0, self._estimate(stage) - (time.time() - started))
        slots = max(1, len(self._started)) if self.slurm else self.jobs
        return left / slots

    def _show_progress(self, shown: dict, waiting: dict) -> None:
        """One line per new ~10% of a running training stage, with the pipeline ETA."""
        for name in list(self._started):
            stage = self._by_name[name]
            progress = self._progress(stage)
            if not progress:
                continue
            done, total = progress["iter"], progress["max_iter"]
            tenth = done * 10 // max(1, total)
            if tenth <= shown.get(name, 0) or done < total and tenth == 0:
                continue
            shown[name] = tenth
            self._pace[stage.meta.get("stage")] = progress["sec_per_iter"]
            eta = self._eta(waiting)
            print(f"    {self._labels[name]}: iter {done}/{total} ({100 * done // total}%) "
                  f"{progress['sec_per_iter']:.2f} s/it | stage ETA "
                  f"{_fmt(progress['sec_per_iter'] * (total - done))} | pipeline ETA "
                  f"{_fmt(eta)}", flush=True)

    def _stop_started(self) -> None:
        """Ask this run's jobs to stop (so they clean up), wait for them, sweep what is left."""
        started, self._started = self._started, {}
        if not started:
            return
        if self.slurm:
            ids = [job_id for job_id, _ in started.values()]
            subprocess.run(["scancel", *ids], capture_output=True)
            deadline = time.time() + 60
            while time.time() < deadline and any(
                    state in SLURM_ACTIVE for state, _ in squeue(ids).values()):
                time.sleep(1.0)
        else:
            # Ctrl-C in a terminal reached the jobs too: let them stop by themselves first, so
            # they are not interrupted a second time while they clean up
            deadline = time.time() + 2.0
            while time.time() < deadline and not all(j.done() for j, _ in started.values()):
                time.sleep(0.1)
            for job, _ in started.values():
                if not job.done():
                    job.cancel()  # SIGINT to submitit's controller: SIGINT, then SIGKILL, to tasks
            deadline = time.time() + 5.0
            while time.time() < deadline and not all(j.done() for j, _ in started.values()):
                time.sleep(0.1)
            # a runner started with SIGINT ignored (nohup, `&` in a script) passes that on to the
            # controllers, which then ignore the cancel: SIGTERM, which submitit's controller
            # forwards to its tasks, and a StageJob unwinds on as on Ctrl-C
            for job, _ in started.values():
                if not job.done():
                    try:
                        os.kill(int(job.job_id), signal.SIGTERM)
                    except (OSError, ValueError):
                        pass
            deadline = time.time() + 20.0
            while time.time() < deadline and not all(j.done() for j, _ in started.values()):
                time.sleep(0.1)
        for name in started:
            remove_stale_temps(self._by_name[name].out_dir, below=True, any_writer=True,
                               exclude=[s.out_dir for s in self.stages if s.name != name])


@contextmanager
def _environ(**values):
    """Set environment variables for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _summary(metrics: dict) -> str:
    flat = {}
    for values in metrics.values():
        if isinstance(values, dict):
            flat.update({k: v for k, v in values.items() if k in ("top1", "AP50", "AP")})
    return " ".join(f"{k}={v:.2f}" for k, v in flat.items())

