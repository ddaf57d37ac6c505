"""One class list per model: every set a model trains or is evaluated on names its classes alike.

Each data set numbers its own classes 0..K-1: a COCO json its categories in id order, a VOC set
its listed (or found) names, an ImageFolder its sorted class folders. A test set that lists one
class fewer, or the same classes in another order, gives the model's class i another meaning:
nothing fails, and the metrics are silently wrong (a "dog" prediction scored as a "horse"). The
trainers call `check_class_lists` before training and before each evaluation.
"""

from __future__ import annotations

from detectron2.data import MetadataCatalog

from .from_config import thing_classes

__all__ = ["ClassListError", "check_class_lists"]


class ClassListError(ValueError):
    """Data sets whose class lists disagree with each other or with the model."""


def check_class_lists(train, test, num_classes: int, classes_key: str) -> None:
    """Raise ClassListError unless every set of `train` and `test` whose class list is known
    has `num_classes` classes, all sets in the same order.

    Args:
        train: training set names, checked when their class lists are known (a COCO or
            ImageFolder set learns its list when it is loaded; training loads it first).
        test: test set names; a set that learns its list when loaded is loaded here.
        num_classes: the model's number of classes; `classes_key` is its config key.
    """
    lists = {name: list(MetadataCatalog.get(name).get("thing_classes", [])) for name in train}
    lists.update({name: thing_classes(name) for name in test if name not in lists})
    lists = {name: classes for name, classes in lists.items() if classes}
    for name, classes in lists.items():
        if len(classes) != num_classes:
            raise ClassListError(
                f"{classes_key}={num_classes} but data set {name} has {len(classes)} classes "
                f"{classes}: set {classes_key} to match, or fix the data set's class list")
    if lists:
        first, classes = next(iter(lists.items()))
        for name, other in lists.items():
            if other != classes:
                raise ClassListError(
                    f"data sets {first} and {name} number their classes differently: {classes} "
                    f"vs {other}. A model's class i must be the same class in every training "
                    "and test set: give both the same class list in the same order (a COCO "
                    "json: the same 'categories'; a VOC set: the same classes in its "
                    "DATASETS.VOC entry; an ImageFolder: the same class folders)")
