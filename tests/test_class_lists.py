"""A test set is refused before training or evaluation when its evaluation would be silently
wrong (another class list than the model's) or would fail after training (a VOC or COCO
annotation that detectron2's evaluation cannot read)."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from _coco_export import cfg_with, good_json, unique
from _detection_common import R18_FPN_TOY, edit_voc_xml, make_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from nst_det.config import load_config
from nst_det.data.class_lists import ClassListError, check_class_lists
from nst_det.data.coco_checked import COCODataError, check_coco_evaluable, check_coco_json
from nst_det.data.from_config import register_datasets_from_config, register_voc
from nst_det.data.imagefolder import register_imagefolder
from nst_det.data.voc_checked import VOCDataError, check_voc_evaluable, load_voc_checked
from nst_det.engine import ClassificationTrainer, DetectionTrainer

CLS_TOY = R18_FPN_TOY.parent / "cls_R18_toy.yaml"
_names = itertools.count()


@pytest.fixture
def named():
    """name(classes or None) -> a fresh data set name with those thing_classes in its metadata;
    removed afterwards."""
    made = []

    def make(classes):
        name = f"class_list_{next(_names)}"
        if classes is not None:
            MetadataCatalog.get(name).set(thing_classes=list(classes))
        made.append(name)
        return name

    yield make
    for name in made:
        MetadataCatalog.remove(name)


def test_class_lists_must_agree_in_count_and_order(named):
    key = "MODEL.ROI_HEADS.NUM_CLASSES"
    train, same = named(["a", "b", "c"]), named(["a", "b", "c"])
    check_class_lists([train], [same], 3, key)
    check_class_lists([train, named(None)], [same], 3, key)  # an unknown list: not judged
    with pytest.raises(ClassListError, match=rf"{key}=4 but data set {train} has 3 classes"):
        check_class_lists([train], [same], 4, key)
    reordered = named(["a", "c", "b"])
    with pytest.raises(ClassListError, match=rf"{train} and {reordered} number their classes "
                                             r"differently: \['a', 'b', 'c'\] vs \['a', 'c'"):
        check_class_lists([train], [same, reordered], 3, key)
    fewer = named(["a", "c"])
    with pytest.raises(ClassListError, match=rf"data set {fewer} has 2 classes"):
        check_class_lists([train], [fewer], 3, key)


# ---- VOC: what detectron2's evaluation reads (parse_rec), checked before it runs ----------

@pytest.mark.parametrize("pattern, replacement, message", [
    # decimal coordinates, as CVAT writes them: detectron2's parse_rec int() fails on them
    (r"<xmin>(\d+)</xmin>", r"<xmin>\1.5</xmin>", r"<xmin> is '\d+\.5'"),
    (r"<pose>\w*</pose>", "", "has no <pose>"),
    (r"<difficult>\d</difficult>", "", "<difficult> is missing"),
    (r"<truncated>\d</truncated>", "<truncated>no</truncated>", "<truncated> is 'no'"),
])
def test_a_voc_test_set_its_evaluation_cannot_read_is_refused_before_evaluating(
        voc, tmp_path, pattern, replacement, message):
    check_voc_evaluable(str(voc), "test")  # the toy set as written is fine
    xml = edit_voc_xml(voc, pattern, replacement, split="test")
    assert len(load_voc_checked(str(voc), "test", _toy_classes())) == 4  # it trains
    with pytest.raises(VOCDataError, match=f"{re.escape(str(xml))}: .*{message}"):
        check_voc_evaluable(str(voc), "test")
    name = f"voc_eval_{next(_names)}"
    register_voc(name, str(voc), "test", _toy_classes(), 2007)
    cfg = make_cfg(R18_FPN_TOY, ["OUTPUT_DIR", str(tmp_path / "out")], data=(name, name))
    with pytest.raises(VOCDataError, match=message):  # --eval-only: before any inference
        DetectionTrainer.test(cfg, model=None)
    with pytest.raises(VOCDataError, match=message):  # training: before the first iteration
        DetectionTrainer(cfg)


def _ground_truth_ap50(name: str) -> float:
    """AP50 of detectron2's VOC evaluation given the set's own ground truth as detections."""
    import torch
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    evaluator = PascalVOCDetectionEvaluator(name)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        boxes = [a["bbox"] for a in record["annotations"]]
        found = Instances((record["height"], record["width"]), scores=torch.ones(len(boxes)),
                          pred_boxes=Boxes(torch.tensor(boxes).reshape(-1, 4)),
                          pred_classes=torch.tensor([a["category_id"]
                                                     for a in record["annotations"]]))
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": found}])
    return evaluator.evaluate()["bbox"]["AP50"]


@pytest.mark.parametrize("edit, message", [
    (lambda ids: ids + [""], r"line 5 \(''\) is blank"),  # voc_eval opens Annotations/.xml
    (lambda ids: ids + ids[:1], "line 5 .* repeats an earlier line"),  # its objects count twice
    (lambda ids: ["\ufeff" + ids[0]] + ids[1:], "line 1 .* byte-order mark"),
])
def test_a_voc_split_file_its_evaluation_misreads_is_refused(voc, edit, message):
    """Lines the checked loader reads fine but detectron2's voc_eval reads raw (readlines)."""
    split = voc / "ImageSets" / "Main" / "test.txt"
    ids = split.read_text().split()
    name = f"voc_split_{next(_names)}"
    register_voc(name, str(voc), "test", _toy_classes(), 2007)
    assert _ground_truth_ap50(name) == pytest.approx(100.0)
    split.write_text("\n".join(edit(ids)) + "\n", encoding="utf-8")
    assert len(load_voc_checked(str(voc), "test", _toy_classes())) >= 4  # it trains
    with pytest.raises(VOCDataError, match=f"{re.escape(str(split))} {message}"):
        check_voc_evaluable(str(voc), "test")
    if "repeats" in message:  # the silent case: perfect detections lose AP (all repeated: ~55)
        assert _ground_truth_ap50(name) < 99.0


