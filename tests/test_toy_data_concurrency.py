"""Toy data sets are materialised safely when several processes ask for one set at once.

Pipeline stages side by side, DDP ranks and two users of one data root all call make_toy_* on
the same folder. Exactly one complete copy must result, and a file a reader has seen must never
disappear (the first `make demo` on a fresh clone once failed with FileNotFoundError because the
second writer deleted the first writer's finished copy while a stage was reading it).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 200  # ~1000 small JPEGs: the reader checks its files while the second writer works

# toy_data.py (and toy_world.py) alone, as a stand-in package: the writers need neither torch nor
# the rest of nst_det, and start in a fraction of the time
WRITER = """
import sys, time, types
from pathlib import Path
package = types.ModuleType("toy_only")
package.__path__ = [sys.argv[5]]
sys.modules["toy_only"] = package
import toy_only.toy_data as toy_data
from toy_only.toy_data import make_toy_imagefolder


class Announced(toy_data.FileLock):
    def acquire(self, *args, **kwargs):  # found no finished copy: waits for the writers' lock
        Path(sys.argv[6]).touch()
        return super().acquire(*args, **kwargs)


toy_data.FileLock = Announced
root, go, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.002)
make_toy_imagefolder(root, seed=0, train_per_class=int(sys.argv[4]), val_per_class=0, size=48)
"""

# Waits for the first finished copy (its spec file), reads every file of it, then watches it until
# told to stop: the spec file must stay the same file (same inode: no second copy replaced it)
# and every file it saw must stay readable. Writes what it saw as JSON.
READER = """
import json, os, sys, time
from pathlib import Path
root, go, done, result = (Path(a) for a in sys.argv[1:5])
ready = Path(sys.argv[5]); ready.touch()
while not go.exists():
    time.sleep(0.002)
spec = root / "toy_spec.json"
while not spec.exists():
    time.sleep(0.0005)
inode = os.stat(spec).st_ino
files = sorted(p for p in root.rglob("*.jpg"))
problems = []
for p in files:
    try:
        p.read_bytes()
    except OSError as e:
        problems.append(f"first read: {e}")
k = 0
while not done.exists() and len(problems) < 5:
    try:
        if os.stat(spec).st_ino != inode:
            problems.append("the finished copy was replaced by another copy")
        files[k % len(files)].read_bytes()
        os.stat(files[-1 - k % len(files)])
    except OSError as e:
        problems.append(f"{type(e).__name__}: {e}")
    k += 1
