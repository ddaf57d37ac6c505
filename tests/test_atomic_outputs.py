"""Small outputs read back later are written whole or not at all: the teacher's metrics (read on
resume) and the report's figures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from matplotlib.figure import Figure

from nst_det.engine.teacher_eval import TEACHER_METRICS_FILE, TeacherEvalHook
from nst_det.pipeline.figures import ForestRow, forest_plot


def _temps(folder):
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_write_of_the_teacher_metrics_leaves_no_file_for_a_resume_to_read(tmp_path):
    # a metric json cannot write fails half-way through the file, as a kill or full disk would
    hook = TeacherEvalHook(None, lambda teacher: {"bbox": {"AP50": 50.0, "AP": object()}},
                           str(tmp_path))
    hook.trainer = SimpleNamespace(start_iter=0)
    with pytest.raises(TypeError):
        hook.before_train()
    assert not (tmp_path / TEACHER_METRICS_FILE).exists() and _temps(tmp_path) == []


def test_a_figure_stopped_while_written_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    rows = [ForestRow("nst_poly", 2.0, 0.5, 3.5, 5, "nst 25")]
    path = tmp_path / "forest.png"
    forest_plot(rows, str(path))
    before = path.read_bytes()

    def stopped_half_way(self, fname, **kwargs):
        with open(fname, "wb") if isinstance(fname, str) else fname as f:
            f.write(before[:100])
        raise KeyboardInterrupt  # Ctrl-C while the PNG is being written

    monkeypatch.setattr(Figure, "savefig", stopped_half_way)
    with pytest.raises(KeyboardInterrupt):
        forest_plot(rows, str(path))
    assert path.read_bytes() == before and _temps(tmp_path) == []


def test_linking_a_name_to_the_file_it_already_is_leaves_no_temporary(tmp_path):
    from nst_det.utils.atomic import atomic_link, atomic_write

    best, final = tmp_path / "model_best.pth", tmp_path / "model_final.pth"
    with atomic_write(best, "w") as f:
        f.write("weights")
    assert atomic_link(best, final) and atomic_link(final, best)  # already one file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best.pth", "model_final.pth"]
    assert best.read_text() == final.read_text() == "weights"


def test_a_long_legal_file_name_is_written_and_its_temporary_left_behind_is_swept(tmp_path):
    """The temporary adds host, pid and random characters to the name: cut short, it stays within
    NAME_MAX (a 240-byte name failed with ENAMETOOLONG), and is still known as a temporary."""
    import os
    import subprocess
    import sys

    from nst_det.utils.atomic import _temp_prefix, atomic_link, atomic_write, remove_stale_temps

    name = "d\u00e9tection_" + "x" * 225 + ".jpg"  # 240 bytes in UTF-8
    assert len(name.encode()) == 240
    path = tmp_path / name
    with atomic_write(path, "w") as f:
        f.write("image")
    assert atomic_link(path, tmp_path / ("y" * 250))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "y" * 250])
    # a writer killed mid-write left this (its pid is gone): the next write sweeps it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    left = tmp_path / f"{_temp_prefix(path)}abcdefgh.tmp".replace(f".{os.getpid()}.", f".{dead}.")
    left.write_text("half")
    assert len(left.name.encode()) <= 255 and remove_stale_temps(tmp_path) == [left]
