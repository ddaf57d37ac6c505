"""PipelineRunner as real processes: stopping the pipeline (Ctrl-C, `kill`) while a stage
writes leaves no temporary file and no job, and a second run on the same folders is refused while
the first run, or a job a killed one left, works there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nst_det.pipeline.run import STAGE_FILE

REPO = Path(__file__).resolve().parents[1]

_INTERRUPTED_RUN = textwrap.dedent("""
    import os, signal, sys, time
    from nst_det.pipeline.plan import Stage
    from nst_det.pipeline.cluster import ClusterSettings
    from nst_det.pipeline.run import PipelineRunner

    def saving(stage):
        # checkpoint-sized atomic writes; with "block", stage a stays inside its third write
        # (after announcing it in a file the test waits for) until the pipeline is stopped
        from nst_det.utils.atomic import atomic_write
        for i in range(int(stage.meta["saves"])):
            with atomic_write(os.path.join(stage.out_dir, f"model_{{i % 2}}.pth")) as f:
                for _ in range(8):
                    f.write(os.urandom(1 << 15))
                if stage.meta["block"] and stage.name == "a" and i == 2:
                    open(os.path.join(stage.out_dir, "inside_write"), "w").close()
                    while True:
                        time.sleep(0.1)
        return {{}}

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # as tools/run_pipeline.py does
    root, block = sys.argv[1], sys.argv[2] == "block"
    stages = [Stage(n, "train", os.path.join(root, n),
                    meta={{"stage": "det", "saves": 6, "block": block}}, iters=1, after=after)
              for n, after in (("a", []), ("b", []), ("c", ["a"]))]
    PipelineRunner(stages, {{"train": saving}}, ClusterSettings(jobs=2)).run()
""")


def _job_processes(root):
    """pids of processes whose command line names `root` (submitit jobs and controllers)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(root) in cmdline and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def _wait_inside_write(out: Path, run: subprocess.Popen) -> None:
    """Wait (an event, not a moment) until stage a is blocked inside one of its writes."""
    marker = out / "a" / "inside_write"
    deadline = time.time() + 300  # only a hung start-up gets here
    while not marker.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), (run.communicate()[0] or "see the run's log")[-3000:] \
        if run.poll() is not None else "hung"


def _no_jobs_left(out: Path) -> list:
    deadline = time.time() + 60  # jobs given time to unwind; their absence is the assertion
    while _job_processes(out) and time.time() < deadline:
        time.sleep(0.2)
    return _job_processes(out)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_stopping_the_pipeline_while_a_stage_writes_leaves_no_temporary_file(tmp_path, how):
    script = tmp_path / "run.py"
    script.write_text(_INTERRUPTED_RUN.format())
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # SIGINT: Ctrl-C in a terminal, SIGINT handled (even where this test runs with it ignored:
    # pytest under nohup or `&` in a script passes the ignored SIGINT on). SIGTERM: `kill` of a
    # pipeline that `nohup ... &` or `&` in a script started, and so its jobs, with SIGINT
    # ignored: cancelling the jobs must not rely on SIGINT
    sigint = signal.SIG_DFL if how == "SIGINT" else signal.SIG_IGN
    run = subprocess.Popen([sys.executable, str(script), str(out), "block"], cwd=REPO, env=env,
                           start_new_session=True, stdout=subprocess.PIPE,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
                           stderr=subprocess.STDOUT, text=True)
    _wait_inside_write(out, run)
    if how == "SIGINT":  # Ctrl-C: the terminal signals the whole process group
        os.killpg(run.pid, signal.SIGINT)
    else:  # `kill`: the pipeline process only
        run.send_signal(signal.SIGTERM)
    log = run.communicate(timeout=120)[0]
    assert run.returncode != 0, log[-3000:]
    assert not (out / "a" / STAGE_FILE).exists() and not (out / "c" / STAGE_FILE).exists()
    assert _no_jobs_left(out) == [], f"jobs outlived the pipeline\n{log[-3000:]}"
    temps = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".save_tmp"))]
    assert temps == [], f"{how}: {temps}\n{log[-3000:]}"
    final = subprocess.run([sys.executable, str(script), str(out), "finish"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert all((out / n / STAGE_FILE).is_file() for n in "abc")
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []


@pytest.mark.slow
def test_a_second_run_on_the_same_folders_is_refused_while_the_first_or_its_jobs_work(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_INTERRUPTED_RUN.format())
    out, env = tmp_path / "out", dict(os.environ, PYTHONPATH=str(REPO))

    def second_run():
        return subprocess.run([sys.executable, str(script), str(out), "finish"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)

    log = open(tmp_path / "first.log", "w")  # (a pipe would stay open while an orphan lives)
    first = subprocess.Popen([sys.executable, str(script), str(out), "block"], cwd=REPO,
                             env=env, start_new_session=True, stdout=log, stderr=log)
    try:
        _wait_inside_write(out, first)  # stage a's job is inside a write; b may have finished
        job_a = json.loads((out / "a" / "submitit" / "job.json").read_text())["job_id"]
        temps = sorted(p for p in (out / "a").iterdir() if p.name.endswith(".tmp"))
        assert temps, "stage a should be inside a write"

        refused = second_run()  # the first run is going
        assert refused.returncode != 0
        assert f"another pipeline run is using {out}" in refused.stderr, refused.stderr[-3000:]

        first.kill()  # the runner alone, killed hard: its job for stage a goes on, orphaned
        first.wait(timeout=60)
        refused = second_run()
        assert refused.returncode != 0
        assert f"still have a job of an earlier run: a (job {job_a})" in refused.stderr, \
            refused.stderr[-3000:]
        # neither refused run started a job or touched the files of the job at work
        assert json.loads((out / "a" / "submitit" / "job.json").read_text())["job_id"] == job_a
        assert sorted(p for p in (out / "a").iterdir() if p.name.endswith(".tmp")) == temps
        assert not (out / "c").exists()
    finally:
        first.kill()
        log.close()
        for pid in _job_processes(out):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    assert _no_jobs_left(out) == []
    final = second_run()  # the orphan gone: the run resumes and sweeps what it left
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert all((out / n / STAGE_FILE).is_file() for n in "abc")
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []


@pytest.mark.slow
def test_a_run_of_part_of_the_plan_is_refused_while_a_run_holds_the_whole_output(tmp_path):
    from filelock import FileLock

    from nst_det.pipeline.run import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / LOCK_FILE)):  # as a run of the whole plan on `out` holds it
        part = subprocess.run(
            [sys.executable, str(REPO / "tools" / "run_pipeline.py"), "--scale", "ci",
             "--output", str(out), "--stages", "cls_teacher"],
            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert part.returncode != 0
    assert f"another pipeline run is using {out}" in part.stderr, part.stderr[-3000:]
    assert not (out / "cls_teacher").exists()  # no job started
