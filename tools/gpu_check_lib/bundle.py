"""The bundle: what a lent GPU machine lacks, gathered here, installed there without a network.

The GPU machine (Python 3.12, torch + CUDA, torchvision, onnx, onnxruntime, numpy, opencv,
matplotlib, tabulate, pytest) has no detectron2 and none of its dependencies, and cannot
download. `prepare` writes into one folder: cp312 manylinux x86_64 wheels of every missing
package (`pip download --only-binary=:all: --no-deps`, pure-Python sdists built into wheels with
`pip wheel --no-deps`), the patched detectron2 v0.6 source tree exactly as tools/setup_env.py
builds it (same pinned sdist, same patches, same `git apply`), optionally the upstream
detectron2 source archive, and `bundle.json`. It checks the folder plus the working tree stay
under the size that travels to the machine. `install` puts it into a `--target` folder there
with `pip install --no-index`. Stdlib only: this module runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
MIB = 1 << 20
LIMIT_MIB = 64  # what travels to the lent machine, working tree included
MANIFEST = "bundle.json"
D2_TREE = "detectron2-src"

# (distribution, why the GPU machine needs it). Versions: those installed here, where the
# project's suite runs (a package not installed here: its newest), except for PINS.
PACKAGES = [
    ("fvcore", "detectron2: config, checkpointer, transforms"),
    ("iopath", "detectron2/fvcore: file I/O"),
    ("yacs", "detectron2 / fvcore CfgNode"),
    ("pycocotools", "detectron2 data and COCO evaluation (binary)"),
    ("omegaconf", "detectron2.config LazyConfig"),
    ("hydra-core", "detectron2.config (instantiate)"),
    ("antlr4-python3-runtime", "omegaconf's grammar (sdist only: built here)"),
    ("portalocker", "iopath file locks"),
    ("termcolor", "detectron2 logger"),
    ("tqdm", "fvcore / iopath"),
    ("PyYAML", "configs (binary)"),
    ("cloudpickle", "detectron2 LazyConfig, submitit"),
    ("tensorboard", "detectron2's default event writer (torch.utils.tensorboard)"),
    ("absl-py", "tensorboard's summary writer imports absl"),
    ("submitit", "nst_det pipeline stages as jobs"),
    ("POT", "nst_det transport losses (binary)"),
    ("scipy", "POT (binary, the largest wheel)"),
    ("filelock", "nst_det toy data writer (torch ships it too)"),
]
# POT 0.9.7.post1's cp312 wheel is 31 MiB (0.9.6.post1's: 1.5 MiB): with scipy's 34 MiB it
# would not travel; the transport losses use POT's emd/sinkhorn, in both
PINS = {"POT": "0.9.6.post1"}
# only for building the detectron2 tree there (pip install --no-build-isolation)
BUILD_PACKAGES = [("setuptools", "builds detectron2's setup.py"), ("wheel", "bdist_wheel")]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64"]  # torch for CUDA is manylinux_2_28: glibc >= 2.28 there


class BundleError(RuntimeError):
    """A bundle that cannot be built or installed; the message says why."""


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path` (symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def working_tree_bytes(root: Path = ROOT) -> int:
    """Size of what travels with the working tree: tracked files and untracked, not ignored ones
    (git's view; the bundle itself is git-ignored and counted separately)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True)
    total = 0
    for name in out.stdout.split(b"\0"):
        path = root / os.fsdecode(name)
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def pinned(name: str) -> str:
    """`name==<PINS or version installed here>`, or `name` when it is not installed here."""
    if name in PINS:
        return f"{name}=={PINS[name]}"
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _wheel_of(folder: Path, name: str) -> Path | None:
    for whl in folder.glob("*.whl"):
        if _canonical(whl.name.split("-")[0]) == _canonical(name):
            return whl
    return None


def pip_fetch(requirement: str, dest: Path, python_version: str, pip_args=()) -> Path:
    """One wheel of `requirement` for CPython `python_version` on manylinux x86_64 into dest.

    A binary (or pure) wheel is downloaded when the index has one; otherwise the sdist is built
    into a wheel here, which must then be pure Python (a platform wheel built here would be for
    this interpreter, not the GPU machine's).
    """
    name = requirement.split("==")[0]
    py = python_version.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
               "--only-binary=:all:", "--no-deps", "--python-version", python_version,
               "--implementation", "cp", "--abi", f"cp{py}", "--abi", "abi3", "--abi", "none",
               *[a for p in PLATFORMS for a in ("--platform", p)], *pip_args, "-d", tmp,
               requirement]
        got = _run(cmd)
        if got.returncode != 0:
            # sdist only (fvcore, antlr4-python3-runtime): build it into a wheel here
            built = _run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check",
                          "--no-deps", "--no-binary", name, "--no-build-isolation", *pip_args,
                          "-w", tmp, requirement])
            if built.returncode != 0:
                raise BundleError(f"no cp{py} manylinux wheel of {requirement} and no sdist "
                                  f"that builds:\n{got.stderr[-2000:]}\n{built.stderr[-2000:]}")
        wheel = _wheel_of(Path(tmp), name)
        if wheel is None:
            raise BundleError(f"pip gave no wheel for {requirement} in {tmp}")
        if not wheel_fits(wheel.name, python_version):
            raise BundleError(f"{wheel.name} is neither pure Python nor a CPython "
                              f"{python_version} manylinux x86_64 wheel")
        target = dest / wheel.name
        shutil.move(str(wheel), target)
        return target


