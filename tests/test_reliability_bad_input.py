"""The bad-input catalogue: every entry fails loudly, naming the file or key and the fix."""

import os
import re
from pathlib import Path

import pytest
import torch
from _detection_common import edit_voc_xml
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper

from nst_det import add_nst_config
from nst_det.data.resumable import PositionSeededDataset, skipped_images
from nst_det.data.toy_world import TOY_CLASSES
from nst_det.data.voc_checked import VOCDataError, load_voc_checked

REPO = Path(__file__).resolve().parents[1]
R18_TOY = REPO / "configs" / "quick_schedules" / "faster_rcnn_R_18_FPN_toy.yaml"


def _first_id(voc):
    return (voc / "ImageSets/Main/trainval.txt").read_text().split()[0]


def _edit_xml(voc, pattern, replacement):
    return edit_voc_xml(voc, pattern, replacement)


def _load(voc, split="trainval"):
    return load_voc_checked(str(voc), split, TOY_CLASSES)


def test_valid_set_loads_like_detectron2(voc):
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    ours, theirs = _load(voc), load_voc_instances(str(voc), "trainval", TOY_CLASSES)
    assert [r["annotations"] for r in ours] == [r["annotations"] for r in theirs]
    assert [r["file_name"] for r in ours] == [r["file_name"] for r in theirs]


def test_missing_image(voc):
    image = voc / "JPEGImages" / f"{_first_id(voc)}.jpg"
    image.unlink()
    with pytest.raises(VOCDataError, match=re.escape(str(image)) + ".*missing"):
        _load(voc)


def test_malformed_xml(voc):
    xml = voc / "Annotations" / f"{_first_id(voc)}.xml"
    xml.write_text(xml.read_text()[:-20])
    with pytest.raises(VOCDataError, match=re.escape(str(xml)) + " is not valid XML"):
        _load(voc)


def test_unknown_class_name(voc):
    xml = _edit_xml(voc, r"<name>\w+</name>", "<name>unicorn</name>")
    with pytest.raises(VOCDataError, match=re.escape(str(xml)) + ": unknown class 'unicorn'"):
        _load(voc)


@pytest.mark.parametrize("box, problem", [
    ("<xmin>50</xmin><ymin>50</ymin><xmax>40</xmax><ymax>60</ymax>", "inverted box"),
    ("<xmin>50</xmin><ymin>50</ymin><xmax>40.5</xmax><ymax>60</ymax>", "inverted box"),
    ("<xmin>50</xmin><ymin>50</ymin><xmax>5000</xmax><ymax>60</ymax>", "outside the"),
])
def test_bad_boxes(voc, box, problem):
    xml = _edit_xml(voc, r"<xmin>.*?</ymax>", box)
    with pytest.raises(VOCDataError, match=re.escape(str(xml)) + ".*" + problem):
        _load(voc)


def test_a_one_pixel_wide_voc_box_loads_as_detectron2_loads_it(voc):
    """VOC coordinates are inclusive: xmin == xmax is a box one pixel wide, not an empty one."""
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    _edit_xml(voc, r"<xmin>.*?</ymax>",
              "<xmin>50</xmin><ymin>50</ymin><xmax>50</xmax><ymax>60</ymax>")
    ours = _load(voc)
    theirs = load_voc_instances(str(voc), "trainval", TOY_CLASSES)
    assert ours[0]["annotations"][0]["bbox"] == theirs[0]["annotations"][0]["bbox"] \
        == [49.0, 49.0, 50.0, 60.0]


def test_a_voc_image_size_that_is_not_a_whole_number_is_named(voc):
    xml = _edit_xml(voc, r"<width>(\d+)</width>", r"<width>\1.0</width>")
    with pytest.raises(VOCDataError,
                       match=re.escape(str(xml)) + ": <width> is '\\d+\\.0', not a whole"):
        _load(voc)


