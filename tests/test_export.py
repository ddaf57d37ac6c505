"""Export: student-only checkpoint, TorchScript and ONNX, each verified against the eager model."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
R18_TOY = REPO / "configs" / "quick_schedules" / "faster_rcnn_R_18_FPN_toy.yaml"
SMALL = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "200",
         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20"]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_detector(tiny_voc, module_tmp_path):
    """An untrained toy R-18 FPN detector saved as a training run would, plus 2 teacher tensors.

    Untrained is enough: export must reproduce whatever the eager model computes; a score
    threshold of 0 keeps plenty of detections to compare.
    """
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from nst_det import add_nst_config

    _, test, _ = tiny_voc
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(R18_TOY))
    cfg.merge_from_list(SMALL)
    cfg.DATASETS.TEST = (test,)
    torch.manual_seed(0)
    model = build_model(cfg)
    state = dict(model.state_dict())
    # what a careless distillation checkpoint might hold: export must drop it
    state["teacher.backbone.stem.conv1.weight"] = torch.zeros(2, 3, 1, 1)
    state["teacher.roi_heads.box_predictor.cls_score.bias"] = torch.zeros(6)
    weights = module_tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 1}, weights)
    opts = [*SMALL, "DATASETS.TEST", f"('{test}',)", "MODEL.WEIGHTS", str(weights)]
    # the training config carries distillation keys that a stock config does not know
    opts += ["MODEL.NST.LOSS_WEIGHT", "25.0", "MODEL.TEACHER.WEIGHTS", "teacher.pth"]
    return opts


@pytest.mark.parametrize("fmt", ["checkpoint", "torchscript", "onnx"])
def test_export_round_trip_matches_eager(toy_detector, tmp_path, fmt):
    export_model = _load_tool("export_model")
    out = tmp_path / fmt
    rc = export_model.main(["--config-file", str(R18_TOY), "--format", fmt,
                            "--output", str(out), "--num-images", "2", *toy_detector])
    summary = json.loads((out / "verification.json").read_text())
    assert rc == 0 and summary["passed"], summary
    assert summary["total_detections"] > 0
    assert summary["max_box_dev"] <= summary["box_atol_px"]
    info = json.loads((out / "export_info.json").read_text())
    assert info["size_bytes"] == os.path.getsize(out / info["file"]) > 1_000_000
    assert info["needs_nst_det"] == []  # an R-18 FPN student: stock detectron2 builds it
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_checkpoint_export_has_no_teacher_and_loads_in_stock_detectron2(
    toy_detector, tiny_voc, tmp_path
):
    export_model = _load_tool("export_model")
    out = tmp_path / "ckpt"
    assert export_model.main(["--config-file", str(R18_TOY), "--format", "checkpoint",
                              "--output", str(out), *toy_detector]) == 0
    state = torch.load(out / "model_final.pth", weights_only=True)
    assert set(state) == {"model"}  # no optimizer, scheduler or iteration
    assert not [k for k in state["model"] if "teacher" in k]
    cfg_text = (out / "config.yaml").read_text()
    for key in ("TEACHER", "NST:", "KD:", "DISTILL:", "NST_DET", "DistillationRCNN"):
        assert key not in cfg_text, key

    # reference detections from nst_det's eager runner, in original-image pixels
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    from nst_det.export import eager_runner, preprocess, rescale_boxes
    from nst_det.export.student import load_student_detector

    _, test, _ = tiny_voc
    files = [r["file_name"] for r in DatasetCatalog.get(test)[:2]]
    export_cfg = _exported_cfg(out / "config.yaml")
    runner = eager_runner(load_student_detector(export_cfg))
    expected = []
    for f in files:
        image = read_image(f, format="RGB")
        tensor = preprocess(image, 128, 200)
        det = runner(tensor)
        expected.append(rescale_boxes(det["boxes"], tensor.shape[1:], image.shape[:2]).tolist())

    script = textwrap.dedent(f"""
        import json, sys
        import cv2
        from detectron2.config import get_cfg
        from detectron2.engine import DefaultPredictor
        cfg = get_cfg()
        cfg.merge_from_file({str(out / "config.yaml")!r})
        cfg.MODEL.DEVICE = "cpu"
        predictor = DefaultPredictor(cfg)
        boxes = [predictor(cv2.imread(f))["instances"].pred_boxes.tensor.tolist()
                 for f in {files!r}]
        assert "nst_det" not in sys.modules
        print(json.dumps(boxes))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd="/", env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for exp, boxes in zip(expected, got):
        assert len(boxes) == len(exp) > 0
        np.testing.assert_allclose(np.array(boxes), np.array(exp), atol=1e-3)


