"""detectron2's PreciseBN hook, resumable: each update reads the training stream from the
iteration it runs at, so a resumed run recomputes the BN statistics from the same batches."""

from __future__ import annotations

import logging
from typing import Callable

from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

logger = logging.getLogger(__name__)


class ResumablePreciseBN(HookBase):
    """Recompute the BN statistics of `model` every `period` iterations and after the last one
    (as detectron2's PreciseBN), from `num_iter` batches of `loader_at(start_iter)`, a training
    loader positioned at `start_iter`. detectron2's hook keeps one iterator for the whole run:
    an uninterrupted run reads batches 0..N-1, then N..2N-1, a resumed one 0..N-1 again."""

    def __init__(self, period: int, model, loader_at: Callable[[int], object], num_iter: int):
        self._period, self._model = period, model
        self._loader_at, self._num_iter = loader_at, num_iter

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self._period > 0
                                                  and next_iter % self._period == 0):
            self.update_stats()

    def update_stats(self):
        if not get_bn_modules(self._model):
            return
        logger.info(f"Running precise-BN on {self._num_iter} batches from iteration "
                    f"{self.trainer.iter + 1} of the training stream ...")
        with EventStorage():  # the model's own logging stays out of the run's storage
            update_bn_stats(self._model, iter(self._loader_at(self.trainer.iter + 1)),
                            self._num_iter)
