"""PipelineRunner through submitit's local executor, with stand-in stages (real jobs, no training).

Finished stages are skipped and summaries follow the plan; stale stages are redone from scratch;
independent stages overlap and dependencies hold; a failure stops only its dependents and names
stage, job and log; --status; one pipeline ETA. Stopping a run and a second run beside it:
test_pipeline_runner_processes.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from nst_det.pipeline.cluster import ClusterSettings
from nst_det.pipeline.plan import Stage
from nst_det.pipeline.run import PRIOR_SEC_PER_ITER, SEC_PER_STAGE, STAGE_FILE, PipelineRunner
from nst_det.utils.atomic import remove_stale_temps

# the stand-in stage functions below travel into the jobs by value (this module is not
# importable there)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _log_event(stage, what):
    with open(os.path.join(os.path.dirname(stage.out_dir), "events.log"), "a") as f:
        f.write(f"{what} {stage.name} {time.time()}\n")


def quick(stage):
    """A stand-in stage: records when it ran; with meta "meets", it ends only once that stage
    has started (or after 120 s), so two stages run side by side whatever the machine's speed."""
    _log_event(stage, "start")
    time.sleep(float(stage.meta.get("sleep", 0)))
    partner, deadline = stage.meta.get("meets"), time.time() + 120
    while partner and ("start", partner) not in _events(Path(stage.out_dir).parents[1]) \
            and time.time() < deadline:
        time.sleep(0.05)
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
    a, b = _stage(tmp_path, "a", meets="b"), _stage(tmp_path, "b", meets="a")
    c = _stage(tmp_path, "c", after=["a"], sleep=0)
    d = _stage(tmp_path, "d", "calibrate", sleep=0)  # a calibration: waits for a job slot too
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


@pytest.mark.slow
def test_a_stale_stage_whose_redo_fails_is_failed_not_its_previous_run(tmp_path):
    """Only a training stage was moved aside: a stale calibration whose redo failed kept its
    previous stage.json, read as this run's, and the students trained from its old config."""
    _finished(_stage(tmp_path, "cls", stage="cls"), run_id="new", inputs={})
    calibrate = _finished(_stage(tmp_path, "calibrate", "calibrate", after=["cls"]),
                          run_id="r_cal", inputs={"cls": "old"})  # stale: cls ran again
    det = _stage(tmp_path, "det", after=["calibrate"])
    cls = _stage(tmp_path, "cls", stage="cls")
    runner = _runner([cls, calibrate, det], calibrate=failing)
    with pytest.raises(RuntimeError, match="stage calibrate failed .* not run because of it: det"):
        runner.run()
    assert not any(name == "det" for _, name in _events(tmp_path))
    assert runner.states()["calibrate"][0] == "failed"


def started_once(stage):
    """A stand-in training stage that resumes what an earlier job of it left (as run_stage
    resumes from the last checkpoint) and, marked `stops`, stops halfway while CRASH exists."""
    partial = Path(stage.out_dir) / "partial.txt"
    _log_event(stage, "resumed" if partial.exists() else "fresh")
    partial.write_text("half the iterations")
    if stage.meta.get("stops") and (Path(stage.out_dir).parent / "CRASH").exists():
        raise RuntimeError("stopped halfway")
    return {}


@pytest.mark.slow
def test_an_unfinished_training_stage_resumes_only_from_the_same_inputs(tmp_path):
    """Removing a stage's folder to redo it while a stage reading it was halfway: the reader
    resumed the weights trained from the removed run, and recorded the new run as its input."""
    cls = _stage(tmp_path, "cls", stage="cls")
    det = _stage(tmp_path, "det", after=["cls"], stops=True)
    crash = tmp_path / "stages" / "CRASH"
    crash.parent.mkdir(parents=True)
    crash.write_text("")
    with pytest.raises(RuntimeError, match="stage det failed"):
        _runner([cls, det], train=started_once).run()
    crash.unlink()
    _runner([cls, det], train=started_once).run()  # the same inputs: it resumes
    assert ("resumed", "det") in _events(tmp_path)
    (tmp_path / "stages" / "events.log").unlink()
    crash.write_text("")
    (Path(det.out_dir) / STAGE_FILE).unlink()  # as if it had stopped halfway this time
    (Path(cls.out_dir) / STAGE_FILE).unlink()  # ... and cls is redone
    with pytest.raises(RuntimeError, match="stage det failed"):
        _runner([cls, det], train=started_once).run()
    crash.unlink()
    (Path(cls.out_dir) / STAGE_FILE).unlink()  # redone once more: det's half run is stale
    (tmp_path / "stages" / "events.log").unlink()
    _runner([cls, det], train=started_once).run()
    assert ("fresh", "det") in _events(tmp_path) and ("resumed", "det") not in _events(tmp_path)
    assert [p.name for p in (tmp_path / "stages").glob("det.superseded-*/partial.txt")]


def test_a_damaged_stage_record_is_named(tmp_path):
    stage = _finished(_stage(tmp_path, "det"))
    record = Path(stage.out_dir) / STAGE_FILE
    record.write_text(record.read_text()[:20])
    with pytest.raises(ValueError, match=f"stage record {record} is damaged .* remove it"):
        _runner([stage]).status()


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


def test_an_empty_plan_or_one_naming_a_stage_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="each named once; got \\[\\]"):
        _runner([])
    with pytest.raises(ValueError, match="each named once; got \\['a', 'b', 'a'\\]"):
        _runner([_stage(tmp_path, "a"), _stage(tmp_path, "b"), _stage(tmp_path / "x", "a")])


def test_the_eta_is_unknown_until_a_stage_of_unknown_length_reports_it(tmp_path):
    # paper scale: a training stage runs its config's schedule (iters 0) and says how long
    # when it runs; 30 s for it would be a made-up figure
    a, b = _stage(tmp_path, "a"), _stage(tmp_path, "b", after=["a"])
    b.iters = 0
    runner = _runner([a, b])
    runner._waiting = {s.name: s for s in (a, b)}  # as run() holds them before any job starts
    assert runner._eta() is None
    os.makedirs(b.out_dir)
    with open(os.path.join(b.out_dir, "progress.json"), "w") as f:
        json.dump({"iter": 10, "max_iter": 30, "sec_per_iter": 2.0, "start_iter": 0}, f)
    assert runner._eta() == 2 * SEC_PER_STAGE + PRIOR_SEC_PER_ITER["det"] + 20 * 2.0


def test_two_stages_writing_into_one_folder_are_refused(tmp_path):
    a, b = _stage(tmp_path, "a"), _stage(tmp_path, "b")
    b.out_dir = a.out_dir + "/"  # the same folder, written another way
    with pytest.raises(ValueError, match="its own out_dir; shared: .*stages/a"):
        _runner([a, b])


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
