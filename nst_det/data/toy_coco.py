"""The toy world in COCO format: the toy VOC images and boxes, described by a COCO json.

`write_coco_json` turns any VOC-layout split into a COCO detection json (image file names relative
to the VOC folder's JPEGImages/, category ids 1..K in class-list order, boxes [x, y, w, h] in
pixels): the same images and boxes, so COCO-style and VOC07 numbers of one model can be set side
by side. `register_toy_coco` registers `<prefix>_{trainval,test}` with evaluator_type "coco"; the
json is written (atomically) on first load and rewritten when the toy set's spec changed.
"""

from __future__ import annotations

import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..utils.atomic import atomic_write
from .coco_checked import load_coco_checked
from .toy_data import SPEC_FILE, make_toy_voc
from .toy_world import TOY_CLASSES
from .voc_checked import load_voc_checked

__all__ = ["register_toy_coco", "voc_records_to_coco", "write_coco_json"]


def voc_records_to_coco(records: list, class_names, info: dict | None = None) -> dict:
    """detectron2 records (XYXY_ABS boxes, contiguous category ids) as a COCO detection dict."""
    images, annotations = [], []
    for image_id, rec in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": os.path.basename(rec["file_name"]),
                       "width": rec["width"], "height": rec["height"]})
        for ann in rec["annotations"]:
            x0, y0, x1, y1 = (float(v) for v in ann["bbox"])
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": ann["category_id"] + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(class_names)]
    return {"info": info or {}, "images": images, "annotations": annotations,
            "categories": categories}


def write_coco_json(voc_dirname: str, split: str, class_names, json_file: str) -> str:
    """Write the VOC-layout split `voc_dirname`/`split` as a COCO json (atomically).

    Its `info` records the toy set's spec (toy_spec.json) when there is one, so a stale json is
    recognised. Returns:
        `json_file`.
    """
    spec_path = os.path.join(voc_dirname, SPEC_FILE)
    spec = json.load(open(spec_path)) if os.path.isfile(spec_path) else None
    info = {"description": f"COCO copy of {voc_dirname} split {split}", "toy_spec": spec}
    records = load_voc_checked(voc_dirname, split, class_names)
    with atomic_write(json_file, "w") as f:
        json.dump(voc_records_to_coco(records, class_names, info), f)
    return json_file


def _current(json_file: str, voc_dirname: str) -> bool:
    """Whether `json_file` exists and was written from the toy set now at `voc_dirname`."""
    try:
        with open(json_file) as f:
            written = json.load(f).get("info", {}).get("toy_spec")
        with open(os.path.join(voc_dirname, SPEC_FILE)) as f:
            return written == json.load(f)
    except (OSError, ValueError, AttributeError):
        return False


def register_toy_coco(prefix: str, voc_dirname: str, json_dir: str, seed: int = 0,
                      num_trainval: int = 300, num_test: int = 150) -> list[str]:
    """Register `<prefix>_trainval` and `<prefix>_test`: the toy VOC set at `voc_dirname` (made on
    first load with these parameters) described by COCO jsons in `json_dir`.

    Returns:
        the registered dataset names.
    """
    image_root = os.path.join(voc_dirname, "JPEGImages")
    names = []
    for split in ("trainval", "test"):
        name = f"{prefix}_{split}"
        json_file = os.path.join(json_dir, f"instances_{split}.json")

        def load(split=split, json_file=json_file, name=name):
            make_toy_voc(voc_dirname, seed=seed, num_trainval=num_trainval, num_test=num_test)
            if not _current(json_file, voc_dirname):
                write_coco_json(voc_dirname, split, TOY_CLASSES, json_file)
            return load_coco_checked(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        # thing_classes now (not only once loaded), as the VOC toy sets have them
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                      evaluator_type="coco", thing_classes=list(TOY_CLASSES))
        names.append(name)
    return names
