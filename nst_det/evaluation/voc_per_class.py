"""PascalVOCDetectionEvaluator that also reports AP50 per class (for the report's bar chart)."""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict

from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.evaluation.pascal_voc_evaluation import voc_eval
from detectron2.utils import comm


class PerClassVOCEvaluator(PascalVOCDetectionEvaluator):
    """Adds `AP50-<class>` entries to the "bbox" results (the naming of detectron2's COCO
    evaluator), computed with the same `voc_eval` and metric year as the mean AP50."""

    def evaluate(self):
        # gather here too (every rank must take part in each gather, in the same order)
        gathered = comm.gather(self._predictions, dst=0)
        results = super().evaluate()
        if not comm.is_main_process():
            return results
        predictions = defaultdict(list)
        for per_rank in gathered:
            for cls_id, lines in per_rank.items():
                predictions[cls_id].extend(lines)
        with tempfile.TemporaryDirectory(prefix="voc_per_class_") as folder:
            template = os.path.join(folder, "{}.txt")
            for cls_id, name in enumerate(self._class_names):
                with open(template.format(name), "w") as f:
                    f.write("\n".join(predictions.get(cls_id, [""])))
                _, _, ap = voc_eval(template, self._anno_file_template, self._image_set_path,
                                    name, ovthresh=0.5, use_07_metric=self._is_2007)
                results["bbox"][f"AP50-{name}"] = float(ap * 100)
        return results
