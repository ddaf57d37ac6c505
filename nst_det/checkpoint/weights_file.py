"""Read a weights file, with one clear error for every way it can be wrong.

Every path that reads weights (MODEL.WEIGHTS for evaluation and initialisation, resume, the
teacher, classification weights, conversion, export, predict) goes through `load_weights_file`
(or `check_weights_file`, which reads nothing into memory for a torch zip file). A missing,
empty, truncated, damaged, random-bytes or wrong-format file raises `WeightsFileError` whose
message names the file, says what is wrong with it and what to do.

Files are read with `torch.load(weights_only=True)`, which runs no pickled code; torch's own
message for a file it refuses advises loading with `weights_only=False` (running whatever code
the file holds), so that message is never passed on. detectron2's model-zoo `.pkl` files are
plain pickles: they are read only where the caller allows it (`allow_pickle=True`), as
detectron2 itself does.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["WeightsFileError", "WeightsFileNotFoundError", "check_weights_file",
           "load_weights_file", "state_dict_from"]

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = b"\x80"  # a pickle of protocol >= 2 starts with PROTO (legacy torch.save too)


class WeightsFileError(RuntimeError):
    """A weights file that cannot be used: the message names it, the problem and the fix."""


class WeightsFileNotFoundError(WeightsFileError, FileNotFoundError):
    """The weights file does not exist (also a FileNotFoundError)."""


def _fail(what: str, path: str, problem: str, todo: str, cls=WeightsFileError):
    return cls(f"{what} {path}: {problem}. {todo}")


def _refit(what: str) -> str:
    return (f"Point {what} at a file written by torch.save (a trained run's model_final.pth, "
            "or tools/convert_student_to_d2.py's output)")


def _recopy(what: str) -> str:
    return (f"Copy or download it again, or point {what} at another checkpoint (a run that was "
            "stopped while saving keeps its previous checkpoint)")


def _describe_zip(what: str, path: str):
    """Check a zip archive without unpickling: complete (central directory), CRCs, a torch file
    and not a TorchScript module. Returns None when fine, else the error to raise."""
    if not zipfile.is_zipfile(path):
        return _fail(what, path, "the file ends early: it is a truncated zip archive (torch.save "
                     "format) without its directory", _recopy(what))
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return _fail(what, path, f"the zip archive is damaged ({type(e).__name__})",
                     _recopy(what))
    if bad is not None:
        return _fail(what, path, f"the zip archive is damaged (member {bad} fails its CRC "
                     "check)", _recopy(what))
    if any(name.split("/", 1)[-1].startswith("code/") for name in names):
        return _fail(what, path, "it is a TorchScript module (torch.jit.save), not a state dict",
                     f"Run it with tools/predict.py --model, or point "
                     f"{what} at the .pth checkpoint it was exported from")
    if not any(name.endswith("data.pkl") for name in names):
        return _fail(what, path, "it is a zip archive but not one written by torch.save",
                     _refit(what))
    return None


def _unpickling_error(what: str, path: str, e: Exception, kind: str):
    """The error for a file torch.load(weights_only=True) (kind zip or pickle) or pickle.load
    (kind pkl) could not read, without torch's advice."""
    text = str(e)
    if isinstance(e, (EOFError, zipfile.BadZipFile)) or any(
            words in text for words in ("central directory", "truncated", "unexpected EOF")):
        return _fail(what, path, "the file ends early: it is truncated", _recopy(what))
    if kind == "pkl":  # pickle.load refuses nothing: the file is damaged
        return _fail(what, path, f"it cannot be read as a pickle ({type(e).__name__}: {text}): "
                     "it is damaged, or not a .pkl weights file", _recopy(what))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found or ("Weights only load failed" in text or isinstance(e, pickle.UnpicklingError)) \
            and not re.search(r"Unsupported operand|invalid load key", text):
        which = f" ({found.group(1)})" if found else ""
        return _fail(
            what, path, "it holds pickled Python objects besides tensors" + which + ", such as a "
            "whole model saved with torch.save(model); such files can run code when loaded and "
            "are refused",
            "Save the weights with torch.save(model.state_dict(), path) where the file was made, "
            f"or point {what} at a checkpoint written by nst_det or detectron2")
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        # opcodes no writer makes (torch: "Unsupported operand"): the bytes are damaged
        return _fail(what, path, "its pickled data is damaged, or it is not a PyTorch weights "
                     "file", _recopy(what))
    return _fail(what, path, f"it cannot be read as PyTorch weights ({type(e).__name__})",
                 _refit(what))


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(64)


