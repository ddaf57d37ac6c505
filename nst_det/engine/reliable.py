"""What every nst_det trainer adds to DefaultTrainer: exact resume, atomic checkpoints, loud NaN.

Mix it in before DefaultTrainer (`class MyTrainer(ReliableTrainerMixin, DefaultTrainer)`) and
implement `build_train_mapper` (and `build_train_records` when the records are not detection
records). Then:
- the training stream is position-seeded (nst_det.data.resumable): resuming after iteration k
  continues at exactly the batch an uninterrupted run would have used;
- checkpoints also hold the python/numpy/torch RNG states and the data seed;
- checkpoints are written atomically and resume skips corrupt files (ReliableCheckpointer);
- a non-finite loss stops training before its step is applied (nan_guard).
"""

from __future__ import annotations

import logging
import os
import weakref

import torch
from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.engine import hooks
from detectron2.utils import comm

from ..data.resumable import build_resumable_train_loader, skipped_images
from ..utils.rng import capture_rng_state, restore_rng_state
from .checkpointer import ReliableCheckpointer
from .cpu_amp import autocast_training_forward
from .nan_guard import install_nan_guard


def _replace_data_loader(simple_trainer, loader) -> None:
    """Point detectron2's SimpleTrainer at a new loader (v0.6 eager iterator, or upstream lazy)."""
    simple_trainer.data_loader = loader
    if isinstance(getattr(type(simple_trainer), "_data_loader_iter", None), property):
        simple_trainer._data_loader_iter_obj = None  # upstream: re-created on next access
    else:
        simple_trainer._data_loader_iter = iter(loader)


def _skip_log_path(cfg) -> str | None:
    if not cfg.NST_DET.SKIP_BAD_IMAGES:
        return None
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    return os.path.join(cfg.OUTPUT_DIR, f"skipped_images.rank{comm.get_rank()}.txt")


def _report_skipped_images(trainer) -> None:
    """At the end of training, say how many bad images were skipped and where they are listed."""
    path = _skip_log_path(trainer.cfg)
    names = skipped_images(path) if path and os.path.exists(path) else []
    if names:
        logging.getLogger(__name__).warning(
            f"Skipped {len(names)} unreadable training image(s) (NST_DET.SKIP_BAD_IMAGES), "
            f"e.g. {names[0]}; each skip is listed in {path}"
        )


class ReliableTrainerMixin:
    """Exact resume, atomic checkpoints and a NaN guard for DefaultTrainer subclasses.

    Also: SOLVER.AMP.ENABLED on a CPU trains under bfloat16 autocast (see cpu_amp.py) instead of
    stopping at detectron2's CUDA-only AMPTrainer.
    """

    def __init__(self, cfg):
        cpu_amp = cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda")
        d2_cfg = cfg
        if cpu_amp:  # DefaultTrainer would build the AMPTrainer: build a SimpleTrainer instead
            d2_cfg = cfg.clone()
            d2_cfg.defrost()
            d2_cfg.SOLVER.AMP.ENABLED = False
        super().__init__(d2_cfg)
        self.cfg = cfg
        if cpu_amp:
            model = self._trainer.model
            model = model.module if hasattr(model, "module") else model  # inside DDP, if any
            autocast_training_forward(model, "cpu", torch.bfloat16)

    @classmethod
    def build_model(cls, cfg):
        """DefaultTrainer's model, in channels_last layout when NST_DET.CHANNELS_LAST is set."""
        model = super().build_model(cfg)
        if cfg.NST_DET.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)  # DistillationRCNN moves its teacher too
        return model

    @classmethod
    def build_train_mapper(cls, cfg):
        """record -> model input for training (e.g. detectron2's DatasetMapper(cfg, True))."""
        raise NotImplementedError

    @classmethod
    def build_train_records(cls, cfg) -> list:
        """The training records; detection records by default (class count checked)."""
        for name in cfg.DATASETS.TRAIN:
            classes = MetadataCatalog.get(name).get("thing_classes")
            if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
                raise ValueError(
                    f"MODEL.ROI_HEADS.NUM_CLASSES={cfg.MODEL.ROI_HEADS.NUM_CLASSES} but data set "
                    f"{name} has {len(classes)} classes {classes}: set NUM_CLASSES to match"
                )
        return get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )

    @classmethod
    def build_train_loader(cls, cfg, seed=None, start_iter: int = 0):
        """The position-seeded training stream, starting at iteration `start_iter`."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise ValueError(
                f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN} is not supported: "
                "nst_det's resumable stream samples uniformly (TrainingSampler)"
            )
        if seed is None:
            seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        loader = build_resumable_train_loader(
            cls.build_train_records(cfg), cls.build_train_mapper(cfg), cfg.SOLVER.IMS_PER_BATCH,
            seed=seed, start_iter=start_iter, num_workers=cfg.DATALOADER.NUM_WORKERS,
            skip_bad=cfg.NST_DET.SKIP_BAD_IMAGES, skip_log=_skip_log_path(cfg),
        )
        loader.nst_data_seed = seed  # remembered in checkpoints so resume replays the same stream
        return loader

    def build_hooks(self):
        # DefaultTrainer made a plain DetectionCheckpointer just before calling build_hooks
        weights_only = ["model_best"]
        if self.cfg.NST_DET.FINAL_CHECKPOINT_WEIGHTS_ONLY:
            weights_only.append("model_final")
        self.checkpointer = ReliableCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, weights_only=weights_only,
            trainer=weakref.proxy(self),
        )
        self._nan_guard = install_nan_guard(self._trainer.model)
        return [*super().build_hooks(), hooks.CallbackHook(after_train=_report_skipped_images)]

    def state_dict(self):
        state = super().state_dict()
        state["rng"] = capture_rng_state()
        state["data_seed"] = self._trainer.data_loader.nst_data_seed
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self._resumed_rng = state_dict.pop("rng", None)
        self._resumed_data_seed = state_dict.pop("data_seed", None)
        super().load_state_dict(state_dict)

    def resume_or_load(self, resume: bool = True):
        self._resumed_rng = self._resumed_data_seed = None
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            seed = self._resumed_data_seed
            if seed is None:
                seed = self._trainer.data_loader.nst_data_seed
            loader = self.build_train_loader(self.cfg, seed=seed, start_iter=self.start_iter)
            _replace_data_loader(self._trainer, loader)
        if self._resumed_rng is not None:
            # last, so that nothing above (e.g. starting loader workers) consumes the restored RNG
            restore_rng_state(self._resumed_rng)
