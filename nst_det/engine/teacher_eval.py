"""A hook that evaluates a distillation model's frozen teacher once, so logs compare the two.

The teacher is evaluated before the first training step on the student's test sets and test
pipeline (same images, sizes and evaluator), the results are put in the event storage as
`teacher/<metric>` scalars (so they reach metrics.json and TensorBoard) and written to
`OUTPUT_DIR/teacher_metrics.json`. After training, one log table puts the teacher's numbers
next to the student's final ones.
"""

from __future__ import annotations

import json
import logging
import os

from detectron2.engine import HookBase
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from tabulate import tabulate
from torch import nn

from ..utils.atomic import atomic_write

__all__ = ["ChannelFlipped", "TeacherEvalHook", "TEACHER_METRICS_FILE"]

TEACHER_METRICS_FILE = "teacher_metrics.json"

logger = logging.getLogger(__name__)


class ChannelFlipped(nn.Module):
    """`model` fed images in the other channel order (RGB <-> BGR): a teacher whose INPUT.FORMAT
    differs from the student's, evaluated on the student's test loader. Not a submodule owner
    that matters for training: it exists only for the teacher's evaluation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batched_inputs):
        """batched_inputs: detectron2 dicts with "image" [C, H, W]; returns model's outputs."""
        return self.model([{**x, "image": x["image"].flip(0)} for x in batched_inputs])


class TeacherEvalHook(HookBase):
    """Evaluate `teacher` once before training (all workers: evaluation is distributed).

    Args:
        teacher: the frozen teacher detector.
        eval_function: callable(model) -> nested dict of metrics (e.g. DefaultTrainer.test).
        output_dir: where teacher_metrics.json is written (main process only).
    On resume (start_iter > 0) an existing teacher_metrics.json is reused instead of re-evaluating.
    """

    def __init__(self, teacher, eval_function, output_dir: str):
        self._teacher = teacher
        self._func = eval_function
        self._path = os.path.join(output_dir, TEACHER_METRICS_FILE)
        self.results = None

    def before_train(self):
        if self.trainer.start_iter > 0 and os.path.isfile(self._path):
            with open(self._path) as f:
                self.results = json.load(f)
            logger.info("Teacher metrics (from %s): %s", self._path, self.results)
        else:
            logger.info("Evaluating the teacher before training ...")
            self.results = flatten_results_dict(self._func(self._teacher) or {})
            if comm.is_main_process():
                with atomic_write(self._path, "w") as f:  # read back on resume: never half
                    json.dump(self.results, f, indent=2)
            comm.synchronize()
        if self.results:
            scalars = {f"teacher/{k}": float(v) for k, v in self.results.items()}
            self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)

    def after_train(self):
        student = flatten_results_dict(getattr(self.trainer, "last_eval_results", None) or {})
        if not self.results or not comm.is_main_process():
            return
        rows = [[k, self.results[k], student.get(k, float("nan"))] for k in sorted(self.results)]
        table = tabulate(rows, headers=["metric", "teacher", "student"], floatfmt=".2f")
        logger.info("Teacher vs student (final evaluation):\n%s", table)
