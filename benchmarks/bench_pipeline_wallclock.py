#!/usr/bin/env python
"""Wall-clock of the toy pipeline (`make demo`'s work) for this tree and an earlier revision.

    python benchmarks/bench_pipeline_wallclock.py                  # this tree, then 7e2bd0e
    python benchmarks/bench_pipeline_wallclock.py --order old,new --scale ci

Each run starts from an empty data root and output folder of its own (as `rm -rf datasets output
&& make demo` does) and runs `tools/run_pipeline.py` of its revision with the venv's python; the
earlier revision is checked out in a git worktree under --work. A run's data and outputs (GBs of
checkpoints) are removed once measured, and the worktree at the end; each run's log stays in
--work. Printed per run: the wall-clock, the training stages' own seconds summed, and the
packing (wall-clock / (those seconds / jobs)): 1.0 would mean both job slots busy with training
all the time, so the packing compares how two schedulers start and overlap the same stages apart
from how fast the machine happened to be. Against 7e2bd0e (the default) it does so only roughly:
there a stage's seconds were timed by the runner from the job's spawn to its exit seen (start-up,
imports and polling included), since the stages became submitit jobs (dddac1a) inside the job,
so the old packing reads better.
Run the two revisions back to back, and again in the other order, to see the machine's drift;
the mean of each revision's runs and their ratio close the output.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the last revision with the pipeline's own scheduler (before the stages became submitit jobs)
OLD_REV = "7e2bd0e"


def _worktree(rev: str, work: str) -> str:
    return os.path.join(work, f"src_{rev}")


def _source(name: str, rev: str, work: str) -> str:
    if name == "new":
        return REPO
    src = _worktree(rev, work)
    if not os.path.isdir(src):
        made = subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", src, rev],
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"--rev {rev}: git worktree add failed: {made.stderr.strip()}")
    return src


def _stage_records(out: str) -> list:
    records = []
    for path in glob.glob(os.path.join(out, "*", "stage.json")):
        with open(path) as f:
            records.append(json.load(f))
    return records


def run_once(name: str, src: str, work: str, scale: str, jobs: int) -> dict:
    """Run one revision's pipeline from empty folders; returns its figures."""
    root = os.path.join(work, name)
    shutil.rmtree(root, ignore_errors=True)
    data, out = os.path.join(root, "data"), os.path.join(root, "out")
    os.makedirs(data)
    env = dict(os.environ, PYTHONPATH=src, DETECTRON2_DATASETS=data,
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    cmd = [sys.executable, "tools/run_pipeline.py", "--output", out, "--scale", scale,
           "--jobs", str(jobs)]
    start = time.perf_counter()
    with open(os.path.join(root, "log.txt"), "w") as log:
        subprocess.run(cmd, cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    train = sum(r["seconds"] for r in _stage_records(out) if r["kind"] == "train")
    shutil.rmtree(data)
    shutil.rmtree(out)
    return {"run": name, "wall_s": wall, "train_stage_s": train,
            "packing": wall / (train / jobs) if train else float("nan")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default=OLD_REV, help="the earlier revision ('old')")
    parser.add_argument("--order", default="new,old", help="runs, in order: new and/or old")
    parser.add_argument("--scale", default="demo", choices=("demo", "ci"))
    parser.add_argument("--jobs", type=int, default=2, help="training stages side by side")
    parser.add_argument("--work", default="/tmp/nst_det_bench_pipeline")
    args = parser.parse_args(argv)
    order = args.order.split(",")
    if not order or set(order) - {"new", "old"}:  # any other name would run --rev under it
        parser.error(f"--order takes 'new' and 'old' only (comma-separated); got {args.order!r}")
    os.makedirs(args.work, exist_ok=True)
    rows = []
    try:
        for name in order:
            src = _source(name, args.rev, args.work)
            row = run_once(name, src, args.work, args.scale, args.jobs)
            rows.append(row)
            print(f"{row['run']:>4}: wall {row['wall_s'] / 60:5.2f} min | training stages "
                  f"{row['train_stage_s'] / 60:5.2f} min | packing {row['packing']:.3f}",
                  flush=True)
    finally:
        src = _worktree(args.rev, args.work)
        if os.path.isdir(src):
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", src],
                           check=False, capture_output=True)
    means = {n: statistics.mean(r["wall_s"] for r in rows if r["run"] == n)
             for n in ("new", "old") if any(r["run"] == n for r in rows)}
    for name, wall in means.items():
        print(f"mean {name}: wall {wall / 60:5.2f} min", flush=True)
    if len(means) == 2:
        print(f"new / old: {means['new'] / means['old']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
