"""Run the check's parts one after another, each in its own process under its own time limit.

A part is a function `f(ctx) -> dict` named as "module:function"; it runs in a child process
(`python -m gpu_check_lib.child`) in a new session, so a part that hangs (a CUDA call, a dead
NCCL peer, a stuck data loader) is stopped with its whole process group when its limit is
reached and reported as "not run: timeout after N s"; the next part then runs. A part that
raises is "failed: <error>", one whose prerequisite did not succeed is "not run: needs <part>",
and one that would start with less than a quarter of its own limit left of the budget is "not
run: N s of the budget left": a part cut shorter would report a slow part as a hang. A part's
limit leaves GRACE_S of the budget for stopping it, so the check ends within its budget. A check
stopped from outside (Ctrl-C, SIGTERM) stops the running part's process group too. Each part's
output goes to its own log file; results are written as JSON (atomically) after every part, so a
check stopped from outside still leaves what it measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LIB_PARENT = Path(__file__).resolve().parents[1]  # tools/: where gpu_check_lib imports from
GRACE_S = 10.0  # after SIGTERM, before SIGKILL: time for a pipeline to stop its jobs
MIN_SHARE = 0.25  # a part is started only with at least this share of its own limit left


@dataclass
class Part:
    """One part of the check.

    target: "module:function" run in a child process with the context dict.
    limit_s / tiny_limit_s: wall-clock limit on the GPU / in --tiny mode on a CPU.
    needs: parts that must have succeeded first (their results are in ctx["results"]).
    what: one line for the docs and the table.
    optional: runs only when named in `requested` (e.g. a long source build).
    """

    name: str
    target: str
    limit_s: float
    tiny_limit_s: float
    needs: tuple = ()
    what: str = ""
    optional: bool = False


@dataclass
class PartResult:
    name: str
    status: str  # "ok", "failed: ...", "not run: ..."
    seconds: float = 0.0
    limit_s: float = 0.0
    summary: str = ""
    metrics: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)  # sub-rows for the table: [label, summary]
    log: str = ""


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_part(part: Part, ctx: dict, limit: float, log_dir: Path, env: dict,
             python: str = sys.executable) -> PartResult:
    """Run one part in a child process (its own session) for at most `limit` seconds."""
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx_file, result_file = log_dir / f"{part.name}.ctx.json", log_dir / f"{part.name}.result.json"
    log_file = log_dir / f"{part.name}.log"
    ctx_file.write_text(json.dumps(ctx, indent=1, default=str))
    result_file.unlink(missing_ok=True)
    child_env = dict(env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(LIB_PARENT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [python, "-m", "gpu_check_lib.child", part.target, str(ctx_file), str(result_file)],
            stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=ctx.get("repo"),
            start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(proc)
        except BaseException:  # the check itself stopped: its part (own session) stops too
            _stop_group(proc)
            raise
        # whatever the part left running (workers, stage jobs) goes with it
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
    seconds = round(time.perf_counter() - start, 1)
    common = {"name": part.name, "seconds": seconds, "limit_s": round(limit, 1),
              "log": str(log_file)}
    if timed_out:
        return PartResult(status=f"not run: timeout after {limit:.0f} s", **common,
                          summary=_last_line(log_file))
    try:
        data = json.loads(result_file.read_text())
    except FileNotFoundError:
        data = None
    except ValueError as e:  # (written atomically by the child: damaged from outside)
        return PartResult(status=f"failed: its result {result_file} is not JSON ({e})",
                          **common)
    if data is not None:
        return PartResult(status=data.get("status", "ok"), summary=data.get("summary", ""),
                          metrics=data.get("metrics", {}), rows=data.get("rows", []), **common)
    return PartResult(status=f"failed: exit code {proc.returncode} without a result",
                      summary=_last_line(log_file), **common)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (a pipeline stops its jobs on it), SIGKILL after
    GRACE_S."""
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    finally:  # also when the check itself is stopped during the wait
        _kill_group(proc.pid, signal.SIGKILL)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it: a kill leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def run_check(parts: list, ctx: dict, *, tiny: bool, budget_s: float, json_path: Path,
              log_dir: Path, env: dict | None = None, requested=(), skip_reasons=None,
              python: str = sys.executable, echo=print) -> dict:
    """Run `parts` in order under their limits and a total budget; write and return the report.

    Args:
        ctx: passed to every part; ctx["results"] gains each finished part's metrics.
        requested: names of optional parts to run.
        skip_reasons: {part name: why} for parts not to run in this mode.
        env: the children's environment (default: this process's).
    """
    env = dict(os.environ if env is None else env)
    skip_reasons = dict(skip_reasons or {})
    ctx = dict(ctx, results={})
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "tiny": tiny,
              "budget_s": budget_s, "device": ctx.get("device"), "parts": []}
    t0 = time.perf_counter()
    ok = set()
    for part in parts:
        left = budget_s - (time.perf_counter() - t0)
        own = part.tiny_limit_s if tiny else part.limit_s
        limit = min(own, left - GRACE_S)  # what stopping it takes stays within the budget
        missing = [n for n in part.needs if n not in ok]
        if part.optional and part.name not in requested:
            result = PartResult(part.name, "not run: not requested")
        elif part.name in skip_reasons:
            result = PartResult(part.name, f"not run: {skip_reasons[part.name]}")
        elif missing:
            result = PartResult(part.name, f"not run: needs {', '.join(missing)}")
        elif limit < MIN_SHARE * own:
            result = PartResult(part.name, f"not run: {max(0.0, left):.0f} s of the "
                                f"{budget_s:.0f} s budget left, under a quarter of its "
                                f"{own:.0f} s limit with {GRACE_S:.0f} s to stop it")
        else:
            echo(f"[gpu_check] {part.name}: running (limit {limit:.0f} s)")
            result = run_part(part, ctx, limit, log_dir, env, python)
        if result.status == "ok":
            ok.add(part.name)
            ctx["results"][part.name] = result.metrics
        echo(f"[gpu_check] {part.name}: {result.status} ({result.seconds:.1f} s) "
             f"{result.summary}".rstrip())
        report["parts"].append(asdict(result))
        report["seconds"] = round(time.perf_counter() - t0, 1)
        write_atomically(json_path, json.dumps(report, indent=1, default=str) + "\n")
    return report


def table(report: dict) -> str:
    """The report as one table: a row per part, sub-rows (e.g. one per timing) below it."""
    from tabulate import tabulate

    rows = []
    for p in report["parts"]:
        secs = f"{p['seconds']:.1f}" if p["seconds"] else ""
        rows.append([p["name"], p["status"], secs, p["summary"]])
        rows.extend(["", "", "", f"{label}: {text}"] for label, text in p["rows"])
    return tabulate(rows, headers=["part", "status", "s", "result"], tablefmt="github")
