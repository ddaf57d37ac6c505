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
  the model (a detector's bottom-up network: FPN layers and heads are new; a classifier's
  network but its last Linear layer, the class head) are missing, have the wrong shape, or come
  with more of that part than the model has (an R-34 file for an R-18): detectron2 only warns,
  and a silently half-initialised student makes every later number meaningless.
- Loading MODEL.WEIGHTS to evaluate them (`whole_model=True`, --eval-only) fails unless it
  fills the whole model but the distillation core's training-only modules (`distill.`): a
  half-random model would be scored as if trained.

Only public API of fvcore/detectron2/torch is used, so this behaves the same on detectron2 v0.6
and on upstream main: `save`, `tag_last_checkpoint`, `resume_or_load` and `load` are the public
methods of fvcore's Checkpointer; the keys a load left unfilled come from a torch
`register_load_state_dict_post_hook` on the model (fvcore drops wrong-shaped tensors before
calling `load_state_dict`, so those keys are reported as unfilled too); a file is checked for
damage by nst_det.checkpoint.weights_file before fvcore loads it.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Any, Iterator

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..checkpoint.weights_file import WeightsFileError, check_weights_file
from ..modeling.convert import resolve_detection_weights
from ..utils.atomic import atomic_link, atomic_write


class CorruptCheckpointError(WeightsFileError):
    """A checkpoint file exists but cannot be read (truncated, not a checkpoint, ...)."""


