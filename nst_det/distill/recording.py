"""Record what a submodule receives and returns while its parent's unchanged forward runs.

This lets a subclass read intermediate values of detectron2's own forward (backbone features,
sampled proposals, RoI logits) without copying that forward.
"""

from contextlib import contextmanager

from torch import nn

__all__ = ["record_first_call"]


@contextmanager
def record_first_call(module: nn.Module, record: dict):
    """Within the block, store the positional inputs and the output of `module`'s first call.

    `record` gets "args" (tuple) and "output" on that call; later calls (e.g. a mask branch
    reusing the pooler) are ignored. The hook is removed on exit.
    """

    def hook(_mod, args, output):
        if "output" not in record:
            record["args"], record["output"] = args, output

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()
