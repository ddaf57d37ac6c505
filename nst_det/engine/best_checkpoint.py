"""detectron2's BestCheckpointer whose best metric survives a resume."""

from __future__ import annotations

import json
import os

from detectron2.engine import hooks

from ..utils.atomic import atomic_write

RECORD_FILE = "model_best.json"  # in OUTPUT_DIR: [[iteration, metric], ...], one per new best


class ResumableBestCheckpointer(hooks.BestCheckpointer):
    """BestCheckpointer (`model_best.pth` whenever the tracked metric improves) that records each
    new best's iteration and metric in OUTPUT_DIR/`RECORD_FILE`, so a resumed run compares with
    the best of the evaluations before the iteration it resumes from, as the uninterrupted run
    does. detectron2's keeps them in memory only: its first evaluation after a resume replaced
    model_best, however much worse. (The trainer's checkpoint cannot hold them: iteration k's is
    written before iteration k's evaluation, so that a failing evaluation leaves the weights.)
    An evaluation between the last checkpoint and the interruption is not repeated, so its
    result is not known to the resumed run.

    Args:
        record_dir: the run's OUTPUT_DIR. Others: BestCheckpointer's.
    """

    def __init__(self, *args, record_dir: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._record = os.path.join(record_dir, RECORD_FILE)
        self._bests: list = []
        self._in_checkpoint: list = []  # a checkpoint of 2026-12-06 held the best itself

    def before_train(self):
        start = self.trainer.iter  # 0 for a fresh run: an earlier run's record is dropped
        bests = []
        if start > 0 and os.path.isfile(self._record):
            with open(self._record) as f:
                bests = json.load(f)
        elif start > 0:
            bests = self._in_checkpoint
        self._bests = [b for b in bests if b[0] < start]  # the later ones run again
        self.best_iter, self.best_metric = self._bests[-1] if self._bests else (None, None)
        self._write()

    def after_step(self):
        best = self.best_iter
        super().after_step()
        self._note(best)

    def after_train(self):
        best = self.best_iter
        super().after_train()
        self._note(best)

    def _note(self, previous) -> None:
        if self.best_iter != previous:  # a new model_best.pth was saved
            self._bests.append([int(self.best_iter), float(self.best_metric)])
            self._write()

    def _write(self) -> None:
        with atomic_write(self._record, "w") as f:
            json.dump(self._bests, f)

    def load_state_dict(self, state: dict) -> None:
        """Checkpoints of 2026-12-06 hold the best here: used when there is no record file."""
        if state.get("best_iter") is not None:
            self._in_checkpoint = [[int(state["best_iter"]), float(state["best_metric"])]]
