"""PipelineRunner through submitit's local executor, with stand-in stages (real jobs, no training).

Finished stages are skipped and summaries follow the plan; independent stages overlap and
dependencies hold; a failure stops only its dependents and names stage, job and log; --status;
one pipeline ETA; stopping the pipeline while a stage writes leaves no temporary file; and a
second run on the same folders is refused while the first, or a job it left, works there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import pytest

from nst_det.pipeline.cluster import ClusterSettings
from nst_det.pipeline.plan import Stage
from nst_det.pipeline.run import STAGE_FILE, PipelineRunner
from nst_det.utils.atomic import remove_stale_temps

REPO = Path(__file__).resolve().parents[1]
# the stand-in stage functions below travel into the jobs by value (this module is not
# importable there)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _log_event(stage, what):
    with open(os.path.join(os.path.dirname(stage.out_dir), "events.log"), "a") as f:
        f.write(f"{what} {stage.name} {time.time()}\n")


def quick(stage):
    """A stand-in stage: records when it ran."""
    _log_event(stage, "start")
    time.sleep(float(stage.meta.get("sleep", 0)))
    _log_event(stage, "end")
    return {"bbox": {"AP50": 1.0}}


def paced(stage):
    """A stand-in training stage that reports its pace like the real one (progress.json)."""
    from nst_det.pipeline.records import PROGRESS_FILE
    from nst_det.utils.atomic import atomic_write

    os.makedirs(stage.out_dir, exist_ok=True)
    for i in range(1, stage.iters + 1):
        time.sleep(0.25)
        with atomic_write(os.path.join(stage.out_dir, PROGRESS_FILE), "w") as f:
            json.dump({"iter": i, "max_iter": stage.iters, "sec_per_iter": 0.25}, f)
    return {}


def failing(stage):
    raise ValueError(f"stand-in failure of {stage.name}")


def _events(root):
    path = Path(root) / "stages" / "events.log"
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        what, name, t = line.split()
        out[what, name] = float(t)
    return out


def _stage(root, name, kind="train", after=(), **meta):
    meta.setdefault("stage", "det")
    return Stage(name, kind, str(Path(root) / "stages" / name), meta=meta, iters=1,
                 after=list(after))


def _runner(stages, jobs=1, **handlers):
    handlers = {"train": quick, "calibrate": quick, "report": quick, **handlers}
    return PipelineRunner(stages, handlers, ClusterSettings(cluster="local", jobs=jobs))


def _finished(stage, **record):
    """Make `stage` look finished by an earlier run (its stage.json exists, with `record`)."""
    Path(stage.out_dir).mkdir(parents=True)
    (Path(stage.out_dir) / STAGE_FILE).write_text(
        json.dumps({"name": stage.name, "metrics": {}, "seconds": 1.0, **record}))
    return stage


@pytest.mark.slow
def test_finished_stages_are_skipped_and_the_report_follows_new_and_rerun_stages(tmp_path, capsys):
    seed0 = _finished(_stage(tmp_path, "det_s0"))
    report = _stage(tmp_path, "report", "report", after=["det_s0"])
    _runner([seed0, report]).run()
    assert set(_events(tmp_path)) == {("start", "report"), ("end", "report")}
    saved = json.loads((Path(report.out_dir) / STAGE_FILE).read_text())
    assert saved["inputs"] == {"det_s0": None} and saved["job_id"] and saved["run_id"]

    (tmp_path / "stages" / "events.log").unlink()
    capsys.readouterr()
    _runner([seed0, report]).run()  # nothing new: nothing runs
    assert _events(tmp_path) == {}
    assert capsys.readouterr().out.count("done earlier: skipped") == 2

    seed1 = _finished(_stage(tmp_path, "det_s1"))  # the plan grew (e.g. --seeds 0,1)
    report.after.append("det_s1")
    _runner([seed0, seed1, report]).run()
    assert {name for _, name in _events(tmp_path)} == {"report"}  # redone, seeds kept
    assert json.loads((Path(report.out_dir) / STAGE_FILE).read_text())["inputs"] == {
        "det_s0": None, "det_s1": None}

    (tmp_path / "stages" / "events.log").unlink()
    (Path(seed0.out_dir) / STAGE_FILE).unlink()  # its folder removed to train it again
    _runner([seed0, seed1, report]).run()
    assert {name for _, name in _events(tmp_path)} == {"det_s0", "report"}
    rerun = json.loads((Path(seed0.out_dir) / STAGE_FILE).read_text())["run_id"]
    assert json.loads((Path(report.out_dir) / STAGE_FILE).read_text())["inputs"] == {
        "det_s0": rerun, "det_s1": None}
    (tmp_path / "stages" / "events.log").unlink()
    _runner([seed0, seed1, report]).run()  # and once more: nothing new, nothing runs
    assert _events(tmp_path) == {}


@pytest.mark.slow
def test_what_reads_a_stage_run_again_is_redone(tmp_path):
    # an earlier run's records, as the jobs write them (run ids, and the run ids each read)
    cls = _finished(_stage(tmp_path, "cls", stage="cls"), run_id="r_cls", inputs={})
    calibrate = _finished(_stage(tmp_path, "calibrate", "calibrate", after=["cls"]),
                          run_id="r_cal", inputs={"cls": "r_cls"})  # a short stage
    det = _finished(_stage(tmp_path, "det", after=["calibrate"]), run_id="r_det",
                    inputs={"calibrate": "r_cal"})
    (Path(det.out_dir) / "model_final.pth").write_text("the previous run's weights")
    _runner([cls, calibrate, det]).run()
    assert _events(tmp_path) == {}  # all done from the inputs they read
    (Path(cls.out_dir) / STAGE_FILE).unlink()
    _runner([cls]).run()  # a run stopped after the training stage: its readers are now stale
    assert {name for _, name in _events(tmp_path)} == {"cls"}
    (tmp_path / "stages" / "events.log").unlink()
    _runner([cls, calibrate, det]).run()
    assert {name for _, name in _events(tmp_path)} == {"calibrate", "det"}
    # the training stage started in an empty folder (nothing of the previous run to resume
    # from); the previous run is kept beside it, whole
    [aside] = (tmp_path / "stages").glob("det.superseded-*")
    assert (aside / "model_final.pth").read_text() == "the previous run's weights"
    assert json.loads((aside / STAGE_FILE).read_text())["run_id"] == "r_det"
    assert not (Path(det.out_dir) / "model_final.pth").exists()
    assert json.loads((Path(det.out_dir) / STAGE_FILE).read_text())["run_id"] != "r_det"
    assert not list((tmp_path / "stages").glob("calibrate.superseded-*"))  # writes afresh
    (tmp_path / "stages" / "events.log").unlink()
    _runner([cls, calibrate, det]).run()
    assert _events(tmp_path) == {}

    (Path(cls.out_dir) / STAGE_FILE).unlink()  # the training stage stopped before its record
    states = _runner([cls, calibrate, det]).states()  # (--status)
    assert [states[n][0] for n in ("cls", "calibrate", "det")] == ["failed", "stale", "stale"]


@pytest.mark.slow
def test_jobs_overlap_independent_stages_respect_dependencies_and_limit(tmp_path):
    a, b = (_stage(tmp_path, n, sleep=4) for n in "ab")
    c = _stage(tmp_path, "c", after=["a"], sleep=0)
    d = _stage(tmp_path, "d", sleep=0)  # a third training stage: waits for a free job slot
    _runner([a, b, c, d], jobs=2).run()
    when = _events(tmp_path)
    assert when["start", "b"] < when["end", "a"] and when["start", "a"] < when["end", "b"]
    assert when["start", "c"] >= when["end", "a"]  # c waited for the stage it reads
    assert when["start", "d"] >= min(when["end", "a"], when["end", "b"])  # at most 2 at once
    for stage in (a, b, c, d):
        saved = json.loads((Path(stage.out_dir) / STAGE_FILE).read_text())
        assert saved["metrics"] == {"bbox": {"AP50": 1.0}} and saved["seconds"] >= 0


@pytest.mark.slow
def test_a_failed_stage_stops_its_dependents_and_names_itself(tmp_path):
    bad = _stage(tmp_path, "bad", "calibrate")
    child = _stage(tmp_path, "child", after=["bad"])
    grandchild = _stage(tmp_path, "grandchild", "report", after=["child"])
    other = _stage(tmp_path, "other", sleep=1)
    runner = PipelineRunner([bad, child, grandchild, other],
                            {"calibrate": failing, "train": quick, "report": quick},
                            ClusterSettings(jobs=2))
    with pytest.raises(RuntimeError) as err:
        runner.run()
    job_id = json.loads((Path(bad.out_dir) / "submitit" / "job.json").read_text())["job_id"]
    message = str(err.value)
    assert f"stage bad failed (job {job_id})" in message
    assert f"{bad.out_dir}/submitit/{job_id}_0_log.err" in message
    assert "stand-in failure of bad" in Path(bad.out_dir, "submitit",
                                             f"{job_id}_0_log.err").read_text()
    assert "not run because of it: child, grandchild" in message
    events = _events(tmp_path)
    assert ("end", "other") in events  # the independent stage finished
    assert not any(name in ("child", "grandchild") for _, name in events)
    states = runner.states()
    assert states["bad"][:2] == ("failed", job_id) and states["other"][0] == "done"
    assert states["child"][0] == states["grandchild"][0] == "pending"
    table = runner.status()
    assert re.search(rf"bad\s+failed\s+{job_id}\s+\S+_log.err", table)


def test_stages_waiting_for_unknown_stages_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not in the plan"):
        _runner([_stage(tmp_path, "x", after=["missing"])])


def test_stages_waiting_for_each_other_are_refused_before_any_job(tmp_path):
    a, b = _stage(tmp_path, "a", after=["b"]), _stage(tmp_path, "b", after=["a"])
    with pytest.raises(ValueError, match=r"wait for each other: \['(a|b)', '(a|b)', '\1'\]"):
        _runner([a, b, _stage(tmp_path, "c")])
    assert not (tmp_path / "stages" / "c").exists()  # nothing was started


class _Instant:
    """A job that has ended at once with its stage finished (for the runner's order alone)."""

    def __init__(self, stage, order):
        order.append(stage.name)
        _finished(stage)
        self.job_id = str(len(order))

    def done(self):
        return True


def test_ready_stages_start_in_the_plan_order_within_the_slots(tmp_path):
    # "late" is listed first but waits for "head"; "lone" is ready at once but listed after
    # "head"'s dependent: once "head" has finished, its dependent goes before "lone"
    head, late = _stage(tmp_path, "head"), _stage(tmp_path, "late", after=["head"])
    lone = _stage(tmp_path, "lone")
    runner, order = _runner([late, head, lone], jobs=1), []
    runner._submit = lambda stage, after=(): _Instant(stage, order)
    runner.run()
    assert order == ["head", "late", "lone"]


@pytest.mark.slow
def test_one_pipeline_eta_while_stages_run_side_by_side(tmp_path, capsys):
    stages = [Stage(n, "train", str(tmp_path / n), meta={"stage": "det"}, iters=24)
              for n in ("a", "b")]
    PipelineRunner(stages, {"train": paced}, ClusterSettings(jobs=2)).run()
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if "iter " in line]
    assert {"[1/2 a]" in line for line in progress} == {True, False}  # both reported
    etas = [int(m) * 60 + int(s) for m, s in re.findall(r"pipeline ETA (\d+):(\d\d)", out)]
    assert len(etas) >= 6
    # one estimate of the whole pipeline, counting down: two per-stage estimates interleaved
    # would jump back up whenever the other stage's line comes
    assert all(later <= earlier + 1 for earlier, later in zip(etas, etas[1:])), etas


