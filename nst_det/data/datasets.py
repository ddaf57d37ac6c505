"""Dataset registration: the built-in toy VOC2007 set (generated on first use), and checked VOC.

Real PASCAL VOC is registered by detectron2 itself (`voc_2007_trainval`, `voc_2007_test`, ... under
`$DETECTRON2_DATASETS`); nst_det swaps their loader for `load_voc_checked` (same records, clear
errors on bad files). The toy set uses the same loader and metadata (year 2007), so
`PascalVOCDetectionEvaluator` applies the VOC07 11-point metric to it as well. `toy_coco_*` are
the same toy images and boxes described by a COCO json (nst_det/data/toy_coco.py).
"""

from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .toy_coco import register_toy_coco
from .toy_data import make_toy_voc
from .toy_world import TOY_CLASSES
from .voc_checked import load_voc_checked


def datasets_root() -> str:
    """detectron2's convention: `$DETECTRON2_DATASETS`, default `./datasets`."""
    return os.getenv("DETECTRON2_DATASETS", "datasets")


def register_toy_voc(prefix: str, dirname: str, seed: int = 0, num_trainval: int = 300,
                     num_test: int = 150, num_minival: int = 0) -> list[str]:
    """Register `<prefix>_trainval` and `<prefix>_test` (and `<prefix>_minival`, the validation
    split disjoint from both, when `num_minival` > 0), generating the data on first load.

    Returns:
        the registered dataset names.
    """
    names = []
    for split in ("trainval", "test", *(("minival",) if num_minival else ())):
        name = f"{prefix}_{split}"

        def load(split=split):
            make_toy_voc(dirname, seed=seed, num_trainval=num_trainval, num_test=num_test,
                         num_minival=num_minival)
            return load_voc_checked(dirname, split, TOY_CLASSES)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            thing_classes=list(TOY_CLASSES), dirname=dirname, year=2007, split=split,
            evaluator_type="pascal_voc",
        )
        names.append(name)
    return names


def register_builtin_toy_datasets() -> None:
    """The toy sets the configs in configs/**/quick_schedules refer to."""
    register_toy_voc("toy_voc_2007", os.path.join(datasets_root(), "toy", "VOC2007"))
    # a reduced copy for the pipeline's CI-scale run (tools/run_pipeline.py --scale ci)
    register_toy_voc("toy_voc_tiny", os.path.join(datasets_root(), "toy", "VOC2007_tiny"),
                     num_trainval=16, num_test=8)
    # the same images and boxes in COCO format, evaluated with detectron2's COCOEvaluator
    toy = os.path.join(datasets_root(), "toy")
    register_toy_coco("toy_coco_2007", os.path.join(toy, "VOC2007"), os.path.join(toy, "COCO2007"))
    register_toy_coco("toy_coco_tiny", os.path.join(toy, "VOC2007_tiny"),
                      os.path.join(toy, "COCO2007_tiny"), num_trainval=16, num_test=8)


def check_builtin_voc_datasets() -> None:
    """Make detectron2's built-in `voc_*` data sets load through `load_voc_checked`."""
    for name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if name.startswith("voc_") and meta.get("evaluator_type") == "pascal_voc":
            dirname, split, classes = meta.dirname, meta.split, meta.thing_classes
            DatasetCatalog.remove(name)
            DatasetCatalog.register(
                name, lambda d=dirname, s=split, c=classes: load_voc_checked(d, s, c)
            )


register_builtin_toy_datasets()
check_builtin_voc_datasets()
