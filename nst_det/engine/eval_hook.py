"""`TrainingEvalHook`: detectron2's EvalHook, its final evaluation only when the last step ran.

detectron2's EvalHook evaluates in `after_train` when `iter + 1 >= max_iter`, which also holds
when the last iteration's step raised. With several processes the rank that failed then waited
in the evaluation's gathers while the others waited in the step's collective, and the run hung
instead of ending on its error. Here the final evaluation runs when the loop finished
(`TrainerBase.train` leaves `iter >= max_iter`), or when the last step itself ran on this rank
(the trainer's `last_step_done`) and only a hook after it failed, e.g. rank 0's checkpoint
write: the other ranks finished, and every rank must take part in an evaluation's collectives.
"""

from __future__ import annotations

from detectron2.engine import hooks

__all__ = ["TrainingEvalHook"]


class TrainingEvalHook(hooks.EvalHook):
    """EvalHook(eval_period, eval_function) without the final evaluation of a failed step."""

    def after_train(self):
        trainer = self.trainer
        if trainer.iter >= trainer.max_iter or \
                getattr(trainer, "last_step_done", None) == trainer.max_iter - 1:
            super().after_train()
