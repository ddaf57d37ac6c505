"""`GatherRngStates`: every rank's RNG state goes into the checkpoints, for an exact resume.

Only rank 0 writes checkpoints, so the trainer's `state_dict` (run on rank 0 alone) can capture
only rank 0's RNG state. detectron2 seeds rank r with SEED + r and the ranks' RPN / RoI sampling
draw differently, so a resume that gave every rank rank 0's state continued unlike the
uninterrupted run (2 processes: 129 of 150 tensors of model_final differed). This hook runs on
every rank, just before detectron2's PeriodicCheckpointer, and gathers the ranks' states at the
iterations that one saves; `ReliableTrainer.state_dict` stores them and each rank restores its
own on resume.
"""

from __future__ import annotations

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..utils.rng import capture_rng_state

__all__ = ["GatherRngStates"]


class GatherRngStates(HookBase):
    """At each iteration PeriodicCheckpointer(period) saves at, with several processes, gather
    `capture_rng_state()` of every rank (a collective: every rank runs this hook).

    Attributes:
        gathered: (iteration, [state of rank 0, rank 1, ...]) of the latest gather, or None.
    """

    def __init__(self, period: int):
        self._period = period
        self.gathered = None

    def after_step(self):
        it = self.trainer.iter
        # PeriodicCheckpointer's schedule: every `period` iterations, and the last one
        if comm.get_world_size() > 1 and ((it + 1) % self._period == 0
                                          or it >= self.trainer.max_iter - 1):
            self.gathered = (it, comm.all_gather(capture_rng_state()))

    def states_at(self, iteration: int) -> list | None:
        """Every rank's state if they were gathered at `iteration`, else None."""
        return self.gathered[1] if self.gathered and self.gathered[0] == iteration else None
