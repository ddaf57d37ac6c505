"""Exact resume and atomic checkpoints, tested by SIGKILLing real training processes."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DRIVER = Path(__file__).with_name("_train_driver.py")
pytestmark = pytest.mark.slow


def _train(out_dir, data_dir, *extra, expect_kill=False):
    cmd = [sys.executable, str(DRIVER), str(out_dir), "--data-dir", str(data_dir), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "losses.jsonl").read_text().splitlines()]
    return {row.pop("iter"): row for row in rows}


def _iterations(out_dir):
    """Every iteration recorded, in order, repeats included (a restart from 0 would show)."""
    lines = (Path(out_dir) / "losses.jsonl").read_text().splitlines()
    return [json.loads(line)["iter"] for line in lines]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


ARGS = ["--max-iter", "6", "--test"]  # checkpoints after iterations 2 and 5, then model_final


@pytest.fixture(scope="module")
def reference(module_tmp_path):
    """task -> a folder with `full`: an uninterrupted 6-iteration run and its final evaluation
    (each task's run made once for the module), and `data`."""
    made = {}

    def get(task):
        if task not in made:
            made[task] = module_tmp_path / task
            _train(made[task] / "full", made[task] / "data", "--task", task, *ARGS)
        return made[task]
    return get


def _assert_ends_as_uninterrupted(run, full):
    assert _losses(run) == _losses(full)
    _assert_same_weights(run / "model_final.pth", full / "model_final.pth")
    assert (run / "last_checkpoint").read_text() == "model_final.pth"
    assert json.loads((run / "results.json").read_text()) == \
        json.loads((full / "results.json").read_text())


@pytest.mark.parametrize("task", ["det", "cls"])
def test_killed_run_resumes_to_identical_weights_and_losses(reference, task):
    """Both trainers share the resumable data stream and RNG checkpointing."""
    root = reference(task)
    killed = root / "killed"
    _train(killed, root / "data", "--task", task, *ARGS, "--kill-at", "2", expect_kill=True)
    assert not (killed / "model_final.pth").exists()
    assert (killed / "last_checkpoint").read_text() == "model_0000002.pth"
    # resume with a data-loader worker this time: the stream must not depend on workers
    _train(killed, root / "data", "--task", task, *ARGS, "--resume", "--num-workers", "1")
    assert all("total_loss" in row for row in _losses(root / "full").values())
    assert _iterations(killed) == list(range(6))  # resumed at 3: each iteration ran once
    _assert_ends_as_uninterrupted(killed, root / "full")
    shutil.rmtree(killed)  # ~0.3 GB of checkpoints; CI's disk is shared by every test


def test_kill_during_checkpoint_save_keeps_previous_checkpoint(reference):
    root = reference("det")
    run = root / "killed_in_save"
    _train(run, root / "data", *ARGS, "--kill-during-save-at", "5", expect_kill=True)
    assert not (run / "model_0000005.pth").exists()  # the half-written file never got its name
    assert (run / "last_checkpoint").read_text() == "model_0000002.pth"
    torch.load(run / "model_0000002.pth", weights_only=True)  # still loadable
    _train(run, root / "data", *ARGS, "--resume")
    # killed in 5's save; resumed after 2
    assert _iterations(run) == [0, 1, 2, 3, 4, 3, 4, 5]
    _assert_ends_as_uninterrupted(run, root / "full")
    shutil.rmtree(run)


# ---- the windows between the writes at the end of training -----------------------------------
# detectron2's PeriodicCheckpointer saves model_<max_iter-1> and then model_final; the final
# evaluation follows. A run killed in either gap must, resumed, end as an uninterrupted run does.

WINDOWS = {"after_last_periodic_save": ("--kill-before-save", "model_final"),
           "after_final_save": ("--kill-after-save", "model_final")}


@pytest.fixture(scope="module")
def killed_at_the_end(reference):
    """(task, window) -> a run killed in that window (made once; tests resume copies of it)."""
    made = {}

    def get(task, window):
        if (task, window) not in made:
            root = reference(task)
            made[task, window] = run = root / f"killed_{window}"
            _train(run, root / "data", "--task", task, *ARGS, *WINDOWS[window],
                   expect_kill=True)
        return made[task, window]
    return get


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("task", ["det", "cls"])
def test_run_killed_at_the_end_resumes_to_final_checkpoint_and_evaluation(
        reference, killed_at_the_end, task, window):
    root = reference(task)
    run = root / f"resumed_{window}"
    shutil.copytree(killed_at_the_end(task, window), run)
    assert not (run / "results.json").exists()
    expected_tag = "model_0000005.pth" if window == "after_last_periodic_save" else \
        "model_final.pth"
    assert (run / "last_checkpoint").read_text() == expected_tag
    _train(run, root / "data", "--task", task, *ARGS, "--resume")
    # iteration 5's loss row is written after its checkpoint saves (hook order), so the killed run
    # recorded 0-4; a resumed run that trained anything would add rows
    assert _iterations(run) == list(range(5))
    _assert_same_weights(run / "model_final.pth", root / "full" / "model_final.pth")
    assert (run / "last_checkpoint").read_text() == "model_final.pth"
    assert json.loads((run / "results.json").read_text()) == \
        json.loads((root / "full" / "results.json").read_text())
    shutil.rmtree(run)


def test_truncated_checkpoint_is_skipped_with_warning(reference, killed_at_the_end):
    root = reference("det")
    run = root / "truncated"
    shutil.copytree(killed_at_the_end("det", "after_last_periodic_save"), run)
    ckpt = run / "model_0000005.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a disk that filled up mid-write
    log = _train(run, root / "data", *ARGS, "--resume")
    assert "Skipping checkpoint on resume" in log and "model_0000005.pth" in log
    # it fell back to iteration 2 and still ends where the uninterrupted run ended
    assert _iterations(run) == [0, 1, 2, 3, 4, 3, 4, 5]
    _assert_ends_as_uninterrupted(run, root / "full")
    shutil.rmtree(run)