def wheel_fits(filename: str, python_version: str) -> bool:
    """Whether a wheel file name is pure Python or CPython `python_version` manylinux x86_64."""
    py_tag, abi_tag, platform_tag = filename[:-4].split("-")[-3:]
    if platform_tag == "any":
        return True
    cp = "cp" + python_version.replace(".", "")
    return ("manylinux" in platform_tag and "x86_64" in platform_tag
            and (cp in py_tag.split(".") or abi_tag == "abi3"))


def build_detectron2_tree(dest: Path) -> Path:
    """The patched detectron2 v0.6 source tree of tools/setup_env.py, written to `dest`.

    The same pinned sdist (checksum-verified, from .cache/ or the index) and the same patch
    series, applied the same way; setup_env installs this tree, here it is kept.
    """
    sys.path.insert(0, str(TOOLS))
    try:
        import setup_env
    finally:
        sys.path.remove(str(TOOLS))
    requirement, sha256 = setup_env.read_pinned_sdist()
    sdist = setup_env.fetch_sdist(requirement, sha256)
    if dest.exists():
        shutil.rmtree(dest)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        setup_env.extract_tar(sdist, tmp)
        (src,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        setup_env.apply_patches(src)  # (dest may lie in a git work tree: checked applied)
        shutil.move(str(src), dest)
    return dest


def find_upstream_archive() -> Path | None:
    """The upstream detectron2 source archive beside the project (../shared/third_party/)."""
    for folder in (ROOT.parent / "shared" / "third_party", ROOT.parent / "third_party"):
        found = sorted(folder.glob("detectron2-upstream-*.tar.gz")) if folder.is_dir() else []
        if found:
            return found[-1]
    return None


def run_command(bundle: Path) -> str:
    """The one command that runs the check on the GPU machine, from the repository root."""
    rel = os.path.relpath(bundle.resolve(), ROOT) if bundle.resolve().is_relative_to(ROOT) \
        else str(bundle)
    return f"python3 tools/gpu_check.py --bundle {rel} --json $OUT/gpu_check.json"


def prepare(out: Path, *, python_version: str = "3.12", with_upstream: bool = False,
            with_detectron2: bool = True, packages=None, skip=(), pip_args=(),
            limit_mib: float = LIMIT_MIB, fetch=pip_fetch, tree_bytes=None) -> dict:
    """Gather the bundle into `out` (reusing wheels already there) and check its size.

    Args:
        packages: [(distribution, why)] (default PACKAGES + BUILD_PACKAGES).
        skip: distribution names to leave out.
        pip_args: extra `pip download` arguments (e.g. `--no-index --find-links DIR`).
        limit_mib: what may travel: the working tree plus this folder.
        fetch: function(requirement, dest, python_version, pip_args) -> wheel path.
        tree_bytes: the working tree's size (default: measured with git).
    Returns:
        the manifest written to out/bundle.json (with "command" and the sizes).
    Raises:
        BundleError: a package has no usable wheel, or the folder is over the limit.
    """
    out = out.resolve()
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    skip = {_canonical(s) for s in skip}
    todo = [(n, why) for n, why in (packages or PACKAGES + BUILD_PACKAGES)
            if _canonical(n) not in skip]
    entries = []
    for name, why in todo:
        requirement = pinned(name)
        wheel = _wheel_of(wheels, name)
        version = requirement.split("==")[1] if "==" in requirement else None
        # a wheel of another version, or for another Python (an earlier --python-version)
        if wheel is not None and ((version and wheel.name.split("-")[1] != version)
                                  or not wheel_fits(wheel.name, python_version)):
            wheel.unlink()
            wheel = None
        if wheel is None:
            wheel = fetch(requirement, wheels, python_version, list(pip_args))
        entries.append({"name": name, "wheel": wheel.name, "bytes": wheel.stat().st_size,
                        "sha256": sha256_file(wheel), "build_only": (name, why) in BUILD_PACKAGES,
                        "why": why})
    wanted = {e["wheel"] for e in entries}
    for stale in wheels.glob("*.whl"):  # from an earlier prepare with another list
        if stale.name not in wanted:
            stale.unlink()
    d2 = out / D2_TREE
    if with_detectron2:
        build_detectron2_tree(d2)
    elif d2.exists():
        shutil.rmtree(d2)
    upstream_dir = out / "upstream"
    if upstream_dir.exists():
        shutil.rmtree(upstream_dir)
    upstream = None
    if with_upstream:
        archive = find_upstream_archive()
        if archive is None:
            raise BundleError("--with-upstream: no detectron2-upstream-*.tar.gz in "
                              f"{ROOT.parent / 'shared' / 'third_party'}")
        upstream_dir.mkdir()
        upstream = shutil.copy2(archive, upstream_dir / archive.name)
    tree = working_tree_bytes() if tree_bytes is None else tree_bytes
    manifest = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python_version": python_version, "platforms": PLATFORMS,
        "wheels": entries,
        "detectron2_tree": D2_TREE if with_detectron2 else None,
        "upstream_archive": f"upstream/{Path(upstream).name}" if upstream else None,
        "command": run_command(out),
    }
    limit = int(limit_mib * MIB)
    manifest.update(bundle_bytes=0, tree_bytes=tree, limit_bytes=limit)
    for _ in range(3):  # the manifest holds the folder's size, itself included
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        size = folder_bytes(out)
        if size == manifest["bundle_bytes"]:
            break
        manifest["bundle_bytes"] = size
    if size + tree > limit:
        biggest = ", ".join(f"{e['wheel']} {e['bytes'] / MIB:.1f} MiB"
                            for e in sorted(entries, key=lambda e: -e["bytes"])[:3])
        raise BundleError(
            f"{out} holds {size / MIB:.1f} MiB; with the working tree ({tree / MIB:.1f} MiB) "
            f"that is over the {limit / MIB:.0f} MiB that travels to the GPU machine. Largest "
            f"wheels: {biggest} (leave some out with --skip NAME,...)")
    return manifest


