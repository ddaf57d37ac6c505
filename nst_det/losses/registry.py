"""Registry of transfer losses by name, so configs can pick and combine them with weights.

Losses register themselves at their definition site::

    @TRANSFER_LOSS_REGISTRY.register(name="nst")
    def nst_loss(f_s, f_t, kernel="poly", **kernel_args): ...

Feature losses take ``(f_s, f_t, **kwargs)`` (student first, teacher second; the teacher is
always detached); ``kd`` takes ``(logits_s, logits_t, T=...)``.
"""

import functools
import inspect
from typing import Any, Callable, Optional

from fvcore.common.registry import Registry

__all__ = ["TRANSFER_LOSS_REGISTRY", "get_transfer_loss", "build_transfer_loss"]


class _NamedRegistry(Registry):
    """fvcore Registry whose ``register`` also accepts an explicit short name.

    fvcore registers under ``obj.__name__`` only; config keys read better as "nst" than as
    "nst_loss", so ``register(name=...)`` is added on top of fvcore's own ``_do_register``.
    """

    def register(self, obj: Any = None, *, name: Optional[str] = None) -> Any:
        if obj is None:

            def deco(fn: Any) -> Any:
                self._do_register(name or fn.__name__, fn)
                return fn

            return deco
        self._do_register(name or obj.__name__, obj)
        return obj


TRANSFER_LOSS_REGISTRY = _NamedRegistry("TRANSFER_LOSS")
TRANSFER_LOSS_REGISTRY.__doc__ = """
Registry for knowledge-transfer losses (NST/MMD, KD, FitNet, AT, SP, distribution metrics).
Each registered object is a callable returning a scalar loss tensor.
"""


def get_transfer_loss(name: str) -> Callable:
    """Return the loss function registered as ``name``.

    Raises:
        KeyError: for an unknown name; the message lists the registered names.
    """
    if name not in TRANSFER_LOSS_REGISTRY:
        known = ", ".join(sorted(k for k, _ in TRANSFER_LOSS_REGISTRY))
        raise KeyError(f"Unknown transfer loss {name!r}; registered losses: {known}")
    return TRANSFER_LOSS_REGISTRY.get(name)


def build_transfer_loss(name: str, **kwargs: Any) -> Callable:
    """Return the loss ``name`` with keyword arguments bound, e.g. ``("nst", kernel="linear")``.

    The keywords are checked against the function's signature now, so a typo in a config fails
    when the model is built rather than at the first training step.
    """
    fn = get_transfer_loss(name)
    if not kwargs:
        return fn
    try:
        inspect.signature(fn).bind_partial(None, None, **kwargs)
    except TypeError as e:
        raise TypeError(f"Bad arguments for transfer loss {name!r}: {e}") from None
    return functools.partial(fn, **kwargs)
