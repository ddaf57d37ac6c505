"""COCO-format loading that names the file and the entry instead of failing later or silently.

detectron2's `load_coco_json` trusts its input: a json that does not parse is a bare
JSONDecodeError, a missing `categories` a KeyError deep in pycocotools, an annotation whose
`category_id` is not defined a KeyError without the file, and a missing image, a box of
non-positive size or a box outside its image pass unnoticed until they crash or quietly poison
training. `check_coco_json` validates the file first and raises `COCODataError` naming the file,
the entry (image / annotation id) and the fix; `load_coco_checked` then hands the same file to
detectron2's own loader. Category ids need not be contiguous (1, 3, 7 ... is legal COCO):
detectron2 maps them to 0..K-1 and its COCO evaluator maps them back.
"""

from __future__ import annotations

import json
import math
import os

from detectron2.data.datasets import load_coco_json

__all__ = ["COCODataError", "check_coco_evaluable", "check_coco_json", "load_coco_checked"]

# a box may pass the image border by this many pixels (rounding in labelling tools' exports)
BORDER_TOLERANCE = 1.0
_MAX_LISTED = 5


class COCODataError(ValueError):
    """A COCO-format data set that cannot be used as it is."""


def _listed(items) -> str:
    items = list(items)
    more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(str(i) for i in items[:_MAX_LISTED]) + more


def _read_json(json_file: str) -> dict:
    if not os.path.isfile(json_file):
        raise COCODataError(f"annotation file {json_file} does not exist")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise COCODataError(f"{json_file} is not valid JSON (line {e.lineno}, column {e.colno}: "
                            f"{e.msg}). Re-export it from the labelling tool") from None
    except UnicodeDecodeError as e:
        raise COCODataError(f"{json_file} is not UTF-8 text ({e}): not a COCO json?") from None
    if not isinstance(data, dict):
        raise COCODataError(f"{json_file}: the top level is a {type(data).__name__}, not an "
                            "object with 'images', 'annotations' and 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise COCODataError(f"{json_file}: no {missing} list. A COCO detection json has "
                            "'images', 'annotations' and 'categories' (an image without objects "
                            "still needs 'annotations': [])")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise COCODataError(f"{json_file}: '{key}' is a {type(data[key]).__name__}, not a "
                                "list")
    return data


