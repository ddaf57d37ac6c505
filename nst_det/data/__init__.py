from . import datasets, imagefolder  # noqa: F401  (register the toy VOC, ImageFolder sets)
from .toy_data import make_toy_imagefolder, make_toy_voc
from .toy_world import TOY_CLASSES

__all__ = ["TOY_CLASSES", "make_toy_imagefolder", "make_toy_voc"]
