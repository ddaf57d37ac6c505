"""Stopping is clean: Ctrl-C or SIGTERM at any moment of a training run or an export leaves no
temporary file and nothing unverified at a final path; what a hard kill leaves is removed by the
next run. A full disk is reported as such, naming the file."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nst_det.checkpoint.weights_file import check_weights_file
from nst_det.utils import atomic
from nst_det.utils.atomic import DiskFullError, atomic_write

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "quick_schedules"
SEED = int(os.environ.get("NST_DET_TEST_SEED", "13"))


def _temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if p.name.endswith((".tmp", ".old")))


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                DETECTRON2_DATASETS=str(tmp_path / "datasets"))


def _interrupt(cmd, env, delay: float, how: signal.Signals) -> subprocess.CompletedProcess:
    """Start `cmd` in its own process group, signal it after `delay` s, wait for its end."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        if how == signal.SIGINT:  # Ctrl-C: the terminal signals the whole process group
            os.killpg(proc.pid, signal.SIGINT)
        else:  # `kill` / SIGKILL: the process only
            proc.send_signal(how)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _timed(cmd, env) -> float:
    start = time.monotonic()
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return time.monotonic() - start


# ---- disk full -------------------------------------------------------------------------------

class _FullDisk:
    """A file object whose writes fail with ENOSPC after `room` bytes, as on a full disk."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_names_the_file_and_the_cause(tmp_path, monkeypatch):
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen",
                        lambda fd, mode: _FullDisk(real_fdopen(fd, mode), room=4096))
    with pytest.raises(DiskFullError) as info:
        with atomic_write(path) as f:
            torch.save({"model": {"w": torch.zeros(100_000)}}, f)
    text = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert f"No space left on device (ENOSPC) while writing {path}" in text
    assert "previous version, if any, is intact" in text
    assert path.read_bytes() == before and _temps(tmp_path) == []


def test_disk_full_on_a_real_small_file_system_is_the_last_error_line(tmp_path):
    """A 1 MiB tmpfs (in a user+mount namespace, so no root is needed where those are allowed)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user+mount namespaces here to mount a small tmpfs (the test above covers "
                    "the same code with a simulated full disk)")
    mount = tmp_path / "small"
    mount.mkdir()
    script = (
        "import sys, torch\n"
        "from nst_det.utils.atomic import atomic_write\n"
        "with atomic_write(sys.argv[1] + '/model_final.pth') as f:\n"
        "    torch.save({'w': torch.ones(1000)}, f)\n"  # fits: the previous checkpoint
        "with atomic_write(sys.argv[1] + '/model_final.pth') as f:\n"
        "    torch.save({'w': torch.zeros(1_000_000)}, f)\n"  # 4 MB: does not fit
    )
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1" && '
         '"$2" -c "$3" "$1"; rc=$?; ls -A "$1"; exit $rc', "sh", str(mount), sys.executable,
         script], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("nst_det.utils.atomic.DiskFullError: [Errno 28] No space left on "
                           f"device (ENOSPC) while writing {mount}/model_final.pth"), run.stderr
    assert run.stdout.split() == ["model_final.pth"]  # the previous file only, no temp file


