"""The evaluator a data set's metadata asks for, as detectron2's own train_net chooses it.

evaluator_type "coco" -> detectron2's COCOEvaluator (pycocotools: AP, AP50, AP75, APs/m/l and
AP-<class>); "pascal_voc" -> the VOC evaluator with per-class AP50 (year 2007: 11-point AP).
"""

from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator

from .voc_per_class import PerClassVOCEvaluator

__all__ = ["build_dataset_evaluator", "compiled_ops_available", "default_best_metric",
           "evaluator_type"]


def compiled_ops_available() -> bool:
    """Whether detectron2._C is the compiled extension (not this project's placeholder .py)."""
    import detectron2._C as ext

    return not str(getattr(ext, "__file__", "")).endswith(".py")


def build_dataset_evaluator(dataset_name: str, output_dir: str | None = None):
    """The evaluator for `dataset_name`, chosen by its metadata's `evaluator_type`.

    Args:
        output_dir: where COCOEvaluator writes its detections json (None: nothing written).
    Raises:
        NotImplementedError: an evaluator_type nst_det does not evaluate (named, with the set).
    """
    kind = evaluator_type(dataset_name)
    if kind == "pascal_voc":
        return PerClassVOCEvaluator(dataset_name)
    if kind == "coco":
        json_file = MetadataCatalog.get(dataset_name).get("json_file")
        if json_file and "://" not in json_file and not os.path.isfile(json_file):
            # a trainer may build evaluators before loading the data: the toy COCO sets write
            # their json on first load, a user's missing json gets the checked loader's error
            DatasetCatalog.get(dataset_name)
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
        # detectron2's fast COCOeval is a compiled op; pycocotools' own COCOeval gives the same AP
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_dir,
                             use_fast_impl=compiled_ops_available())


def evaluator_type(dataset_name: str) -> str:
    """The set's metadata evaluator_type, "coco" or "pascal_voc", the detection evaluations
    nst_det runs. Raises NotImplementedError naming the set for any other."""
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type")
    if kind not in ("coco", "pascal_voc"):
        raise NotImplementedError(
            f"data set {dataset_name!r} has evaluator_type {kind!r}; nst_det evaluates 'coco' "
            "and 'pascal_voc' data sets (register yours with DATASETS.COCO or DATASETS.VOC)")
    return kind


def default_best_metric(dataset_name: str) -> str:
    """The metric model_best follows by default: AP50 for VOC-style sets, AP for COCO-style."""
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type")
    return "AP" if kind == "coco" else "AP50"
