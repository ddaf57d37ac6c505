"""Strict loading of classifier weights from local files (teachers and student initialisation).

Two file layouts are accepted:

* a torchvision-style state dict (`{"conv1.weight": ..., "fc.bias": ...}`), e.g. torchvision's
  published ImageNet weights `resnet101-63fe2227.pth`, or an Inception-BN state dict of ours;
* a checkpoint written by nst_det's ClassificationTrainer (`{"model": {"student.<key>": ...},
  "optimizer": ..., ...}`): the `student.` entries are the classifier; the other entries of the
  distiller (e.g. FitNet regressors) are not part of the classifier and are skipped.

Anything else, a missing file, a missing or unexpected key or a shape mismatch raises an error
that names the file and the keys. A URL (https://, detectron2://) is downloaded once into a
cache and verified (nst_det/checkpoint/remote.py), then read like a local file.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...checkpoint.remote import resolve_weights
from ...checkpoint.weights_file import load_weights_file

__all__ = ["classifier_state_dict", "load_classifier_weights", "read_classifier_file"]

logger = logging.getLogger(__name__)

STUDENT_PREFIX = "student."
_MAX_LISTED = 20


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def read_classifier_file(path: str, what: str = "classifier weights"
                         ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read the classifier state dict stored in `path` (either layout above).

    Args:
        what: what the file is for (a config key such as "MODEL.CLASSIFIER.WEIGHTS"), named first
            in every error.
    Returns:
        (classifier state dict, keys of the file that are not part of the classifier).
    Raises:
        WeightsFileError: `path` is missing (also a FileNotFoundError), truncated, damaged or
            not PyTorch weights (nst_det.checkpoint.weights_file).
        ValueError: the file holds neither layout.
    """
    path = resolve_weights(path)  # a URL: its verified, cached download (checkpoint/remote.py)
    ckpt = load_weights_file(path, what)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a state dict or checkpoint dict, got {type(ckpt)}")
    if isinstance(ckpt.get("model"), dict):  # an nst_det / detectron2 checkpoint
        model = ckpt["model"]
        state = {k[len(STUDENT_PREFIX):]: v for k, v in model.items()
                 if k.startswith(STUDENT_PREFIX)}
        if not state:
            raise ValueError(
                f"{path}: checkpoint has no '{STUDENT_PREFIX}*' keys (not a ClassificationTrainer "
                f"checkpoint?); its keys: {_listing(model)}")
        return state, [k for k in model if not k.startswith(STUDENT_PREFIX)]
    if not all(torch.is_tensor(v) for v in ckpt.values()):
        raise ValueError(f"{path}: not a state dict (non-tensor entries); keys: {_listing(ckpt)}")
    return ckpt, []


def classifier_state_dict(path: str, what: str = "classifier weights"
                          ) -> dict[str, torch.Tensor]:
    """The classifier state dict stored in `path`; other distiller entries are skipped (logged)."""
    state, skipped = read_classifier_file(path, what)
    if skipped:
        logger.info(f"{path}: not part of the classifier, skipped: {_listing(skipped)}")
    return state


def load_classifier_weights(model: nn.Module, path: str, what: str = "classifier weights"
                            ) -> nn.Module:
    """Load `path` into `model` strictly (see the module docstring for accepted layouts).

    A missing `num_batches_tracked` buffer is tolerated (torchvision's published files predate
    it; BatchNorm fills it in). Every other difference is an error.

    Raises:
        WeightsFileError, ValueError: see `read_classifier_file` (`what` names the file's use).
        KeyError: missing or unexpected keys (listed).
        ValueError: shape mismatches (listed with both shapes).
    Returns:
        `model`, loaded.
    """
    state = classifier_state_dict(path, what)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise KeyError(
            f"{path} does not match {type(model).__name__}: missing keys [{_listing(missing)}]; "
            f"unexpected keys [{_listing(unexpected)}]")
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{path}: shape mismatch for {len(wrong)} keys: {'; '.join(wrong[:10])}")
    model.load_state_dict(state, strict=True)
    logger.info(f"Loaded {len(state)} tensors into {type(model).__name__} from {path}")
    return model
