"""tools/gpu_check.py: the bundle for a GPU machine, parts under time limits, and the CPU mode.

The check itself needs a GPU; what a CPU can show is tested here: `--prepare` against a local
wheel folder (no network), the bundle installed into a --target folder, a part that blocks on
a never-set event stopped at its limit while the next part runs, and (slow) the whole check
with `--device cpu --tiny`, which runs every part's code at tiny shapes.
"""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from gpu_check_lib import bundle  # noqa: E402
from gpu_check_lib.check import PARTS  # noqa: E402
from gpu_check_lib.runner import Part, run_check, table  # noqa: E402

TOOL = REPO / "tools" / "gpu_check.py"


# ---- parts under time limits ----------------------------------------------------------------
FAKE_PARTS = '''
import os, threading

def blocking(ctx):
    pid_file = ctx.get("pid_file") or os.path.join(ctx["work_dir"], "blocking.pid")
    with open(pid_file + ".tmp", "w") as f:  # whole when it appears
        f.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    threading.Event().wait()  # never set: only the time limit ends this part

def stubborn(ctx):  # slow to stop: notes the SIGTERM and goes on
    import signal
    work = ctx["work_dir"]
    signal.signal(signal.SIGTERM, lambda *_: open(os.path.join(work, "termed"), "w").close())
    blocking(ctx)

def quick(ctx):
    return {"summary": "fine", "metrics": {"seen": sorted(ctx["results"])}}

def broken(ctx):
    raise ValueError("what broke\\nsecond line")
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in \
        Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_part_over_its_limit_is_stopped_and_reported_not_run(tmp_path):
    (tmp_path / "fake_parts.py").write_text(FAKE_PARTS)
    pid_file = tmp_path / "blocking.pid"
    parts = [Part("quick", "fake_parts:quick", 60, 60),
             Part("slow", "fake_parts:blocking", 60, 3),
             Part("after_slow", "fake_parts:quick", 60, 60),
             Part("needs_slow", "fake_parts:quick", 60, 60, needs=("slow",)),
             Part("broken", "fake_parts:broken", 60, 60),
             Part("optional", "fake_parts:quick", 60, 60, optional=True)]
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    report = run_check(parts, {"repo": str(tmp_path), "pid_file": str(pid_file)}, tiny=True,
                       budget_s=300, json_path=tmp_path / "r.json", log_dir=tmp_path / "logs",
                       env=env, echo=lambda *_: None)
    status = {p["name"]: p["status"] for p in report["parts"]}
    assert status["slow"].startswith("not run: timeout"), status
    assert status["quick"] == status["after_slow"] == "ok"
    assert status["needs_slow"] == "not run: needs slow"
    assert status["broken"] == "failed: ValueError: what broke"
    assert status["optional"] == "not run: not requested"
    # the blocked process is gone, and the part after it saw only the parts that succeeded
    assert not _alive(int(pid_file.read_text()))
    after = next(p for p in report["parts"] if p["name"] == "after_slow")
    assert after["metrics"] == {"seen": ["quick"]}
    written = json.loads((tmp_path / "r.json").read_text())
    assert [p["name"] for p in written["parts"]] == [p.name for p in parts]
    assert "Traceback" in (tmp_path / "logs" / "broken.log").read_text()
    text = table(report)
    assert all(p.name in text for p in parts)


def test_parts_after_the_budget_are_not_started(tmp_path):
    parts = [Part("a", "fake_parts:quick", 60, 60)]
    report = run_check(parts, {"repo": str(tmp_path)}, tiny=False, budget_s=3,
                       json_path=tmp_path / "r.json", log_dir=tmp_path / "logs",
                       echo=lambda *_: None)
    assert report["parts"][0]["status"] == ("not run: 3 s of the 3 s budget left, under a "
                                            "quarter of its 60 s limit with 10 s to stop it")
    assert not (tmp_path / "logs").exists()


def test_a_part_s_limit_leaves_the_budget_time_to_stop_it(tmp_path):
    """Budget GRACE_S + 3 s: the blocking part (own limit 4 s) gets what is left less the time
    stopping it may take, so the check ends within its budget; the next part is not started."""
    from gpu_check_lib.runner import GRACE_S

    (tmp_path / "fake_parts.py").write_text(FAKE_PARTS)
    parts = [Part("slow", "fake_parts:blocking", 4, 4), Part("next", "fake_parts:quick", 4, 4)]
    budget = GRACE_S + 3
    report = run_check(parts, {"repo": str(tmp_path), "pid_file": str(tmp_path / "pid")},
                       tiny=True, budget_s=budget, json_path=tmp_path / "r.json",
                       log_dir=tmp_path / "logs", env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                       echo=lambda *_: None)
    slow, after = report["parts"]
    assert slow["status"].startswith("not run: timeout") and slow["limit_s"] <= 3.0
    assert after["status"].startswith("not run: ") and "budget left" in after["status"]
    assert report["seconds"] <= budget


DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from gpu_check_lib import check
from gpu_check_lib.runner import Part
check.PARTS = [Part(*p[:4], needs=tuple(p[4]), optional=p[5]) for p in json.loads(sys.argv[2])]
sys.exit(check.main(sys.argv[3:]))
"""


def _check_with(parts, tmp_path, *argv):
    """tools/gpu_check.py's main on the fake `parts` [(name, target, limit, tiny limit, needs,
    optional)], in a process of its own."""
    (tmp_path / "fake_parts.py").write_text(FAKE_PARTS)
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(REPO / "tools"), json.dumps(parts), "--device", "cpu",
         "--work-dir", str(tmp_path / "work"), "--json", str(tmp_path / "r.json"), *argv],
        env=dict(os.environ, PYTHONPATH=str(tmp_path)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def test_stopping_the_check_stops_its_running_part(tmp_path):
    """A part runs in a session of its own (so its limit can stop its whole group): a check
    stopped by SIGTERM left it running."""
    import signal
    import time

    pid_file = tmp_path / "work" / "blocking.pid"  # the blocking part writes it once running
    check = _check_with([("slow", "fake_parts:blocking", 600, 600, [], False)], tmp_path,
                        "--budget", "900")
    pid = None
    try:
        deadline = time.time() + 120
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        check.send_signal(signal.SIGTERM)
        assert check.wait(timeout=60) == 128 + signal.SIGTERM
        assert not _alive(pid)
    finally:  # (a failure must leave nothing running)
        check.kill()
        check.wait()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_stopping_the_check_while_a_part_is_being_stopped_still_kills_it(tmp_path):
    """A part over its limit gets SIGTERM, then GRACE_S before SIGKILL: a check stopped during
    that wait skipped the SIGKILL, and the part (its own session) outlived it."""
    import signal
    import time

    work = tmp_path / "work"
    check = _check_with([("stubborn", "fake_parts:stubborn", 3, 3, [], False)], tmp_path,
                        "--budget", "900")
    pid = None
    try:
        deadline = time.time() + 120
        while not (work / "termed").exists() and time.time() < deadline:  # in the grace wait
            time.sleep(0.05)
        pid = int((work / "blocking.pid").read_text())
        check.send_signal(signal.SIGTERM)
        assert check.wait(timeout=60) == 128 + signal.SIGTERM
        assert not _alive(pid)
    finally:
        check.kill()
        check.wait()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_an_optional_part_named_in_only_runs(tmp_path):
    check = _check_with([("base", "fake_parts:quick", 60, 60, [], False),
                         ("extra", "fake_parts:quick", 60, 60, ["base"], True),
                         ("other", "fake_parts:quick", 60, 60, [], False)],
                        tmp_path, "--only", "extra")
    out, _ = check.communicate(timeout=120)
    assert check.returncode == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    status = {p["name"]: p["status"] for p in report["parts"]}
    assert status == {"base": "ok", "extra": "ok", "other": "not run: not in --only"}


# ---- --prepare and install --------------------------------------------------------------------
def _fake_wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A minimal pure wheel whose module says its own name."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}.py", f"NAME = {name!r}\n")
        z.writestr(f"{dist}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def _fake_sdist(folder: Path, name: str, version: str = "2.0") -> Path:
    """A setup.py sdist with no wheel: --prepare must build it into a pure wheel."""
    import tarfile

    src = folder / f"{name}-{version}"
    src.mkdir()
    (src / f"{name.replace('-', '_')}.py").write_text("BUILT = True\n")
    (src / "setup.py").write_text(textwrap.dedent(f"""
        from setuptools import setup
        setup(name={name!r}, version={version!r}, py_modules=[{name.replace('-', '_')!r}])
    """))
    (src / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    path = folder / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return path


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheelhouse")
    _fake_wheel(folder, "nstdet-fake-pure")
    _fake_sdist(folder, "nstdet-fake-sdist")
    return folder


def _prepare(out: Path, wheelhouse: Path, *extra):
    cmd = [sys.executable, str(TOOL), "--prepare", "--out", str(out), "--no-detectron2",
           "--packages", "nstdet-fake-pure,nstdet-fake-sdist", "--pip-arg=--no-index",
           f"--pip-arg=--find-links={wheelhouse}", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_prepare_gathers_wheels_checks_the_size_and_prints_the_command(tmp_path, wheelhouse):
    out = tmp_path / "bundle"
    done = _prepare(out, wheelhouse)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((out / "bundle.json").read_text())
    assert sorted(e["wheel"] for e in manifest["wheels"]) == [
        "nstdet_fake_pure-1.0-py3-none-any.whl", "nstdet_fake_sdist-2.0-py3-none-any.whl"]
    assert manifest["bundle_bytes"] == bundle.folder_bytes(out)
    assert manifest["tree_bytes"] == bundle.working_tree_bytes()
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == f"python3 tools/gpu_check.py --bundle {out} --json $OUT/gpu_check.json"
    assert "together" in lines[-3] and "of 64 MiB" in lines[-3]
    # less room than the working tree alone: refused, no command printed
    tree_mib = manifest["tree_bytes"] / bundle.MIB
    over = _prepare(out, wheelhouse, "--limit-mib", f"{tree_mib / 2:.3f}")
    assert over.returncode == 2
    assert "over the" in over.stderr and "--skip" in over.stderr
    assert "--bundle" not in over.stdout


def test_size_limit_counts_the_bundle_and_the_working_tree(tmp_path, wheelhouse):
    out = tmp_path / "bundle"
    assert _prepare(out, wheelhouse).returncode == 0  # fetched once; prepare reuses the wheels
    packages = [("nstdet-fake-pure", "test"), ("nstdet-fake-sdist", "test")]
    limit = 64 * bundle.MIB

    def fetch_nothing(*args):
        raise AssertionError(f"the wheels are in the bundle already: {args}")

    def prepare(tree_bytes):
        return bundle.prepare(out, with_detectron2=False, packages=packages, limit_mib=64,
                              tree_bytes=tree_bytes, fetch=fetch_nothing)

    size = prepare(0)["bundle_bytes"]
    assert prepare(limit - size - 512)["command"].endswith("--json $OUT/gpu_check.json")
    with pytest.raises(bundle.BundleError, match="over the 64 MiB"):
        prepare(limit - size + 512)


def test_a_wheel_for_another_python_in_the_bundle_is_fetched_again(tmp_path):
    """An earlier --prepare for another --python-version left its binary wheels: reused, they
    passed the checksum and failed to import on the GPU machine."""
    wheels = tmp_path / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "nstdet_fake_bin-1.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"311")
    fetched = []

    def fetch(requirement, dest, python_version, pip_args):
        fetched.append((requirement, python_version))
        wheel = dest / "nstdet_fake_bin-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"
        wheel.write_bytes(b"312")
        return wheel

    manifest = bundle.prepare(tmp_path / "bundle", python_version="3.12", with_detectron2=False,
                              packages=[("nstdet-fake-bin", "test")], tree_bytes=0, fetch=fetch)
    assert fetched == [("nstdet-fake-bin", "3.12")]
    assert [e["wheel"] for e in manifest["wheels"]] == [
        "nstdet_fake_bin-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"]
    assert [p.name for p in wheels.iterdir()] == [manifest["wheels"][0]["wheel"]]


def test_the_upstream_part_finds_what_it_imports(tmp_path):
    """The optional upstream_ops part runs only on a lent GPU: its imports are checked here (it
    once imported a function renamed since). A bundle without the archive: not run."""
    from gpu_check_lib.parts import upstream_ops

    (tmp_path / "bundle.json").write_text(json.dumps({"upstream_archive": None}))
    got = upstream_ops({"repo": str(REPO), "bundle": str(tmp_path), "work_dir": str(tmp_path)})
    assert got == {"status": "not run: the bundle has no upstream archive (--with-upstream)"}


def test_install_into_a_target_and_a_damaged_wheel_is_named(tmp_path, wheelhouse):
    out = tmp_path / "bundle"
    assert _prepare(out, wheelhouse).returncode == 0
    for use_pip in (True, False):  # pip there, or none: the wheels unpacked
        target = out / f"site_{use_pip}"
        done = bundle.install(out, target, use_pip=use_pip)
        assert done["via"] == ("pip" if use_pip else "unzip")
        assert sorted(done["installed"]) == ["nstdet_fake_pure-1.0-py3-none-any.whl",
                                             "nstdet_fake_sdist-2.0-py3-none-any.whl"]
        probe = subprocess.run([sys.executable, "-c", "import nstdet_fake_pure as a, "
                                "nstdet_fake_sdist as b; print(a.NAME, b.BUILT)"],
                               env=dict(os.environ, PYTHONPATH=str(target)),
                               capture_output=True, text=True, cwd=tmp_path)
        assert probe.stdout.split() == ["nstdet-fake-pure", "True"], probe.stderr
    wheel = next((out / "wheels").glob("nstdet_fake_pure*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-10])
    with pytest.raises(bundle.BundleError, match="checksum"):
        bundle.install(out, target)


def test_wheel_tags_the_gpu_machine_can_install():
    fits = bundle.wheel_fits
    assert fits("scipy-1.17.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
                "3.12")
    assert fits("pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl", "3.12")
    assert fits("fvcore-0.1.5-py3-none-any.whl", "3.12")
    assert not fits("scipy-1.17.1-cp311-cp311-manylinux_2_28_x86_64.whl", "3.12")
    assert not fits("scipy-1.17.1-cp312-cp312-macosx_14_0_arm64.whl", "3.12")


@pytest.mark.skipif(not any((REPO / ".cache").glob("*.tar.gz")),
                    reason="the detectron2 sdist is not cached here (tools/setup_env.py)")
def test_detectron2_tree_is_setup_envs_patched_source(tmp_path):
    tree = bundle.build_detectron2_tree(tmp_path / "d2")
    assert (tree / "setup.py").is_file()
    # patch 0009: the placeholder for the compiled ops; patch 0001: Pillow 10's name
    assert "Placeholder for detectron2's compiled extension" in \
        (tree / "detectron2" / "_C.py").read_text()
    assert "Image.LINEAR" not in \
        (tree / "detectron2" / "data" / "transforms" / "transform.py").read_text()


# ---- the whole check on a CPU -----------------------------------------------------------------
@pytest.mark.slow
def test_tiny_cpu_check_runs_every_part(tmp_path):
    json_path = tmp_path / "report" / "gpu_check.json"
    done = subprocess.run([sys.executable, str(TOOL), "--device", "cpu", "--tiny",
                           "--work-dir", str(tmp_path / "work"), "--json", str(json_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    report = json.loads(json_path.read_text())
    status = {p["name"]: p["status"] for p in report["parts"]}
    assert done.returncode == 0, (status, done.stdout[-4000:], done.stderr[-4000:])
    assert list(status) == [p.name for p in PARTS]
    assert status.pop("install") == "not run: no --bundle: this interpreter's packages are used"
    assert status.pop("upstream_ops") == "not run: not requested"
    assert set(status.values()) == {"ok"}, status
    m = {p["name"]: p["metrics"] for p in report["parts"]}
    assert m["environment"]["missing"] == []
    assert m["environment"]["detectron2"]["version"]
    setups = m["paper_shapes"]["setups"]
    assert set(setups) == {"det R-18 FPN <- R-101 FPN", "cls R-18 <- R-50"}
    assert set(setups["cls R-18 <- R-50"]) == {"shape", "fp32", "bf16", "fp16"}
    for setup in setups.values():
        for precision, r in setup.items():
            if precision != "shape":
                assert r["distill_ms"] > 0 and r["student_ms"] > 0 and r["loss_nst_finite"]
                assert 0 < r["nst_share"] < 1
    train = m["train_net"]
    assert (train["train"]["start_iter"], train["resume"]["start_iter"]) == (0, 4)
    assert train["resume"]["end_iter"] == 7 and train["backend"] == "gloo"
    for fmt in ("torchscript", "onnx"):
        assert m["export"][fmt]["passed"] and m["export"][fmt]["total_detections"] > 0
    assert m["pipeline"]["stages"] == 3 and m["pipeline"]["export"]["onnx"]["passed"]
    md = json_path.with_suffix(".md").read_text()
    assert all(p.name in md for p in PARTS) and "(tiny)" in md
