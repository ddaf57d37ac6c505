#!/usr/bin/env python3
"""Build a detectron2 source tree or archive, compiled ops included, into its own venv.

    python3 tools/setup_upstream_env.py <detectron2 source folder or .tar.gz/.zip> [--venv DIR]

This is what `make test-upstream D2_SRC=...` runs before the test suite: the second detectron2
nst_det is tested against (upstream main built from source, as GPU users install it), beside the
patched v0.6 of `.venv/` (tools/setup_env.py). Steps, each skipped when already done:
1. create the venv (default `.venv-upstream/`) with torch/torchvision at setup_env's pins;
2. `pip install --no-build-isolation` of a copy of the source (the folder is left as it is):
   detectron2's setup.py compiles its C++ ops (and CUDA ops where nvcc is found), which takes
   minutes; the archive's sha256 (or, for a folder, a hash of its files' names, sizes and
   modification times) is recorded in `.upstream_stamp`;
3. nst_det in editable mode with its dev extras, redone whenever pyproject.toml changes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from setup_env import TORCH_PINS, extract_tar  # noqa: E402  (one place for pins and untarring)


def log(msg: str) -> None:
    print(f"[setup_upstream_env] {msg}", flush=True)


def run(cmd: list, **kwargs) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def source_digest(src: Path) -> str:
    """sha256 of an archive; for a folder, of its files' relative names, sizes and mtimes."""
    h = hashlib.sha256()
    if src.is_file():
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    for path in sorted(src.rglob("*")):
        if path.is_file() and ".git" not in path.relative_to(src).parts:
            stat = path.stat()
            h.update(f"{path.relative_to(src).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                     .encode())
    return "tree:" + h.hexdigest()


def find_setup_root(folder: Path) -> Path:
    """The folder holding detectron2's setup.py: `folder` itself or its only child folder."""
    if (folder / "setup.py").is_file():
        return folder
    children = [p for p in folder.iterdir() if p.is_dir() and (p / "setup.py").is_file()]
    if len(children) != 1:
        raise SystemExit(f"no detectron2 setup.py in {folder} or in exactly one folder below it")
    return children[0]


def build_tree(src: Path, into: Path) -> Path:
    """The tree to build: the archive extracted into `into`, or a copy there of the folder
    (without .git). pip builds in the tree it is given, writing build/ and *.egg-info into it,
    which would change a folder's digest and rebuild the venv on every run."""
    if src.is_dir():
        root = find_setup_root(src)
        return shutil.copytree(root, into / root.name, symlinks=True,
                               ignore=shutil.ignore_patterns(".git"))
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            z.extractall(into)
    else:
        extract_tar(src, into)
    return find_setup_root(into)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="detectron2 source folder or archive")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-upstream")
    args = parser.parse_args()
    src, venv = args.src.resolve(), args.venv.resolve()
    if not src.exists():
        raise SystemExit(f"{args.src} does not exist: give a detectron2 source folder (a git "
                         "clone) or an archive of one")
    py = venv / "bin" / "python"
    d2_stamp, deps_stamp = venv / ".upstream_stamp", venv / ".nst_det_deps_stamp"

    def pip(*pip_args, **kwargs) -> None:
        run([py, "-m", "pip", "--disable-pip-version-check", "-q", *pip_args], **kwargs)

    digest = source_digest(src)
    if not (d2_stamp.is_file() and d2_stamp.read_text().strip() == digest and py.exists()):
        if venv.exists():
            shutil.rmtree(venv)
        run([sys.executable, "-m", "venv", venv])
        pip("install", *TORCH_PINS, "setuptools", "wheel")
        with tempfile.TemporaryDirectory() as tmp:
            root = build_tree(src, Path(tmp))
            # no build isolation: setup.py imports the venv's torch to compile against it
            env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
            pip("install", "--no-build-isolation", root, env=env)
        run([py, "-c", "import detectron2._C as C; print('detectron2 built with its compiled "
                       "ops:', C.get_compiler_version())"])
        d2_stamp.write_text(digest + "\n")
        deps_stamp.unlink(missing_ok=True)
    deps = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not (deps_stamp.is_file() and deps_stamp.read_text() == deps):
        pip("install", "-e", f"{ROOT}[dev]")
        deps_stamp.write_text(deps)
    log(f"environment ready: {venv} (detectron2 from {src})")


if __name__ == "__main__":
    main()