def test_a_voc_image_id_with_a_space_and_a_class_name_with_a_slash_are_refused(voc):
    split = voc / "ImageSets" / "Main" / "test.txt"
    first, *rest = split.read_text().split()
    for folder, ext in (("Annotations", "xml"), ("JPEGImages", "jpg")):
        (voc / folder / f"{first}.{ext}").rename(voc / folder / f"my {first}.{ext}")
    split.write_text("\n".join([f"my {first}", *rest]) + "\n")
    assert len(load_voc_checked(str(voc), "test", _toy_classes())) == 4  # it trains
    with pytest.raises(VOCDataError, match=r"line 1 \('my .*'\) has a space"):
        check_voc_evaluable(str(voc), "test")
    split.write_text("\n".join(rest) + "\n")
    check_voc_evaluable(str(voc), "test", _toy_classes())
    for xml in (voc / "Annotations").glob("*.xml"):  # each class's detections go to <class>.txt
        xml.write_text(xml.read_text().replace("<name>circle</name>", "<name>circle/ring</name>"))
    classes = ["circle/ring" if c == "circle" else c for c in _toy_classes()]
    name = f"voc_slash_{next(_names)}"
    register_voc(name, str(voc), "test", classes, 2007)
    cfg = make_cfg(R18_FPN_TOY, ["OUTPUT_DIR", str(voc.parent / "out")], data=(name, name))
    with pytest.raises(VOCDataError, match="class name 'circle/ring' of .* holds a '/'"):
        DetectionTrainer.test(cfg, model=None)  # --eval-only: before any inference


def test_a_voc_class_name_with_spaces_around_it_is_refused(voc):
    """The loader strips <name>; detectron2's parse_rec does not, and the class scores 0."""
    xml = edit_voc_xml(voc, r"<name>(\w+)</name>", r"<name>\1 </name>", split="test")
    assert len(load_voc_checked(str(voc), "test", _toy_classes())) == 4  # it trains
    with pytest.raises(VOCDataError, match=f"{re.escape(str(xml))}: <name>.* </name> has spaces"):
        check_voc_evaluable(str(voc), "test")


def _toy_classes():
    from nst_det.data.toy_world import TOY_CLASSES

    return list(TOY_CLASSES)


# ---- ImageFolder: a split missing a class folder numbers the classes after it otherwise ------

def _imagefolder(root, classes):
    for c in classes:
        (root / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (40, 80, 120)).save(root / c / "0.png")


