"""PASCAL VOC loading that names the file and the problem instead of failing later or silently.

detectron2's `load_voc_instances` trusts its input: a malformed XML raises a bare ParseError, an
unknown class a bare ValueError, and a missing image, an inverted box or a box outside the image
pass unnoticed until they crash or quietly poison training. `load_voc_checked` returns the same
records for a valid data set and raises `VOCDataError` naming the file and what to do otherwise.
Images without objects are kept (VOC has none, but they are legal); detectron2 drops them from
training when DATALOADER.FILTER_EMPTY_ANNOTATIONS is on, and logs how many.
"""

from __future__ import annotations

import os
from xml.etree import ElementTree as ET

from detectron2.structures import BoxMode


class VOCDataError(ValueError):
    """A VOC-layout data set that cannot be used as it is."""


def _read_split(dirname: str, split: str) -> list[str]:
    if not os.path.isdir(dirname):
        raise VOCDataError(
            f"data set root {dirname} does not exist. Put the data there (see datasets/README.md)"
            f" or set DETECTRON2_DATASETS (now {os.getenv('DETECTRON2_DATASETS', 'datasets')!r})"
        )
    path = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(path):
        raise VOCDataError(f"split file {path} is missing: the '{split}' split needs it")
    with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark is not part of an id)
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise VOCDataError(f"split file {path} is empty: it should list one image id per line")
    return ids


