"""A DetectionCheckpointer that writes atomically, resumes past corrupt files, and inits strictly.

- Every checkpoint and the `last_checkpoint` tag are written to a temp file, fsynced and renamed,
  so a crash mid-save leaves the previous checkpoint intact and loadable.
- `model_best` (and, with NST_DET.FINAL_CHECKPOINT_WEIGHTS_ONLY, `model_final`) hold the model
  and iteration only: they are for evaluation/export, and optimizer state would double their size.
  A weights-only save with no weight changed since the previous weights-only save (model_best
  after the final evaluation, right after model_final) is a hard link to that file, not a second
  copy; the file then carries the earlier save's `iteration` (detectron2 labels the final
  evaluation max_iter, model_final max_iter - 1: the same weights).
- `resume_or_load(resume=True)` tries the tagged checkpoint, then older `model_*.pth` files newest
  first, skipping (with a warning naming it) any file that is truncated or unreadable.
- Initialising from MODEL.WEIGHTS (not resuming) fails when weights of the pretrained part of
  the backbone (the bottom-up network; FPN layers are new) are missing or any tensor has the
  wrong shape: detectron2 only warns, and a silently half-initialised student makes every later
  number meaningless.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.atomic import atomic_link, atomic_write


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, not a checkpoint, ...)."""


class ReliableCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, corrupt-file fallback on resume, strict init."""

    # saves that are not the latest state: BestCheckpointer's model_best must not become the
    # resume point (detectron2 would tag it, and a resume would repeat the iterations after it)
    UNTAGGED = ("model_best",)

    def __init__(self, model, save_dir: str = "", *, weights_only=("model_best",),
                 **checkpointables):
        """`weights_only`: checkpoint names saved without the other checkpointables (optimizer,
        scheduler, trainer state); keyword arguments given to `save` (iteration) are kept."""
        super().__init__(model, save_dir, **checkpointables)
        self.weights_only = tuple(weights_only)
        self._last_weights_only = None  # (weights version, path) of the latest weights-only save

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        weights_only = name in self.weights_only
        data = {"model": self.model.state_dict()}
        if not weights_only:
            data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        version = self._weights_version(data["model"]) if weights_only else None
        previous = self._last_weights_only if weights_only else None
        if not (previous and previous[0] == version and os.path.isfile(previous[1])
                and atomic_link(previous[1], path)):
            with atomic_write(path) as f:
                torch.save(data, f)
        if weights_only:
            self._last_weights_only = (version, path)
        if name not in self.UNTAGGED:
            self.tag_last_checkpoint(basename)

    @staticmethod
    def _weights_version(state: dict) -> list:
        """Which tensors, at which in-place version: equal lists mean no weight or buffer has
        been modified since (an optimizer step or a load bumps the tensors' version counters)."""
        return [(key, value.data_ptr(), value._version) for key, value in state.items()]

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except FileNotFoundError:
            raise
        except Exception as e:  # torch.load raises many types for a damaged zip/pickle
            raise CorruptCheckpointError(
                f"{filename} is not a readable checkpoint ({type(e).__name__}: {e})"
            ) from e

    def _resume_candidates(self) -> list[str]:
        """The tagged checkpoint first, then every other checkpoint in save_dir, newest first."""
        tagged = self.get_checkpoint_file()
        others = sorted((p for p in glob.glob(os.path.join(self.save_dir, "model_*.pth"))
                         if os.path.basename(p)[:-4] not in self.UNTAGGED),
                        key=os.path.getmtime, reverse=True)
        return [p for p in dict.fromkeys([tagged, *others]) if p and os.path.isfile(p)]

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict:
        if resume and self.has_checkpoint():
            for candidate in self._resume_candidates():
                try:
                    return self._load_checked(candidate, "resume")
                except CorruptCheckpointError as e:
                    self.logger.warning(f"Skipping checkpoint on resume: {e}")
            self.logger.warning(f"No readable checkpoint in {self.save_dir}; not resuming")
        if path and not os.path.isfile(path) and "://" not in path:
            raise FileNotFoundError(
                f"MODEL.WEIGHTS={path} does not exist. Point it at a checkpoint or at converted "
                "backbone weights (tools/convert_student_to_d2.py), or set it to '' to train "
                "from scratch"
            )
        return self._load_checked(path, "init", checkpointables=[])

    def _load_checked(self, path: str, mode: str, **kwargs) -> dict:
        self._check_mode, self._checked_path = mode, path
        try:
            return self.load(path, **kwargs)
        finally:
            self._check_mode = None

    def _pretrained_prefix(self) -> str:
        """Keys that pretrained weights must cover: the bottom-up network (FPN layers are new)."""
        model = getattr(self.model, "module", self.model)
        backbone = getattr(model, "backbone", None)
        return "backbone.bottom_up." if hasattr(backbone, "bottom_up") else "backbone."

    def _log_incompatible_keys(self, incompatible) -> None:
        super()._log_incompatible_keys(incompatible)
        mode = getattr(self, "_check_mode", None)
        shapes = [f"{k}: {tuple(a)} in file vs {tuple(b)} in model"
                  for k, a, b in incompatible.incorrect_shapes]
        if mode == "resume" and (shapes or incompatible.missing_keys):
            # a resumed run must continue the same model: anything else is a changed config
            raise KeyError(
                f"checkpoint {self._checked_path} does not match the model built from the current "
                f"config: wrong shapes {shapes[:5]}, missing keys {incompatible.missing_keys[:5]}."
                " Resume with the config the run started with, or use a new OUTPUT_DIR"
            )
        prefix = self._pretrained_prefix()
        missing_backbone = [k for k in incompatible.missing_keys if k.startswith(prefix)]
        if mode == "init" and (shapes or missing_backbone):
            raise KeyError(
                f"MODEL.WEIGHTS={self._checked_path} does not match the model's backbone: "
                f"wrong shapes {shapes[:10]}, missing backbone keys {missing_backbone[:10]}. "
                "Check MODEL.RESNETS.DEPTH / the backbone name against the weights file"
            )