@pytest.mark.slow
def test_training_on_a_full_disk_ends_on_the_file_and_the_cause(tmp_path):
    """The bug report's case: OUTPUT_DIR on a small tmpfs, a checkpoint save does not fit."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user+mount namespaces here to mount a small tmpfs")
    out = tmp_path / "out"
    out.mkdir()
    train = [sys.executable, "tools/train_net.py", "--config-file", str(TOY / "cls_R18_toy.yaml"),
             "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
             "SOLVER.IMS_PER_BATCH", "8", "INPUT.CLS.TRAIN_CROP_SIZE", "32", "TEST.EVAL_PERIOD",
             "0"]
    # 60 MiB: the logs fit, a ResNet-18 checkpoint with its optimizer state (~130 MB) does not
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=60m tmpfs "$1" && shift && "$@"; '
         'rc=$?; exit $rc', "sh", str(out), *train],
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("nst_det.utils.atomic.DiskFullError: [Errno 28] No space left on "
                           f"device (ENOSPC) while writing {out}/model_0000001.pth"), \
        run.stderr[-3000:]


# ---- stale temporaries -----------------------------------------------------------------------

def test_temporaries_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    host = atomic._HOST
    stale = tmp_path / f".model_0000005.pth.{host}.{dead_pid}.abcd1234.tmp"
    stale_dir = tmp_path / f".export.{host}.{dead_pid}.abcd1234.tmp"
    live = tmp_path / f".model_final.pth.{host}.{os.getpid()}.abcd1234.tmp"
    elsewhere = tmp_path / f".model_final.pth.otherhost.{dead_pid}.abcd1234.tmp"
    for p in (stale, live, elsewhere):
        p.write_bytes(b"partial")
    (stale_dir / "sub").mkdir(parents=True)
    with atomic_write(tmp_path / "last_checkpoint", "w") as f:
        f.write("model_final.pth")
    assert not stale.exists() and not stale_dir.exists()  # a killed writer's: removed
    assert live.exists() and elsewhere.exists()  # a running writer's, another machine's: kept


@pytest.mark.parametrize("handler", [True, False], ids=["exit_on_sigterm", "python_default"])
def test_sigterm_mid_write_removes_the_temporary_only_with_the_handler(tmp_path, handler):
    """SIGTERM arriving inside an atomic write: with exit_on_sigterm (as train_net and
    export_model install it) the write unwinds and its temporary goes; Python's default action
    ends the process on the spot and leaves it (which the next write then removes)."""
    script = (
        "import os, signal, sys\n"
        "from nst_det.utils.atomic import atomic_write, exit_on_sigterm\n"
        f"if {handler}:\n"
        "    exit_on_sigterm()\n"
        "with atomic_write(sys.argv[1] + '/model_final.pth') as f:\n"
        "    f.write(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    f.write(b'never')\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == (143 if handler else -signal.SIGTERM), run.stderr[-2000:]
    assert not (tmp_path / "model_final.pth").exists()
    assert len(_temps(tmp_path)) == (0 if handler else 1)
    if not handler:  # the next write in the folder removes the dead writer's temporary
        with atomic_write(tmp_path / "last_checkpoint", "w") as f:
            f.write("x")
        assert _temps(tmp_path) == []


# ---- interrupted export ----------------------------------------------------------------------

def _export_set_is_whole_or_absent(out: Path) -> str:
    """'whole' when verification.json is there (and everything it vouches for), else 'absent'."""
    marker = out / "verification.json"
    if not marker.exists():
        return "absent"
    summary = json.loads(marker.read_text())
    info = json.loads((out / "export_info.json").read_text())
    model = out / info["file"]
    assert summary["passed"] and info["size_bytes"] == model.stat().st_size
    # both records describe these very bytes (not a model file of another export)
    assert summary["sha256"] == info["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    check_weights_file(model, "exported checkpoint")
    cfg_text = (out / "config.yaml").read_text()
    assert f"WEIGHTS: {model}" in cfg_text  # the final path, not the staging folder
    return "whole"


@pytest.mark.slow
def test_export_stopped_at_random_moments_leaves_a_verified_export_or_none(tmp_path):
    from detectron2.modeling import build_model

    from nst_det.config import load_config

    cfg = load_config(str(TOY / "faster_rcnn_R_18_FPN_toy.yaml"))
    # two different detectors, exported in turn: a file of one under the other's records shows
    weights = [tmp_path / "a.pth", tmp_path / "b.pth"]
    for seed, path in enumerate(weights):
        torch.manual_seed(seed)
        torch.save({"model": build_model(cfg).state_dict()}, path)
    out = tmp_path / "export"

    def cmd(trial):
        return [sys.executable, "tools/export_model.py", "--config-file",
                str(TOY / "faster_rcnn_R_18_FPN_toy.yaml"), "--format", "checkpoint",
                "--output", str(out), "--num-images", "1", "MODEL.WEIGHTS",
                str(weights[trial % 2])]

    env = _env(tmp_path)
    seconds = _timed(cmd(0), env)  # also writes the toy data set once
    assert _export_set_is_whole_or_absent(out) == "whole"
    rng = random.Random(SEED)
    for trial, how in enumerate([signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM],
                                start=1):
        run = _interrupt(cmd(trial), env, rng.uniform(0.3, 1.0) * seconds, how)
        assert _temps(out) == [], (trial, how, run.stderr[-2000:])
        _export_set_is_whole_or_absent(out)
    # a hard kill cannot clean up: its staging folder is removed by the next export
    _interrupt(cmd(5), env, rng.uniform(0.5, 1.0) * seconds, signal.SIGKILL)
    _export_set_is_whole_or_absent(out)
    subprocess.run(cmd(6), cwd=REPO, env=env, capture_output=True, check=True, timeout=900)
    assert _export_set_is_whole_or_absent(out) == "whole" and _temps(out) == []


# ---- interrupted training --------------------------------------------------------------------

@pytest.mark.slow
def test_training_stopped_at_random_moments_leaves_no_temp_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "tools/train_net.py", "--config-file", str(TOY / "cls_R18_toy.yaml"),
           "--resume", "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "12",
           "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "2",
           "SOLVER.IMS_PER_BATCH", "8", "INPUT.CLS.TRAIN_CROP_SIZE", "32",
           "INPUT.CLS.TEST_RESIZE", "32", "INPUT.CLS.TEST_CROP_SIZE", "32", "TEST.EVAL_PERIOD",
           "0", "TEST.CLS.IMS_PER_BATCH", "50"]
    env = _env(tmp_path)
    seconds = _timed([*cmd, "OUTPUT_DIR", str(tmp_path / "timing")], env)
    shutil.rmtree(tmp_path / "timing")  # its only purpose: the time a whole run takes here
    rng = random.Random(SEED)
    for trial, how in enumerate([signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM]):
        run = _interrupt(cmd, env, rng.uniform(0.3, 1.0) * seconds, how)
        if not out.exists():
            continue
        assert _temps(out) == [], (trial, how, run.stderr[-2000:])
        tagged = out / "last_checkpoint"
        if tagged.exists():  # whatever is tagged is a whole checkpoint
            check_weights_file(out / tagged.read_text().strip(), "checkpoint")
    _interrupt(cmd, env, rng.uniform(0.5, 1.0) * seconds, signal.SIGKILL)
    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    check_weights_file(out / "model_final.pth", "checkpoint")
    assert _temps(out) == []  # the hard kill's leftovers went with the next run's first save