def _text(node, tag: str, xml_path: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise VOCDataError(f"{xml_path}: <{tag}> is missing in <{node.tag}>")
    return child.text.strip()


def _whole(text: str, tag: str, xml_path: str) -> int:
    """An image size in whole pixels (detectron2's loader reads it with int())."""
    try:
        return int(text)
    except ValueError:
        raise VOCDataError(f"{xml_path}: <{tag}> is {text!r}, not a whole number of pixels. "
                           "Fix the <size> element") from None


def _parse_box(obj, xml_path: str, width: int, height: int) -> list[float]:
    node = obj.find("bndbox")
    if node is None:
        raise VOCDataError(f"{xml_path}: an <object> has no <bndbox>")
    try:
        x0, y0, x1, y1 = (float(_text(node, k, xml_path)) for k in ("xmin", "ymin", "xmax", "ymax"))
    except ValueError as e:
        raise VOCDataError(f"{xml_path}: a box coordinate is not a number ({e})") from None
    if x1 < x0 or y1 < y0:
        raise VOCDataError(f"{xml_path}: inverted box {[x0, y0, x1, y1]} (xmax < xmin or "
                           "ymax < ymin). Fix the annotation")
    # VOC coordinates are 1-based and inclusive (xmin == xmax: one pixel wide); valid range is
    # [1, width] x [1, height]
    if x0 < 0 or y0 < 0 or x1 > width + 1 or y1 > height + 1:
        raise VOCDataError(f"{xml_path}: box {[x0, y0, x1, y1]} lies outside the {width}x{height}"
                           " image. Fix the annotation (or the <size> element)")
    return [x0 - 1.0, y0 - 1.0, x1, y1]  # the same convention as detectron2's loader


def load_voc_checked(dirname: str, split: str, class_names) -> list[dict]:
    """Load a VOC-layout split as detectron2 records, validating every file it reads.

    Returns:
        list of dicts with file_name, image_id, height, width and annotations (category_id,
        bbox in XYXY_ABS, bbox_mode), exactly as `load_voc_instances` would for valid data.
    Raises:
        VOCDataError: naming the file, the problem and the fix.
    """
    class_names = list(class_names)
    records = []
    for file_id in _read_split(dirname, split):
        xml_path = os.path.join(dirname, "Annotations", f"{file_id}.xml")
        image_path = os.path.join(dirname, "JPEGImages", f"{file_id}.jpg")
        if not os.path.isfile(xml_path):
            raise VOCDataError(f"{xml_path} is missing (listed in the '{split}' split)")
        if not os.path.isfile(image_path):
            raise VOCDataError(f"image {image_path} is missing (listed in the '{split}' split)")
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError as e:
            raise VOCDataError(f"{xml_path} is not valid XML ({e}). Fix or regenerate it") from None
        size = tree.find("size")
        if size is None:
            raise VOCDataError(f"{xml_path}: <size> is missing")
        width, height = (_whole(_text(size, k, xml_path), k, xml_path) for k in ("width", "height"))
        annotations = []
        for obj in tree.findall("object"):
            name = _text(obj, "name", xml_path)
            if name not in class_names:
                raise VOCDataError(
                    f"{xml_path}: unknown class '{name}'; the data set's classes are "
                    f"{class_names}. Fix the annotation or register the data set with this class"
                )
            annotations.append({
                "category_id": class_names.index(name),
                "bbox": _parse_box(obj, xml_path, width, height),
                "bbox_mode": BoxMode.XYXY_ABS,
            })
        records.append({"file_name": image_path, "image_id": file_id, "height": height,
                        "width": width, "annotations": annotations})
    return records


def _evaluable_split(dirname: str, split: str) -> list[str]:
    """The split's ids as detectron2's `voc_eval` reads them (`readlines`, each stripped), refused
    when it would read a blank, repeated or space-holding id: it opens "Annotations/.xml" for a
    blank line, counts a repeated image's objects twice (perfect detections then score ~55
    AP50), and splits its detection lines on spaces."""
    _read_split(dirname, split)  # the root and the file exist, and it lists ids
    path = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
        ids = [line.strip() for line in f.readlines()]
    seen = set()
    for number, file_id in enumerate(ids, 1):
        problem = ""
        if not file_id:
            problem = "is blank"
        elif len(file_id.split()) > 1:
            problem = "has a space"
        elif file_id.startswith("\ufeff"):
            problem = "starts with a byte-order mark (the file was saved as UTF-8 with BOM)"
        elif file_id in seen:
            problem = "repeats an earlier line"
        if problem:
            raise VOCDataError(
                f"{path} line {number} ({file_id!r}) {problem}; the VOC evaluation (detectron2's "
                "voc_eval) needs one distinct image id per line, without spaces or blank lines")
        seen.add(file_id)
    return ids


def check_voc_evaluable(dirname: str, split: str, class_names=()) -> None:
    """Raise VOCDataError naming the first thing of the split that detectron2's VOC evaluation
    cannot read, or would score wrongly: the split file's lines (`_evaluable_split`); a class
    name with "/" (each class's detections go to a file of its name); and in every <object> a
    <name> without surrounding spaces (compared unstripped: the class would score 0), a <pose>,
    integer <truncated> and <difficult>, and integer box coordinates. Many tools leave those tags
    out or write decimal coordinates, which train well but end the evaluation after training."""
    for name in class_names:
        if "/" in name:
            raise VOCDataError(
                f"class name {name!r} of {dirname} holds a '/': the VOC evaluation writes each "
                "class's detections to a file of its name. Rename the class")
    for file_id in _evaluable_split(dirname, split):
        xml_path = os.path.join(dirname, "Annotations", f"{file_id}.xml")
        try:
            objects = ET.parse(xml_path).findall("object")
        except (OSError, ET.ParseError) as e:
            raise VOCDataError(f"{xml_path} cannot be read ({e}). Fix or regenerate it") from None
        for obj in objects:
            name = obj.findtext("name")
            if name is not None and name != name.strip():
                raise VOCDataError(
                    f"{xml_path}: <name>{name}</name> has spaces around the class name; the VOC "
                    "evaluation compares it unstripped, so that class would score 0. Remove them")
            box = obj.find("bndbox")
            for node, tag in [(obj, "truncated"), (obj, "difficult"),
                              *((box, k) for k in ("xmin", "ymin", "xmax", "ymax"))]:
                text = None if node is None else node.findtext(tag)
                if text is None or not text.strip().lstrip("-").isdigit():
                    raise VOCDataError(
                        f"{xml_path}: <{tag}> is {'missing' if text is None else repr(text)}; the "
                        "VOC evaluation (detectron2's parse_rec) needs an integer <truncated>, "
                        "<difficult> (0 or 1) and box coordinates (whole pixels) in every "
                        "<object>. Add or round them, e.g. <truncated>0</truncated>")
            if obj.find("pose") is None:
                raise VOCDataError(
                    f"{xml_path}: an <object> has no <pose>, which the VOC evaluation "
                    "(detectron2's parse_rec) reads. Add <pose>Unspecified</pose> to each object")
