"""Run a tool and signal it at a chosen write: python tests/_stop_at.py EVENT SIG TOOL [ARGS...]

EVENT is `write:NAME` (inside the atomic write of the file NAME, e.g. `write:model_0000003.pth`:
its temporary file holds all its bytes and is about to be fsynced and renamed) or `moved:NAME`
(right after nst_det.utils.atomic renamed a file onto NAME, e.g. one file of an export's set);
`...#K` picks the K-th such event (default 1). SIG is INT, TERM or KILL; TOOL a script such as
tools/train_net.py, followed by its own arguments. So a test stops a run at an event, never at a
wall-clock moment. Only nst_det.utils.atomic's own `os` is wrapped: other modules see the real one.
"""

import os
import runpy
import signal
import sys
import types

import nst_det.utils.atomic as atomic


def _stop_at(event: str, sig: signal.Signals) -> None:
    kind, _, target = event.partition(":")
    name, _, nth = target.partition("#")
    if kind not in ("write", "moved") or not name:
        raise SystemExit(f"bad event {event!r}: write:NAME[#K] or moved:NAME[#K]")
    seen = 0
    real_os = atomic.os

    def count(hit: bool) -> None:
        nonlocal seen
        seen += hit
        if hit and seen == int(nth or 1):
            real_os.kill(real_os.getpid(), sig)

    def fsync(fd):
        link = f"/proc/self/fd/{fd}"
        path = real_os.readlink(link) if real_os.path.exists(link) else ""
        # atomic_write's temporary of NAME is `.NAME.<host>.<pid>.<random>.tmp`
        count(kind == "write" and real_os.path.basename(path).startswith(f".{name}."))
        return real_os.fsync(fd)

    def replace(src, dst, **kwargs):
        real_os.replace(src, dst, **kwargs)
        count(kind == "moved" and real_os.path.basename(dst) == name)

    proxy = types.SimpleNamespace(**{k: getattr(real_os, k) for k in dir(real_os)
                                     if not k.startswith("__")})
    proxy.fsync, proxy.replace = fsync, replace
    atomic.os = proxy


def main() -> None:
    event, sig, tool, *args = sys.argv[1:]
    # a process started in the background (nohup, `&`, CI) inherits SIGINT ignored; Ctrl-C in a
    # terminal reaches a tool with Python's own handler, which is what is tested here
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _stop_at(event, signal.Signals[f"SIG{sig}"])
    sys.argv = [tool, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(tool)))
    runpy.run_path(tool, run_name="__main__")


if __name__ == "__main__":
    main()
