"""Dataset registration: the built-in toy VOC2007 set (generated on first use), loaded checked.

Real PASCAL VOC is registered by detectron2 itself (`voc_2007_trainval`, `voc_2007_test`, ... under
`$DETECTRON2_DATASETS`), and importing nst_det leaves those entries as they are: it only adds new
names. Their training records are checked as every training set's are (data/record_check.py:
boxes, class ids, and `load_voc_checked`'s error naming the XML file when detectron2's loader
fails on one, e.g. on an unknown class). The toy set loads through `load_voc_checked` with VOC's
metadata (year 2007), so `PascalVOCDetectionEvaluator` applies the VOC07 11-point metric to it.
`toy_coco_*` are the same toy images and boxes described by a COCO json (data/toy_coco.py).
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
                     num_test: int = 150, num_minival: int = 0, splits=None) -> list[str]:
    """Register `<prefix>_trainval` and `<prefix>_test` (and `<prefix>_minival`, the validation
    split disjoint from both, when `num_minival` > 0), generating the data on first load.

    splits: only these of them (e.g. ("minival",) for a set whose other splits are registered
        already, in another folder: the generator draws every image from (seed, split, index),
        so the same seed and sizes give the same trainval / test pictures anywhere).
    Returns:
        the registered dataset names.
    """
    names = []
    for split in splits or ("trainval", "test", *(("minival",) if num_minival else ())):
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
    # their validation splits (the methods benchmark picks loss weights on them, never on test),
    # in folders of their own so that the sets above (and their spec files) stay as they are
    register_toy_voc("toy_voc_2007", os.path.join(datasets_root(), "toy", "VOC2007_minival"),
                     num_minival=150, splits=("minival",))
    register_toy_voc("toy_voc_tiny", os.path.join(datasets_root(), "toy", "VOC2007_tiny_minival"),
                     num_trainval=16, num_test=8, num_minival=8, splits=("minival",))
    # the same images and boxes in COCO format, evaluated with detectron2's COCOEvaluator
    toy = os.path.join(datasets_root(), "toy")
    register_toy_coco("toy_coco_2007", os.path.join(toy, "VOC2007"), os.path.join(toy, "COCO2007"))
    register_toy_coco("toy_coco_tiny", os.path.join(toy, "VOC2007_tiny"),
                      os.path.join(toy, "COCO2007_tiny"), num_trainval=16, num_test=8)


register_builtin_toy_datasets()