def test_image_without_objects_is_kept(voc):
    xml = voc / "Annotations" / f"{_first_id(voc)}.xml"
    xml.write_text(re.sub(r"<object>.*</object>", "", xml.read_text(), flags=re.S))
    records = _load(voc)
    assert records[0]["annotations"] == [] and len(records) == 8


def test_empty_and_missing_split_file(voc):
    split = voc / "ImageSets/Main/trainval.txt"
    split.write_text("\n")
    with pytest.raises(VOCDataError, match=re.escape(str(split)) + " is empty"):
        _load(voc)
    split.unlink()
    with pytest.raises(VOCDataError, match=re.escape(str(split)) + " is missing"):
        _load(voc)


def test_missing_dataset_root(tmp_path):
    with pytest.raises(VOCDataError, match="does not exist.*DETECTRON2_DATASETS"):
        load_voc_checked(str(tmp_path / "nowhere"), "trainval", TOY_CLASSES)


def _cfg(**overrides):
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(R18_TOY))
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg_names_the_file_or_is_skipped_and_counted(voc, tmp_path, damage):
    records = _load(voc)
    image = Path(records[0]["file_name"])
    data = image.read_bytes()
    image.write_bytes(b"not a jpeg at all" if damage == "garbage" else data[: len(data) // 3])
    mapper = DatasetMapper(_cfg(), is_train=True)

    strict = PositionSeededDataset(records, mapper, seed=0)
    with pytest.raises(RuntimeError, match=f"cannot load training image {re.escape(str(image))}"
                       r".* set NST_DET\.SKIP_BAD_IMAGES True"):
        strict[(0, 0)]

    log = tmp_path / "skipped.txt"
    lenient = PositionSeededDataset(records, mapper, seed=0, skip_bad=True, skip_log=str(log))
    sample = lenient[(0, 0)]
    assert sample["file_name"] == records[1]["file_name"]  # moved on to the next image
    assert log.read_text().splitlines()[0].startswith(str(image))
    # met again (the next epoch, another worker): one more load skipped, still one image
    lenient[(5, 0)]
    assert len(log.read_text().splitlines()) == 2
    assert skipped_images(str(log)) == [str(image)]


def test_a_fresh_run_does_not_report_an_earlier_runs_skipped_images(tiny_voc, tmp_path, caplog):
    from _detection_common import R18_FPN_TOY, make_cfg

    from nst_det.engine import DetectionTrainer
    from nst_det.engine.reliable import _report_skipped_images

    cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "NST_DET.SKIP_BAD_IMAGES", "True"],
                   data=tiny_voc[:2], output_dir=tmp_path / "out")
    log = tmp_path / "out" / "skipped_images.rank0.txt"
    trainer = DetectionTrainer(cfg)
    log.write_text("a.jpg: bad\na.jpg: bad\nb.jpg: bad\n")  # 3 loads of 2 images, this run's
    with caplog.at_level("WARNING"):
        _report_skipped_images(trainer)
    assert "Skipped 2 unreadable training images" in caplog.text  # images, not loads
    DetectionTrainer(cfg).resume_or_load(resume=False)  # a fresh run in the same folder
    assert not log.exists()


