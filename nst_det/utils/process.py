"""Whether a process is running: the one check the atomic writers and the pipeline share."""

from __future__ import annotations

import os


def process_running(pid: int, named: bytes | None = None) -> bool:
    """Whether process `pid` runs on this host (with `named`: and its command line contains it,
    which tells a reused pid from the process that had it)."""
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # someone else's process
        pass
    except (OSError, ValueError, OverflowError):
        return False
    if named is None:
        return True
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return named in f.read()
    except OSError:
        return False
