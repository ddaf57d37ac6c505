"""The detection trainer: detectron2's DefaultTrainer evaluated with the VOC07 metric."""

from detectron2.data import DatasetMapper
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..evaluation import PerClassVOCEvaluator
from .registry import TRAINER_REGISTRY
from .reliable import ReliableTrainerMixin
from .teacher_eval import TeacherEvalHook


@TRAINER_REGISTRY.register()
class DetectionTrainer(ReliableTrainerMixin, DefaultTrainer):
    """DefaultTrainer + exact resume/atomic checkpoints/NaN guard, evaluated with VOC07 AP.

    Hooks added to DefaultTrainer's (all driven by the config):
      - evaluation every TEST.EVAL_PERIOD iterations and at the end (DefaultTrainer's EvalHook);
      - BestCheckpointer: `model_best.pth` whenever AP50 on the first test set improves;
      - TeacherEvalHook, for a model with a `teacher` (DistillationRCNN): the teacher is
        evaluated once before training, logged as `teacher/...` scalars and written to
        OUTPUT_DIR/teacher_metrics.json, and compared with the student at the end
        (MODEL.TEACHER.EVAL_BEFORE_TRAIN False skips it).
    """

    # the metric BestCheckpointer tracks (as flattened by EvalHook), per test set
    BEST_METRIC = "bbox/AP50"

    @classmethod
    def build_train_mapper(cls, cfg):
        return DatasetMapper(cfg, is_train=True)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # the VOC evaluator writes nothing; output_folder is accepted for DefaultTrainer's API
        del output_folder
        return PerClassVOCEvaluator(dataset_name)

    def build_hooks(self):
        ret = super().build_hooks()
        if not self.cfg.DATASETS.TEST:
            return ret
        at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)) + 1
        extra = []
        if comm.is_main_process():
            metric = self.BEST_METRIC
            if len(self.cfg.DATASETS.TEST) > 1:  # DefaultTrainer.test then nests by dataset
                metric = f"{self.cfg.DATASETS.TEST[0]}/{metric}"
            extra.append(
                hooks.BestCheckpointer(self.cfg.TEST.EVAL_PERIOD, self.checkpointer, metric)
            )
        model = self.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        teacher = getattr(model, "teacher", None)
        if teacher is not None and self.cfg.MODEL.TEACHER.EVAL_BEFORE_TRAIN:
            extra.append(
                TeacherEvalHook(teacher, lambda m: self.test(self.cfg, m), self.cfg.OUTPUT_DIR)
            )
        return ret[:at] + extra + ret[at:]
