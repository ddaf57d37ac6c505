"""`FinalCheckpoint`: a finished run always ends with `model_final.pth`.

detectron2's PeriodicCheckpointer saves `model_<max_iter-1>` (when the period divides max_iter)
and then `model_final` in the same `after_step`. A run killed between the two saves (SIGKILL, a
SLURM time limit or preemption) is tagged at the last iteration; resumed, it starts at max_iter,
runs no step, and so never reaches the save of `model_final`. This hook writes it at the end of
such a run, before the final evaluation (as in an uninterrupted run, where the checkpoint also
precedes the evaluation).
"""

from __future__ import annotations

from detectron2.engine import HookBase

__all__ = ["FinalCheckpoint"]


class FinalCheckpoint(HookBase):
    """Save `model_final` after a completed run whose last save was not `model_final`.

    Args:
        checkpointer: the run's checkpointer (its `last_checkpoint` tag says what was saved
            last; ReliableCheckpointer tags every save except model_best).
        name: the final checkpoint's name (detectron2's "model_final").
    """

    def __init__(self, checkpointer, name: str = "model_final"):
        self._checkpointer = checkpointer
        self._name = name

    def after_train(self):
        # TrainerBase.train leaves iter == max_iter only when the loop ended without an error
        if self.trainer.iter < self.trainer.max_iter:
            return
        last = self._checkpointer.get_checkpoint_file() if self._checkpointer.has_checkpoint() \
            else ""
        if last.endswith(f"{self._name}.pth"):
            return
        # the weights of the last iteration, labelled as PeriodicCheckpointer labels them
        self._checkpointer.save(self._name, iteration=self.trainer.max_iter - 1)
