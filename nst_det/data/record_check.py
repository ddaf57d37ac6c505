"""One check of the training records, however their data set was registered.

nst_det's own loaders (voc_checked, coco_checked) validate their files, but a set registered
with detectron2's `register_pascal_voc` or `register_coco_instances`, or any function of the
user's, reaches training unchecked: an unknown VOC class ends on a bare `ValueError: 'x' is not
in list`, an inverted box trains silently. `load_train_records` loads the sets with detectron2's
`get_detection_dataset_dicts` and checks every record once: boxes of positive size inside their
image (1 px tolerance, as coco_checked), class ids within the model's number of classes. A set
with VOC metadata (dirname, split, thing_classes) whose loader fails is re-read with
`load_voc_checked`, whose error names the file and the fix.
"""

from __future__ import annotations

import numbers

from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.structures import BoxMode

from .coco_checked import BORDER_TOLERANCE
from .voc_checked import VOCDataError, load_voc_checked

__all__ = ["DetectionDataError", "check_detection_records", "load_train_records"]


class DetectionDataError(ValueError):
    """Training records that cannot be trained on as they are."""


def _explain_with_checked_loader(name: str) -> None:
    """Raise load_voc_checked's named error for a VOC-layout set, if it finds one."""
    meta = MetadataCatalog.get(name)
    if all(meta.get(k) is not None for k in ("dirname", "split", "thing_classes")):
        load_voc_checked(meta.dirname, meta.split, meta.thing_classes)


def check_detection_records(records: list, num_classes: int, classes_key: str) -> None:
    """Raise DetectionDataError naming the image and the box of the first bad annotation.

    Args:
        records: detectron2 dataset dicts (file_name, height, width, annotations with bbox,
            bbox_mode, category_id).
        num_classes: the model's number of classes; `classes_key` is its config key.
    """
    tol = BORDER_TOLERANCE
    for record in records:
        where = record.get("file_name", record.get("image_id", "?"))
        height, width = record.get("height"), record.get("width")
        for ann in record.get("annotations", []):
            cat = ann.get("category_id")
            # (numpy integers too, which detectron2 takes: a pandas-made loader gives them)
            if not isinstance(cat, numbers.Integral) or isinstance(cat, bool) \
                    or not 0 <= cat < num_classes:
                raise DetectionDataError(
                    f"{where}: an object has category_id {cat!r}, outside 0..{num_classes - 1} "
                    f"({classes_key}={num_classes}). Set {classes_key} to the data set's class "
                    "count, or fix the data set's class ids")
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"],
                                             BoxMode.XYXY_ABS)
            if not (x1 > x0 and y1 > y0):
                raise DetectionDataError(
                    f"{where}: box {[x0, y0, x1, y1]} (x0, y0, x1, y1) of class {cat} is inverted "
                    "or has zero area. Fix or remove the annotation")
            if height and width and (x0 < -tol or y0 < -tol or x1 > width + tol
                                     or y1 > height + tol):
                raise DetectionDataError(
                    f"{where}: box {[x0, y0, x1, y1]} (x0, y0, x1, y1) of class {cat} lies "
                    f"outside the {width}x{height} image. Fix the box (or the image's size)")


def load_train_records(names, num_classes: int, classes_key: str, filter_empty: bool) -> list:
    """`get_detection_dataset_dicts(names)`, with named errors and every record checked."""
    names = list(names)
    try:
        records = get_detection_dataset_dicts(names, filter_empty=filter_empty)
    except VOCDataError:
        raise
    # detectron2's VOC loader on an unknown class (ValueError), malformed XML (ParseError, a
    # SyntaxError), no <size> or no <bndbox> (IndexError, AttributeError)
    except (ValueError, SyntaxError, IndexError, AttributeError) as e:
        for name in names:
            _explain_with_checked_loader(name)
        raise DetectionDataError(f"loading the training sets {names} failed: "
                                 f"{type(e).__name__}: {e}") from e
    try:
        check_detection_records(records, num_classes, classes_key)
    except DetectionDataError as e:
        raise DetectionDataError(f"training set(s) {names}: {e}") from None
    return records
