"""The detection trainer: nst_det's ReliableTrainer, evaluated as each test set asks."""

import logging
import os

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.engine import hooks
from detectron2.utils import comm

from ..data.coco_checked import check_coco_evaluable
from ..data.from_config import configured_classes
from ..data.voc_checked import check_voc_evaluable
from ..evaluation.by_dataset import build_dataset_evaluator, default_best_metric, evaluator_type
from ..modeling.teacher import build_teacher_cfg, is_lazy_config, resolve_teacher_config
from ..utils.dist import unwrap_ddp
from .best_checkpoint import ResumableBestCheckpointer
from .registry import TRAINER_REGISTRY
from .reliable import ReliableTrainer
from .teacher_eval import ChannelFlipped, TeacherEvalHook

logger = logging.getLogger(__name__)


@TRAINER_REGISTRY.register()
class DetectionTrainer(ReliableTrainer):
    """ReliableTrainer (exact resume/atomic checkpoints/NaN guard), evaluated per test set with
    the metric of its evaluator_type (VOC: AP50, 11-point for 2007; COCO: pycocotools AP).

    Hooks added to ReliableTrainer's (all driven by the config):
      - evaluation every TEST.EVAL_PERIOD iterations and at the end (ReliableTrainer's EvalHook);
      - BestCheckpointer (its best metric kept in the training checkpoints, so a resumed run
        compares with it): `model_best.pth` whenever NST_DET.BEST_METRIC (default AP50 for a VOC
        set, AP for a COCO set) on the first test set improves;
      - TeacherEvalHook, for a model with a `teacher` (DistillationRCNN): the teacher is
        evaluated once before training, logged as `teacher/...` scalars and written to
        OUTPUT_DIR/teacher_metrics.json, and compared with the student at the end
        (MODEL.TEACHER.EVAL_BEFORE_TRAIN False skips it; so does a teacher with another class
        count than the student's, e.g. a zoo model for feature losses, with a warning).
    """


    @classmethod
    def build_train_mapper(cls, cfg):
        return DatasetMapper(cfg, is_train=True)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # the dataset's evaluator_type decides; COCOEvaluator writes its detections json here
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_dataset_evaluator(dataset_name, output_folder)

    def check_teacher_classes(self) -> None:
        """Raise when a teacher whose class logits are distilled (KD, DKD) was trained on a set
        that names its classes otherwise than the training sets (the count is checked when the
        model is built): logit i would be another class on each side. A yacs teacher's
        DATASETS.TRAIN is compared when its class list is known without loading it
        (`configured_classes`: its config registers none of its sets)."""
        distill = getattr(unwrap_ddp(self.model), "distill", None)
        if distill is None or not distill.uses_logits or \
                is_lazy_config(resolve_teacher_config(self.cfg.MODEL.TEACHER.CONFIG_FILE)):
            return
        tcfg = build_teacher_cfg(self.cfg)
        theirs = next(filter(None, (configured_classes(tcfg, n) for n in tcfg.DATASETS.TRAIN)),
                      None)
        mine = MetadataCatalog.get(self.cfg.DATASETS.TRAIN[0]).get("thing_classes") \
            if self.cfg.DATASETS.TRAIN else None
        if theirs and mine and list(theirs) != list(mine):
            raise ValueError(
                f"the teacher's class logits are distilled (KD/DKD) but its training set names "
                f"its classes {list(theirs)}, the student's {list(mine)}: logit i would be "
                "another class on each side. Use a teacher trained on the student's classes in "
                "their order (MODEL.TEACHER.CONFIG_FILE / OPTS)")

    @classmethod
    def check_test_set(cls, cfg, dataset_name: str) -> None:
        """ReliableTrainer's class-list check, and that the evaluation can read every annotation
        of the set: detectron2's VOC evaluation (`check_voc_evaluable`) or pycocotools'
        (`check_coco_evaluable`)."""
        super().check_test_set(cfg, dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        DatasetCatalog.get(dataset_name)  # a generated set (the toy ones) is written on load
        if meta.get("evaluator_type") == "pascal_voc":
            check_voc_evaluable(meta.dirname, meta.split, meta.get("thing_classes", []))
        elif meta.get("evaluator_type") == "coco" and meta.get("json_file"):
            check_coco_evaluable(meta.json_file)

    @staticmethod
    def best_metric(cfg) -> str:
        """The metric BestCheckpointer tracks, as EvalHook flattens it (e.g. "bbox/AP50")."""
        first, chosen = cfg.DATASETS.TEST[0], cfg.NST_DET.BEST_METRIC
        if chosen:  # else BestCheckpointer only warns at each evaluation and saves nothing
            coco = evaluator_type(first) == "coco"
            summary = ("AP", "AP50", "AP75", *(("APs", "APm", "APl") if coco else ()))
            prefix, classes = "AP-" if coco else "AP50-", MetadataCatalog.get(first).get(
                "thing_classes")
            if chosen not in summary and not (chosen.startswith(prefix) and (
                    classes is None or chosen[len(prefix):] in classes)):
                raise ValueError(f"NST_DET.BEST_METRIC {chosen!r} is not reported for {first}: "
                                 f"choose one of {list(summary)} or a per-class "
                                 f"{'AP-' if coco else 'AP50-'}<class>")
        metric = f"bbox/{chosen or default_best_metric(first)}"
        if len(cfg.DATASETS.TEST) > 1:  # ReliableTrainer.test then nests by dataset
            metric = f"{first}/{metric}"
        return metric

    def build_hooks(self):
        self.check_teacher_classes()  # the training sets are loaded: their classes are known
        ret = super().build_hooks()
        if not self.cfg.DATASETS.TEST:
            return ret
        for name in self.cfg.DATASETS.TEST:  # the evaluators EvalHook will build: one that
            self.build_evaluator(self.cfg, name)  # cannot be (an LVIS set) fails before training
        at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)) + 1
        extra = []
        if comm.is_main_process():
            extra.append(ResumableBestCheckpointer(self.cfg.TEST.EVAL_PERIOD, self.checkpointer,
                                                   self.best_metric(self.cfg),
                                                   record_dir=self.cfg.OUTPUT_DIR))
        model = unwrap_ddp(self.model)
        teacher = getattr(model, "teacher", None)
        theirs = getattr(getattr(teacher, "roi_heads", teacher), "num_classes", None)
        if teacher is not None and self.cfg.MODEL.TEACHER.EVAL_BEFORE_TRAIN \
                and theirs not in (None, self.num_classes(self.cfg)[0]):
            # a teacher for feature losses may know other classes (an 80-class zoo model): its
            # ids would be scored as the test set's classes, or end COCO's evaluation
            logger.warning(f"The teacher predicts {theirs} classes, the test sets have "
                           f"{self.num_classes(self.cfg)[0]}: it is not evaluated before training "
                           "(MODEL.TEACHER.EVAL_BEFORE_TRAIN)")
            teacher = None
        if teacher is not None and self.cfg.MODEL.TEACHER.EVAL_BEFORE_TRAIN:
            # the student's test loader gives the student's channel order; a BGR teacher (every
            # model-zoo one, for an RGB student) sees its own
            if getattr(model, "flip_teacher_channels", False):
                teacher = ChannelFlipped(teacher).eval()
            extra.append(
                TeacherEvalHook(teacher, lambda m: self.test(self.cfg, m), self.cfg.OUTPUT_DIR)
            )
        return ret[:at] + extra + ret[at:]
