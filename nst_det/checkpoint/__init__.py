"""Checkpoint conversion: classification students -> detectron2 backbone weights."""

from .convert import convert_student, detect_family, save_d2_weights

__all__ = ["convert_student", "detect_family", "save_d2_weights"]
