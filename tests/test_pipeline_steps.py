"""best_student: the export picks the student with the highest AP50 on the first test set."""

import json

import pytest

from nst_det.pipeline.plan import Stage
from nst_det.pipeline.run import STAGE_FILE
from nst_det.pipeline.steps import best_student


def _student(root, name, metrics):
    stage = Stage(name, "train", str(root / name), meta={"stage": "det", "role": "student"})
    (root / name).mkdir()
    (root / name / STAGE_FILE).write_text(json.dumps({"name": name, "metrics": metrics}))
    return stage


def test_best_student_one_test_set_and_several(tmp_path):
    one = [_student(tmp_path, "a", {"bbox": {"AP50": 10.0}}),
           _student(tmp_path, "b", {"bbox": {"AP50": 30.0, "AP": 5.0}})]
    assert best_student(one).name == "b"
    # several test sets: detectron2 keys the results by data set; the first one decides
    several = [_student(tmp_path, "c", {"my_coco_test": {"bbox": {"AP": 1.0, "AP50": 50.0}},
                                        "my_voc_test": {"bbox": {"AP50": 1.0}}}),
               _student(tmp_path, "d", {"my_coco_test": {"bbox": {"AP": 9.0, "AP50": 20.0}},
                                        "my_voc_test": {"bbox": {"AP50": 90.0}}})]
    assert best_student(several).name == "c"


def test_best_student_without_ap50_names_the_metrics(tmp_path):
    stages = [_student(tmp_path, "a", {"classification": {"top1": 50.0}})]
    with pytest.raises(RuntimeError, match="no bbox AP50.*classification"):
        best_student(stages)


def test_a_diverged_student_is_never_the_best(tmp_path):
    """max() kept a NaN AP50 once it led (every comparison with NaN is False): the export and the
    report's detections figure took a diverged run."""
    stages = [_student(tmp_path, "a", {"bbox": {"AP50": float("nan")}}),
              _student(tmp_path, "b", {"bbox": {"AP50": 77.0}}),
              _student(tmp_path, "c", {"bbox": {"AP50": 12.0}})]
    assert best_student(stages).name == "b"
