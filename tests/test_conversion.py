"""Classification student -> detectron2 weights: same features, zero missing backbone keys."""

import runpy
import sys
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from nst_det import add_nst_config
from nst_det.engine.checkpointer import unfilled_keys
from nst_det.modeling.classification import build_classifier
from nst_det.modeling.convert import convert_student, save_d2_weights

REPO = Path(__file__).resolve().parents[1]


def _student(arch):
    """A student with random weights *and* random BN statistics (so BN handling is tested)."""
    torch.manual_seed(0)
    model = build_classifier(arch, 5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _save_as_trainer_checkpoint(model, path):
    """The layout ClassificationTrainer writes: the distiller's state dict under "model"."""
    state = {f"student.{k}": v for k, v in model.state_dict().items()}
    state["regressors.fitnet_0.conv.weight"] = torch.zeros(2, 2, 1, 1)
    torch.save({"model": state, "iteration": 9}, path)


def _detector_cfg(kind):
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    if kind == "r18_fpn":
        cfg.merge_from_file(str(REPO / "configs" / "Base-RCNN-FPN.yaml"))
    elif kind == "r18_c4":  # detectron2's defaults are the C4 layout (res4 backbone, res5 head)
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    elif kind == "inception_fpn":
        cfg.merge_from_file(str(REPO / "configs" / "Base-RCNN-FPN.yaml"))
        cfg.MODEL.BACKBONE.NAME = "build_inception_bn_fpn_backbone"
        cfg.MODEL.INCEPTION_BN.OUT_FEATURES = ["stage2", "stage3", "stage4", "stage5"]
        cfg.MODEL.FPN.IN_FEATURES = ["stage2", "stage3", "stage4", "stage5"]
    elif kind == "inception_c4":
        cfg.MODEL.BACKBONE.NAME = "build_inception_bn_backbone"
        cfg.MODEL.INCEPTION_BN.OUT_FEATURES = ["stage4"]
        cfg.MODEL.RPN.IN_FEATURES = ["stage4"]
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["stage4"]
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    if kind.startswith("r18"):
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    return cfg


def _run_cli(monkeypatch, capsys, src, out):
    """tools/convert_student_to_d2.py in-process; checks it reports what it did not convert."""
    monkeypatch.setattr(sys, "argv", ["convert_student_to_d2.py", str(src), str(out)])
    runpy.run_path(str(REPO / "tools" / "convert_student_to_d2.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "fc.weight: classifier head" in printed
    assert "regressors.fitnet_0.conv.weight: not part of the student" in printed


def _load(model, path):
    """Load `path` through detectron2's own DetectionCheckpointer (public `load`); returns the
    model keys it left unfilled (missing from the file, or dropped for a wrong shape)."""
    with unfilled_keys(model) as (unfilled, _):
        DetectionCheckpointer(model).load(str(path))
    return unfilled


CASES = [
    # (student arch, detector, name of the bottom-up module in the detector, compared features)
    ("resnet18", "r18_fpn", "backbone.bottom_up", ["res2", "res3", "res4", "res5"]),
    ("resnet18", "r18_c4", "backbone", ["res4"]),
    ("inception_bn", "inception_fpn", "backbone.bottom_up", ["stage2", "stage3", "stage5"]),
    ("inception_bn", "inception_c4", "backbone", ["stage4"]),
]


@pytest.mark.parametrize("arch,kind,bottom_up,features", CASES)
def test_converted_student_gives_same_backbone_features(
    tmp_path, monkeypatch, capsys, arch, kind, bottom_up, features
):
    student = _student(arch)
    src = tmp_path / "model_final.pth"
    _save_as_trainer_checkpoint(student, src)
    out = tmp_path / "d2.pth"
    _run_cli(monkeypatch, capsys, src, out)

    detector = build_model(_detector_cfg(kind)).eval()
    unfilled = _load(detector, out)
    # every pretrainable backbone key is filled with the right shape (FPN's lateral/output
    # convs are new layers)
    pretrained = bottom_up + "."
    assert unfilled and [k for k in unfilled if k.startswith(pretrained)] == []
    n_backbone = sum(k.startswith(pretrained) for k in detector.state_dict())
    assert n_backbone > 50

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        _, expected = student.forward_features(x, pre_relu=False)
        got = detector.get_submodule(bottom_up)(x)
    for name in features:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


def test_the_tool_refuses_to_write_over_its_input(tmp_path, monkeypatch):
    src = tmp_path / "model_final.pth"
    _save_as_trainer_checkpoint(_student("resnet18"), src)
    before = src.read_bytes()
    (tmp_path / "link.pth").symlink_to(src)  # the same file under another name
    for out in (src, tmp_path / "link.pth"):
        monkeypatch.setattr(sys, "argv", ["convert_student_to_d2.py", str(src), str(out)])
        with pytest.raises(SystemExit, match="would replace their source"):
            runpy.run_path(str(REPO / "tools" / "convert_student_to_d2.py"), run_name="__main__")
    assert src.read_bytes() == before


def test_torchvision_state_dict_converts_and_head_is_dropped():
    state = _student("resnet18").state_dict()
    converted, skipped = convert_student(state)
    assert skipped["fc.weight"] == "classifier head"
    assert not any("fc" in k for k in converted)
    shortcut_var = state["layer2.0.downsample.1.running_var"]
    assert converted["res3.0.shortcut.norm.running_var"] is shortcut_var
    assert converted["stem.conv1.norm.weight"] is state["bn1.weight"]


def test_an_architecture_name_keeps_torchvisions_keys_for_its_backbone():
    """--arch resnet18 is for nst_det's torchvision backbone (torchvision's own keys); before, the
    ResNet keys were renamed to detectron2's all the same, which that backbone cannot load."""
    state = _student("resnet18").state_dict()
    converted, _ = convert_student(state, arch="resnet18")
    assert "layer1.0.conv1.weight" in converted and not any(k.startswith("res") for k in converted)
    with pytest.raises(ValueError, match="applies to the torchvision family only, not to 'resnet'"):
        convert_student(state, "resnet", arch="resnet18")


def test_the_conversion_tool_with_an_architecture_name_writes_torchvisions_keys(tmp_path):
    """The tool's path (classifier_file_to_d2) detected the family itself first, so --arch on a
    ResNet file met the check above and always failed."""
    from nst_det.modeling.convert import classifier_file_to_d2

    src = tmp_path / "r18.pth"
    torch.save(_student("resnet18").state_dict(), src)
    done = classifier_file_to_d2(str(src), str(tmp_path / "out.pth"), arch="resnet18")
    written = torch.load(tmp_path / "out.pth", weights_only=True)
    assert done["family"] == "torchvision"
    assert "layer1.0.conv1.weight" in written.get("model", written)


def test_conversion_errors_name_the_keys(tmp_path):
    state = _student("resnet18").state_dict()
    del state["layer3.1.conv2.weight"]
    with pytest.raises(ValueError, match=r"missing \['res4\.1\.conv2\.weight'\]"):
        convert_student(state)
    state = _student("resnet18").state_dict()
    state["layer3.1.conv2.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ValueError, match=r"res4\.1\.conv2\.weight: \(1, 1, 3, 3\) vs \(256, 256"):
        convert_student(state)
    state = _student("resnet18").state_dict()
    state["layer3.1.se.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"no renaming rule .*layer3\.1\.se\.weight"):
        convert_student(state)


def test_converted_file_layout(tmp_path):
    converted, _ = convert_student(_student("resnet18").state_dict())
    save_d2_weights(converted, tmp_path / "w.pth")
    ckpt = torch.load(tmp_path / "w.pth", weights_only=True)
    assert ckpt["__author__"] == "nst_det" and ckpt["matching_heuristics"] is True
    assert set(ckpt["model"]) == set(converted)