def test_an_imagefolder_val_split_missing_a_class_folder_is_refused(tmp_path):
    _imagefolder(tmp_path / "train", ["n01", "n02", "n03"])
    _imagefolder(tmp_path / "val", ["n01", "n03"])  # n03's images would get n02's label
    _imagefolder(tmp_path / "val_fixed", ["n01", "n02", "n03"])
    train, val, fixed = (register_imagefolder(f"folder_{split}_{next(_names)}",
                                              str(tmp_path / split))
                         for split in ("train", "val", "val_fixed"))
    try:
        cfg = load_config(str(CLS_TOY), ["MODEL.CLASSIFIER.NUM_CLASSES", "3", "DATASETS.TRAIN",
                                         f"('{train}',)", "DATASETS.TEST", f"('{val}',)"])
        DatasetCatalog.get(train)  # as training loads it
        with pytest.raises(ClassListError, match=rf"NUM_CLASSES=3 but data set {val} has 2 "
                                                 r"classes \['n01', 'n03'\]"):
            ClassificationTrainer.check_test_set(cfg, val)
        ClassificationTrainer.check_test_set(cfg, fixed)  # the same classes: accepted
    finally:
        for name in (train, val, fixed):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_a_test_set_written_on_its_first_load_is_written_then_checked(tiny_voc, tmp_path):
    """The toy sets (e.g. the weight grid's minival split) are generated when first loaded: the
    check before training loads them instead of refusing a folder not written yet."""
    from nst_det.data.datasets import register_toy_voc

    dirname = tmp_path / "VOC2007"
    _, test = register_toy_voc(f"lazy_voc_{next(_names)}", str(dirname), seed=2,
                               num_trainval=2, num_test=2)
    assert not dirname.exists()
    cfg = make_cfg(R18_FPN_TOY, ["OUTPUT_DIR", str(tmp_path / "out")], data=(tiny_voc[0], test))
    DetectionTrainer(cfg)
    assert (dirname / "ImageSets" / "Main" / "test.txt").is_file()


def test_a_coco_test_set_written_on_its_first_load_is_written_then_checked(tiny_voc, tmp_path):
    """The shipped toy COCO config refused its own test set on a fresh data root: the json is
    written when the set is first loaded, and the COCO check did not load it."""
    from nst_det.data.toy_coco import register_toy_coco

    _, test = register_toy_coco(f"lazy_coco_{next(_names)}", str(tmp_path / "VOC2007"),
                                str(tmp_path / "json"), seed=2, num_trainval=2, num_test=2)
    assert not (tmp_path / "json").exists()
    cfg = make_cfg(R18_FPN_TOY, ["OUTPUT_DIR", str(tmp_path / "out")], data=(tiny_voc[0], test))
    DetectionTrainer(cfg)
    assert (tmp_path / "json" / "instances_test.json").is_file()


def test_a_test_set_nst_det_cannot_evaluate_is_refused_before_training(tiny_voc, tmp_path):
    name = f"lvis_like_{next(_names)}"  # e.g. an LVIS set: its evaluation failed after training
    DatasetCatalog.register(name, lambda: DatasetCatalog.get(tiny_voc[1]))
    MetadataCatalog.get(name).set(evaluator_type="lvis",
                                  thing_classes=MetadataCatalog.get(tiny_voc[1]).thing_classes)
    try:
        cfg = make_cfg(R18_FPN_TOY, ["OUTPUT_DIR", str(tmp_path / "out")],
                       data=(tiny_voc[0], name))
        with pytest.raises(NotImplementedError, match=rf"{name}' has evaluator_type 'lvis'"):
            DetectionTrainer(cfg)
        assert not (tmp_path / "out" / "model_final.pth").exists()
        # with an evaluator of one's own, the set's evaluator_type does not matter
        from detectron2.evaluation import DatasetEvaluator
        from detectron2.modeling import build_model

        class Mine(DatasetEvaluator):
            def evaluate(self):
                return {"bbox": {"AP50": 1.0}}

        model = build_model(cfg).eval()
        assert DetectionTrainer.test(cfg, model, Mine()) == {"bbox": {"AP50": 1.0}}
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_a_classifier_refuses_a_detection_set_before_training(tiny_voc, tmp_path):
    classes = sorted(MetadataCatalog.get(tiny_voc[1]).thing_classes)  # ImageFolder's order
    _imagefolder(tmp_path / "train", classes)
    train = register_imagefolder(f"folder_train_{next(_names)}", str(tmp_path / "train"))
    boxes = f"voc_sorted_{next(_names)}"  # a detection set naming the same classes
    DatasetCatalog.register(boxes, lambda: DatasetCatalog.get(tiny_voc[1]))
    MetadataCatalog.get(boxes).set(thing_classes=classes, evaluator_type="pascal_voc")
    try:
        cfg = load_config(str(CLS_TOY), ["MODEL.CLASSIFIER.NUM_CLASSES", str(len(classes)),
                                         "DATASETS.TRAIN", f"('{train}',)"])
        DatasetCatalog.get(train)
        # the class lists agree; its records have boxes, no label: a KeyError after training
        with pytest.raises(ValueError, match=rf"\['{boxes}'\]: record .* has no 'label'"):
            ClassificationTrainer.check_test_set(cfg, boxes)
    finally:
        for name in (train, boxes):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


