from .classification_trainer import ClassificationTrainer
from .detection_trainer import DetectionTrainer
from .registry import TRAINER_REGISTRY

__all__ = ["TRAINER_REGISTRY", "ClassificationTrainer", "DetectionTrainer"]
