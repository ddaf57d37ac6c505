"""Child process of one part: `python -m gpu_check_lib.child module:function ctx.json out.json`.

Calls the function with the context dict and writes {"status", "summary", "metrics", "rows"}:
status "ok" unless the function returns its own ("not run: ..."), "failed: <error>" when it
raises (the traceback goes to the part's log).
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import traceback
from pathlib import Path

from .runner import write_atomically


def main(target: str, ctx_file: str, out_file: str) -> int:
    # SIGTERM (the runner's time limit) unwinds like Ctrl-C, so `finally` blocks clean up
    # (nst_det's exit_on_sigterm cannot be imported here: the install part runs before the
    # packages that nst_det imports are there)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with open(ctx_file) as f:
        ctx = json.load(f)
    module, function = target.split(":")
    try:
        result = getattr(importlib.import_module(module), function)(ctx) or {}
        result.setdefault("status", "ok")
        code = 0
    except Exception as e:  # the report names it; the traceback is in the log
        traceback.print_exc()
        message = str(e).strip().splitlines()
        result = {"status": f"failed: {type(e).__name__}: {message[0] if message else ''}"[:400]}
        code = 1
    write_atomically(Path(out_file), json.dumps(result, indent=1, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
