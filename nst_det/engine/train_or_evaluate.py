"""The one way a config is trained or evaluated: what tools/train_net.py and pipeline stages run."""

from __future__ import annotations

import logging

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.remote import resolve_weights
from ..checkpoint.weights_file import check_weights_file
from ..config import load_config
from .checkpointer import ReliableCheckpointer
from .registry import TRAINER_REGISTRY


def config_of(args):
    """The config of detectron2's command-line `args` (config_file, opts; nst_det's
    coco_dataset / voc_dataset when present, appended to DATASETS.COCO / VOC), not frozen."""
    return load_config(args.config_file, args.opts, more_datasets={
        "COCO": getattr(args, "coco_dataset", None) or [],
        "VOC": getattr(args, "voc_dataset", None) or []})


def setup(args):
    """The frozen config of detectron2's command-line `args` (config_file, opts; nst_det's
    coco_dataset / voc_dataset when present), set up by detectron2's `default_setup`: logs to
    OUTPUT_DIR/log.txt (log.txt.rank<N> on other ranks), config.yaml written, the seed set."""
    cfg = config_of(args)
    cfg.freeze()
    default_setup(cfg, args)
    # nst_det's own INFO logs (teacher loading and evaluation, ...) next to detectron2's
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="nst_det")
    return cfg


def main(args, hooks=()) -> dict:
    """tools/train_net.py's main, and a pipeline stage's: `setup(args)`, then train (resuming
    with `args.resume`) or, with `args.eval_only`, evaluate `MODEL.WEIGHTS`."""
    return train_or_evaluate(setup(args), eval_only=args.eval_only, resume=args.resume,
                             hooks=hooks)


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
        # as training reads checkpoints (past corrupt ones on resume), and strictly: weights
        # that do not fill the model are an error, not a half-random model scored
        ReliableCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            weights, resume=resume, whole_model=True)
        results = trainer_cls.test(cfg, model) or {}
        if comm.is_main_process():  # as detectron2's train_net --eval-only
            trainer_cls.verify_expected(cfg, results)
        return results
    trainer = trainer_cls(cfg)
    trainer.register_hooks(list(hooks))
    trainer.resume_or_load(resume=resume)
    return trainer.train() or {}