# ---- every set a model trains or is evaluated on numbers its classes as the model does ----

def _coco_trainer_cfg(tmp_path, tool_export, mutate_test=None, opts=()):
    """A toy detector's config training on the tool export's trainval set and testing on its
    test set, whose json `mutate_test` may change first; returns (cfg, test set name)."""
    data, image_root = good_json(tool_export)
    if mutate_test is not None:
        mutate_test(data)
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps(data))
    train, test = unique("cls_train"), unique("cls_test")
    register_datasets_from_config(cfg_with(coco=[[train, *tool_export["trainval"]],
                                                  [test, str(test_json), image_root]]))
    return make_cfg(R18_FPN_TOY, ["OUTPUT_DIR", str(tmp_path / "out"), *opts],
                    data=(train, test)), test


def _swap_two_category_names(data):
    first, second = data["categories"][:2]
    first["name"], second["name"] = second["name"], first["name"]


def _drop_last_category(data):
    gone = data["categories"].pop()["id"]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != gone]


@pytest.mark.parametrize("mutate, message", [
    # the same 5 classes in another order: class 0 would be scored as class 1
    (_swap_two_category_names, r"number their classes differently: \['circle', 'triangle'"),
    # a test json listing only the classes it uses (4 of 5): ids after the gap shift
    (_drop_last_category, r"MODEL.ROI_HEADS.NUM_CLASSES=5 but data set cls_test_\d+ has 4"),
])
def test_a_test_set_numbering_classes_otherwise_is_refused_before_training_and_evaluation(
        tmp_path, tool_export, mutate, message):
    cfg, test = _coco_trainer_cfg(tmp_path, tool_export, mutate)
    with pytest.raises(ClassListError, match=message):
        DetectionTrainer(cfg)
    with pytest.raises(ClassListError, match=message):  # --eval-only: before any inference
        DetectionTrainer.test(cfg, model=None)


def test_a_coco_training_set_with_another_class_count_than_the_model_is_refused(
        tmp_path, tool_export):
    """A COCO set learns its classes when loaded: the count is checked once it is."""
    cfg, _ = _coco_trainer_cfg(tmp_path, tool_export,
                               opts=["MODEL.ROI_HEADS.NUM_CLASSES", "20", "DATASETS.TEST", "()"])
    with pytest.raises(ClassListError, match=r"MODEL.ROI_HEADS.NUM_CLASSES=20 but data set "
                                             r"cls_train_\d+ has 5 classes"):
        DetectionTrainer(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    assert len(DetectionTrainer(cfg).data_loader.dataset) == 8  # the right count trains


def test_a_coco_test_set_without_iscrowd_is_refused_before_training_a_training_set_is_not(
        tmp_path, tool_export):
    """pycocotools' evaluation ends on a bare KeyError without 'iscrowd' (after training);
    detectron2's training loader takes a missing one as 0, so a training json may omit it."""
    def without_iscrowd(data):
        data["annotations"][3].pop("iscrowd")

    cfg, test = _coco_trainer_cfg(tmp_path, tool_export, without_iscrowd)
    json_file = MetadataCatalog.get(test).json_file
    check_coco_json(json_file, tool_export["test"][1])  # fine as data
    with pytest.raises(COCODataError, match=r"annotation id 4 \(annotations\[3\]\) has 'iscrowd' "
                                            r"'missing'; COCO evaluation needs"):
        check_coco_evaluable(json_file)
    with pytest.raises(COCODataError, match="'iscrowd' 'missing'"):
        DetectionTrainer(cfg)  # before training
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (test,), ()
    DetectionTrainer(cfg)  # as a training set: accepted
