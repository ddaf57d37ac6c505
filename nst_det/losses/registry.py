"""Registry of transfer losses by name, so configs can pick and combine them with weights.

Losses register themselves at their definition site::

    @TRANSFER_LOSS_REGISTRY.register(name="nst")
    def nst_loss(f_s, f_t, kernel="poly", **kernel_args): ...

Feature losses take ``(f_s, f_t, **kwargs)`` (student first, teacher second; the teacher is
always detached); ``kd`` takes ``(logits_s, logits_t, T=...)``.
"""

import functools
import inspect
from typing import Any, Callable, Iterator, Optional, Tuple

from fvcore.common.registry import Registry

__all__ = ["TRANSFER_LOSS_REGISTRY", "get_transfer_loss", "build_transfer_loss"]


class _Entry:
    """What the fvcore registry files for one loss: the short name (as ``__name__``) and the loss.

    fvcore's public ``Registry.register(obj)`` files ``obj`` under ``obj.__name__``; the entry
    carries the short name so that the loss function itself is left exactly as defined.
    """

    def __init__(self, name: str, obj: Any):
        self.__name__, self.obj = name, obj

    def __repr__(self) -> str:  # what fvcore's table shows for the entry: the loss itself
        return repr(self.obj)


class _NamedRegistry(Registry):
    """fvcore Registry whose ``register`` also accepts an explicit short name.

    fvcore registers under ``obj.__name__`` only; config keys read better as "nst" than as
    "nst_loss", so each loss is registered through fvcore's public ``register`` as an `_Entry`
    named ``name``, and ``get`` / iteration hand back the loss itself. fvcore's own checks
    (a name registered twice, an unknown name in ``get``) are unchanged.
    """

    def register(self, obj: Any = None, *, name: Optional[str] = None) -> Any:
        """Register ``obj`` under ``name`` (default ``obj.__name__``); a decorator without obj."""
        if obj is None:
            return lambda fn: self.register(fn, name=name)
        super().register(_Entry(name or obj.__name__, obj))
        return obj

    def get(self, name: str) -> Any:
        """The object registered as ``name``; KeyError (fvcore's) for an unknown name."""
        return super().get(name).obj

    def __iter__(self) -> Iterator[Tuple[str, Any]]:
        return ((key, entry.obj) for key, entry in super().__iter__())


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
