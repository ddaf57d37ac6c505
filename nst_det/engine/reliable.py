"""nst_det's trainer base: detectron2's training loop plus exact resume, atomic checkpoints, a
NaN guard, CPU autocast and channels_last, built from detectron2's public API only.

Subclass `ReliableTrainer` as one would subclass DefaultTrainer (the same classmethods:
build_model, build_optimizer, build_lr_scheduler, build_test_loader, build_evaluator, test, and
build_hooks), and implement `build_train_mapper` (and `build_train_records` when the records are
not detection records). Then:
- the training stream is position-seeded (nst_det.data.resumable): resuming after iteration k
  continues at exactly the batch an uninterrupted run would have used;
- checkpoints also hold the optimizer, the LR scheduler, the python/numpy/torch RNG states (of
  every rank, rank_rng.py) and the data seed;
- checkpoints are written atomically and resume skips corrupt files (ReliableCheckpointer);
- a non-finite loss stops training before its step is applied (nan_guard);
- several CPU processes (gloo) train with DDP as GPUs do (nst_det.utils.dist.build_ddp_model);
- SOLVER.AMP.ENABLED on a CPU trains under bfloat16 autocast (cpu_amp.py) instead of stopping at
  detectron2's CUDA-only AMPTrainer.

Why not a DefaultTrainer subclass: DefaultTrainer's constructor builds the model, the DDP wrapper
(with `device_ids` even for a CPU model), the step trainer and a plain checkpointer in one fixed
sequence, and its methods reach into its private `_trainer`. Each change above would depend on
that sequence or on private attributes that differ between detectron2 v0.6 and upstream main.
Here those pieces are built in this class from public detectron2 classes (TrainerBase,
SimpleTrainer/AMPTrainer, the hooks, a DetectionCheckpointer subclass).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    default_writers,
    hooks,
)
from detectron2.evaluation import (
    DatasetEvaluator,
    inference_on_dataset,
    print_csv_format,
    verify_results,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules

from ..data.class_lists import check_class_lists
from ..data.record_check import load_train_records
from ..data.resumable import build_resumable_train_loader, skipped_images
from ..utils.dist import broadcast_buffers, build_ddp_model
from ..utils.rng import capture_rng_state, restore_rng_state
from .checkpointer import ReliableCheckpointer
from .cpu_amp import TrainingAutocast
from .eval_hook import TrainingEvalHook
from .final_checkpoint import FinalCheckpoint
from .nan_guard import install_nan_guard
from .precise_bn import ResumablePreciseBN
from .rank_rng import GatherRngStates

logger = logging.getLogger(__name__)


def _skip_log_path(cfg, rank: int | None = None) -> str | None:
    if not cfg.NST_DET.SKIP_BAD_IMAGES:
        return None
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    rank = comm.get_rank() if rank is None else rank
    return os.path.join(cfg.OUTPUT_DIR, f"skipped_images.rank{rank}.txt")


def _report_skipped_images(trainer) -> None:
    """At the end of training, say how many bad images were skipped and where they are listed:
    after a finished run of several processes, rank 0 (the log and console one reads) says it
    for every rank, from their lists in OUTPUT_DIR (an image met by two ranks counted once);
    after a failure, each rank for its own."""
    path = _skip_log_path(trainer.cfg)
    if not path:
        return
    files = [path]
    if comm.get_world_size() > 1 and trainer.iter >= trainer.max_iter:
        if not comm.is_main_process():
            return
        files = [_skip_log_path(trainer.cfg, rank) for rank in range(comm.get_world_size())]
    files = [f for f in files if os.path.exists(f)]
    images = {name for f in files for name in skipped_images(f)}
    if images:
        logger.warning(
            f"Skipped {len(images)} unreadable training images (NST_DET.SKIP_BAD_IMAGES), each "
            f"met once per epoch and per loading worker: they are listed in {', '.join(files)}"
        )


class ReliableTrainer(TrainerBase):
    """detectron2's training loop with exact resume, atomic checkpoints and a NaN guard.

    Attributes (as DefaultTrainer's): cfg, model, optimizer, data_loader, scheduler,
    checkpointer (ReliableCheckpointer), start_iter, max_iter; plus step_trainer (the
    SimpleTrainer/AMPTrainer that runs one iteration), nan_guard (the hook's handle) and
    last_eval_results (the latest `test` results, None before the first evaluation).
    """

    def __init__(self, cfg):
        super().__init__()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()  # detectron2's progress logs even when default_setup was not called
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        self.cfg = cfg
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # the training sets are loaded now: their class lists and the test sets' are checked
        # before training, not at its first evaluation (nst_det.data.class_lists)
        check_class_lists(cfg.DATASETS.TRAIN, [], *self.num_classes(cfg))
        if len(set(cfg.DATASETS.TEST)) < len(cfg.DATASETS.TEST):  # results are keyed by name
            raise ValueError(f"DATASETS.TEST {list(cfg.DATASETS.TEST)} names a set twice")
        for name in cfg.DATASETS.TEST:
            self.check_test_set(cfg, name)
        self.nan_guard = install_nan_guard(model, cfg.OUTPUT_DIR)  # names its checkpoint
        model = build_ddp_model(model)
        self.step_trainer = self.build_step_trainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        weights_only = ["model_best"]
        if cfg.NST_DET.FINAL_CHECKPOINT_WEIGHTS_ONLY:
            weights_only.append("model_final")
        self.checkpointer = ReliableCheckpointer(
            model, cfg.OUTPUT_DIR, weights_only=weights_only, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.last_eval_results = None
        self._resumed_rng = self._resumed_data_seed = None
        self.register_hooks(self.build_hooks())

    # the objects the step trainer works with, under DefaultTrainer's names (hooks read them)
    @property
    def model(self):
        """The model (DDP-wrapped when several processes train), without CPU AMP's wrapper."""
        model = self.step_trainer.model
        return model.module if isinstance(model, TrainingAutocast) else model

    @property
    def optimizer(self):
        return self.step_trainer.optimizer

    @property
    def data_loader(self):
        return self.step_trainer.data_loader

    def build_step_trainer(self, model, data_loader, optimizer):
        """The trainer of one iteration: detectron2's AMPTrainer for AMP on a GPU, else its
        SimpleTrainer; with AMP on a CPU that SimpleTrainer calls the model under bfloat16
        autocast (cpu_amp.TrainingAutocast), so backward and the optimizer step stay outside."""
        if not self.cfg.SOLVER.AMP.ENABLED:
            return SimpleTrainer(model, data_loader, optimizer)
        if self.cfg.MODEL.DEVICE.startswith("cuda"):
            return AMPTrainer(model, data_loader, optimizer)
        return SimpleTrainer(TrainingAutocast(model, "cpu", torch.bfloat16), data_loader,
                             optimizer)

    @classmethod
    def build_model(cls, cfg):
        """detectron2's model of cfg, in channels_last layout when NST_DET.CHANNELS_LAST is set."""
        model = DefaultTrainer.build_model(cfg)
        if cfg.NST_DET.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)  # DistillationRCNN moves its teacher too
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's optimizer for cfg (SGD with its per-parameter groups and clipping)."""
        return DefaultTrainer.build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """detectron2's LR schedule for cfg (warm-up, then steps or cosine)."""
        return DefaultTrainer.build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's detection test loader."""
        return DefaultTrainer.build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The evaluator of test set `dataset_name`; subclasses define it."""
        raise NotImplementedError

    @classmethod
    def num_classes(cls, cfg) -> tuple[int, str]:
        """(the model's number of classes, its config key): a detector's by default."""
        if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE:
            return cfg.MODEL.RETINANET.NUM_CLASSES, "MODEL.RETINANET.NUM_CLASSES"
        return cfg.MODEL.ROI_HEADS.NUM_CLASSES, "MODEL.ROI_HEADS.NUM_CLASSES"

    @classmethod
    def check_test_set(cls, cfg, dataset_name: str) -> None:
        """Raise a named error if evaluating a model of cfg on `dataset_name` would fail or be
        silently wrong: here, a class list unlike the model's or the training sets'."""
        check_class_lists(cfg.DATASETS.TRAIN, [dataset_name], *cls.num_classes(cfg))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate `model` on every set of cfg.DATASETS.TEST.

        Args:
            evaluators: one DatasetEvaluator per test set (one alone for one set), or None for
                `build_evaluator`'s.
        Returns:
            the results dict of the only test set, or {set name: results} for several (the
            shape DefaultTrainer.test returns, which EvalHook and BestCheckpointer expect).
        """
        names = list(cfg.DATASETS.TEST)
        if isinstance(evaluators, DatasetEvaluator):  # as DefaultTrainer.test accepts it
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(names):
            raise ValueError(f"{len(evaluators)} evaluators for {len(names)} test sets {names}")
        # an evaluation draws from the global RNGs (a test loader's base seed): training goes on
        # from the states before it, so a resumed run, which does not repeat the evaluation after
        # its checkpoint, draws as an uninterrupted one
        rng = capture_rng_state()
        try:
            return cls._test(cfg, model, names, evaluators)
        finally:
            restore_rng_state(rng)

    @classmethod
    def _test(cls, cfg, model, names, evaluators):
        results = OrderedDict()
        for i, name in enumerate(names):
            loader = cls.build_test_loader(cfg, name)  # (loads the set: its classes are known)
            cls.check_test_set(cfg, name)
            evaluator = evaluators[i] if evaluators is not None else cls.build_evaluator(cfg, name)
            results[name] = inference_on_dataset(model, loader, evaluator)
            if comm.is_main_process():
                logger.info(f"Evaluation results for {name} in csv format:")
                print_csv_format(results[name])
        return next(iter(results.values())) if len(results) == 1 else results

    def build_writers(self):
        """detectron2's default writers (console, metrics.json, TensorBoard)."""
        return default_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    def build_hooks(self):
        """Timing, LR schedule, PreciseBN (if enabled), checkpoints, evaluation, writers."""
        cfg = self.cfg
        ret = [hooks.IterationTimer(), hooks.LRScheduler(self.optimizer, self.scheduler)]
        if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model):
            bn_cfg = cfg.clone()
            bn_cfg.defrost()
            bn_cfg.DATALOADER.NUM_WORKERS = 0  # a second loader must not cost worker processes
            # the step trainer's model: BN statistics under the autocast training uses; the
            # stream's seed read when used (a resume may restore another)
            records = self.build_train_records(bn_cfg)  # loaded and checked once
            ret.append(ResumablePreciseBN(
                cfg.TEST.EVAL_PERIOD, self.step_trainer.model,
                lambda start: self.build_train_loader(bn_cfg, self.data_loader.nst_data_seed,
                                                      start, records),
                cfg.TEST.PRECISE_BN.NUM_ITER))
        # every rank's RNG state for the checkpoint, gathered just before it is written
        self._rank_rng = GatherRngStates(cfg.SOLVER.CHECKPOINT_PERIOD)
        ret.append(self._rank_rng)
        # checkpoint before evaluating: a failing evaluation leaves the weights to debug with
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))
            ret.append(FinalCheckpoint(self.checkpointer))  # resumed after the last periodic save
        ret.append(TrainingEvalHook(cfg.TEST.EVAL_PERIOD, self._evaluate))
        if comm.is_main_process():  # last, so that the evaluation's metrics are written
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=20))
        ret.append(hooks.CallbackHook(after_train=_report_skipped_images))
        return ret

    def _evaluate(self):
        # the model saved is rank 0's, BN statistics included; DDP does not broadcast buffers
        # and each rank's differ: the others evaluate their shards with rank 0's
        broadcast_buffers(self.model)
        self.last_eval_results = self.test(self.cfg, self.model)
        return self.last_eval_results

    @classmethod
    def build_train_mapper(cls, cfg):
        """record -> model input for training (e.g. detectron2's DatasetMapper(cfg, True))."""
        raise NotImplementedError

    @classmethod
    def build_train_records(cls, cfg) -> list:
        """The training records; detection records by default, every one checked once (boxes,
        class ids: nst_det.data.record_check) whatever registered their data set."""
        num_classes, key = cls.num_classes(cfg)
        return load_train_records(cfg.DATASETS.TRAIN, num_classes, key,
                                  filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)

    @classmethod
    def build_train_loader(cls, cfg, seed=None, start_iter: int = 0, records=None):
        """The position-seeded training stream, starting at iteration `start_iter`, of `records`
        (default: `build_train_records(cfg)`)."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise ValueError(
                f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN} is not supported: "
                "nst_det's resumable stream samples uniformly (TrainingSampler)"
            )
        if seed is None:
            seed = cfg.NST_DET.DATA_SEED if cfg.NST_DET.DATA_SEED >= 0 else \
                cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        loader = build_resumable_train_loader(
            cls.build_train_records(cfg) if records is None else records,
            cls.build_train_mapper(cfg), cfg.SOLVER.IMS_PER_BATCH,
            seed=seed, start_iter=start_iter, num_workers=cfg.DATALOADER.NUM_WORKERS,
            skip_bad=cfg.NST_DET.SKIP_BAD_IMAGES, skip_log=_skip_log_path(cfg),
        )
        loader.nst_data_seed = seed  # remembered in checkpoints so resume replays the same stream
        return loader

    def run_step(self):
        self.step_trainer.iter = self.iter
        self.step_trainer.run_step()
        self.last_step_done = self.iter  # (TrainingEvalHook: evaluate after a failed hook)

    def train(self):
        """Train from start_iter to max_iter; returns the last evaluation's results (or None),
        checked against cfg.TEST.EXPECTED_RESULTS when that is set."""
        super().train(self.start_iter, self.max_iter)
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            if self.last_eval_results is None:
                raise RuntimeError("TEST.EXPECTED_RESULTS is set but no evaluation ran")
            self.verify_expected(self.cfg, self.last_eval_results)
        return self.last_eval_results

    @staticmethod
    def verify_expected(cfg, results: dict) -> None:
        """detectron2's `verify_results` of cfg.TEST.EXPECTED_RESULTS ([[task, metric, value,
        tolerance], ...]) on the first test set's results (`test` nests several by set name):
        it exits the process with 1 when one is off."""
        if len(cfg.TEST.EXPECTED_RESULTS) == 0:
            return
        if len(cfg.DATASETS.TEST) > 1:
            results = results[cfg.DATASETS.TEST[0]]
        unknown = sorted({e[0] for e in cfg.TEST.EXPECTED_RESULTS} - set(results))
        if unknown:
            raise ValueError(f"TEST.EXPECTED_RESULTS names tasks {unknown}; the evaluation of "
                             f"{cfg.DATASETS.TEST[0]} reports {sorted(results)}")
        verify_results(cfg, results)

    def state_dict(self):
        state = super().state_dict()  # iteration and the hooks' states
        # the step trainer's state (optimizer, AMP grad scaler) under the key DefaultTrainer
        # uses, so checkpoints stay interchangeable with DefaultTrainer's
        state["_trainer"] = self.step_trainer.state_dict()
        # also kept by the LRScheduler hook, but only for some scheduler classes in v0.6
        state["scheduler"] = self.scheduler.state_dict()
        state["rng"] = capture_rng_state()  # rank 0's (a checkpoint of one process has only it)
        per_rank = getattr(self, "_rank_rng", None)
        per_rank = per_rank.states_at(self.iter) if per_rank else None
        if per_rank is not None:
            state["rng_per_rank"] = per_rank
        state["data_seed"] = self.data_loader.nst_data_seed
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        self._resumed_rng = state.pop("rng", None)
        per_rank = state.pop("rng_per_rank", None)
        if per_rank is not None and len(per_rank) == comm.get_world_size():
            self._resumed_rng = per_rank[comm.get_rank()]  # this rank's own stream
        elif comm.get_world_size() > 1:
            logger.warning("the checkpoint holds no RNG state per rank of %d processes: every "
                           "rank resumes with rank 0's, so the run differs from an "
                           "uninterrupted one", comm.get_world_size())
        self._resumed_data_seed = state.pop("data_seed", None)
        super().load_state_dict(state)
        self.step_trainer.load_state_dict(state["_trainer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])

    def resume_or_load(self, resume: bool = True):
        """Resume from the newest readable checkpoint in OUTPUT_DIR (`resume`, and one exists),
        else initialise the model from cfg.MODEL.WEIGHTS and start at iteration 0."""
        self._resumed_rng = self._resumed_data_seed = None
        extra = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        # the checkpoint holds the iteration that had finished; a weights-only one (model_final
        # under NST_DET.FINAL_CHECKPOINT_WEIGHTS_ONLY) has no trainer state, only `iteration`
        self.start_iter = int(extra.get("iteration", self.iter)) + 1 \
            if self.checkpointer.resumed_from else 0
        skip_log = _skip_log_path(self.cfg)
        if self.start_iter == 0 and skip_log and os.path.exists(skip_log):
            os.remove(skip_log)  # an earlier run's, in this OUTPUT_DIR: this one starts afresh
        if self.start_iter > self.max_iter:  # (== max_iter: killed between its last two saves)
            raise ValueError(
                f"{self.checkpointer.resumed_from} ended iteration {self.start_iter - 1}, past "
                f"SOLVER.MAX_ITER {self.max_iter}: raise SOLVER.MAX_ITER to train on, or use "
                "another OUTPUT_DIR to train afresh")
        if self.start_iter > 0:
            seed = self._resumed_data_seed
            if seed is None:
                seed = self.data_loader.nst_data_seed
            loader = self.build_train_loader(self.cfg, seed=seed, start_iter=self.start_iter)
            # a step trainer on the stream positioned at start_iter, same model and optimizer
            step_state = self.step_trainer.state_dict()
            self.step_trainer = self.build_step_trainer(self.model, loader, self.optimizer)
            self.step_trainer.load_state_dict(step_state)
        if self._resumed_rng is not None:
            # last, so that nothing above (e.g. starting loader workers) consumes the restored RNG
            restore_rng_state(self._resumed_rng)
