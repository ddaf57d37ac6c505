#!/usr/bin/env python3
"""The prepared check of nst_det on a lent GPU machine, and its CPU mode (docs/gpu_check.md).

    python tools/gpu_check.py --prepare                    # here: gather .gpu_bundle/
    python3 tools/gpu_check.py --bundle .gpu_bundle --json $OUT/gpu_check.json   # on the GPU
    python tools/gpu_check.py --device cpu --tiny          # the same code paths, tiny, on a CPU

Every part runs in its own process under its own time limit and is reported as ok, failed or
"not run: why"; one table is printed and the results are written as JSON.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check_lib: stdlib + tabulate

from gpu_check_lib.check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
