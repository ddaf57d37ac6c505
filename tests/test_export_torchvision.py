"""Export of a torchvision-backbone (MobileNetV3-Large FPN) student: checkpoint, TorchScript and
ONNX verified against eager, and a detectron2 client that loads it after `import nst_det`."""

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
MNV3 = REPO / "configs" / "quick_schedules" / "faster_rcnn_MNV3_FPN_toy_pretrained.yaml"
SMALL = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "200",
         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
         # not the config's default nodes: the export must carry the student's own choice
         "MODEL.TORCHVISION.OUT_FEATURES", "['features.3', 'features.6', 'features.11', "
         "'features.15']",
         "MODEL.FPN.IN_FEATURES", "['features.3', 'features.6', 'features.11', 'features.15']"]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mnv3_detector(tiny_voc, module_tmp_path):
    """An untrained MobileNetV3 FPN detector saved as a distillation run would (core extras)."""
    from detectron2.modeling import build_model

    from nst_det.config import load_config

    _, test, _ = tiny_voc
    cfg = load_config(str(MNV3), [*SMALL, "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg)
    state = dict(model.state_dict())
    state["distill.regressors.fitnet_0.conv.weight"] = torch.zeros(2, 2, 1, 1)  # training-only
    weights = module_tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 1}, weights)
    return [*SMALL, "DATASETS.TEST", f"('{test}',)", "MODEL.WEIGHTS", str(weights),
            "MODEL.META_ARCHITECTURE", "DistillationRCNN", "MODEL.NST.LOSS_WEIGHT", "25.0"]


@pytest.mark.parametrize("fmt", ["checkpoint", "torchscript", "onnx"])
def test_torchvision_student_export_matches_eager(mnv3_detector, tmp_path, fmt):
    out = tmp_path / fmt
    rc = _load_tool("export_model").main(["--config-file", str(MNV3), "--format", fmt,
                                          "--output", str(out), "--num-images", "2",
                                          *mnv3_detector])
    summary = json.loads((out / "verification.json").read_text())
    assert rc == 0 and summary["passed"], summary
    assert summary["total_detections"] > 0
    info = json.loads((out / "export_info.json").read_text())
    assert info["score_thresh_test"] == 0.0  # SMALL's MODEL.ROI_HEADS.SCORE_THRESH_TEST
    if fmt != "checkpoint":
        assert info["needs_nst_det"] == []  # a traced model runs without nst_det
        return
    assert info["needs_nst_det"]  # its torchvision backbone
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert not [k for k in state if k.startswith(("distill.", "teacher"))]
    assert "backbone.bottom_up.features.15.block.0.0.weight" in state  # torchvision's names
    cfg_text = (out / "config.yaml").read_text()
    assert "features.11" in cfg_text and "DistillationRCNN" not in cfg_text


def test_detectron2_client_loads_torchvision_student_after_import_nst_det(
    mnv3_detector, tiny_voc, tmp_path
):
    """What a user does: `import nst_det` (registers the backbone), load_config, predict."""
    out = tmp_path / "ckpt"
    assert _load_tool("export_model").main(["--config-file", str(MNV3), "--format",
                                            "checkpoint", "--output", str(out),
                                            *mnv3_detector]) == 0
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    from nst_det.config import load_config
    from nst_det.export import eager_runner, preprocess, rescale_boxes
    from nst_det.export.student import load_student_detector

    _, test, _ = tiny_voc
    files = [r["file_name"] for r in DatasetCatalog.get(test)[:2]]
    runner = eager_runner(load_student_detector(load_config(str(out / "config.yaml"))))
    expected = []
    for f in files:
        image = read_image(f, format="RGB")
        tensor = preprocess(image, 128, 200)
        expected.append(rescale_boxes(runner(tensor)["boxes"], tensor.shape[1:],
                                      image.shape[:2]).tolist())
    script = textwrap.dedent(f"""
        import json
        import cv2
        import nst_det  # registers build_torchvision_fpn_backbone
        from detectron2.engine import DefaultPredictor
        from nst_det.config import load_config
        cfg = load_config({str(out / "config.yaml")!r})
        cfg.MODEL.DEVICE = "cpu"
        predictor = DefaultPredictor(cfg)
        print(json.dumps([predictor(cv2.imread(f))["instances"].pred_boxes.tensor.tolist()
                          for f in {files!r}]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd="/", env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for exp, boxes in zip(expected, got):
        assert len(boxes) == len(exp) > 0
        np.testing.assert_allclose(np.array(boxes), np.array(exp), atol=1e-3)


@pytest.mark.parametrize("fmt", ["checkpoint", "torchscript", "onnx"])
def test_retinanet_student_export_matches_eager(tiny_voc, module_tmp_path, tmp_path, fmt):
    from detectron2.modeling import build_model

    from nst_det.config import load_config

    config = REPO / "configs" / "quick_schedules" / "retinanet_R_18_FPN_toy_nst.yaml"
    opts = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "200",
            "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
            "DATASETS.TEST", f"('{tiny_voc[1]}',)"]
    cfg = load_config(str(config), [*opts, "MODEL.WEIGHTS", "",
                                    "MODEL.META_ARCHITECTURE", "RetinaNet"])
    torch.manual_seed(0)
    weights = module_tmp_path / "retinanet.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    out = tmp_path / fmt
    rc = _load_tool("export_model").main(["--config-file", str(config), "--format", fmt,
                                          "--output", str(out), "--num-images", "2",
                                          *opts, "MODEL.WEIGHTS", str(weights)])
    summary = json.loads((out / "verification.json").read_text())
    assert rc == 0 and summary["passed"] and summary["total_detections"] > 0, summary
    if fmt == "checkpoint":
        assert "RetinaNet" in (out / "config.yaml").read_text()
