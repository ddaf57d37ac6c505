"""PipelineRunner's resumability: finished stages are skipped, summaries follow the plan."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nst_det.pipeline.plan import Stage
from nst_det.pipeline.run import STAGE_FILE, PipelineRunner


def _finished_training(tmp_path, name):
    """A training stage whose stage.json exists (as after an earlier run): never re-run here."""
    stage = Stage(name, "train", str(tmp_path / name), meta={"stage": "det"}, iters=10)
    (tmp_path / name).mkdir()
    (tmp_path / name / STAGE_FILE).write_text(json.dumps({"name": name, "metrics": {}}))
    return stage


def _run(stages, calls):
    handlers = {kind: (lambda stage, kind=kind: calls.append(stage.name) or {"ok": 1})
                for kind in ("convert", "report")}
    PipelineRunner(stages, argparse.Namespace(), handlers).run()


def test_finished_stages_are_skipped_and_the_report_follows_new_runs(tmp_path):
    seed0 = _finished_training(tmp_path, "det_s0")
    convert = Stage("convert", "convert", str(tmp_path / "convert"))
    report = Stage("report", "report", str(tmp_path / "report"), after=["det_s0", "convert"])
    calls = []
    _run([seed0, convert, report], calls)
    assert calls == ["convert", "report"]
    saved = json.loads((tmp_path / "report" / STAGE_FILE).read_text())
    assert saved["built_from"] == ["det_s0"] and saved["metrics"] == {"ok": 1}

    calls.clear()
    _run([seed0, convert, report], calls)  # nothing new: everything skipped
    assert calls == []

    seed1 = _finished_training(tmp_path, "det_s1")  # the plan grew (e.g. --seeds 0,1)
    report.after.append("det_s1")
    _run([seed0, seed1, convert, report], calls)
    assert calls == ["report"]  # the conversion is still done; the report covers both seeds
    assert json.loads((tmp_path / "report" / STAGE_FILE).read_text())["built_from"] == [
        "det_s0", "det_s1"]


class _Spawned:
    """Stands in for a training stage's process: records when it ran, writes its metrics."""

    def __init__(self, stage, log, seconds=0.6, code=0):
        script = (f"import json, time; time.sleep({seconds}); "
                  f"json.dump({{'bbox': {{'AP50': 1.0}}}}, "
                  f"open({str(Path(stage.out_dir) / 'final_metrics.json')!r}, 'w'))")
        Path(stage.out_dir).mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-c", script if code == 0 else
                                         f"import sys, time; time.sleep({seconds}); sys.exit(3)"])
        self.name, self.log = stage.name, log
        log.append(("start", stage.name, time.perf_counter()))

    def poll(self):
        code = self.process.poll()
        if code is not None and not any(e[:2] == ("end", self.name) for e in self.log):
            self.log.append(("end", self.name, time.perf_counter()))
        return code

    def terminate(self):
        self.process.terminate()

    def wait(self):
        return self.process.wait()


def _train(tmp_path, name, after=()):
    return Stage(name, "train", str(tmp_path / name), meta={"stage": "det"}, iters=1,
                 after=list(after))


def test_parallel_jobs_overlap_independent_stages_and_respect_dependencies(tmp_path):
    log = []
    a, b = _train(tmp_path, "a"), _train(tmp_path, "b")
    c = _train(tmp_path, "c", after=["a"])
    runner = PipelineRunner([a, b, c], argparse.Namespace(), {}, jobs=2,
                            spawn=lambda stage, *_: _Spawned(stage, log))
    runner.run()
    when = {(kind, name): t for kind, name, t in log}
    assert when["start", "b"] < when["end", "a"]  # a and b ran side by side
    assert when["start", "c"] >= when["end", "a"]  # c waited for the stage it reads
    for stage in (a, b, c):
        saved = json.loads((Path(stage.out_dir) / STAGE_FILE).read_text())
        assert saved["metrics"] == {"bbox": {"AP50": 1.0}} and saved["seconds"] > 0.5


def test_a_failed_stage_stops_the_run_and_names_itself(tmp_path):
    log = []
    bad, slow = _train(tmp_path, "bad"), _train(tmp_path, "slow")
    spawn = {"bad": lambda s: _Spawned(s, log, seconds=0.2, code=3),
             "slow": lambda s: _Spawned(s, log, seconds=30)}
    runner = PipelineRunner([bad, slow], argparse.Namespace(), {}, jobs=2,
                            spawn=lambda stage, *_: spawn[stage.name](stage))
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="stage bad failed .exit code 3"):
        runner.run()
    assert time.perf_counter() - start < 20  # the other stage was stopped, not waited for
    assert not (Path(bad.out_dir) / STAGE_FILE).exists()
    assert not (Path(slow.out_dir) / STAGE_FILE).exists()


def test_stages_waiting_for_unknown_stages_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not in the plan"):
        PipelineRunner([_train(tmp_path, "x", after=["missing"])], argparse.Namespace(), {})


def test_the_stage_heading_the_longest_chain_starts_first(tmp_path):
    calls = []
    lone = Stage("lone", "convert", str(tmp_path / "lone"))
    head = Stage("head", "convert", str(tmp_path / "head"))
    tail = Stage("tail", "convert", str(tmp_path / "tail"), after=["head"])
    _run([lone, head, tail], calls)
    assert calls == ["head", "lone", "tail"]  # plan order would have run "lone" first


def test_a_failure_in_the_runner_stops_the_stage_processes_it_started(tmp_path):
    log, started = [], []
    slow = _train(tmp_path, "slow")
    broken = Stage("broken", "convert", str(tmp_path / "broken"))

    def spawn(stage, *_):
        started.append(_Spawned(stage, log, seconds=30))
        return started[-1]

    def convert(stage):
        raise OSError("disk full")

    runner = PipelineRunner([slow, broken], argparse.Namespace(), {"convert": convert}, jobs=2,
                            spawn=spawn)
    start = time.perf_counter()
    with pytest.raises(OSError, match="disk full"):
        runner.run()
    assert time.perf_counter() - start < 20
    assert started and started[0].process.poll() is not None  # terminated, not left running
