"""torchvision classifiers by name: node features, the detection backbone, strict loading,
and a few NST training iterations with each family as the student."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from nst_det import add_nst_config
from nst_det.modeling.backbone import TorchvisionBackbone
from nst_det.modeling.classification import ClassificationDistiller, build_classifier
from nst_det.modeling.convert import convert_student, detect_family

REPO = Path(__file__).resolve().parents[1]

# name -> (arch, four nodes at strides 4, 8, 16, 32)
FAMILIES = {
    "mobilenet_v2": ("mobilenet_v2", ["features.3", "features.6", "features.13", "features.18"]),
    "mobilenet_v3_large": ("mobilenet_v3_large",
                           ["features.3", "features.6", "features.12", "features.16"]),
    "efficientnet_b0": ("efficientnet_b0", ["features.2", "features.3", "features.5",
                                            "features.8"]),
    "regnet_y_400mf": ("regnet_y_400mf", [f"trunk_output.block{i}" for i in range(1, 5)]),
    "convnext_tiny": ("convnext_tiny", ["features.1", "features.3", "features.5", "features.7"]),
    "resnet18": ("torchvision:resnet18", ["layer1", "layer2", "layer3", "layer4"]),
}


@pytest.fixture(scope="module")
def classifiers():
    """One randomly initialised 5-class classifier per family (built once: tracing costs)."""
    torch.manual_seed(0)
    return {name: build_classifier(arch, 5) for name, (arch, _) in FAMILIES.items()}


def _randomise_bn(model):
    """Non-trivial BN statistics, so a load that skipped them would show."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_features_shapes_and_strict_load_into_detection_backbone(name, classifiers):
    arch, nodes = FAMILIES[name]
    cls = classifiers[name].eval()
    _randomise_bn(cls)
    backbone = TorchvisionBackbone(arch.split(":")[-1], nodes).eval()
    strides = [s.stride for s in backbone.output_shape().values()]
    assert strides == [4, 8, 16, 32]
    assert [cls.feature_strides[n] for n in nodes] == strides
    skipped = backbone.load_classifier_state_dict(cls.state_dict())
    assert skipped and all(k not in backbone.state_dict() for k in skipped)  # the head at least
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits, feats = cls.forward_features(x, names=nodes)
        out = backbone(x)
    assert logits.shape == (2, 5)
    for node, spec in backbone.output_shape().items():
        h, w = math.ceil(64 / spec.stride), math.ceil(96 / spec.stride)
        assert out[node].shape == (2, spec.channels, h, w), node
        assert cls.feature_channels[node] == spec.channels
        # the same weights and statistics: the detection backbone computes the same features
        torch.testing.assert_close(out[node], feats[node], rtol=1e-4, atol=1e-4)
    # a classifier of another width does not load: a missing or mis-shaped key is an error
    bad = {k: v for k, v in cls.state_dict().items() if k != next(iter(backbone.state_dict()))}
    with pytest.raises(KeyError, match="lacks 1 keys"):
        backbone.load_classifier_state_dict(bad)


def test_registered_resnet18_checkpoint_loads_into_torchvision_backbone(classifiers):
    """nst_det's ResNetClassifier has torchvision's keys: its files serve this backbone too."""
    res = build_classifier("resnet18", 5).eval()
    backbone = TorchvisionBackbone("resnet18", ["layer3"]).eval()
    assert backbone.load_classifier_state_dict(res.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)["layer3"], res.forward_features(x, False)[1]["res4"])


def test_unknown_node_lists_available_nodes(classifiers):
    with pytest.raises(ValueError, match=r"no feature node \['features.99'\].*'features.12'"):
        TorchvisionBackbone("mobilenet_v3_large", ["features.99"])
    with pytest.raises(KeyError, match="mobilenet_v9.*any torchvision classification model"):
        build_classifier("mobilenet_v9", 5)


def test_only_channels_first_maps_are_nodes_and_fixed_size_models_are_named(classifiers):
    channels = classifiers["convnext_tiny"].feature_channels
    # inside a ConvNeXt block the map is permuted to [B, h, w, C]: its "channels" would be h
    assert channels["features.1"] == 96 and "features.1.0.block.2" not in channels
    # block.0 (a conv) and block.6 (the permute back) are maps; block.1-5 are channels-last
    assert [n for n in channels if n.startswith("features.1.0.block.")] == [
        "features.1.0.block.0", "features.1.0.block.6"]
    assert channels["features.1.0.block.6"] == 96
    with pytest.raises(ValueError, match="VisionTransformer: its feature nodes cannot be probed"):
        build_classifier("vit_b_16", 5)
    # unpadded convolutions: a map's height grows with the image's, not by exactly 3/2
    assert build_classifier("squeezenet1_1", 5).feature_channels["features.12"] == 512


def test_frozen_prefixes_freeze_whole_blocks_with_their_bn_statistics():
    b = TorchvisionBackbone("mobilenet_v3_small", ["features.11"], "BN",
                            ["features.0", "features.1."]).train()
    frozen = {n.split(".")[1] for n, p in b.named_parameters() if not p.requires_grad}
    assert frozen == {"0", "1"}  # not features.10 and .11: whole components only
    stem_bn, later_bn = b.get_submodule("features.0.1"), b.get_submodule("features.2.block.0.1")
    before = stem_bn.running_mean.clone(), later_bn.running_mean.clone()
    b(torch.randn(2, 3, 64, 64))
    assert torch.equal(stem_bn.running_mean, before[0])  # frozen block: fixed statistics
    assert not torch.equal(later_bn.running_mean, before[1])  # trained block: BN still learns
    with pytest.raises(ValueError, match=r"FROZEN_PREFIXES .*\['feature.0'\] match no"):
        TorchvisionBackbone("mobilenet_v3_small", ["features.3"], "BN", ["feature.0"])
    for norm in ("BN", "FrozenBN"):  # a prefix naming the BN itself: frozen, not refused
        bn = TorchvisionBackbone("resnet18", ["layer1"], norm, ["conv1", "bn1"]).get_submodule(
            "bn1")
        assert isinstance(bn, FrozenBatchNorm2d)


