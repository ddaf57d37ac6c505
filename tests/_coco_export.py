"""A labelling tool's COCO export of the tiny toy VOC set, and config helpers, shared by the
tests of your own data (test_custom_data.py) and of class lists (test_class_lists.py)."""

from __future__ import annotations

import itertools
import json
import shutil

from detectron2.config import get_cfg

from nst_det import add_nst_config
from nst_det.data.toy_world import TOY_CLASSES
from nst_det.data.voc_checked import load_voc_checked

_names = itertools.count()
# non-contiguous ids, as labelling tools often write them (deleted labels leave gaps)
TOOL_CATEGORY_IDS = [2, 5, 9, 11, 17]


def unique(prefix: str) -> str:
    """A data set name no other test uses."""
    return f"{prefix}_{next(_names)}"


def labelling_tool_export(voc_dir, split: str, out_dir) -> tuple[str, str]:
    """Copy a VOC split's images into out_dir/images and describe them the way CVAT / Label Studio
    export COCO: info + licenses, non-contiguous category ids, float [x, y, w, h] boxes,
    segmentation [], area, iscrowd, attributes. Returns (json_file, image_root)."""
    records = load_voc_checked(str(voc_dir), split, TOY_CLASSES)
    image_root = out_dir / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, rec in enumerate(records, start=1):
        name = f"{split}_{i:03d}.jpg"
        shutil.copy(rec["file_name"], image_root / name)
        images.append({"id": i, "width": rec["width"], "height": rec["height"], "file_name": name,
                       "license": 0, "flickr_url": "", "coco_url": "", "date_captured": 0})
        for a in rec["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i,
                "category_id": TOOL_CATEGORY_IDS[a["category_id"]], "segmentation": [],
                "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0,
                "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                "attributes": {"occluded": False},
            })
    data = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "version": ""},
        "categories": [{"id": c, "name": n, "supercategory": ""}
                       for c, n in zip(TOOL_CATEGORY_IDS, TOY_CLASSES)],
        "images": images, "annotations": annotations,
    }
    json_file = out_dir / "annotations" / f"instances_{split}.json"
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(data))
    return str(json_file), str(image_root)


def cfg_with(coco=(), voc=()):
    """A config whose DATASETS.COCO / DATASETS.VOC are the given entries."""
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.DATASETS.COCO, cfg.DATASETS.VOC = [list(e) for e in coco], [list(e) for e in voc]
    return cfg


def good_json(tool_export):
    """(the export's test json as a dict, its image root)."""
    json_file, image_root = tool_export["test"]
    with open(json_file) as f:
        return json.load(f), image_root