def test_sweep_removes_only_temporaries_and_spares_other_stages(tmp_path):
    (tmp_path / "other").mkdir()
    leftovers = [tmp_path / ".model_final.pth.x1y2.tmp", tmp_path / "sub" / ".a.json.k.tmp"]
    keep = [tmp_path / "model_final.pth", tmp_path / "other" / ".b.json.z.tmp",
            tmp_path / "notes.tmp"]
    for path in leftovers + keep:
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
    (tmp_path / ".export.abc.tmp").mkdir()
    assert remove_stale_temps(tmp_path, below=True) == []  # no dead writer of this host named
    removed = remove_stale_temps(tmp_path, below=True, exclude=[tmp_path / "other"],
                                 any_writer=True)
    assert sorted(removed) == sorted([*leftovers, tmp_path / ".export.abc.tmp"])
    assert all(p.exists() for p in keep) and not any(p.exists() for p in leftovers)


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


def test_an_empty_plan_or_one_naming_a_stage_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="each named once; got \\[\\]"):
        _runner([])
    with pytest.raises(ValueError, match="each named once; got \\['a', 'b', 'a'\\]"):
        _runner([_stage(tmp_path, "a"), _stage(tmp_path, "b"), _stage(tmp_path / "x", "a")])


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


@pytest.mark.slow
def test_a_stage_is_redone_when_its_definition_changed_not_when_its_root_is_written_otherwise(
        tmp_path, monkeypatch):
    def plan(root, iters):  # a training stage and the summary that reads it
        det = Stage("det", "train", os.path.join(root, "det"), "configs/x.yaml",
                    ["SOLVER.MAX_ITER", iters, "OUTPUT_DIR", os.path.join(root, "det")],
                    meta={"stage": "det"}, iters=1)
        report = Stage("report", "report", os.path.join(root, "report"), after=["det"])
        return PipelineRunner([det, report], {"train": quick, "report": quick},
                              ClusterSettings(), root=root)

    plan(str(tmp_path / "stages"), "3").run()
    assert {name for _, name in _events(tmp_path)} == {"det", "report"}
    (tmp_path / "stages" / "events.log").unlink()
    monkeypatch.chdir(tmp_path)
    plan("./stages/", "3").run()  # the same plan, its root written another way: all done
    assert _events(tmp_path) == {}
    plan("stages", "120").run()  # e.g. --scale demo into a --scale ci output: redone
    assert {name for _, name in _events(tmp_path)} == {"det", "report"}
    [aside] = (tmp_path / "stages").glob("det.superseded-*")
    assert json.loads((aside / STAGE_FILE).read_text())["definition"]["opts"] == [
        "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", "det"]
