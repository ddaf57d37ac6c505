"""Your own data without code: COCO-json and VOC-layout sets from config keys, evaluated with the
metric their format implies, and clear errors (file + entry) for bad data."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _coco_export import TOOL_CATEGORY_IDS, cfg_with, good_json, unique
from _detection_common import R18_FPN_TOY, TINY, distill_opts, load_train_net, write_teacher
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from nst_det import add_nst_config
from nst_det.config import load_config
from nst_det.data.coco_checked import COCODataError, check_coco_json
from nst_det.data.from_config import register_datasets_from_config, register_voc
from nst_det.data.toy_coco import register_toy_coco
from nst_det.data.toy_world import TOY_CLASSES
from nst_det.data.voc_checked import VOCDataError
from nst_det.engine import DetectionTrainer
from nst_det.evaluation import PerClassVOCEvaluator
from nst_det.evaluation.by_dataset import build_dataset_evaluator


def _gt_outputs(record, id_map):
    """Ground truth as predictions (score 1), in contiguous class ids."""
    anns = record["annotations"]
    inst = Instances((record["height"], record["width"]))
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.ones(len(anns))
    inst.pred_classes = torch.tensor([id_map(a["category_id"]) for a in anns], dtype=torch.int64)
    return [{"instances": inst}]


# ---- registration from config keys ----

def test_coco_from_config_keys_registers_in_load_config(tmp_path, tool_export):
    name = unique("tool_coco")
    json_file, image_root = tool_export["test"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"_BASE_: {str(R18_FPN_TOY)!r}\nDATASETS:\n"
                        f"  COCO: [[{name!r}, {json_file!r}, {image_root!r}]]\n"
                        f"  TEST: ({name!r},)\n")
    cfg = load_config(str(cfg_file))
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "coco" and meta.json_file == json_file
    records = DatasetCatalog.get(name)
    assert len(records) == 4 and all(r["file_name"].startswith(image_root) for r in records)
    # non-contiguous category ids work: mapped to 0..4, and back by the evaluator
    assert meta.thing_classes == list(TOY_CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id == {c: i for i, c in
                                                      enumerate(TOOL_CATEGORY_IDS)}
    assert {a["category_id"] for r in records for a in r["annotations"]} <= set(range(5))
    assert isinstance(build_dataset_evaluator(name), COCOEvaluator)
    assert DetectionTrainer.best_metric(cfg) == "bbox/AP"
    load_config(str(cfg_file))  # loading the config again is a no-op
    other = get_cfg()
    add_nst_config(other)
    other.DATASETS.COCO = [[name, json_file + ".other", image_root]]
    with pytest.raises(ValueError, match="already registered"):
        register_datasets_from_config(other)


def test_a_teachers_config_registers_none_of_its_data_sets(tmp_path):
    """A training run's config.yaml names its data sets; as a teacher's config it must build
    without them (the teacher reads no data; its sets may have moved away)."""
    from nst_det.modeling.teacher import build_teacher_cfg

    gone = tmp_path / "moved_away" / "VOC2007"  # no class list: registering it reads the folder
    yaml, weights = write_teacher(tmp_path, ["DATASETS.VOC", repr([["teacher_only_voc", str(gone),
                                                                    "trainval"]])])
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(R18_FPN_TOY))
    cfg.merge_from_list([*TINY, *distill_opts(yaml, weights)])
    tcfg = build_teacher_cfg(cfg)
    assert tcfg.DATASETS.VOC[0][0] == "teacher_only_voc"
    assert "teacher_only_voc" not in DatasetCatalog.list()


def test_train_net_options_register_sets(tmp_path, tool_export, tiny_voc):
    train_net = load_train_net()
    coco, voc = unique("cli_coco"), unique("cli_voc")
    args = train_net.argument_parser().parse_args([
        "--config-file", str(R18_FPN_TOY), "--coco-dataset", coco, *tool_export["test"],
        "--voc-dataset", voc, tiny_voc[2], "test", "OUTPUT_DIR", str(tmp_path)])
    cfg = train_net.setup(args)
    assert [e[0] for e in cfg.DATASETS.COCO] == [coco] and [e[0] for e in cfg.DATASETS.VOC] == [voc]
    assert MetadataCatalog.get(coco).evaluator_type == "coco"
    assert MetadataCatalog.get(voc).thing_classes == sorted(TOY_CLASSES)  # found in annotations
    assert MetadataCatalog.get(voc).year == 2007  # the folder is named VOC2007: 11-point AP


def test_voc_from_config_keys(tiny_voc):
    name, found = unique("my_voc"), unique("my_voc_found")
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.DATASETS.VOC = [[name, tiny_voc[2], "test", ",".join(TOY_CLASSES), 2012],
                        [found, tiny_voc[2], "trainval"]]
    cfg.DATASETS.TEST = (name,)
    assert register_datasets_from_config(cfg) == [name, found]
    assert DatasetCatalog.get(name) == DatasetCatalog.get(tiny_voc[1])  # the checked loader
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == list(TOY_CLASSES) and meta.year == 2012
    evaluator = build_dataset_evaluator(name)
    assert isinstance(evaluator, PerClassVOCEvaluator) and not evaluator._is_2007
    assert DetectionTrainer.best_metric(cfg) == "bbox/AP50"
    cfg.NST_DET.BEST_METRIC = "AP75"
    cfg.DATASETS.TEST = (name, found)
    assert DetectionTrainer.best_metric(cfg) == f"{name}/bbox/AP75"
    assert MetadataCatalog.get(found).thing_classes == sorted(TOY_CLASSES)


def test_voc_class_list_disagreeing_with_annotations(tiny_voc):
    name = unique("voc_wrong_classes")
    register_voc(name, tiny_voc[2], "test", ["circle", "triangle", "square", "star"])  # no cross
    with pytest.raises(VOCDataError, match=r"Annotations/.*\.xml: unknown class 'cross'"):
        DatasetCatalog.get(name)
    with pytest.raises(VOCDataError, match="names a class twice"):
        register_voc(unique("voc_dup"), tiny_voc[2], "test", "circle,circle")


def test_voc_classes_found_needs_annotations(tmp_path):
    with pytest.raises(VOCDataError, match="holds no .xml annotations"):
        register_voc(unique("voc_empty"), str(tmp_path), "test")
    with pytest.raises(VOCDataError, match=f"VOC folder {tmp_path / 'MyVOC'} does not exist"):
        register_voc(unique("voc_typo"), str(tmp_path / "MyVOC"), "test")  # not "no .xml"


def test_a_voc_entry_with_the_year_in_the_class_list_slot_is_named(tiny_voc):
    cfg = load_config(str(R18_FPN_TOY), ["DATASETS.VOC", repr([["voc_year_slot", tiny_voc[2],
                                                                 "test", 2007]])],
                      register_data=False)
    with pytest.raises(ValueError, match=r"'voc_year_slot': its class list \(the 4th item of a "
                                         r"DATASETS.VOC entry\) is 2007"):
        register_datasets_from_config(cfg)


# ---- evaluation ----

def test_coco_evaluator_ground_truth_is_100_on_toy_coco(tmp_path, tiny_voc):
    prefix = unique("toy_coco_t")
    _, test = register_toy_coco(prefix, tiny_voc[2], str(tmp_path / "coco"), seed=1,
                                num_trainval=8, num_test=4)
    # the evaluator first (as a trainer may build it): it has the json written
    evaluator = build_dataset_evaluator(test, str(tmp_path / "eval"))
    assert (tmp_path / "coco" / "instances_test.json").is_file()
    records = DatasetCatalog.get(test)
    voc_records = DatasetCatalog.get(tiny_voc[1])
    assert [len(r["annotations"]) for r in records] == [len(r["annotations"])
                                                         for r in voc_records]
    assert isinstance(evaluator, COCOEvaluator)
    evaluator.reset()
    for r in records:
        evaluator.process([{"image_id": r["image_id"]}], _gt_outputs(r, lambda c: c))
    bbox = evaluator.evaluate()["bbox"]
    assert bbox["AP"] == pytest.approx(100.0) and bbox["AP50"] == pytest.approx(100.0)
    assert all(bbox[f"AP-{c}"] == pytest.approx(100.0) for c in TOY_CLASSES)
    # the json is rewritten only when the toy set changes
    json_file = MetadataCatalog.get(test).json_file
    mtime = (tmp_path / "coco" / "instances_test.json").stat().st_mtime_ns
    DatasetCatalog.get(test)
    assert (tmp_path / "coco" / "instances_test.json").stat().st_mtime_ns == mtime
    assert json_file.endswith("instances_test.json")


def test_coco_and_voc_numbers_differ_as_metrics_do(tmp_path, tool_export):
    """One box shifted: COCO AP (IoU .5:.95) drops, AP50 stays 100 (IoU still > .5)."""
    name = unique("tool_coco_eval")
    register_datasets_from_config(cfg_with(coco=[[name, *tool_export["test"]]]))
    records = DatasetCatalog.get(name)
    evaluator = build_dataset_evaluator(name, str(tmp_path))
    evaluator.reset()
    for i, r in enumerate(records):
        out = _gt_outputs(r, lambda c: c)
        if i == 0:
            b = out[0]["instances"].pred_boxes.tensor
            b[0] += torch.tensor([2.0, 2.0, 2.0, 2.0]) * (b[0, 2:] - b[0, :2]).repeat(2) / 20
        evaluator.process([{"image_id": r["image_id"]}], out)
    bbox = evaluator.evaluate()["bbox"]
    assert bbox["AP50"] == pytest.approx(100.0) and 50.0 < bbox["AP"] < 100.0


# ---- bad data: clear errors naming the file and the entry ----

def _bad(tmp_path, data, text=None):
    path = tmp_path / "bad.json"
    path.write_text(text if text is not None else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("categories"), r"no \['categories'\] list"),
    (lambda d: d.pop("images"), r"no \['images'\] list"),
    (lambda d: d.pop("annotations"), r"no \['annotations'\] list"),
    (lambda d: d.update(categories=[]), "'categories' is empty"),
    (lambda d: d["annotations"][2].update(category_id=4),
     r"annotation id 3 \(annotations\[2\], image test_\d+\.jpg\) has category_id 4, which "
     "'categories' does not define"),
    (lambda d: d["annotations"][1].update(image_id=99), "refers to image id 99"),
    (lambda d: d["annotations"][0]["bbox"].__setitem__(2, 0), "annotation id 1 .* non-positive"),
    (lambda d: d["annotations"][0]["bbox"].__setitem__(3, -4.0), "annotation id 1 .* non-positive"),
    (lambda d: d["annotations"][0]["bbox"].__setitem__(0, 1000.0), "annotation id 1 .* outside"),
    (lambda d: d["annotations"][0]["bbox"].__setitem__(1, -9.0), "annotation id 1 .* outside"),
    (lambda d: d["annotations"][3].pop("area"), r"annotation id 4 .* no numeric 'area'"),
    (lambda d: d["annotations"][1].update(ignore=1), r"annotation id 2 .* 'ignore': 1"),
    (lambda d: d["annotations"][1].update(segmentation=[[1.0, 2.0, 3.0, 4.0]]),
     r"annotation id 2 .* no polygon of 3 points or more"),
    (lambda d: d["annotations"][0]["bbox"].__setitem__(2, math.nan),
     r"annotation id 1 .* finite numbers"),
    (lambda d: d["images"][0].update(width="100"), r"image id 1 .* has size 100x"),
    (lambda d: d["images"][0].update(file_name="gone.jpg"), r"1 of 4 image files are missing .*"
     r"gone\.jpg \(id 1\)"),
    (lambda d: d["images"][1].update(id=1), "image id 1 is used more than once"),
    (lambda d: d["images"][0].pop("width"), r"images\[0\] \(id 1\) has no \['width'\]"),
])
def test_bad_coco_json_names_file_and_entry(tmp_path, tool_export, mutate, message):
    data, image_root = good_json(tool_export)
    data = copy.deepcopy(data)
    mutate(data)
    path = _bad(tmp_path, data)
    with pytest.raises(COCODataError, match=message) as info:
        check_coco_json(path, image_root)
    assert path in str(info.value)


def test_unparsable_coco_json_through_the_catalog(tmp_path, tool_export):
    _, image_root = good_json(tool_export)
    path = _bad(tmp_path, None, text='{"images": [], "annotations": [\n  {"id": 1,}\n]')
    name = unique("broken_coco")
    register_datasets_from_config(cfg_with(coco=[[name, path, image_root]]))
    with pytest.raises(COCODataError, match=r"bad\.json is not valid JSON \(line 2, column"):
        DatasetCatalog.get(name)
    assert (tmp_path / "bad.json").exists()  # nothing is lost: the file is left as it was
    with pytest.raises(COCODataError, match="does not exist"):
        check_coco_json(str(tmp_path / "nope.json"), image_root)
    missing = unique("missing_coco")
    register_datasets_from_config(cfg_with(coco=[[missing, str(tmp_path / "no.json"),
                                                   image_root]]))
    with pytest.raises(COCODataError, match=r"no\.json does not exist"):
        build_dataset_evaluator(missing)  # not pycocotools' bare FileNotFoundError


def test_wrong_entry_shape_is_named():
    with pytest.raises(ValueError, match="DATASETS.COCO entry"):
        register_datasets_from_config(cfg_with(coco=[["only_a_name", "x.json"]]))


# ---- done when: a labelling tool's COCO export trains with NST and is evaluated COCO-style ----

def test_tool_export_trains_with_nst_and_coco_metrics(tmp_path, tool_export, tiny_voc):
    teacher = write_teacher(tmp_path)
    train, test, voc_test = unique("tool_train"), unique("tool_test"), unique("tool_voc_test")
    out = tmp_path / "run"
    (tmp_path / "student.yaml").write_text("\n".join([
        f"_BASE_: {str(R18_FPN_TOY)!r}",
        "DATASETS:",
        f"  COCO: [[{train!r}, {tool_export['trainval'][0]!r}, {tool_export['trainval'][1]!r}],"
        f" [{test!r}, {tool_export['test'][0]!r}, {tool_export['test'][1]!r}]]",
        f"  VOC: [[{voc_test!r}, {tiny_voc[2]!r}, 'test', {','.join(TOY_CLASSES)!r}, 2007]]",
        f"  TRAIN: ({train!r},)",
        f"  TEST: ({test!r}, {voc_test!r})",
        f"OUTPUT_DIR: {str(out)!r}", ""]))
    train_net = load_train_net()
    args = train_net.argument_parser().parse_args([
        "--config-file", str(tmp_path / "student.yaml"), *TINY, *distill_opts(*teacher),
        "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0"])
    train_net.main(args)
    with open(out / "metrics.json") as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    assert any(math.isfinite(m.get("loss_nst", math.nan)) for m in metrics)
    final = metrics[-1]
    coco_ap, voc_ap50 = final[f"{test}/bbox/AP"], final[f"{voc_test}/bbox/AP50"]
    assert math.isfinite(coco_ap) and math.isfinite(voc_ap50)
    # the numbers training logged are what --eval-only gives for its model_final.pth
    again = train_net.main(train_net.argument_parser().parse_args([
        "--config-file", str(tmp_path / "student.yaml"), "--eval-only", *TINY,
        *distill_opts(*teacher), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path / "eval")]))
    assert again[test]["bbox"]["AP"] == coco_ap and again[voc_test]["bbox"]["AP50"] == voc_ap50
    assert {f"{test}/bbox/{k}" for k in ("AP50", "AP75", "APs", "APm", "APl")} <= set(final)
    assert f"{test}/bbox/AP-circle" in final and f"{voc_test}/bbox/AP50-circle" in final
    assert (out / "inference" / test / "coco_instances_results.json").is_file()
    # the saved config names the data sets, so --eval-only (and the pipeline) find them again
    saved = load_config(str(out / "config.yaml"))
    assert [e[0] for e in saved.DATASETS.COCO] == [train, test]
    result = train_net.main(train_net.argument_parser().parse_args([
        "--config-file", str(out / "config.yaml"), "--eval-only",
        "MODEL.WEIGHTS", str(out / "model_final.pth")]))
    assert result[test]["bbox"]["AP"] == pytest.approx(coco_ap, abs=1e-6)


def test_thing_classes_of_a_coco_set_before_it_was_loaded(tool_export):
    """tools/predict.py names classes from the first test set: a COCO set is read for them."""
    from nst_det.data.from_config import thing_classes

    name = unique("tool_coco_names")
    register_datasets_from_config(cfg_with(coco=[[name, *tool_export["test"]]]))
    assert MetadataCatalog.get(name).get("thing_classes") is None
    assert thing_classes(name) == list(TOY_CLASSES)