def test_unknown_config_key_is_named(tmp_path):
    from nst_det.config import load_config

    with pytest.raises(KeyError, match="command-line overrides: Non-existent key: MODEL.NST.LOS"):
        load_config(str(R18_TOY), ["MODEL.NST.LOSS_WEIGTH", "1.0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {R18_TOY}\nMODEL:\n  NST:\n    KERNAL: poly\n")
    with pytest.raises(KeyError, match=f"config file {bad}: .*MODEL.NST.KERNAL"):
        load_config(str(bad))


def test_missing_config_file_or_base_names_it_and_its_includer(tmp_path):
    from nst_det.config import load_config

    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=f"config file {missing} does not exist") as info:
        load_config(str(missing))
    assert "spelling" not in str(info.value)  # no advice about key names for a missing file
    leaf, middle = tmp_path / "leaf.yaml", tmp_path / "sub" / "middle.yaml"
    middle.parent.mkdir()
    leaf.write_text("_BASE_: sub/middle.yaml\n")
    middle.write_text("_BASE_: ../Base-Gone.yaml\nSEED: 3\n")
    gone = os.path.join(str(middle.parent), "../Base-Gone.yaml")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"config file {gone} does not exist: it is the _BASE_ of {middle} <- {leaf}")):
        load_config(str(leaf))
    middle.write_text(f"_BASE_: {R18_TOY}\nSEED: 3\n")  # fixed: loads
    assert load_config(str(leaf)).SEED == 3
    middle.write_text("_BASE_: ../leaf.yaml\n")  # a cycle: detectron2 alone never ends
    again = os.path.join(str(middle.parent), "../leaf.yaml")
    with pytest.raises(ValueError, match=re.escape(
            f"include each other through _BASE_: {again} <- {middle} <- {leaf}")):
        load_config(str(leaf))


def _trainer(cfg, train, out):
    from nst_det.engine import DetectionTrainer

    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
                         "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)])
    cfg.DATASETS.TRAIN = (train,)
    return DetectionTrainer(cfg)


def test_num_classes_disagreeing_with_dataset(tiny_voc, tmp_path):
    train, _, _ = tiny_voc
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES=7 but data set"):
        _trainer(_cfg(**{"MODEL.ROI_HEADS.NUM_CLASSES": "7"}), train, tmp_path)


