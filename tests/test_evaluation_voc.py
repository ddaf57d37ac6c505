"""The per-class VOC evaluator: per-class AP50 consistent with detectron2's mean AP50."""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, Instances

from nst_det.evaluation import PerClassVOCEvaluator


def _outputs(record, drop_class=None):
    anns = [a for a in record["annotations"] if a["category_id"] != drop_class]
    inst = Instances((record["height"], record["width"]))
    inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
                            .reshape(-1, 4))
    inst.scores = torch.ones(len(anns))
    inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
    return [{"instances": inst}]


@pytest.mark.parametrize("drop_class", [None, 2])
def test_ground_truth_as_predictions(tiny_voc, drop_class):
    _, test, _ = tiny_voc
    evaluator = PerClassVOCEvaluator(test)
    evaluator.reset()
    for record in DatasetCatalog.get(test):
        evaluator.process([{"image_id": record["image_id"]}], _outputs(record, drop_class))
    bbox = evaluator.evaluate()["bbox"]
    per_class = {k: v for k, v in bbox.items() if k.startswith("AP50-")}
    assert len(per_class) == 5
    np.testing.assert_allclose(np.mean(list(per_class.values())), bbox["AP50"], atol=1e-6)
    names = ["circle", "triangle", "square", "star", "cross"]
    for i, name in enumerate(names):
        expected = 0.0 if i == drop_class else 100.0
        assert per_class[f"AP50-{name}"] == pytest.approx(expected, abs=1e-6), name
