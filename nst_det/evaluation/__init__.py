"""Evaluators in detectron2's DatasetEvaluator form."""

from .classification_evaluator import ClassificationEvaluator
from .voc_per_class import PerClassVOCEvaluator

__all__ = ["ClassificationEvaluator", "PerClassVOCEvaluator"]
