""".ci/run stops before installing anything when the disk lacks room, naming the folder."""

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_ci_with_free_kb(tmp_path: Path, free_kb: int, fakes=()) -> subprocess.CompletedProcess:
    """.ci/run in a copy holding only .ci/ (no Makefile: past the check it fails at `make`),
    with a `df` that reports `free_kb` available everywhere; `fakes`: (command, sh script)."""
    shutil.copytree(REPO / ".ci", tmp_path / "repo" / ".ci")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in fakes:
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    fake_df = bin_dir / "df"
    fake_df.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity "
                       f"Mounted'\necho 'fake 999999999 1 {free_kb} 1% /'\n")
    fake_df.chmod(0o755)
    # as if SLURM were installed: .ci/run would otherwise start apt-get (as root)
    (bin_dir / "slurmctld").write_text("#!/bin/sh\n")
    (bin_dir / "slurmctld").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    return subprocess.run(["bash", ".ci/run"], cwd=tmp_path / "repo", env=env,
                          capture_output=True, text=True, timeout=60)


def test_ci_stops_first_when_the_disk_is_nearly_full(tmp_path):
    out = _run_ci_with_free_kb(tmp_path, 3 * 1024 * 1024)  # 3 GB: under the venv's ~6.5
    assert out.returncode == 1
    assert "only 3 GB free under" in out.stderr and "free some space" in out.stderr
    assert "make" not in out.stderr  # stopped before the set-up


def test_ci_goes_on_to_the_set_up_when_there_is_room(tmp_path):
    out = _run_ci_with_free_kb(tmp_path, 50 * 1024 * 1024)
    assert "GB free under" not in out.stderr
    assert "make" in out.stderr  # reached `make setup`, which has no Makefile in this copy


def test_ci_installs_what_the_set_up_needs_when_it_is_missing(tmp_path):
    """A Python without ensurepip (Debian's python3 without python3-venv) cannot make the venv:
    .ci/run installs python3-venv first (as root), or says what to install."""
    calls = tmp_path / "apt_calls"
    out = _run_ci_with_free_kb(tmp_path, 50 * 1024 * 1024, fakes=[
        ("python3", 'case "$*" in *ensurepip*) exit 1;; esac; exit 0'),
        ("apt-get", f'echo "$*" >> {calls}')])
    if os.geteuid() == 0:
        assert "installing python3-venv" in out.stdout
        assert "python3-venv" in calls.read_text().splitlines()[-1]
        assert "make" in out.stderr  # went on to the set-up
    else:
        assert out.returncode == 1 and "python3-venv: install them" in out.stderr
