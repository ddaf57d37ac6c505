#!/usr/bin/env python3
"""Create or refresh the project environment in `.venv/` (idempotent; stdlib only).

Steps, each skipped when already satisfied:
1. create `.venv/` (with `--system-site-packages` when NST_DET_SYSTEM_SITE_PACKAGES=1, so that a
   detectron2 you built from source in your base Python is visible);
2. install torch / torchvision at the pinned versions (unless torch already imports);
3. install detectron2: keep one that already imports; otherwise fetch the `pb1-detectron2==0.6`
   sdist from PyPI, check its sha256, apply `third_party/detectron2/patches/*.patch` in order and
   install it without the (missing) C++ extension;
4. install nst_det in editable mode with its dev extras;
5. byte-compile what was installed, on every core (pip installs with --no-compile).

A stamp file records a hash of every input of these steps, so a second run costs a hash and a stat.
`--force` ignores the stamp: every step checks its own state again (a venv without pip is
made again, torch is kept when it imports, detectron2 when it imports and its patches are
unchanged) and nst_det is reinstalled. To rebuild from nothing, remove `.venv/`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
VENV_PY = VENV / "bin" / "python"
STAMP = VENV / ".nst_det_setup_stamp"
D2_STAMP = VENV / ".nst_det_detectron2_stamp"
CACHE = ROOT / ".cache"
D2_DIR = ROOT / "third_party" / "detectron2"
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]


def log(msg: str) -> None:
    print(f"[setup_env] {msg}", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def imports_ok(module: str) -> bool:
    """True when `module` imports in the venv's interpreter."""
    probe = subprocess.run(
        [str(VENV_PY), "-c", f"import {module}"], capture_output=True, text=True
    )
    return probe.returncode == 0


def inputs_hash() -> str:
    """Hash of everything that decides what the environment contains."""
    h = hashlib.sha256()
    files = [Path(__file__), ROOT / "pyproject.toml", *sorted(D2_DIR.rglob("*"))]
    for f in files:
        if f.is_file():
            h.update(f.relative_to(ROOT).as_posix().encode())
            h.update(f.read_bytes())
    h.update(os.environ.get("NST_DET_SYSTEM_SITE_PACKAGES", "0").encode())
    return h.hexdigest()


def pip(*args: str) -> None:
    # --no-compile: pip byte-compiles on one core; byte_compile() does it on all of them
    extra = ["--no-compile"] if args[0] == "install" else []
    run([VENV_PY, "-m", "pip", "--disable-pip-version-check", "-q", args[0], *extra, *args[1:]])


def create_venv() -> None:
    """Create .venv; make it again when it has no pip (venv writes bin/python before pip, so a
    first run stopped there, or failing without python3-venv, leaves one) or was made with the
    other NST_DET_SYSTEM_SITE_PACKAGES."""
    system = os.environ.get("NST_DET_SYSTEM_SITE_PACKAGES") == "1"
    if VENV_PY.exists():
        config = VENV / "pyvenv.cfg"
        setting = f"include-system-site-packages = {'true' if system else 'false'}"
        if imports_ok("pip") and config.is_file() and setting in config.read_text():
            return
        log(f"{VENV} has no pip or other system-site-packages than asked: making it again")
        shutil.rmtree(VENV)
    run([sys.executable, "-m", "venv", str(VENV), *(["--system-site-packages"] if system else [])])


