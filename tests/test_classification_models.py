"""Classification networks: shapes, named (pre-ReLU) features, strict weight loading."""

import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone

from nst_det import add_nst_config
from nst_det.modeling.classification import (
    CLASSIFIER_REGISTRY,
    build_classifier,
    load_classifier_weights,
)

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "inception_bn"]


def test_registry_has_all_archs():
    for arch in ARCHS:
        assert arch in CLASSIFIER_REGISTRY
    with pytest.raises(KeyError, match="inception_bn"):
        build_classifier("resnet19", 5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "inception_bn"])
def test_features_match_declared_shapes_and_logits(arch):
    torch.manual_seed(0)
    model = build_classifier(arch, 7).eval()
    x = torch.randn(2, 3, 64, 96)  # H != W
    with torch.no_grad():
        logits, pre = model.forward_features(x, pre_relu=True)
        logits_post, post = model.forward_features(x, pre_relu=False)
        plain = model(x)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, plain)
    torch.testing.assert_close(logits_post, plain)
    assert set(pre) == set(model.feature_channels) == set(model.feature_strides)
    for name, f in pre.items():
        stride = model.feature_strides[name]
        assert f.shape == (2, model.feature_channels[name], 64 // stride, 96 // stride), name
        # the pre-ReLU map is what the stage's ReLU turns into the stage output
        torch.testing.assert_close(torch.relu(f), post[name])
    assert (pre["stem"] >= 0).all()
    assert (pre[list(pre)[-1]] < 0).any(), "the last map should be taken before the ReLU"


def test_inception_bn_last_block_is_1024x7x7_at_224():
    model = build_classifier("inception_bn", 1000).eval()
    with torch.no_grad():
        _, feats = model.forward_features(torch.randn(1, 3, 224, 224))
    assert feats["stage5"].shape == (1, 1024, 7, 7)
    assert feats["stage4"].shape == (1, 608, 14, 14)
    n_params = sum(p.numel() for p in model.parameters())
    assert 11.0e6 < n_params < 11.6e6  # BN-Inception: ~11.3M parameters with a 1000-way head


def test_torchvision_state_dict_loads_strictly(tmp_path):
    tv = torchvision.models.resnet18(weights=None, num_classes=5)
    path = tmp_path / "resnet18_tv.pth"
    torch.save(tv.state_dict(), path)
    model = load_classifier_weights(build_classifier("resnet18", 5), str(path))
    for k, v in tv.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_torchvision_file_without_bn_counters_loads(tmp_path):
    # torchvision's published files predate num_batches_tracked
    tv = torchvision.models.resnet18(weights=None, num_classes=5)
    state = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    load_classifier_weights(build_classifier("resnet18", 5), str(tmp_path / "old.pth"))


def test_missing_file_and_mismatches_are_clear_errors(tmp_path):
    model = build_classifier("resnet18", 5)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_classifier_weights(model, str(tmp_path / "nope.pth"))

    torch.save(build_classifier("resnet34", 5).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(KeyError, match=r"r34\.pth.*unexpected keys \[layer1\.2\."):
        load_classifier_weights(model, str(tmp_path / "r34.pth"))

    state = build_classifier("resnet18", 5).state_dict()
    del state["layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match=r"missing keys \[layer4\.1\.conv2\.weight\]"):
        load_classifier_weights(model, str(tmp_path / "partial.pth"))

    torch.save(build_classifier("resnet18", 10).state_dict(), tmp_path / "ten.pth")
    with pytest.raises(ValueError, match=r"fc\.weight: file \(10, 512\) vs model \(5, 512\)"):
        load_classifier_weights(model, str(tmp_path / "ten.pth"))


def test_distiller_checkpoint_layout_loads(tmp_path):
    src = build_classifier("resnet18", 5)
    model = {f"student.{k}": v for k, v in src.state_dict().items()}
    model["regressors.fitnet_0.conv.weight"] = torch.zeros(1)
    torch.save({"model": model, "iteration": 3}, tmp_path / "model_final.pth")
    dst = build_classifier("resnet18", 5)
    load_classifier_weights(dst, str(tmp_path / "model_final.pth"))
    torch.testing.assert_close(dst.state_dict(), src.state_dict())

    torch.save({"model": {"backbone.x": torch.zeros(1)}}, tmp_path / "det.pth")
    with pytest.raises(ValueError, match="no 'student"):
        load_classifier_weights(build_classifier("resnet18", 5), str(tmp_path / "det.pth"))


def _inception_cfg(out_features, freeze_at=0, fpn=False):
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.MODEL.BACKBONE.NAME = (
        "build_inception_bn_fpn_backbone" if fpn else "build_inception_bn_backbone")
    cfg.MODEL.INCEPTION_BN.OUT_FEATURES = out_features
    cfg.MODEL.FPN.IN_FEATURES = out_features
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    return cfg


def test_inception_bn_backbones_match_output_shape():
    x = torch.randn(1, 3, 64, 96)
    c4 = build_backbone(_inception_cfg(["stage4"]), ShapeSpec(channels=3)).eval()
    assert not hasattr(c4, "stage5")  # stages after the last output are not built
    fpn = build_backbone(_inception_cfg(["stage2", "stage3", "stage4", "stage5"], fpn=True),
                         ShapeSpec(channels=3)).eval()
    assert set(fpn.output_shape()) == {"p2", "p3", "p4", "p5", "p6"}
    with torch.no_grad():
        for backbone in (c4, fpn):
            out = backbone(x)
            assert set(out) == set(backbone.output_shape())
            for name, spec in backbone.output_shape().items():
                assert out[name].shape[1] == spec.channels, name
                assert out[name].shape[-2:] == (-(-64 // spec.stride), -(-96 // spec.stride)), name


def test_inception_bn_backbone_freeze_at():
    cfg = _inception_cfg(["stage4"], freeze_at=2)
    cfg.MODEL.INCEPTION_BN.NORM = "BN"
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    frozen = [n for n, p in backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("stem.", "stage2.")) for n in frozen)
    assert all(p.requires_grad for n, p in backbone.named_parameters()
               if n.startswith(("stage3.", "stage4.")))
    assert isinstance(backbone.stage2.conv2.bn, FrozenBatchNorm2d)
    assert isinstance(backbone.stage3.inception3a.b1x1.bn, torch.nn.BatchNorm2d)

