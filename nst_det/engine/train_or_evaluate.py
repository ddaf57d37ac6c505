"""The one way a config is trained or evaluated: what tools/train_net.py and pipeline stages run."""

from __future__ import annotations

import logging

from detectron2.checkpoint import DetectionCheckpointer

from ..checkpoint.remote import resolve_weights
from ..checkpoint.weights_file import check_weights_file
from .registry import TRAINER_REGISTRY


def train_or_evaluate(cfg, *, eval_only: bool = False, resume: bool = False,
                      hooks=()) -> dict:
    """Train the frozen `cfg` with its `NST_DET.TRAINER` (returns the last evaluation's results),
    or, `eval_only`, evaluate the model with `MODEL.WEIGHTS` loaded (detectron2's --eval-only).

    resume: training continues from OUTPUT_DIR's last checkpoint (`--resume`); evaluation then
        loads that checkpoint instead of MODEL.WEIGHTS. hooks: extra trainer hooks.
    An empty MODEL.WEIGHTS evaluates the model as its config builds it (a classifier's
    MODEL.CLASSIFIER.WEIGHTS, for instance). Returns {} when nothing was evaluated.
    """
    trainer_cls = TRAINER_REGISTRY.get(cfg.NST_DET.TRAINER)
    if eval_only:
        weights = resolve_weights(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
        if weights and not resume:  # one clear error for a missing, truncated or wrong file
            check_weights_file(weights, "MODEL.WEIGHTS", allow_pickle=weights.endswith(".pkl"))
        if not weights:
            logging.getLogger(__name__).info(
                "MODEL.WEIGHTS is empty: evaluating the model as its config builds it")
        model = trainer_cls.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(weights,
                                                                             resume=resume)
        return trainer_cls.test(cfg, model) or {}
    trainer = trainer_cls(cfg)
    trainer.register_hooks(list(hooks))
    trainer.resume_or_load(resume=resume)
    return trainer.train() or {}
