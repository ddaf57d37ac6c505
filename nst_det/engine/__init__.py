from .classification_trainer import ClassificationTrainer
from .detection_trainer import DetectionTrainer
from .registry import TRAINER_REGISTRY
from .reliable import ReliableTrainer

__all__ = ["TRAINER_REGISTRY", "ClassificationTrainer", "DetectionTrainer", "ReliableTrainer"]
