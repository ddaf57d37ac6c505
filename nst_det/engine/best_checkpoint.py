"""detectron2's BestCheckpointer whose best metric is part of the training checkpoints."""

from __future__ import annotations

from detectron2.engine import hooks


class ResumableBestCheckpointer(hooks.BestCheckpointer):
    """BestCheckpointer (`model_best.pth` whenever the tracked metric improves) that saves its
    best metric and iteration with the trainer's state (TrainerBase collects hooks' state
    dicts), so a resumed run compares with the best before the interruption. detectron2's keeps
    them in memory only: its first evaluation after a resume always replaced model_best, however
    much worse. An evaluation between the last checkpoint and the interruption is not repeated,
    so its result is not known to the resumed run."""

    def state_dict(self) -> dict:
        if self.best_metric is None:
            return {}
        return {"best_metric": float(self.best_metric), "best_iter": int(self.best_iter)}

    def load_state_dict(self, state: dict) -> None:
        self.best_metric, self.best_iter = state.get("best_metric"), state.get("best_iter")
