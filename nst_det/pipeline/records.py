"""A stage's record, `stage.json`: the file whose presence marks the stage finished.

Written atomically by the stage's job at its end (`worker.StageJob`) with its metrics, seconds,
a fresh run id, the run ids of the stages it read and its definition; read by the runner (what is
done) and by the report (what to say). Nothing here starts or follows a job.
"""

from __future__ import annotations

import json
import os

from .plan import Stage

STAGE_FILE = "stage.json"
PROGRESS_FILE = "progress.json"  # a training stage's iteration count and speed, for the runner
# what a stage's job started from (its inputs' run ids, its definition): a training stage that
# did not finish resumes only from a run of the same inputs and definition
STARTED_FILE = "started.json"
SUMMARY_KINDS = ("export", "report")  # stages that summarise every training run


def stage_result(stage: Stage) -> dict | None:
    """The stage's stage.json, or None when it has not finished."""
    path = os.path.join(stage.out_dir, STAGE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:  # (written atomically: damaged by hand or by the disk)
            raise ValueError(f"stage record {path} is damaged ({e}): remove it, and the next "
                             "run does the stage again") from None


def finished_results(stages) -> dict:
    """name -> stage.json of each finished stage of `stages` (one read each)."""
    return {s.name: r for s in stages if (r := stage_result(s)) is not None}


def runs_of(stages) -> dict:
    """name -> run id of each of `stages` (None: not finished, or finished before run ids)."""
    return {s.name: (stage_result(s) or {}).get("run_id") for s in stages}


def started_from(inputs, stage_definition: dict) -> dict:
    """What a stage's job starts from (`STARTED_FILE`): the run ids of `inputs`, the stages it
    reads, and its `definition`."""
    return {"inputs": runs_of(inputs), "definition": stage_definition}


def definition(stage: Stage, root: str) -> dict:
    """What `stage` runs (kind, config, overrides, inputs), each path under the plan's `root`
    written relative to it: a record made from another definition (e.g. another --scale into
    the same --output) is stale, while the same root written another way is the same."""
    root = os.path.abspath(root)

    def relative(value):
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [relative(v) for v in value]
        path = os.path.abspath(value) if isinstance(value, str) and value else ""
        return os.path.relpath(path, root) if path.startswith(root + os.sep) else value

    return relative({"kind": stage.kind, "config": stage.config, "opts": stage.opts,
                     "inputs": stage.inputs, "d2_backbone": stage.d2_backbone})