def test_student_init_weights_that_do_not_match_the_backbone(tiny_voc, tmp_path):
    train, _, _ = tiny_voc
    trainer = _trainer(_cfg(), train, tmp_path / "a")
    state = trainer.model.state_dict()
    wrong = {k: v for k, v in state.items() if not k.startswith("backbone.bottom_up.res5")}
    wrong["backbone.bottom_up.stem.conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save({"model": wrong}, tmp_path / "wrong.pth")
    bad = _trainer(_cfg(**{"MODEL.WEIGHTS": str(tmp_path / "wrong.pth")}), train, tmp_path / "b")
    # the wrong-shaped stem conv and the missing res5 keys are both named
    with pytest.raises(KeyError, match=r"missing from it or of a different shape .*stem.conv1"
                                       r".weight.*res5"):
        bad.resume_or_load(resume=False)

    missing = _trainer(_cfg(**{"MODEL.WEIGHTS": str(tmp_path / "no.pth")}), train, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS=.*no.pth does not exist"):
        missing.resume_or_load(resume=False)


# ---- data sets registered with detectron2's own functions are checked too --------------------

def _d2_voc_trainer(voc, tmp_path):
    """A trainer on `voc` registered with detectron2's register_pascal_voc (not nst_det's)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_pascal_voc

    name = f"d2_registered_{tmp_path.name}"
    register_pascal_voc(name, str(voc), "trainval", 2007, class_names=list(TOY_CLASSES))
    try:
        return _trainer(_cfg(), name, tmp_path / "out")
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.parametrize("pattern, replacement, message", [
    (r"<name>\w+</name>", "<name>hexagon</name>", "unknown class 'hexagon'"),  # ValueError
    (r"</annotation>", "", "is not valid XML"),  # detectron2: a bare ParseError
    (r"<size>.*</size>", "", "<size> is missing"),  # IndexError
    (r"<bndbox>.*?</bndbox>", "", "an <object> has no <bndbox>"),  # AttributeError
])
def test_d2_registered_voc_with_a_bad_annotation_names_the_file(voc, tmp_path, pattern,
                                                                replacement, message):
    xml = voc / "Annotations" / f"{_first_id(voc)}.xml"
    xml.write_text(re.sub(pattern, replacement, xml.read_text(), count=1, flags=re.S))
    with pytest.raises(VOCDataError, match=f"{xml}:? {message}"):
        _d2_voc_trainer(voc, tmp_path)


def test_d2_registered_voc_with_an_inverted_box_names_the_image(voc, tmp_path):
    _edit_xml(voc, r"<xmin>(\d+)</xmin>(\s*)<ymin>(\d+)</ymin>(\s*)<xmax>(\d+)</xmax>",
              r"<xmin>\5</xmin>\2<ymin>\3</ymin>\4<xmax>\1</xmax>")
    image = voc / "JPEGImages" / f"{_first_id(voc)}.jpg"
    with pytest.raises(ValueError, match=re.escape(f"{image}: box [") + r".* is inverted"):
        _d2_voc_trainer(voc, tmp_path)


def test_d2_registered_voc_that_is_valid_builds_its_trainer(voc, tmp_path):
    assert len(_d2_voc_trainer(voc, tmp_path).data_loader.dataset) == 8


def test_records_with_class_ids_beyond_num_classes_or_outside_the_image(tmp_path):
    from detectron2.structures import BoxMode

    from nst_det.data.record_check import DetectionDataError, check_detection_records

    def record(box, cat=0, mode=BoxMode.XYXY_ABS):
        return [{"file_name": "a.jpg", "height": 50, "width": 80,
                 "annotations": [{"bbox": box, "bbox_mode": mode, "category_id": cat}]}]

    key = "MODEL.ROI_HEADS.NUM_CLASSES"
    check_detection_records(record([0, 0, 80, 50]), 3, key)  # the whole image: fine
    check_detection_records(record([10, 10, 5, 5], mode=BoxMode.XYWH_ABS), 3, key)
    with pytest.raises(DetectionDataError, match=r"a.jpg: an object has category_id 3, outside "
                                                 r"0..2 \(MODEL.ROI_HEADS.NUM_CLASSES=3\)"):
        check_detection_records(record([0, 0, 8, 5], cat=3), 3, key)
    with pytest.raises(DetectionDataError, match="outside the 80x50 image"):
        check_detection_records(record([0, 0, 85, 50]), 3, key)
    with pytest.raises(DetectionDataError, match="inverted or has zero area"):
        check_detection_records(record([10, 10, 0, 5], mode=BoxMode.XYWH_ABS), 3, key)
    import numpy as np  # a loader built with pandas/numpy: detectron2 takes its ids

    check_detection_records(record([0, 0, 8, 5], cat=np.int64(2)), 3, key)
    with pytest.raises(DetectionDataError, match="category_id np.int64\\(3\\), outside"):
        check_detection_records(record([0, 0, 8, 5], cat=np.int64(3)), 3, key)
    with pytest.raises(DetectionDataError, match="category_id True"):
        check_detection_records(record([0, 0, 8, 5], cat=True), 3, key)


def test_a_samples_seeding_leaves_the_gpus_generators_alone(monkeypatch):
    """torch.manual_seed reseeded every CUDA generator per sample, and nothing restored it: with
    DATALOADER.NUM_WORKERS 0 a GPU run's RoI sampling drew from a stream the last sample set."""
    from nst_det.data.resumable import _seeded_rngs

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls.append)
    before = torch.get_rng_state()
    with _seeded_rngs(12345):
        seeded = torch.rand(3)
    assert calls == [] and torch.equal(torch.get_rng_state(), before)
    with _seeded_rngs(12345):
        assert torch.equal(torch.rand(3), seeded)  # the sample's own CPU stream, as before


def test_odd_length_override_list_says_a_value_is_missing():
    from nst_det.config import load_config

    with pytest.raises(ValueError, match="the last key, 'MODEL.NST.LOSS_WEIGHT', has no value") \
            as info:
        load_config(str(R18_TOY), ["SEED", "3", "MODEL.NST.LOSS_WEIGHT"])
    assert "spelling" not in str(info.value)