def byte_compile() -> None:
    """Write the .pyc files of everything installed, on every core (pip's serial compile of
    torch took ~40 s of a ~115 s set-up on 2 cores; this takes ~18 s). Imports must not depend on
    writing them at run time: PYTHONDONTWRITEBYTECODE may be set, and then every process would
    compile torch again (10 s instead of 4.5 s per `import nst_det`)."""
    purelib = subprocess.run([str(VENV_PY), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True)
    log("byte-compiling the installed packages")
    # a non-zero exit only means some file did not compile (a test fixture of a package in an
    # old syntax, say); pip's own compile skips those the same way
    subprocess.run([str(VENV_PY), "-m", "compileall", "-q", "-q", "-j", "0",
                    purelib.stdout.strip()], check=False)


def install_torch() -> None:
    if imports_ok("torchvision"):
        log("torch/torchvision already import: keeping them")
        return
    pip("install", *TORCH_PINS)
    byte_compile()  # before the import probes of the next steps


def read_pinned_sdist() -> tuple[str, str]:
    """(requirement, sha256) from third_party/detectron2/SOURCE."""
    fields = {}
    for line in (D2_DIR / "SOURCE").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            fields[key.strip()] = value.strip()
    return fields["requirement"], fields["sha256"]


def fetch_sdist(requirement: str, sha256: str) -> Path:
    """Download (or reuse from .cache/) the detectron2 sdist and verify its checksum."""
    CACHE.mkdir(exist_ok=True)
    cached = [p for p in CACHE.glob("*.tar.gz") if sha256_of(p) == sha256]
    if cached:
        return cached[0]
    with tempfile.TemporaryDirectory() as tmp:
        # --no-build-isolation: the sdist's setup.py imports torch, which the venv already has
        pip("download", "--no-deps", "--no-build-isolation",
            "-d", tmp, requirement)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        got = sha256_of(sdist)
        if got != sha256:
            raise SystemExit(
                f"checksum mismatch for {sdist.name}: got {got}, pinned {sha256} in "
                f"{D2_DIR / 'SOURCE'}. Refusing to install an unreviewed detectron2."
            )
        target = CACHE / sdist.name
        shutil.move(str(sdist), target)
        return target


def extract_tar(archive: Path, into) -> None:
    """Extract a tar archive into `into`, with tarfile's "data" filter (no absolute paths, no
    links out of `into`, no devices) where this Python has it: 3.11.4 / 3.10.12 on, and not
    Debian 12's own 3.11.2, whose `extractall` has no `filter`."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patches_hash() -> str:
    h = hashlib.sha256()
    for f in sorted(D2_DIR.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def apply_patches(src: Path) -> None:
    """Apply third_party/detectron2/patches/*.patch to the unpacked sdist `src`, each checked
    applied afterwards (`git apply --check --reverse`). git apply fails on a hunk that does not
    apply, but inside a repository it skips, exiting 0, paths it takes for outside the current
    directory; GIT_CEILING_DIRECTORIES keeps it from looking for one above `src`."""
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(src).resolve().parent)}
    for patch in sorted((D2_DIR / "patches").glob("*.patch")):
        log(f"applying {patch.name}")
        run(["git", "apply", "--whitespace=nowarn", str(patch)], cwd=src, env=env)
        check = subprocess.run(["git", "apply", "--check", "--reverse", str(patch)], cwd=src,
                               env=env, capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"{patch.name} did not apply to {src}: {check.stderr.strip()}")


def install_detectron2() -> None:
    ours = imports_ok("importlib.metadata as m; m.distribution('pb1-detectron2')")
    if imports_ok("detectron2") and not ours:
        log("detectron2 already imports (not installed by this script): keeping it")
        return
    if ours and D2_STAMP.exists() and D2_STAMP.read_text() == patches_hash():
        log("patched detectron2 v0.6 is up to date")
        return
    requirement, sha256 = read_pinned_sdist()
    # the sdist's metadata (pip download) and build need these in the venv: both run its
    # setup.py without isolation, and a venv of Python 3.12 or later has no setuptools
    pip("install", "setuptools", "wheel")
    sdist = fetch_sdist(requirement, sha256)
    with tempfile.TemporaryDirectory() as tmp:
        extract_tar(sdist, tmp)
        (src,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        apply_patches(src)
        pip("install", "--no-build-isolation", str(src))
    if not imports_ok("detectron2"):
        raise SystemExit("detectron2 was installed but does not import; see the log above")
    D2_STAMP.write_text(patches_hash())


def install_nst_det() -> None:
    pip("install", "-e", f"{ROOT}[dev]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true",
                        help="ignore the stamp: check every step again and reinstall nst_det "
                        "(remove .venv/ to rebuild everything)")
    args = parser.parse_args()
    if sys.version_info < (3, 11):  # before gigabytes of torch: pyproject.toml's requires-python
        raise SystemExit(f"nst_det needs Python >= 3.11; {sys.executable} is "
                         f"{sys.version.split()[0]}: run with PYTHON=python3.11 (or newer)")

    digest = inputs_hash()
    if not args.force and STAMP.exists() and STAMP.read_text() == digest and VENV_PY.exists():
        log("environment up to date (.venv)")
        return
    create_venv()
    install_torch()
    install_detectron2()
    install_nst_det()
    byte_compile()  # what the last two steps added (the rest is up to date)
    STAMP.write_text(digest)
    log("environment ready: .venv")


if __name__ == "__main__":
    main()
