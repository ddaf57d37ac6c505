"""PascalVOCDetectionEvaluator that also reports AP50 per class (for the report's bar chart)."""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict

from detectron2.data import MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.evaluation.pascal_voc_evaluation import voc_eval
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager


class PerClassVOCEvaluator(PascalVOCDetectionEvaluator):
    """Adds `AP50-<class>` entries to the "bbox" results (the naming of detectron2's COCO
    evaluator), computed with the same `voc_eval` and metric year as the mean AP50.

    The per-class detections are kept by this class itself (detectron2's evaluator keeps its
    own in private attributes), from the dataset's metadata as detectron2 reads it.

    Attributes:
        class_names: the data set's thing_classes.
        use_07_metric: VOC2007's 11-point AP (metadata year 2007) instead of the area under PR.
    """

    def __init__(self, dataset_name: str):
        super().__init__(dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        self.class_names = list(meta.thing_classes)
        self.use_07_metric = meta.year == 2007
        annotations = PathManager.get_local_path(os.path.join(meta.dirname, "Annotations/"))
        self._anno_template = os.path.join(annotations, "{}.xml")
        self._image_set = os.path.join(meta.dirname, "ImageSets", "Main", f"{meta.split}.txt")
        self._lines = defaultdict(list)

    def reset(self):
        super().reset()
        self._lines = defaultdict(list)

    def process(self, inputs, outputs):
        super().process(inputs, outputs)
        for inp, out in zip(inputs, outputs):
            instances = out["instances"].to("cpu")
            boxes = instances.pred_boxes.tensor.numpy()  # float32 sums round as detectron2's
            for (x0, y0, x1, y1), score, cls_id in zip(boxes, instances.scores.tolist(),
                                                       instances.pred_classes.tolist()):
                # the VOC devkit's detection-file line; VOC pixel coordinates start at 1
                self._lines[cls_id].append(
                    f"{inp['image_id']} {score:.3f} {x0 + 1:.1f} {y0 + 1:.1f} {x1:.1f} {y1:.1f}")

    def evaluate(self):
        # gather here too (every rank must take part in each gather, in the same order)
        gathered = comm.gather(dict(self._lines), dst=0)
        results = super().evaluate()
        if not comm.is_main_process():
            return results
        lines = defaultdict(list)
        for per_rank in gathered:
            for cls_id, rank_lines in per_rank.items():
                lines[cls_id].extend(rank_lines)
        with tempfile.TemporaryDirectory(prefix="voc_per_class_") as folder:
            template = os.path.join(folder, "{}.txt")
            for cls_id, name in enumerate(self.class_names):
                with open(template.format(name), "w") as f:
                    f.write("\n".join(lines.get(cls_id, [""])))
                _, _, ap = voc_eval(template, self._anno_template, self._image_set, name,
                                    ovthresh=0.5, use_07_metric=self.use_07_metric)
                results["bbox"][f"AP50-{name}"] = float(ap * 100)
        return results