def has_pip(python: str) -> bool:
    """Whether `python -m pip` works."""
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def install(bundle: Path, target: Path, python: str = sys.executable,
            use_pip: bool | None = None) -> dict:
    """Install the bundle into `target` (a --target folder to put first on PYTHONPATH).

    Wheels with `pip install --no-index --no-deps` (the list is explicit and every other
    requirement is the machine's own), then the detectron2 tree with
    `pip install --no-build-isolation` as tools/setup_env.py installs it, its setup.py run by
    `python` with the bundle's setuptools/wheel beside it. Without pip (`use_pip` False, or
    None and `python -m pip` fails) the wheels are unpacked and the tree's pure-Python package
    copied, which is what pip would put there for these packages.
    Returns: {"installed": [wheel names], "detectron2": "tree" | None, "via": "pip" | "unzip",
    "seconds": float}.
    """
    start = time.perf_counter()
    manifest = json.loads((bundle / MANIFEST).read_text())
    wheels = bundle / "wheels"
    for e in manifest["wheels"]:  # a copy cut short on the way fails here, named
        if sha256_file(wheels / e["wheel"]) != e["sha256"]:
            raise BundleError(f"{wheels / e['wheel']}: checksum differs from {MANIFEST}")
    use_pip = has_pip(python) if use_pip is None else use_pip
    build_dir = target.parent / (target.name + "-build")
    for folder in (target, build_dir):
        if folder.exists():
            shutil.rmtree(folder)
    runtime = [wheels / e["wheel"] for e in manifest["wheels"] if not e["build_only"]]
    build = [wheels / e["wheel"] for e in manifest["wheels"] if e["build_only"]]
    tree = bundle / manifest["detectron2_tree"] if manifest.get("detectron2_tree") else None
    if use_pip:
        _pip_install(python, wheels, runtime, build, tree, target, build_dir)
    else:
        for wheel in runtime:
            _unpack_wheel(wheel, target)
        if tree is not None:
            shutil.copytree(tree / "detectron2", target / "detectron2")
            for info in tree.glob("*.egg-info"):  # importlib.metadata finds the distribution
                shutil.copytree(info, target / info.name)
    return {"installed": [p.name for p in runtime], "detectron2": "tree" if tree else None,
            "via": "pip" if use_pip else "unzip", "seconds": round(time.perf_counter() - start, 1)}


def _pip_install(python, wheels, runtime, build, tree, target, build_dir) -> None:
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
           "--no-deps", "--find-links", wheels]
    for files, folder in ((runtime, target), (build, build_dir)):
        if files:
            got = _run([*pip, "--target", folder, *files])
            if got.returncode != 0:
                raise BundleError(f"installing wheels into {folder} failed:\n"
                                  f"{got.stdout[-2000:]}\n{got.stderr[-3000:]}")
    if tree is not None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(build_dir), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        got = _run([*pip, "--no-build-isolation", "--target", target, tree], env=env)
        if got.returncode != 0:
            raise BundleError(f"building the detectron2 tree failed:\n{got.stdout[-2000:]}\n"
                              f"{got.stderr[-3000:]}")


def _unpack_wheel(wheel: Path, target: Path) -> None:
    """A wheel's files into `target`, its .data/{purelib,platlib} moved up (scripts dropped)."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    for data in target.glob("*.data"):
        for kind in ("purelib", "platlib"):
            if (data / kind).is_dir():
                shutil.copytree(data / kind, target, dirs_exist_ok=True)
        shutil.rmtree(data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()