def check_checkpoint_readable(path: str) -> None:
    """Raise CorruptCheckpointError if `path` is damaged (truncated, garbage, bad CRC).

    The one weights-file check (nst_det.checkpoint.weights_file): a torch zip archive's central
    directory and CRCs, then a memory-mapped `torch.load(weights_only=True)`, which runs no
    pickled code.
    """
    try:
        check_weights_file(path, "checkpoint", allow_pickle=path.endswith(".pkl"))
    except WeightsFileError as e:
        raise CorruptCheckpointError(str(e)) from None


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
        self.resumed_from = None  # the checkpoint the last resume_or_load resumed from, if any

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
        been modified since (an optimizer step or a load bumps the tensors' version counters).
        `Tensor._version` is torch's autograd version counter (torch 1.x-2.14, not detectron2)."""
        return [(key, value.data_ptr(), value._version) for key, value in state.items()]

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    def _resume_candidates(self) -> list[str]:
        """The tagged checkpoint first, then every other checkpoint in save_dir, newest first."""
        tagged = self.get_checkpoint_file()
        others = sorted((p for p in glob.glob(os.path.join(self.save_dir, "model_*.pth"))
                         if os.path.basename(p)[:-4] not in self.UNTAGGED),
                        key=os.path.getmtime, reverse=True)
        return [p for p in dict.fromkeys([tagged, *others]) if p and os.path.isfile(p)]

    def resume_or_load(self, path: str, *, resume: bool = True, whole_model: bool = False
                       ) -> dict:
        """Resume from the newest readable checkpoint in save_dir (sets `resumed_from`), else
        load the model weights of `path` strictly enough for its pretrained part (the whole
        model with `whole_model`: to evaluate it); returns what the file holds besides the model
        and the checkpointables (e.g. `iteration`)."""
        self.resumed_from = None
        if resume and self.has_checkpoint():
            for candidate in self._resume_candidates():
                try:
                    check_checkpoint_readable(candidate)
                except CorruptCheckpointError as e:
                    self.logger.warning(f"Skipping checkpoint on resume: {e}")
                    continue
                extra = self._load_checked(candidate, "resume")
                self.resumed_from = candidate
                return extra
            self.logger.warning(f"No readable checkpoint in {self.save_dir}; not resuming")
        # a URL: its verified, cached download (a torchvision ResNet: converted to detectron2's)
        path = resolve_detection_weights(path, "MODEL.WEIGHTS")
        if path and not os.path.isfile(path) and "://" not in path:
            raise FileNotFoundError(
                f"MODEL.WEIGHTS={path} does not exist. Point it at a checkpoint or at converted "
                "backbone weights (tools/convert_student_to_d2.py), or set it to '' to train "
                "from scratch"
            )
        if path and "://" not in path:  # one clear error for a truncated or wrong-format file
            check_weights_file(path, "MODEL.WEIGHTS", allow_pickle=path.endswith(".pkl"))
        return self._load_checked(path, "eval" if whole_model else "init", checkpointables=[])

    def _load_checked(self, path: str, mode: str, **kwargs) -> dict:
        """`load(path)`, then raise if the model was not filled as `mode` requires."""
        with unfilled_keys(self.model) as (unfilled, unexpected):
            extra = self.load(path, **kwargs)
        if path:
            self._check_filled(path, mode, unfilled, unexpected)
        return extra

    def _pretrained_part(self) -> tuple[str, tuple]:
        """(prefix, exceptions): the keys that pretrained weights must cover, those under the
        prefix but the exceptions' prefixes. A detector: its bottom-up network (FPN layers are
        new). A classifier (a distiller's `student`): all but its last Linear layer, the class
        head a new class count re-initialises."""
        model = self.model
        backbone = getattr(model, "backbone", None)
        if backbone is not None:
            return ("backbone.bottom_up." if hasattr(backbone, "bottom_up") else "backbone."), ()
        student = getattr(model, "student", None)
        if isinstance(student, torch.nn.Module):
            heads = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)]
            return "student.", (f"student.{heads[-1]}.",) if heads else ()
        return "", ()

    def _check_filled(self, path: str, mode: str, unfilled: list[str],
                      unexpected: list[str]) -> None:
        if mode == "resume" and unfilled:
            # a resumed run must continue the same model: anything else is a changed config
            raise KeyError(
                f"checkpoint {path} does not match the model built from the current config: "
                f"keys missing from it or of a different shape {unfilled[:5]} (shapes are in "
                "the warning above). Resume with the config the run started with, or use a new "
                "OUTPUT_DIR"
            )
        if mode == "eval":
            unused = [k for k in unfilled if not k.startswith("distill.")]
            if unused:
                raise KeyError(
                    f"MODEL.WEIGHTS={path} does not fill the model to evaluate: keys missing "
                    f"from it or of a different shape {unused[:10]} (shapes are in the warning "
                    "above), which would be scored with random values. Evaluate a checkpoint "
                    "of this config's model, with the config its run wrote (config.yaml)")
            return
        prefix, heads = self._pretrained_part()

        def pretrained(keys):
            return [k for k in keys if k.startswith(prefix) and not k.startswith(heads)]

        for keys, what in ((pretrained(unfilled), "missing from it or of a different shape"),
                           (pretrained(unexpected), "in it that the model does not have")):
            if mode == "init" and keys:
                raise KeyError(
                    f"MODEL.WEIGHTS={path} does not match the model's pretrained part "
                    f"({prefix}*): keys {what} {keys[:10]} (shapes are in the warning above). "
                    "Check MODEL.RESNETS.DEPTH / the backbone or classifier name against the "
                    "weights file"
                )


@contextlib.contextmanager
def unfilled_keys(model: torch.nn.Module) -> Iterator[tuple[list[str], list[str]]]:
    """Collect (unfilled, unexpected): the state-dict keys of `model` that `model.
    load_state_dict` calls inside the block leave unfilled (missing from the loaded dict, or
    dropped by fvcore for a wrong shape), and the loaded keys the model does not have.

    Uses torch's public `register_load_state_dict_post_hook` on the root module, which sees the
    whole load's missing and unexpected keys.
    """
    unfilled: list[str] = []
    unexpected: list[str] = []

    def record(module, incompatible):
        unfilled.extend(k for k in incompatible.missing_keys if k not in unfilled)
        unexpected.extend(k for k in incompatible.unexpected_keys if k not in unexpected)

    handle = model.register_load_state_dict_post_hook(record)
    try:
        yield unfilled, unexpected
    finally:
        handle.remove()
