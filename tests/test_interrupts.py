"""Stopping is clean: Ctrl-C or SIGTERM at any moment of a training run or an export leaves no
temporary file and nothing unverified at a final path; what a hard kill leaves is removed by the
next run. A full disk is reported as such, naming the file."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nst_det.checkpoint.weights_file import check_weights_file
from nst_det.utils import atomic
from nst_det.utils.atomic import DiskFullError, atomic_write

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "quick_schedules"
STOP_AT = Path(__file__).with_name("_stop_at.py")


def _temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if p.name.endswith((".tmp", ".old")))


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                DETECTRON2_DATASETS=str(tmp_path / "datasets"))


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
    # atomic_write's `open` (the builtin, shadowed in its module only)
    monkeypatch.setattr(atomic, "open", lambda name, mode: _FullDisk(open(name, mode), room=4096),
                        raising=False)
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
    # named by an earlier version (the host without its pid namespace): still this host's
    earlier = tmp_path / f".model_0000004.pth.{atomic._OLD_HOST}.{dead_pid}.abcd1234.tmp"
    for p in (stale, live, elsewhere, earlier):
        p.write_bytes(b"partial")
    (stale_dir / "sub").mkdir(parents=True)
    with atomic_write(tmp_path / "last_checkpoint", "w") as f:
        f.write("model_final.pth")
    assert not stale.exists() and not stale_dir.exists()  # a killed writer's: removed
    assert not earlier.exists()
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


def _stopped(event: str, sig: str, cmd, env) -> subprocess.CompletedProcess:
    """Run `cmd` (a tool and its arguments) signalled with SIG at EVENT (tests/_stop_at.py)."""
    run = subprocess.run([sys.executable, str(STOP_AT), event, sig, *cmd[1:]], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode != 0, f"{event} never happened: {run.stderr[-2000:]}"
    if sig == "KILL":
        assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    return run


@pytest.mark.slow
def test_export_stopped_at_each_write_leaves_a_verified_export_or_none(tmp_path):
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

    def exported_sha():
        return json.loads((out / "export_info.json").read_text())["sha256"]

    env = _env(tmp_path)
    subprocess.run(cmd(0), cwd=REPO, env=env, capture_output=True, check=True, timeout=900)
    assert _export_set_is_whole_or_absent(out) == "whole"
    first = exported_sha()
    # stopped while staging (at its first and its last write; every staged file is written by
    # the same atomic_write): the previous export stays whole and unchanged
    for trial, (event, sig) in enumerate([("write:model_final.pth", "INT"),
                                          ("write:verification.json", "TERM")], start=1):
        run = _stopped(event, sig, cmd(trial), env)
        assert _temps(out) == [], (event, sig, run.stderr[-2000:])
        assert _export_set_is_whole_or_absent(out) == "whole" and exported_sha() == first
    # stopped while the verified set moves into place: no export until the next one completes
    # (the first rename onto model_final.pth is its atomic write into the staging folder)
    run = _stopped("moved:model_final.pth#2", "INT", cmd(5), env)
    assert _temps(out) == [], run.stderr[-2000:]
    assert _export_set_is_whole_or_absent(out) == "absent"
    # a hard kill cannot clean up: its staging folder is removed by the next export
    _stopped("write:export_info.json", "KILL", cmd(7), env)
    assert _temps(out) != []
    subprocess.run(cmd(7), cwd=REPO, env=env, capture_output=True, check=True, timeout=900)
    assert _export_set_is_whole_or_absent(out) == "whole" and _temps(out) == []
    assert exported_sha() != first  # detector b's export, not a's files under new records


# ---- interrupted training --------------------------------------------------------------------

@pytest.mark.slow
def test_training_stopped_at_each_kind_of_write_leaves_no_temp_and_resumes(tmp_path):
    """Stopped inside a periodic checkpoint, its tag and model_final, then killed inside the
    model_final of a run resumed at max_iter: the last run ends as an uninterrupted one."""
    out = tmp_path / "run"
    cmd = [sys.executable, "tools/train_net.py", "--config-file", str(TOY / "cls_R18_toy.yaml"),
           "--resume", "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "6",
           "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "2",
           "SOLVER.IMS_PER_BATCH", "8", "INPUT.CLS.TRAIN_CROP_SIZE", "32",
           "INPUT.CLS.TEST_RESIZE", "32", "INPUT.CLS.TEST_CROP_SIZE", "32", "TEST.EVAL_PERIOD",
           "0", "TEST.CLS.IMS_PER_BATCH", "50", "SEED", "3"]
    env = _env(tmp_path)
    tag = out / "last_checkpoint"
    # (event, signal, the tag the stop leaves)
    for event, sig, tagged in [("write:model_0000003.pth", "INT", "model_0000001.pth"),
                               ("write:last_checkpoint", "TERM", "model_0000001.pth"),
                               ("write:model_final.pth", "INT", "model_0000005.pth"),
                               ("write:model_final.pth", "KILL", "model_0000005.pth")]:
        run = _stopped(event, sig, cmd, env)
        temps = _temps(out)
        assert temps == ([] if sig != "KILL" else temps[:1]) and len(temps) == (sig == "KILL"), \
            (event, sig, temps, run.stderr[-2000:])
        assert tag.read_text() == tagged, (event, sig)
        check_weights_file(out / tagged, "checkpoint")  # what is tagged is whole
        assert not (out / "model_final.pth").exists()
    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    assert _temps(out) == []  # the hard kill's leftover went with the next run's first save
    assert tag.read_text() == "model_final.pth"
    reference = [*cmd, "OUTPUT_DIR", str(tmp_path / "uninterrupted")]
    subprocess.run(reference, cwd=REPO, env=env, capture_output=True, check=True, timeout=900)
    resumed = torch.load(out / "model_final.pth", weights_only=True)["model"]
    whole = torch.load(tmp_path / "uninterrupted" / "model_final.pth", weights_only=True)["model"]
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_writer_in_another_pid_namespace_leaves_a_live_writers_temporary_alone(tmp_path):
    """Containers sharing a host name but not their pids: this process's pid does not exist in
    the other namespace, so its live temporary looked like a dead writer's and was removed."""
    import shutil

    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True) \
        if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("needs `unshare --pid` (util-linux, as root): run as CI does")
    other = ("import sys\nfrom nst_det.utils.atomic import atomic_write\n"
             "with atomic_write(sys.argv[1], 'w') as f:\n    f.write('x')\n")
    with atomic_write(tmp_path / "model_final.pth") as f:
        f.write(b"half")
        subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", other,
                        str(tmp_path / "metrics.json")], check=True)
        assert os.path.exists(f.name)  # still being written here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model_final.pth"]
