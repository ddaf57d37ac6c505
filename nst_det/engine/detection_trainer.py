"""The detection trainer: detectron2's DefaultTrainer evaluated with the VOC07 metric."""

from detectron2.engine import DefaultTrainer
from detectron2.evaluation import PascalVOCDetectionEvaluator

from .registry import TRAINER_REGISTRY


@TRAINER_REGISTRY.register()
class DetectionTrainer(DefaultTrainer):
    """DefaultTrainer whose evaluator is PascalVOCDetectionEvaluator (AP, AP50, AP75)."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # the VOC evaluator writes nothing; output_folder is accepted for DefaultTrainer's API
        del output_folder
        return PascalVOCDetectionEvaluator(dataset_name)