def _checked_head(path: str, what: str, allow_pickle: bool,
                  name: str | None = None) -> tuple[bytes, str]:
    """Existence, type and magic bytes of `path`, whose format `name` (default: path) tells;
    returns (head, kind: zip|pickle|pkl)."""
    if not path:
        raise _fail(what, "''", "no file given", f"Set {what} to a weights file",
                    WeightsFileNotFoundError)
    if not os.path.exists(path):
        raise _fail(what, path, "no such file", f"Check the path, or point {what} at an existing "
                    "weights file (train or convert first)", WeightsFileNotFoundError)
    if os.path.isdir(path):
        raise _fail(what, path, "it is a folder, not a file",
                    f"Point {what} at a weights file inside it (e.g. model_final.pth)")
    head = _head(path)
    if not head:
        raise _fail(what, path, "the file is empty (0 bytes)", _recopy(what))
    name = name or path
    if name.endswith(".pkl"):
        if not allow_pickle:
            raise _fail(what, path, "a .pkl file (a plain pickle) is not read here",
                        f"Point {what} at a .pth file written by torch.save")
        return head, "pkl"
    if head.startswith(_ZIP_MAGIC):
        return head, "zip"
    if head.startswith(_PICKLE_PROTOCOL):
        return head, "pickle"  # legacy (pre-zip) torch.save, or a plain pickle
    kind = "text" if _is_text(head) else f"binary data starting {head[:8].hex(' ')}"
    if name.endswith(".onnx"):
        kind = "an ONNX model"
    raise _fail(what, path, f"not a PyTorch weights file (it holds {kind}; torch.save writes a "
                "zip archive)", _refit(what))


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_weights_file(path: str | os.PathLike, what: str, *, allow_pickle: bool = False,
                      mmap: bool = False, name: str | None = None) -> Any:
    """Read a weights file with `torch.load(weights_only=True)` onto the CPU.

    Args:
        path: a local file (resolve URLs to their cached copy first: nst_det.checkpoint.remote).
        what: what the file is for, as the user set it, e.g. "MODEL.WEIGHTS",
            "MODEL.TEACHER.WEIGHTS" or "checkpoint": the message starts with it.
        allow_pickle: read a `.pkl` file (detectron2's model-zoo format) with pickle, which can run
            code: only where detectron2 itself would.
        mmap: map tensor data instead of reading it (torch zip files only): a cheap full check.
        name: the file name that tells its format (`.pkl`), when `path` is a temporary name.
    Returns:
        what the file holds (usually a state dict or {"model": state dict, ...}).
    Raises:
        WeightsFileNotFoundError: no file at `path` (also a FileNotFoundError).
        WeightsFileError: the file is empty, truncated, damaged, or not PyTorch weights.
    """
    path = os.fspath(path)
    _, kind = _checked_head(path, what, allow_pickle, name)
    if kind == "zip":
        error = _describe_zip(what, path)
        if error is not None:
            raise error
    try:
        if kind == "pkl":
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        return torch.load(path, map_location="cpu", weights_only=True,
                          mmap=bool(mmap and kind == "zip"))
    except Exception as e:  # torch.load and pickle raise many types for a damaged file
        raise _unpickling_error(what, path, e, kind) from None


def check_weights_file(path: str | os.PathLike, what: str, *, allow_pickle: bool = False,
                       name: str | None = None) -> None:
    """Raise WeightsFileError (see `load_weights_file`) unless `path` reads as weights.

    A torch zip file is checked by its CRCs and a memory-mapped load: no tensor data is copied.
    """
    load_weights_file(path, what, allow_pickle=allow_pickle, mmap=True, name=name)


def state_dict_from(data: Any, path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The {name: tensor} state dict in what `load_weights_file` returned: the file's "model"
    entry when it has one (a detectron2 / nst_det checkpoint), else the file itself.

    Raises:
        WeightsFileError: the file holds no state dict.
    """
    path = os.fspath(path)
    state = data.get("model", data) if isinstance(data, Mapping) else data
    if not isinstance(state, Mapping) or not state:
        got = type(state).__name__ if not isinstance(state, Mapping) else "an empty dict"
        raise _fail(what, path, f"it holds no state dict (it holds {got})", _refit(what))
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise _fail(what, path, f"it is not a state dict: {bad[0]!r} is a "
                    f"{type(state[bad[0]]).__name__}, not a tensor", _refit(what))
    return dict(state)
