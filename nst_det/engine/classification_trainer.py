"""The classification trainer: ReliableTrainer on ImageFolder data, evaluated by top-k accuracy."""

from __future__ import annotations

import torch
from detectron2.data import (
    DatasetFromList,
    MapDataset,
    get_detection_dataset_dicts,
)
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping

from ..data.classification_mapper import ClassificationDatasetMapper
from ..evaluation import ClassificationEvaluator
from .registry import TRAINER_REGISTRY
from .reliable import ReliableTrainer

__all__ = ["ClassificationTrainer"]


def _dataset_dicts(cfg, names) -> list[dict]:
    """The dicts of `names`, checked against cfg.MODEL.CLASSIFIER.NUM_CLASSES."""
    dicts = get_detection_dataset_dicts(names, filter_empty=False)
    unlabelled = next((d for d in dicts if "label" not in d), None)
    if unlabelled is not None:  # e.g. a detection set
        raise ValueError(f"{list(names)}: record {unlabelled.get('file_name')!r} has no 'label': "
                         "a classifier trains and is evaluated on image-level labels, an "
                         "ImageFolder set (imagenet_*, toy_cls_*, or one registered with "
                         "nst_det.data.imagefolder.register_imagefolder)")
    top = max(d["label"] for d in dicts)
    if top >= cfg.MODEL.CLASSIFIER.NUM_CLASSES:
        raise ValueError(f"{names} has label {top} but MODEL.CLASSIFIER.NUM_CLASSES is "
                         f"{cfg.MODEL.CLASSIFIER.NUM_CLASSES}")
    return dicts


@TRAINER_REGISTRY.register()
class ClassificationTrainer(ReliableTrainer):
    """ReliableTrainer for `ClassificationDistiller`: ImageFolder loaders, top-k evaluation, and
    ReliableTrainer's exact resume, atomic checkpoints and NaN guard.

    Training batches are cfg.SOLVER.IMS_PER_BATCH images (over all processes) of
    cfg.INPUT.CLS.TRAIN_CROP_SIZE; test batches cfg.TEST.CLS.IMS_PER_BATCH per process. The
    optimizer is detectron2's SGD or AdamW (cfg.SOLVER.CLS.OPTIMIZER).
    """

    @classmethod
    def build_optimizer(cls, cfg, model):
        if cfg.SOLVER.CLS.OPTIMIZER == "SGD":
            return super().build_optimizer(cfg, model)
        if cfg.SOLVER.CLS.OPTIMIZER != "AdamW":
            raise ValueError(f"SOLVER.CLS.OPTIMIZER must be 'SGD' or 'AdamW'; "
                             f"got {cfg.SOLVER.CLS.OPTIMIZER!r}")
        params = get_default_optimizer_params(  # detectron2's per-parameter groups, as for SGD
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    @classmethod
    def num_classes(cls, cfg) -> tuple[int, str]:
        return cfg.MODEL.CLASSIFIER.NUM_CLASSES, "MODEL.CLASSIFIER.NUM_CLASSES"

    @classmethod
    def check_test_set(cls, cfg, dataset_name: str) -> None:
        """ReliableTrainer's class-list check, and that the set's records have labels in range
        (before training, not at its first evaluation)."""
        super().check_test_set(cfg, dataset_name)
        _dataset_dicts(cfg, [dataset_name])

    @classmethod
    def build_train_records(cls, cfg):
        return _dataset_dicts(cfg, cfg.DATASETS.TRAIN)

    @classmethod
    def build_train_mapper(cls, cfg):
        return ClassificationDatasetMapper(cfg, is_train=True)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        dataset = MapDataset(DatasetFromList(_dataset_dicts(cfg, [dataset_name]), copy=False),
                             ClassificationDatasetMapper(cfg, is_train=False))
        batches = torch.utils.data.BatchSampler(
            InferenceSampler(len(dataset)), cfg.TEST.CLS.IMS_PER_BATCH, drop_last=False)
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=cfg.DATALOADER.NUM_WORKERS,
            collate_fn=trivial_batch_collator)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        del output_folder  # nothing is written
        return ClassificationEvaluator(dataset_name, topk=cfg.TEST.CLS.TOPK)
