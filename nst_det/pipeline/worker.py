"""One training stage of the pipeline in a process of its own (PipelineRunner with jobs > 1).

    python -m nst_det.pipeline.worker '<json: {"stage": ..., "label": ..., "later": ...,
                                               "threads": ...}>'

Trains and evaluates the stage exactly as the in-process path does (`run._train_worker`), with
`threads` torch threads; its result is the stage folder's final_metrics.json.
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    payload = json.loads((argv if argv is not None else sys.argv[1:])[0])
    import torch

    from .run import _train_worker

    torch.set_num_threads(int(payload["threads"]))
    _train_worker(payload["stage"], payload["label"], tuple(payload["later"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
