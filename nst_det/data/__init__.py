from . import datasets  # noqa: F401  (registers the built-in toy datasets)
from .toy_data import make_toy_imagefolder, make_toy_voc
from .toy_world import TOY_CLASSES

__all__ = ["TOY_CLASSES", "make_toy_imagefolder", "make_toy_voc"]
