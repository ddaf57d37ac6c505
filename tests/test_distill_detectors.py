"""RetinaNet distillation and a torchvision-backbone (MobileNetV3) Faster R-CNN student."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _detection_common import TOY, make_cfg, write_teacher
from detectron2.data import build_detection_train_loader
from detectron2.modeling import RetinaNet, build_model
from detectron2.utils.events import EventStorage

from nst_det.modeling import DistillationRCNN, DistillationRetinaNet
from nst_det.modeling.distill_retinanet import _per_anchor, sigmoid_kd_loss

RETINA_TEACHER = TOY / "retinanet_R_34_FPN_toy_teacher.yaml"
RETINA_STUDENT = TOY / "retinanet_R_18_FPN_toy_nst.yaml"
MNV3_NST = TOY / "faster_rcnn_MNV3_FPN_toy_nst.yaml"
R18_FPN_TOY = TOY / "faster_rcnn_R_18_FPN_toy.yaml"
RETINA_TINY = ["MODEL.WEIGHTS", "", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50"]


def _write_retina_teacher(tmp_path):
    """A toy RetinaNet R-34 teacher config (TINY, no weights file) and its random weights."""
    cfg = make_cfg(RETINA_TEACHER, RETINA_TINY)
    torch.manual_seed(7)
    model = build_model(cfg)
    for m in model.modules():  # non-trivial frozen statistics
        if hasattr(m, "running_mean"):
            m.running_mean.normal_(0, 0.1)
    weights = tmp_path / "retina_teacher.pth"
    torch.save({"model": model.state_dict()}, weights)
    yaml = tmp_path / "retina_teacher.yaml"
    yaml.write_text(cfg.dump())
    return yaml, weights


def _step(model, batch):
    with EventStorage(0):
        return model(batch)


def test_sigmoid_kd_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(10, 5)
    assert sigmoid_kd_loss(z, z, 2.0).abs().item() < 1e-6
    s = z.clone().requires_grad_()
    loss = sigmoid_kd_loss(s + 1.0, z, 2.0)
    assert loss.item() > 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_sigmoid_kd_is_t_squared_times_the_bernoulli_kl_summed_over_classes_mean_over_rows():
    torch.manual_seed(0)
    zs, zt, T = torch.randn(3, 4), torch.randn(3, 4), 2.0
    expected = 0.0
    for r in range(3):  # written out per anchor and class, from the definition of the KL
        for k in range(4):
            p = 1 / (1 + math.exp(-zt[r, k].item() / T))  # teacher's, then student's
            q = 1 / (1 + math.exp(-zs[r, k].item() / T))
            expected += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    torch.testing.assert_close(sigmoid_kd_loss(zs, zt, T).item(), T * T * expected / 3,
                               rtol=1e-5, atol=0)  # (float32 against float64)


def test_anchor_rows_are_detectron2s_and_a_crop_keeps_each_cells_anchors():
    from detectron2.modeling.meta_arch.retinanet import permute_to_N_HWA_K

    n, a, k = 2, 3, 4
    maps = [torch.randn(n, a * k, 5, 6), torch.randn(n, a * k, 3, 2)]
    rows = _per_anchor(maps, k, [(5, 6), (3, 2)])
    # detectron2's order of (image, level, cell, anchor) rows is level-major; ours is the same
    # level-major stack of each level's image-major rows
    torch.testing.assert_close(rows, torch.cat([permute_to_N_HWA_K(m, k).reshape(-1, k)
                                                for m in maps]), rtol=0, atol=0)
    cropped = _per_anchor([maps[0]], k, [(2, 4)])  # e.g. a teacher's larger padded map
    torch.testing.assert_close(cropped, permute_to_N_HWA_K(maps[0][..., :2, :4].contiguous(),
                                                           k).reshape(-1, k), rtol=0, atol=0)


def test_retinanet_distillation_teacher_inert_gradients_only_in_student(tiny_voc, tmp_path):
    t_yaml, t_weights = _write_retina_teacher(tmp_path)
    cfg = make_cfg(RETINA_STUDENT, RETINA_TINY + [
        "MODEL.TEACHER.CONFIG_FILE", str(t_yaml), "MODEL.TEACHER.WEIGHTS", str(t_weights),
        "MODEL.KD.LOSS_WEIGHT", "1.0", "MODEL.TRANSFER.NAMES", "['at']",
        "MODEL.TRANSFER.WEIGHTS", "[10.0]"], data=tiny_voc)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, DistillationRetinaNet) and isinstance(model.teacher, RetinaNet)
    teacher = model.teacher
    # outside the module tree: no teacher parameter, state_dict key or submodule
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}
    plain_cfg = cfg.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    assert set(model.state_dict()) == set(build_model(plain_cfg).state_dict())
    model.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher_before = copy.deepcopy(teacher.state_dict())

    loader = iter(build_detection_train_loader(cfg))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    student_before = copy.deepcopy(model.state_dict())
    for _ in range(2):
        losses = _step(model, next(loader))
        assert {"loss_cls", "loss_box_reg", "loss_nst", "loss_kd", "loss_at"} == set(losses)
        assert losses["loss_nst"].item() > 0 and math.isfinite(losses["loss_nst"].item())
        assert losses["loss_kd"].item() > 0 and math.isfinite(losses["loss_kd"].item())
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None for p in teacher.parameters())
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None for p in trainable)
        opt.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # incl. frozen statistics
    assert any(not torch.equal(v, student_before[k]) for k, v in model.state_dict().items())
    model.double()  # moved with the student
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    model.float()

    # inference is RetinaNet's: the teacher does no work
    calls = []
    handle = teacher.backbone.register_forward_pre_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)}])
    handle.remove()
    assert not calls and "instances" in out[0]


def test_retinanet_kd_needs_a_matching_retinanet_teacher(tiny_voc, tmp_path):
    t_yaml, t_weights = _write_retina_teacher(tmp_path)
    opts = RETINA_TINY + ["MODEL.TEACHER.CONFIG_FILE", str(t_yaml),
                          "MODEL.TEACHER.WEIGHTS", str(t_weights), "MODEL.KD.LOSS_WEIGHT", "1.0",
                          "MODEL.RETINANET.NUM_CLASSES", "4"]
    with pytest.raises(ValueError, match="anchors"):
        build_model(make_cfg(RETINA_STUDENT, opts))


def test_mobilenet_v3_fpn_student_distils_from_resnet_teacher(tiny_voc, tmp_path):
    t_yaml, t_weights = write_teacher(tmp_path)  # toy R-18 FPN Faster R-CNN, random weights
    cfg = make_cfg(MNV3_NST, ["MODEL.WEIGHTS", "", "MODEL.TEACHER.CONFIG_FILE", str(t_yaml),
                              "MODEL.TEACHER.WEIGHTS", str(t_weights), "MODEL.KD.LOSS_WEIGHT",
                              "1.0"], data=tiny_voc)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert isinstance(model, DistillationRCNN)
    assert type(model.backbone.bottom_up).__name__ == "TorchvisionBackbone"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    loader = iter(build_detection_train_loader(cfg))
    for _ in range(2):
        losses = _step(model, next(loader))
        assert losses["loss_nst"].item() > 0 and math.isfinite(losses["loss_kd"].item())
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        opt.step()
    frozen = [p for n, p in model.named_parameters()
              if n.startswith("backbone.bottom_up.features.0.")]
    assert frozen and not any(p.requires_grad for p in frozen)


def _mask_batch():
    """Two images with box-shaped polygon masks (the toy sets have no segmentation)."""
    from detectron2.structures import Boxes, Instances, PolygonMasks

    batch = []
    for i in range(2):
        inst = Instances((96, 128))
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]])
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([i, 3])
        inst.gt_masks = PolygonMasks([[[x0, y0, x1, y0, x1, y1, x0, y1]]
                                      for x0, y0, x1, y1 in boxes.tolist()])
        batch.append({"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8),
                      "instances": inst, "height": 96, "width": 128})
    return batch


def test_mask_rcnn_student_keeps_working(tmp_path):
    mask = ["MODEL.MASK_ON", "True", "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
            "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32"]
    t_yaml, t_weights = write_teacher(tmp_path, mask)
    cfg = make_cfg(R18_FPN_TOY, mask + [
        "MODEL.META_ARCHITECTURE", "DistillationRCNN", "MODEL.TEACHER.CONFIG_FILE", str(t_yaml),
        "MODEL.TEACHER.WEIGHTS", str(t_weights), "MODEL.NST.LOSS_WEIGHT", "25.0",
        "MODEL.DISTILL.STUDENT_FEATURES", "['p3', 'p4']",
        "MODEL.DISTILL.TEACHER_FEATURES", "['p3', 'p4']", "MODEL.DISTILL.FEATURE_WEIGHTS",
        "[0.5, 0.5]", "MODEL.KD.LOSS_WEIGHT", "1.0"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = _step(model, _mask_batch())
    assert {"loss_mask", "loss_nst", "loss_kd"} <= set(losses)
    assert losses["loss_nst"].item() > 0 and math.isfinite(losses["loss_mask"].item())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)}])
    assert out[0]["instances"].has("pred_masks")