def _exported_cfg(path):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_failed_export_leaves_no_partial_file(toy_detector, tmp_path, monkeypatch):
    export_model = _load_tool("export_model")

    def broken_export(model, args, f, **kwargs):
        f.write(b"half an onnx file")
        raise RuntimeError("simulated crash during export")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    out = tmp_path / "onnx"
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_model.main(["--config-file", str(R18_TOY), "--format", "onnx",
                           "--output", str(out), *toy_detector])
    assert not (out / "model.onnx").exists()
    assert not [p for p in out.iterdir()]  # no temp file, no verification of a broken export


def test_missing_weights_is_a_clear_error(tiny_voc, tmp_path):
    export_model = _load_tool("export_model")
    with pytest.raises(SystemExit, match=r"MODEL.WEIGHTS .*no.pth: no such file"):
        export_model.main(["--config-file", str(R18_TOY), "--format", "checkpoint",
                           "--output", str(tmp_path), "MODEL.WEIGHTS", str(tmp_path / "no.pth")])


@pytest.mark.parametrize("marks, says", [
    ({"last_checkpoint": b"model_final.pth"}, r"is a training run's \(it holds last_checkpoint\)"),
    ({}, r"holds \['model_final.pth', 'config.yaml'\], not from an export"),
], ids=["training_run", "users_copies"])
def test_an_export_never_replaces_files_it_did_not_write(toy_detector, tmp_path, marks, says):
    """A training run's folder, or one holding a user's copies of the checkpoint and config
    being exported: the export replaced both with the student-only ones."""
    export_model = _load_tool("export_model")
    folder = tmp_path / "my_student_nst"
    folder.mkdir()
    weights = Path(toy_detector[toy_detector.index("MODEL.WEIGHTS") + 1]).read_bytes()
    files = {**marks, "model_final.pth": weights, "config.yaml": R18_TOY.read_bytes()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with pytest.raises(SystemExit, match=f"export folder .*my_student_nst {says}"):
        export_model.main(["--config-file", str(R18_TOY), "--format", "checkpoint",
                           "--output", str(folder), *toy_detector,
                           "MODEL.WEIGHTS", str(folder / "model_final.pth")])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_an_export_folder_is_the_next_exports_and_a_file_is_no_folder(toy_detector, tmp_path):
    export_model = _load_tool("export_model")
    export = tmp_path / "export"
    for _ in range(2):  # an export's files are the next export's to replace
        export_model.main(["--config-file", str(R18_TOY), "--format", "checkpoint",
                           "--output", str(export), *toy_detector])
    with pytest.raises(SystemExit, match="is a file: give a folder"):
        export_model.main(["--config-file", str(R18_TOY), "--format", "onnx",
                           "--output", str(export / "config.yaml"), *toy_detector])


def test_a_first_export_stopped_while_moving_into_place_can_be_run_again(
        toy_detector, tmp_path, monkeypatch):
    """config.yaml moved in before export_info.json: a Ctrl-C between the two left a folder the
    next export refused for ever ('not from an export')."""
    from nst_det.utils import atomic

    export_model = _load_tool("export_model")
    out = tmp_path / "export"
    real, moved = atomic.os.replace, []

    def stop_after_the_first_move(src, dst):
        if os.path.dirname(dst) == str(out):  # into place (not a write inside the staging)
            if moved:
                raise KeyboardInterrupt
            moved.append(os.path.basename(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", stop_after_the_first_move)
    args = ["--config-file", str(R18_TOY), "--format", "checkpoint", "--output", str(out),
            *toy_detector]
    with pytest.raises(KeyboardInterrupt):
        export_model.main(args)
    assert moved == ["export_info.json"]  # what says whose files these are, first
    monkeypatch.setattr(atomic.os, "replace", real)
    assert export_model.main(args) == 0
    assert json.loads((out / "verification.json").read_text())["passed"]


def test_nothing_to_verify_on_and_unfit_weights_are_named(toy_detector, tmp_path, capsys):
    export_model = _load_tool("export_model")
    out = tmp_path / "out"
    with pytest.raises(SystemExit):  # verified on 0 images, the checkpoint export had passed
        export_model.main(["--config-file", str(R18_TOY), "--format", "checkpoint",
                           "--num-images", "0", "--output", str(out), *toy_detector])
    assert "--num-images: '0': give a whole number >= 1" in capsys.readouterr().err
    # weights of another class count: a bare RuntimeError from load_state_dict before
    with pytest.raises(SystemExit, match=r"does not match the student .* shapes \(file vs "
                                         r"model\) \['roi_heads.box_predictor.cls_score"):
        export_model.main(["--config-file", str(R18_TOY), "--format", "onnx", "--output",
                           str(out), *toy_detector, "MODEL.ROI_HEADS.NUM_CLASSES", "20"])
    with pytest.raises(SystemExit, match="MODEL.MASK_ON / KEYPOINT_ON exports as --format "
                                         "checkpoint"):
        export_model.main(["--config-file", str(R18_TOY), "--format", "onnx", "--output",
                           str(out), *toy_detector, "MODEL.MASK_ON", "True"])
    assert not out.exists()


def test_an_export_that_fails_verification_keeps_the_previous_export(
        toy_detector, tmp_path, monkeypatch):
    """Before, the failed export replaced the verified one (its verification.json saying
    passed: false), and the good export was lost."""
    from nst_det.export import api

    export_model = _load_tool("export_model")
    out = tmp_path / "ts"
    args = ["--config-file", str(R18_TOY), "--format", "torchscript", "--output", str(out),
            "--num-images", "2", *toy_detector]
    assert export_model.main(args) == 0
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    real = api.torchscript_runner

    def shifted_runner(path):  # an export whose boxes are 3 px off the eager model's
        run = real(path)
        return lambda image: {**run(image), "boxes": run(image)["boxes"] + 3.0}

    monkeypatch.setattr(api, "torchscript_runner", shifted_runner)
    cfg = export_model.export_config(export_model.parse_args(args))
    with pytest.raises(api.ExportVerificationError, match=r"does not match the eager model on 2 "
                       r"test images \(boxes up to 3 px .*previous export, if any, is kept") as e:
        api.export_and_verify(cfg, "torchscript", str(out), 2)
    assert not e.value.summary["passed"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good
    with pytest.raises(SystemExit, match="does not match the eager model"):  # the tool: rc != 0
        export_model.main(args)


def test_detections_are_compared_one_to_one_whatever_their_order():
    from nst_det.export.verify import compare_detections

    boxes = np.array([[0, 0, 10, 10], [50, 50, 70, 90], [5, 5, 9, 9]], dtype=np.float32)
    ref = {"boxes": boxes, "scores": np.array([0.9, 0.5, 0.5 + 4e-8]),
           "classes": np.array([1, 2, 2])}
    # the two near-equal scores swapped places: the same detections
    swapped = {k: v[[0, 2, 1]] for k, v in ref.items()}
    same = compare_detections(ref, swapped)
    assert same["classes_equal"] and same["max_box_dev"] == 0.0 and same["max_score_dev"] < 1e-7
    moved = {**swapped, "boxes": swapped["boxes"] + [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]}
    assert compare_detections(ref, moved)["max_box_dev"] == pytest.approx(1.0)
    relabelled = {**swapped, "classes": np.array([1, 1, 2])}
    assert not compare_detections(ref, relabelled)["classes_equal"]
    fewer = {k: v[:2] for k, v in ref.items()}
    assert compare_detections(ref, fewer)["max_box_dev"] == float("inf")
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "classes": np.zeros(0, int)}
    assert compare_detections(empty, empty)["classes_equal"]


@pytest.mark.parametrize("more, seen", [(None, 4), (2, 3)])
def test_an_export_that_detects_nothing_is_verified_on_more_test_images(
        toy_detector, tmp_path, capsys, monkeypatch, more, seen):
    """A score threshold nothing passes: after the one image asked for, the tool goes on with
    up to MORE_IMAGES more (the tiny test set has 4), and still warns that no box was
    compared."""
    from nst_det.export import api

    if more is not None:
        monkeypatch.setattr(api, "MORE_IMAGES", more)
    export_model = _load_tool("export_model")
    assert export_model.main(["--config-file", str(R18_TOY), "--format", "checkpoint",
                              "--num-images", "1", "--output", str(tmp_path / "out"),
                              *toy_detector, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"]) == 0
    out = capsys.readouterr().out
    assert f"verified on {seen} images (0 detections)" in out and "checked no box" in out


def test_a_verification_that_saw_no_detection_goes_on_with_more_images():
    """Empty outputs compare no box: the verification asks for more images, once, and only
    then; a mismatch found there fails it."""
    from nst_det.export.verify import verify

    def detections(n, shift=0.0):
        return {"boxes": np.tile([[1.0 + shift, 2.0, 8.0, 9.0]], (n, 1)),
                "scores": np.full(n, 0.7), "classes": np.zeros(n, int)}

    def runner(shift=0.0):  # image i -> i detections (image 0: none)
        return lambda img: detections(int(img), shift)

    asked = []

    def more():
        asked.append(1)
        return [0, 2]

    seen = verify(runner(), runner(), [0, 0], more_images=more)
    assert asked == [1] and len(seen["images"]) == 4 and seen["total_detections"] == 2
    assert seen["passed"]
    assert not verify(runner(), runner(1.0), [0], more_images=lambda: [3])["passed"]
    asked.clear()
    assert len(verify(runner(), runner(), [1, 0], more_images=more)["images"]) == 2
    assert not asked  # a detection was compared: no more images
    nothing = verify(runner(), runner(), [0], more_images=lambda: [0, 0])
    assert nothing["passed"] and nothing["total_detections"] == 0 and len(nothing["images"]) == 3


def test_the_parts_an_export_needs_nst_det_for_are_named():
    """export_info.json's needs_nst_det: an R-18/34 C4 student's BasicRes5ROIHeads and the
    torchvision / Inception-BN backbones are nst_det's; an R-18 FPN student is stock."""
    from nst_det.config import load_config
    from nst_det.export.student import nst_det_parts, student_config

    def parts(config):
        return nst_det_parts(student_config(load_config(str(REPO / "configs" / config))))

    assert parts("quick_schedules/faster_rcnn_R_18_FPN_toy.yaml") == []
    assert parts("VOC-Detection/faster_rcnn_R_18_C4.yaml") == [
        "MODEL.ROI_HEADS.NAME=BasicRes5ROIHeads"]
    assert parts("quick_schedules/faster_rcnn_MNV3_FPN_toy_pretrained.yaml") == [
        "MODEL.BACKBONE.NAME=build_torchvision_fpn_backbone"]
    # RetinaNet builds no box head: its ROI_BOX_HEAD.NAME "" is no part (it raised a KeyError)
    assert parts("COCO-Distill/Base-Distill-RetinaNet-R50-FPN-1x.yaml") == []
    assert parts("quick_schedules/retinanet_R_18_FPN_toy_pretrained.yaml") == []