def _is_number(value) -> bool:
    """An int or a finite float (json reads NaN and Infinity; bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _check_categories(json_file: str, categories: list) -> set:
    if not categories:
        raise COCODataError(f"{json_file}: 'categories' is empty; a detection data set needs at "
                            "least one category ({'id': 1, 'name': ...})")
    ids = []
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise COCODataError(f"{json_file}: categories[{i}] = {cat!r} needs 'id' and 'name'")
        ids.append(cat["id"])
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise COCODataError(f"{json_file}: category ids {duplicates} are defined more than once")
    return set(ids)


def _check_images(json_file: str, image_root: str, images: list) -> dict:
    sizes, missing_files = {}, []
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise COCODataError(f"{json_file}: images[{i}] is not an object")
        lacking = [k for k in ("id", "file_name", "width", "height") if k not in img]
        if lacking:
            raise COCODataError(f"{json_file}: images[{i}] (id {img.get('id')!r}) has no "
                                f"{lacking}")
        if img["id"] in sizes:
            raise COCODataError(f"{json_file}: image id {img['id']} is used more than once "
                                f"(again by images[{i}], {img['file_name']})")
        if not all(_is_number(img[k]) and img[k] > 0 for k in ("width", "height")):
            raise COCODataError(f"{json_file}: image id {img['id']} ({img['file_name']}) has size "
                                f"{img['width']}x{img['height']}")
        sizes[img["id"]] = (img["width"], img["height"], img["file_name"])
        if not os.path.isfile(os.path.join(image_root, img["file_name"])):
            missing_files.append(f"{os.path.join(image_root, img['file_name'])} (id {img['id']})")
    if missing_files:
        raise COCODataError(f"{json_file}: {len(missing_files)} of {len(images)} image files are "
                            f"missing under image root {image_root}: {_listed(missing_files)}. "
                            "Check the image root (file_name is relative to it)")
    return sizes


def _check_annotations(json_file: str, annotations: list, sizes: dict, cat_ids: set) -> None:
    seen = set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise COCODataError(f"{json_file}: annotations[{i}] is not an object")
        where = f"{json_file}: annotation id {ann.get('id')!r} (annotations[{i}]"
        lacking = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
        if lacking:
            raise COCODataError(f"{where}) has no {lacking}")
        if ann["id"] in seen:
            raise COCODataError(f"{where}): the id is used more than once")
        seen.add(ann["id"])
        if ann["image_id"] not in sizes:
            raise COCODataError(f"{where}) refers to image id {ann['image_id']}, which 'images' "
                                "does not define")
        width, height, file_name = sizes[ann["image_id"]]
        where += f", image {file_name}"
        if ann["category_id"] not in cat_ids:
            raise COCODataError(f"{where}) has category_id {ann['category_id']}, which "
                                f"'categories' does not define (defined: {sorted(cat_ids)})")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
            raise COCODataError(f"{where}) has bbox {box!r}; COCO boxes are [x, y, width, "
                                "height] finite numbers")
        x, y, w, h = box
        if w <= 0 or h <= 0:
            raise COCODataError(f"{where}) has a box of non-positive size {box} ([x, y, width, "
                                "height]). Fix or remove it")
        if not _is_number(ann.get("area")):
            raise COCODataError(f"{where}) has no numeric 'area'; COCO evaluation needs it (for a "
                                "box, usually its width * height)")
        segm = ann.get("segmentation")
        if isinstance(segm, list) and segm and not any(
                isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segm):
            # detectron2's loader drops the whole annotation, box included, with one summary line
            raise COCODataError(f"{where}) has no polygon of 3 points or more in 'segmentation' "
                                f"({segm!r:.60}): detectron2 would drop the object, box and all. "
                                "Fix the polygon, or give 'segmentation': [] for a box only")
        if ann.get("ignore", 0):  # detectron2's loader stops on it with a bare AssertionError
            raise COCODataError(f"{where}) has 'ignore': {ann['ignore']!r}, which detectron2 does "
                                "not support. Remove the annotation, or mark it 'iscrowd': 1")
        tol = BORDER_TOLERANCE
        if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
            raise COCODataError(f"{where}) has box {box} ([x, y, width, height]), outside the "
                                f"{width}x{height} image. Fix the box (or the image's size)")


def check_coco_json(json_file: str, image_root: str) -> None:
    """Validate a COCO detection json and its image files.

    Raises:
        COCODataError: naming the file, the entry and the problem (see the module docstring).
    """
    data = _read_json(json_file)
    cat_ids = _check_categories(json_file, data["categories"])
    sizes = _check_images(json_file, image_root, data["images"])
    _check_annotations(json_file, data["annotations"], sizes, cat_ids)


def check_coco_evaluable(json_file: str) -> None:
    """Raise COCODataError naming the first annotation that COCO evaluation cannot score: one
    without 'iscrowd' 0 or 1 (pycocotools reads it; detectron2's training loader takes a missing
    one as 0, so only a test set needs it)."""
    for i, ann in enumerate(_read_json(json_file)["annotations"]):
        if isinstance(ann, dict) and ann.get("iscrowd") not in (0, 1):
            raise COCODataError(
                f"{json_file}: annotation id {ann.get('id')!r} (annotations[{i}]) has 'iscrowd' "
                f"{ann.get('iscrowd', 'missing')!r}; COCO evaluation needs 0 (one object) or 1 "
                "(a crowd region) in every annotation of a test set")


def load_coco_checked(json_file: str, image_root: str, dataset_name: str | None = None):
    """`check_coco_json`, then detectron2's `load_coco_json` (same records, same metadata)."""
    check_coco_json(json_file, image_root)
    return load_coco_json(json_file, image_root, dataset_name)
