"""Where a stage runs: its submitit executor (this machine or SLURM), and the state of a job.

Job states come from `squeue` rather than submitit's `job.state`, which reads `sacct`: a SLURM
without accounting storage (the CI's one-node cluster, many small ones) has no `sacct`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

import submitit

from ..utils.process import process_running

# squeue states of a job that has not ended -> the pipeline's words for them
SLURM_ACTIVE = {**dict.fromkeys(("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                                 "SUSPENDED", "RESV_DEL_HOLD"), "queued"),
                **dict.fromkeys(("CONFIGURING", "RUNNING", "COMPLETING", "RESIZING",
                                 "STAGE_OUT", "SIGNALING"), "running")}


@dataclass
class ClusterSettings:
    """Where the stages run and with what, per stage kind: "cls" / "det" (training and
    evaluation stages of that task) or "other" (export, report, calibration).

    cluster: "local" (submitit's local executor) or "slurm". jobs: local only, training stages
    side by side. tasks / gpus / nodes / time_min / cpus: per kind, e.g. `{"cls": 8}`, a
    missing kind falling back to "default"; tasks are processes per node (default: gpus or 1).
    partition, account: SLURM's; sbatch: extra `#SBATCH --key=value` options.
    """

    cluster: str = "local"
    jobs: int = 1
    tasks: dict = field(default_factory=dict)
    gpus: dict = field(default_factory=dict)
    nodes: dict = field(default_factory=dict)
    time_min: dict = field(default_factory=dict)
    cpus: dict = field(default_factory=dict)
    partition: str | None = None
    account: str | None = None
    sbatch: dict = field(default_factory=dict)

    def get(self, name: str, kind: str, default):
        values = getattr(self, name)
        return values.get(kind, values.get("default", default))


def stage_executor(settings: ClusterSettings, kind: str, folder: str, name: str,
                   after_ids=()) -> tuple:
    """(submitit executor, torch threads per task, 0 for "as SLURM gives") of one stage of
    `kind` ("cls", "det" or "other"), waiting (`afterok`) for the SLURM jobs `after_ids`."""
    s = settings
    gpus = s.get("gpus", kind, 0)
    tasks = s.get("tasks", kind, gpus or 1) if kind != "other" else 1
    if s.cluster != "slurm":
        # the cores shared among the training stages side by side and their processes
        cpus = max(1, (os.cpu_count() or 1) // (max(1, s.jobs) * tasks)) if kind != "other" else 1
        executor = submitit.LocalExecutor(folder)
        # a long limit: submitit's local default would signal a time-out
        executor.update_parameters(timeout_min=s.get("time_min", kind, 60 * 24 * 30),
                                   tasks_per_node=tasks, gpus_per_node=gpus, name=name)
        return executor, cpus
    cpus = s.get("cpus", kind, None)
    # a requeued job (time limit, preemption) appends to its logs instead of truncating them
    extra = {"kill-on-invalid-dep": "yes", "open-mode": "append", **s.sbatch}
    if after_ids:
        extra["dependency"] = "afterok:" + ":".join(after_ids)
    executor = submitit.SlurmExecutor(folder)
    executor.update_parameters(
        job_name=name, time=s.get("time_min", kind, 60 * 24), nodes=s.get("nodes", kind, 1),
        ntasks_per_node=tasks, gpus_per_node=gpus or None, cpus_per_task=cpus,
        partition=s.partition, account=s.account, additional_parameters=extra,
        setup=["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"])
    return executor, cpus or 0


def squeue(job_ids) -> dict:
    """job id -> (state, reason) of the SLURM jobs slurmctld still knows (none without SLURM's
    client, e.g. `--status` on a machine that did not submit them)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    out = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%T|%r",
                          "-j", ",".join(sorted(job_ids))], capture_output=True, text=True)
    rows = ((line.split("|") + ["", ""])[:3] for line in out.stdout.splitlines())
    return {job_id.strip(): (state.strip(), reason.strip()) for job_id, state, reason in rows}


def local_job_alive(job_id: str) -> bool:
    """Whether a local submitit job (its id is its controller's pid) is still running."""
    return process_running(job_id, named=b"submitit")  # not another program that got the pid
