"""ImageFolder registration, the ImageNet-style mapper and the top-k evaluator."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from nst_det import add_nst_config
from nst_det.data.classification_mapper import ClassificationDatasetMapper
from nst_det.data.imagefolder import load_imagefolder, register_toy_imagefolder
from nst_det.evaluation import ClassificationEvaluator


def test_toy_imagefolder_registration(tmp_path):
    train, val = register_toy_imagefolder("tiny_cls_data", str(tmp_path / "cls"), seed=2,
                                          train_per_class=2, val_per_class=1, size=40)
    dicts = DatasetCatalog.get(train)
    assert len(dicts) == 10 and len(DatasetCatalog.get(val)) == 5
    classes = MetadataCatalog.get(train).thing_classes
    assert classes == sorted(classes)  # ImageFolder convention: sorted folder names
    for d in dicts:
        assert classes[d["label"]] in d["file_name"]
    assert MetadataCatalog.get(val).evaluator_type == "classification"


def test_missing_imagefolder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_imagefolder(str(tmp_path / "nowhere"))


def test_imagefolder_lists_sub_folders_as_torchvision_and_refuses_an_empty_class(tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    for rel in ("a/x.png", "b/batch1/x.png", "b/y.png", "b/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            Image.new("RGB", (4, 4)).save(tmp_path / rel)
        else:
            (tmp_path / rel).write_text("not an image")
    dicts, classes = load_imagefolder(str(tmp_path))
    reference = ImageFolder(str(tmp_path))
    assert classes == reference.classes == ["a", "b"]
    assert [(d["file_name"], d["label"]) for d in dicts] == reference.samples
    assert [d["image_id"] for d in dicts] == [0, 1, 2]
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match=r"without images \['c'\]"):
        load_imagefolder(str(tmp_path))


def test_mapper_train_and_test_sizes(tmp_path):
    register_toy_imagefolder("tiny_cls_map", str(tmp_path / "cls"), seed=2, train_per_class=1,
                             val_per_class=1, size=40)
    d = DatasetCatalog.get("tiny_cls_map_train")[0]
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_list(["INPUT.FORMAT", "RGB", "INPUT.CLS.TRAIN_CROP_SIZE", 24,
                         "INPUT.CLS.TEST_RESIZE", 36, "INPUT.CLS.TEST_CROP_SIZE", 32])
    out = ClassificationDatasetMapper(cfg, is_train=True)(d)
    assert out["image"].shape == (3, 24, 24) and out["image"].dtype == torch.uint8
    assert out["label"] == d["label"]
    test_out = ClassificationDatasetMapper(cfg, is_train=False)(d)
    assert test_out["image"].shape == (3, 32, 32)
    again = ClassificationDatasetMapper(cfg, is_train=False)(d)
    assert torch.equal(test_out["image"], again["image"])  # deterministic at test time
    cfg.INPUT.CLS.TEST_RESIZE = 28  # a crop larger than the image was padded with black
    with pytest.raises(ValueError, match="INPUT.CLS.TEST_RESIZE 28 is smaller than "
                                         "INPUT.CLS.TEST_CROP_SIZE 32"):
        ClassificationDatasetMapper(cfg, is_train=False)


def test_topk_evaluator():
    ev = ClassificationEvaluator("x", topk=(1, 2))
    ev.reset()
    logits = torch.tensor([[5.0, 1.0, 0.0], [1.0, 5.0, 0.0], [0.0, 1.0, 5.0], [0.0, 5.0, 1.0]])
    labels = [0, 0, 1, 0]  # ranks: 0, 1, 1, 2
    ev.process([{"label": y} for y in labels], [{"logits": row} for row in logits])
    res = ev.evaluate()["classification"]
    assert res["top1"] == pytest.approx(25.0)
    assert res["top2"] == pytest.approx(75.0)
    assert res["num_images"] == 4


def test_topk_counts_ties_and_non_finite_logits_against_the_image():
    """A collapsed head (constant logits) scored 100% (a tie went to the label), and so did NaN
    logits (every comparison with NaN is False): the model the report would publish."""
    ev = ClassificationEvaluator("x", topk=(1, 2, 3, 4))
    ev.reset()
    constant, nan = torch.zeros(3), torch.full((3,), float("nan"))
    tie = torch.tensor([2.0, 2.0, 0.0])  # the label ties one other class: top-2, not top-1
    ev.process([{"label": y} for y in (0, 1, 2, 0, 0)],
               [{"logits": row} for row in (constant, constant, constant, nan, tie)])
    res = ev.evaluate()["classification"]
    assert res["top1"] == 0.0  # no image has its label alone on top
    assert res["top2"] == pytest.approx(20.0)  # the tie only
    assert res["top3"] == pytest.approx(80.0)  # all but the NaN image
    assert res["top4"] == pytest.approx(80.0)  # k above the 3 classes: still not the NaN image