result.write_text(json.dumps({"files": len(files), "problems": problems, "checks": k}))
"""


def _wait_for(paths, procs):
    while not all(p.exists() for p in paths):
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)


def test_racing_writers_leave_one_copy_that_a_reader_keeps_seeing(tmp_path):
    from filelock import FileLock

    root = tmp_path / "data" / "cls"  # the data root is empty: nothing exists yet
    # the writers' lock, held here until both wait for it: both race for it whatever the
    # machine's speed, and the second must find the first's copy under the lock
    held = FileLock(str(root.parent / ".cls.lock"))
    root.parent.mkdir(parents=True)
    held.acquire()
    go, done, result = tmp_path / "go", tmp_path / "done", tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(go),
                          str(tmp_path / f"ready{i}"), str(PER_CLASS),
                          str(REPO / "nst_det" / "data"), str(tmp_path / f"waiting{i}")],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for i in range(2)
    ]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(root), str(go), str(done),
                               str(result), str(tmp_path / "ready_reader")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    procs = [*writers, reader]
    try:
        _wait_for([tmp_path / "ready0", tmp_path / "ready1", tmp_path / "ready_reader"], procs)
        go.touch()  # all three start together
        _wait_for([tmp_path / "waiting0", tmp_path / "waiting1"], procs)
        held.release()
        for proc in writers:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
        done.touch()
        _, err = reader.communicate(timeout=600)
        assert reader.returncode == 0, err[-3000:]
    finally:
        held.release()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    seen = json.loads(result.read_text())
    assert seen["problems"] == []
    assert seen["files"] == 5 * PER_CLASS
    # exactly one complete copy, no temp folder left beside it (the lock file may stay)
    assert sorted(p.name for p in root.parent.iterdir() if p.is_dir()) == ["cls"]
    assert len(list(root.rglob("*.jpg"))) == 5 * PER_CLASS


def test_a_different_spec_replaces_the_set_and_leftovers_are_removed(tmp_path):
    from nst_det.data.toy_data import SPEC_FILE, make_toy_imagefolder

    root = tmp_path / "cls"
    make_toy_imagefolder(root, seed=0, train_per_class=2, val_per_class=1, size=32)
    first_spec = (root / SPEC_FILE).stat().st_ino
    umask = os.umask(0)
    os.umask(umask)
    assert root.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by other users, not 0700
    # the same spec again: reused as it is (same file, nothing rewritten)
    make_toy_imagefolder(root, seed=0, train_per_class=2, val_per_class=1, size=32)
    assert (root / SPEC_FILE).stat().st_ino == first_spec
    # a temp folder a hard-killed writer left behind is removed by the next writer
    leftover = tmp_path / ".cls.abc123de.tmp"  # the name mkdtemp gives a writer of cls
    (leftover / "train").mkdir(parents=True)
    # a live writer of another set, cls.v2 (under its own lock): it was removed too
    other = tmp_path / ".cls.v2.abc123de.tmp"
    (other / "train").mkdir(parents=True)
    make_toy_imagefolder(root, seed=0, train_per_class=3, val_per_class=1, size=32)
    assert json.loads((root / SPEC_FILE).read_text())["per_class"] == {"train": 3, "val": 1}
    assert len(list((root / "train").rglob("*.jpg"))) == 5 * 3
    assert not leftover.exists() and (other / "train").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [".cls.v2.abc123de.tmp",
                                                                          "cls"]


@pytest.mark.parametrize("damage", ["deleted", "cut short", "file list damaged"])
def test_a_damaged_set_is_written_again_whole(tmp_path, caplog, damage):
    """A finished set missing a file, or holding one cut short, is rewritten (the same bytes as
    a fresh copy) with a warning naming what was wrong; a file added to it is no damage."""
    from nst_det.data.toy_data import FILES_FILE, SPEC_FILE, make_toy_voc

    kwargs = dict(seed=2, num_trainval=3, num_test=2)
    fresh = make_toy_voc(tmp_path / "fresh", **kwargs)
    root = make_toy_voc(tmp_path / "voc", **kwargs)
    (root / "coco_test.json").write_text("{}")  # e.g. a COCO copy written beside it later
    make_toy_voc(root, **kwargs)
    spec_inode = (root / SPEC_FILE).stat().st_ino
    assert (root / "coco_test.json").is_file()  # reused as is
    image = root / "JPEGImages" / "100001.jpg"
    if damage == "deleted":
        image.unlink()
    elif damage == "cut short":
        image.write_bytes(image.read_bytes()[:100])
    else:
        (root / FILES_FILE).write_text("[1]")
    with caplog.at_level("WARNING", logger="nst_det.data.toy_data"):
        make_toy_voc(root, **kwargs)
    assert (root / SPEC_FILE).stat().st_ino != spec_inode
    said = {"deleted": "JPEGImages/100001.jpg is missing",
            "cut short": "JPEGImages/100001.jpg has 100 bytes",
            "file list damaged": "its file list toy_files.json holds no file list"}[damage]
    assert f"is damaged ({said}" in caplog.text
    files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == files
    assert all((root / f).read_bytes() == (fresh / f).read_bytes() for f in files)


def test_a_set_written_before_file_lists_is_kept_and_given_one(tmp_path):
    """An older set (no toy_files.json) is whole as far as we know: used as it is, not rewritten
    (other processes may be reading it), and its file list written for later checks."""
    from nst_det.data.toy_data import FILES_FILE, SPEC_FILE, make_toy_voc

    kwargs = dict(seed=2, num_trainval=3, num_test=2)
    root = make_toy_voc(tmp_path / "voc", **kwargs)
    written = json.loads((root / FILES_FILE).read_text())
    (root / FILES_FILE).unlink()
    spec_inode = (root / SPEC_FILE).stat().st_ino
    make_toy_voc(root, **kwargs)
    assert (root / SPEC_FILE).stat().st_ino == spec_inode
    assert json.loads((root / FILES_FILE).read_text()) == written
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_a_folder_that_is_not_a_toy_set_is_never_replaced(tmp_path):
    from nst_det.data.toy_data import make_toy_imagefolder

    root = tmp_path / "cls"
    (root / "mine").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"cls exists but holds no toy_spec.json"):
        make_toy_imagefolder(root, seed=0, train_per_class=1, val_per_class=1, size=32)
    assert (root / "mine").is_dir()
