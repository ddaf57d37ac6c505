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


@pytest.fixture(scope="module")
def reference_run(module_tmp_path):
    """An uninterrupted 8-iteration run (checkpoints after iterations 2 and 5)."""
    root = module_tmp_path
    _train(root / "full", root / "data")
    return root


def test_killed_run_resumes_to_identical_weights_and_losses(reference_run):
    root = reference_run
    killed = root / "killed"
    _train(killed, root / "data", "--kill-at", "5", expect_kill=True)
    assert not (killed / "model_final.pth").exists()
    assert (killed / "last_checkpoint").read_text() == "model_0000005.pth"
    shutil.copytree(killed, root / "killed_copy")  # for the corrupt-checkpoint test
    # resume with a data-loader worker this time: the stream must not depend on workers
    _train(killed, root / "data", "--resume", "--num-workers", "1")
    assert _losses(killed) == _losses(root / "full")
    assert _iterations(killed) == list(range(8))  # resumed at 6: each iteration ran once
    _assert_same_weights(killed / "model_final.pth", root / "full" / "model_final.pth")
    shutil.rmtree(killed)  # ~0.3 GB of checkpoints; CI's disk is shared by every test


def test_kill_during_checkpoint_save_keeps_previous_checkpoint(reference_run):
    root = reference_run
    run = root / "killed_in_save"
    _train(run, root / "data", "--kill-during-save-at", "5", expect_kill=True)
    assert not (run / "model_0000005.pth").exists()  # the half-written file never got its name
    assert (run / "last_checkpoint").read_text() == "model_0000002.pth"
    torch.load(run / "model_0000002.pth", weights_only=True)  # still loadable
    _train(run, root / "data", "--resume")
    # killed in 5's save; resumed after 2
    assert _iterations(run) == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]
    assert _losses(run) == _losses(root / "full")
    _assert_same_weights(run / "model_final.pth", root / "full" / "model_final.pth")
    shutil.rmtree(run)


def test_truncated_checkpoint_is_skipped_with_warning(reference_run):
    root = reference_run
    run = root / "killed_copy"
    ckpt = run / "model_0000005.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a disk that filled up mid-write
    log = _train(run, root / "data", "--resume")
    assert "Skipping checkpoint on resume" in log and "model_0000005.pth" in log
    # it fell back to iteration 2 and still ends where the uninterrupted run ended
    _assert_same_weights(run / "model_final.pth", root / "full" / "model_final.pth")
    shutil.rmtree(run)


def test_classification_killed_run_resumes_exactly(tmp_path):
    """The classification trainer shares the resumable stream and RNG checkpointing."""
    data = tmp_path / "cls_data"
    _train(tmp_path / "full", data, "--task", "cls")
    _train(tmp_path / "killed", data, "--task", "cls", "--kill-at", "5", expect_kill=True)
    _train(tmp_path / "killed", data, "--task", "cls", "--resume", "--num-workers", "1")
    assert _iterations(tmp_path / "killed") == list(range(8))  # resumed at 6
    assert all("total_loss" in row for row in _losses(tmp_path / "full").values())
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    _assert_same_weights(tmp_path / "killed" / "model_final.pth",
                         tmp_path / "full" / "model_final.pth")


# ---- the windows between the writes at the end of training -----------------------------------
# detectron2's PeriodicCheckpointer saves model_<max_iter-1> and then model_final; the final
# evaluation follows. A run killed in either gap must, resumed, end as an uninterrupted run does.

@pytest.fixture(scope="module", params=["det", "cls"])
def six_iteration_run(request, module_tmp_path):
    """An uninterrupted 6-iteration run with its final evaluation (saves after 2, 5, final)."""
    root = module_tmp_path / request.param
    _train(root / "full", root / "data", "--task", request.param, "--max-iter", "6", "--test")
    return request.param, root


@pytest.mark.parametrize("window", [("--kill-before-save", "model_final"),
                                    ("--kill-after-save", "model_final")],
                         ids=["after_last_periodic_save", "after_final_save"])
def test_run_killed_at_the_end_resumes_to_final_checkpoint_and_evaluation(six_iteration_run,
                                                                          window):
    task, root = six_iteration_run
    run = root / f"killed{window[0]}"
    args = ["--task", task, "--max-iter", "6", "--test"]
    _train(run, root / "data", *args, *window, expect_kill=True)
    assert not (run / "results.json").exists()
    expected_tag = "model_0000005.pth" if window[0] == "--kill-before-save" else "model_final.pth"
    assert (run / "last_checkpoint").read_text() == expected_tag
    _train(run, root / "data", *args, "--resume")
    # iteration 5's loss row is written after its checkpoint saves (hook order), so the killed run
    # recorded 0-4; a resumed run that trained anything would add rows
    assert _iterations(run) == list(range(5))
    _assert_same_weights(run / "model_final.pth", root / "full" / "model_final.pth")
    assert (run / "last_checkpoint").read_text() == "model_final.pth"
    assert json.loads((run / "results.json").read_text()) == \
        json.loads((root / "full" / "results.json").read_text())
    shutil.rmtree(run)