def test_conversion_keeps_torchvision_keys_and_checks_strictly(classifiers):
    state = classifiers["mobilenet_v3_large"].state_dict()
    assert detect_family(state) == "torchvision"
    converted, skipped = convert_student(state, arch="mobilenet_v3_large")
    assert {k for k in skipped if not k.endswith("num_batches_tracked")} == {
        "classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"}
    assert all(torch.equal(converted[k], state[k]) for k in converted)  # no renaming
    del state["features.16.0.weight"]
    with pytest.raises(KeyError, match="features.16.0.weight"):
        convert_student(state, arch="mobilenet_v3_large")


def test_fpn_and_c4_style_backbones_from_config():
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "quick_schedules"
                            / "faster_rcnn_MNV3_FPN_toy_pretrained.yaml"))
    fpn = BACKBONE_REGISTRY.get("build_torchvision_fpn_backbone")(cfg, ShapeSpec(channels=3))
    assert {k: v.stride for k, v in fpn.output_shape().items()} == {
        "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert not any(p.requires_grad for n, p in fpn.bottom_up.named_parameters()
                   if n.startswith("features.2."))
    assert all(p.requires_grad for n, p in fpn.bottom_up.named_parameters()
               if n.startswith("features.4."))
    # the toy config normalises the FPN (MODEL.FPN.NORM GN): whatever the scale of MobileNetV3's
    # nodes (trained toy students: std up to ~30), the levels reach the heads at unit scale
    assert all(isinstance(getattr(fpn, f"fpn_{kind}{i}").norm, torch.nn.GroupNorm)
               for kind in ("lateral", "output") for i in (2, 3, 4, 5))
    torch.manual_seed(0)
    image = torch.randn(2, 3, 128, 128) * 3
    levels = fpn(image)
    assert [round(levels[k].std().item(), 1) for k in ("p2", "p3")] == [1.0, 1.0]
    cfg.MODEL.TORCHVISION.OUT_FEATURES = ["features.12"]
    c4 = BACKBONE_REGISTRY.get("build_torchvision_backbone")(cfg, ShapeSpec(channels=3))
    out = c4(torch.randn(1, 3, 64, 64))
    assert out["features.12"].shape == (1, 112, 4, 4)
    assert c4.output_shape()["features.12"] == ShapeSpec(channels=112, stride=16)


def test_freeze_at_without_frozen_prefixes_warns_that_nothing_is_frozen(caplog):
    cfg = get_cfg()  # detectron2's default FREEZE_AT is 2
    add_nst_config(cfg)
    cfg.MODEL.TORCHVISION.ARCH, cfg.MODEL.TORCHVISION.OUT_FEATURES = "mobilenet_v3_small", [
        "features.3"]
    build = BACKBONE_REGISTRY.get("build_torchvision_backbone")
    with caplog.at_level("WARNING"):
        backbone = build(cfg, ShapeSpec(channels=3))
    assert all(p.requires_grad for p in backbone.parameters())
    assert "FREEZE_AT 2 does not apply to the torchvision backbone" in caplog.text
    caplog.clear()
    cfg.MODEL.TORCHVISION.FROZEN_PREFIXES = ["features.0"]
    with caplog.at_level("WARNING"):
        build(cfg, ShapeSpec(channels=3))
    assert "FREEZE_AT" not in caplog.text


@pytest.fixture(scope="module")
def teacher_file(module_tmp_path):
    torch.manual_seed(1)
    teacher = build_classifier("resnet18", 5)
    _randomise_bn(teacher)
    path = module_tmp_path / "teacher_r18.pth"
    torch.save(teacher.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_few_nst_iterations_with_each_family_as_student(name, teacher_file):
    arch, nodes = FAMILIES[name]
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(REPO / "configs/quick_schedules/cls_Base-Toy.yaml"))
    cfg.merge_from_list([
        "MODEL.CLASSIFIER.ARCH", arch, "MODEL.TEACHER.ARCH", "resnet18",
        "MODEL.TEACHER.WEIGHTS", teacher_file, "MODEL.NST.LOSS_WEIGHT", "25.0",
        "MODEL.DISTILL.STUDENT_FEATURES", str(nodes[2:]),
        "MODEL.DISTILL.TEACHER_FEATURES", "['res4', 'res5']",
        "MODEL.DISTILL.FEATURE_WEIGHTS", "[0.5, 0.5]"])
    torch.manual_seed(0)
    model = ClassificationDistiller(cfg).train()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    batch = [{"image": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), "label": i % 5}
             for i in range(4)]
    first = [p.detach().clone() for p in model.student.parameters()][:3]
    for _ in range(2):
        losses = model(batch)
        assert set(losses) == {"loss_cls", "loss_nst"}
        assert losses["loss_nst"].item() > 0 and math.isfinite(losses["loss_nst"].item())
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(first, model.student.parameters()))
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
