"""`TrainingEvalHook`: detectron2's EvalHook, its final evaluation only after a finished loop.

detectron2's EvalHook evaluates in `after_train` when `iter + 1 >= max_iter`, which also holds
when the last iteration raised. With several processes the rank that failed then waited in the
evaluation's gathers while the others waited in the step's collective, and the run hung instead
of ending on its error. `TrainerBase.train` leaves `iter >= max_iter` only when its loop
finished (or had nothing left to run), which is the condition here.
"""

from __future__ import annotations

from detectron2.engine import hooks

__all__ = ["TrainingEvalHook"]


class TrainingEvalHook(hooks.EvalHook):
    """EvalHook(eval_period, eval_function) that skips the final evaluation of a failed run."""

    def after_train(self):
        if self.trainer.iter >= self.trainer.max_iter:
            super().after_train()
