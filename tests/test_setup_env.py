"""tools/setup_env.py's steps that a first run on a fresh machine depends on: the venv it makes
and the detectron2 patches it applies (on toy inputs: no download, no install)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_env(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("setup_env_under_test",
                                                  REPO / "tools" / "setup_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "VENV", tmp_path / "venv")
    monkeypatch.setattr(module, "VENV_PY", tmp_path / "venv" / "bin" / "python")
    return module


def _toy_patch(folder: Path) -> Path:
    """patches/0001-x.patch changing detectron2/x.py's `old` into `new`."""
    (folder / "patches").mkdir(parents=True)
    patch = folder / "patches" / "0001-x.patch"
    patch.write_text("--- a/detectron2/x.py\n+++ b/detectron2/x.py\n@@ -1 +1 @@\n-old\n+new\n")
    return patch


def test_patches_apply_inside_a_git_work_tree_and_a_skipped_one_is_an_error(
        setup_env, tmp_path, monkeypatch):
    """A patch git apply skipped while exiting 0 (inside a repository, paths it takes for outside
    the current directory) left detectron2 unpatched with a stamp saying it was."""
    monkeypatch.setattr(setup_env, "D2_DIR", tmp_path / "d2")
    _toy_patch(tmp_path / "d2")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    src = repo / "tmp" / "detectron2-0.6"
    (src / "detectron2").mkdir(parents=True)
    (src / "detectron2" / "x.py").write_text("old\n")
    setup_env.apply_patches(src)
    assert (src / "detectron2" / "x.py").read_text() == "new\n"
    (src / "detectron2" / "x.py").write_text("something else\n")  # the patch no longer fits
    with pytest.raises(subprocess.CalledProcessError):
        setup_env.apply_patches(src)
    (src / "detectron2" / "x.py").write_text("old\n")
    monkeypatch.setattr(setup_env, "run", lambda *args, **kwargs: None)  # applies nothing, rc 0
    with pytest.raises(SystemExit, match="0001-x.patch did not apply"):
        setup_env.apply_patches(src)


def test_a_venv_without_pip_is_made_again(setup_env, monkeypatch):
    """venv writes bin/python before pip: a first run stopped there (or without python3-venv)
    left a .venv every later run took as made, then failed on `pip install`."""
    monkeypatch.delenv("NST_DET_SYSTEM_SITE_PACKAGES", raising=False)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(setup_env.VENV)],
                   check=True)
    assert not setup_env.imports_ok("pip")
    setup_env.create_venv()
    assert setup_env.imports_ok("pip")
    assert "include-system-site-packages = false" in (setup_env.VENV / "pyvenv.cfg").read_text()
    monkeypatch.setenv("NST_DET_SYSTEM_SITE_PACKAGES", "1")  # asked for later: applied
    setup_env.create_venv()
    assert "include-system-site-packages = true" in (setup_env.VENV / "pyvenv.cfg").read_text()


def test_setuptools_is_installed_before_the_sdist_is_fetched(setup_env, monkeypatch):
    """`pip download --no-build-isolation` runs the sdist's setup.py for its metadata: a venv of
    Python 3.12 or later has no setuptools, so a first set-up failed before it was installed."""
    calls = []
    monkeypatch.setattr(setup_env, "imports_ok", lambda module: False)
    monkeypatch.setattr(setup_env, "read_pinned_sdist", lambda: ("pb1-detectron2==0.6", "ab"))
    monkeypatch.setattr(setup_env, "pip", lambda *args: calls.append(("pip", *args)))

    def fetch(requirement, sha256):
        calls.append(("fetch", requirement))
        raise SystemExit("stop here")

    monkeypatch.setattr(setup_env, "fetch_sdist", fetch)
    with pytest.raises(SystemExit, match="stop here"):
        setup_env.install_detectron2()
    assert calls == [("pip", "install", "setuptools", "wheel"), ("fetch", "pb1-detectron2==0.6")]


def test_the_upstream_build_leaves_a_source_folder_and_its_digest_as_they_were(tmp_path):
    """pip builds in the tree it is given (build/, *.egg-info): built in the folder itself, the
    folder's digest changed after every build, so each run rebuilt the venv from nothing."""
    import tarfile

    spec = importlib.util.spec_from_file_location("setup_upstream_under_test",
                                                  REPO / "tools" / "setup_upstream_env.py")
    upstream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upstream)
    src = tmp_path / "clone"
    (src / "detectron2").mkdir(parents=True)
    (src / "setup.py").write_text("# detectron2's\n")
    (src / "detectron2" / "__init__.py").write_text("")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref\n")
    digest = upstream.source_digest(src)
    (tmp_path / "a").mkdir()
    root = upstream.build_tree(src, tmp_path / "a")
    assert root.parent == tmp_path / "a" and (root / "detectron2" / "__init__.py").is_file()
    assert not (root / ".git").exists()
    (root / "build").mkdir()  # what pip writes where it builds
    (root / "d2.egg-info").write_text("")
    assert upstream.source_digest(src) == digest and not (src / "build").exists()
    archive = tmp_path / "d2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="detectron2-main")
    (tmp_path / "b").mkdir()
    assert upstream.build_tree(archive, tmp_path / "b") == tmp_path / "b" / "detectron2-main"


def test_the_sdist_unpacks_on_a_python_without_tar_filters(setup_env, tmp_path, monkeypatch):
    """Debian 12's own Python (3.11.2) has no `filter` argument to `extractall`: the set-up
    ended in a TypeError there, right after installing torch."""
    import tarfile

    src = tmp_path / "detectron2-0.6"
    (src / "detectron2").mkdir(parents=True)
    (src / "detectron2" / "x.py").write_text("old\n")
    archive = tmp_path / "d2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    unfiltered = tarfile.TarFile.extractall

    def extractall_of_3_11_2(self, path=".", members=None, *, numeric_owner=False):
        return unfiltered(self, path, members, numeric_owner=numeric_owner)

    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall_of_3_11_2)
    setup_env.extract_tar(archive, tmp_path / "out")
    assert (tmp_path / "out" / "detectron2-0.6" / "detectron2" / "x.py").read_text() == "old\n"


def test_an_older_python_is_refused_before_anything_is_installed(setup_env, monkeypatch):
    """requires-python refused a 3.10 only at the last step, after torch and detectron2."""
    monkeypatch.setattr(setup_env.sys, "version_info", (3, 10, 12))
    monkeypatch.setattr(setup_env.sys, "argv", ["setup_env.py"])
    monkeypatch.setattr(setup_env, "create_venv", lambda: pytest.fail("went on to set up"))
    with pytest.raises(SystemExit, match=r"nst_det needs Python >= 3.11"):
        setup_env.main()
