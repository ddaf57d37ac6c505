"""Detection models: student backbones, the strict frozen teacher, DistillationRCNN's contracts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _detection_common import C4, LEVELS, R18_FPN_TOY, distill_opts, make_cfg, write_teacher
from detectron2.data import build_detection_train_loader
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage

from nst_det.checkpoint.weights_file import WeightsFileError
from nst_det.distill import align_pair
from nst_det.modeling import DistillationRCNN, TeacherWeightsError

# (name, opts) of every student backbone layout, on the toy R-18 FPN config
BACKBONES = {
    "R18-C4": ["MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.OUT_FEATURES",
               "['res4']"],
    "R34-C4": ["MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.OUT_FEATURES",
               "['res4']", "MODEL.RESNETS.DEPTH", "34"],
    "R18-FPN": [],
    "R34-FPN": ["MODEL.RESNETS.DEPTH", "34"],
    "InceptionBN-C4": ["MODEL.BACKBONE.NAME", "build_inception_bn_backbone",
                       "MODEL.INCEPTION_BN.OUT_FEATURES", "['stage4']"],
    "InceptionBN-FPN": ["MODEL.BACKBONE.NAME", "build_inception_bn_fpn_backbone",
                        "MODEL.INCEPTION_BN.OUT_FEATURES",
                        "['stage2', 'stage3', 'stage4', 'stage5']",
                        "MODEL.FPN.IN_FEATURES", "['stage2', 'stage3', 'stage4', 'stage5']"],
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_outputs_match_declared_shapes(name):
    cfg = make_cfg(R18_FPN_TOY, BACKBONES[name])
    backbone = build_backbone(cfg).eval()
    h, w = 128, 192  # divisible by every stride (<= 64): exact sizes H / stride
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, h, w))
    shapes = backbone.output_shape()
    assert set(out) == set(shapes)
    for f, spec in shapes.items():
        assert out[f].shape == (2, spec.channels, h // spec.stride, w // spec.stride), f


@pytest.mark.parametrize("depth,blocks", [(18, 2), (34, 3)])
def test_basic_res5_roi_heads_builds_basicblock_res5(depth, blocks):
    from nst_det.modeling.roi_heads import BasicRes5ROIHeads

    cfg = make_cfg(R18_FPN_TOY, C4 + ["MODEL.RESNETS.DEPTH", str(depth)])
    heads = BasicRes5ROIHeads(cfg, {"res4": ShapeSpec(channels=256, stride=16)})
    assert len(heads.res5) == blocks
    x = heads.res5(torch.randn(3, 256, 8, 8))
    assert x.shape == (3, 512, 4, 4)
    assert heads.box_predictor.cls_score.in_features == 512
    with pytest.raises(ValueError, match="ResNet-18/34"):
        BasicRes5ROIHeads(make_cfg(R18_FPN_TOY, C4 + ["MODEL.RESNETS.DEPTH", "50"]),
                          {"res4": ShapeSpec(channels=1024, stride=16)})


def test_align_pair_pools_finer_map_and_crops_padding():
    fine = torch.arange(2 * 6 * 8, dtype=torch.float32).view(1, 2, 6, 8)  # stride 8
    coarse = torch.zeros(1, 3, 4, 5)  # stride 16, padded one cell further than the fine map
    s, t = align_pair(fine, coarse, 8, 16)
    assert s.shape == (1, 2, 3, 4) and t.shape == (1, 3, 3, 4)
    torch.testing.assert_close(s, torch.nn.functional.avg_pool2d(fine, 2))
    s2, t2 = align_pair(coarse, fine, 16, 8)  # either side may be the finer one
    assert s2.shape == (1, 3, 3, 4) and t2.shape == (1, 2, 3, 4)
    a, b = align_pair(torch.ones(1, 1, 5, 7), torch.ones(1, 1, 4, 8), 16, 16)
    assert a.shape == b.shape == (1, 1, 4, 7)


def _batch(cfg):
    return next(iter(build_detection_train_loader(cfg)))


def _step(model, batch):
    with EventStorage(0):
        return model(batch)


@pytest.fixture(scope="module")
def teacher_fpn(module_tmp_path):
    return write_teacher(module_tmp_path)


@pytest.fixture(scope="module")
def teacher_c4(module_tmp_path):
    return write_teacher(module_tmp_path, C4, name="teacher_c4")


def test_distillation_step_fpn_gradients_only_in_student(tiny_voc, teacher_fpn):
    other = ["MODEL.TRANSFER.NAMES", "['at']", "MODEL.TRANSFER.WEIGHTS", "[100.0]"]
    cfg = make_cfg(R18_FPN_TOY, distill_opts(*teacher_fpn, kd=1.0) + other, data=tiny_voc)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, DistillationRCNN) and not model.teacher.training
    model.train()
    losses = _step(model, _batch(cfg))
    assert {"loss_nst", "loss_kd", "loss_at", "loss_cls", "loss_rpn_cls"} <= set(losses)
    assert losses["loss_nst"].item() > 0 and math.isfinite(losses["loss_nst"].item())
    assert losses["loss_nst"].dtype == torch.float32
    sum(losses.values()).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    student = [p for p in model.parameters() if p.requires_grad]
    assert student and all(p.grad is not None for p in student)
    assert not model.teacher.training  # model.train() does not reach the teacher


def test_distillation_step_c4_stride_mismatch_res5_heads(tiny_voc, teacher_fpn, teacher_c4):
    """C4 student (res4, BasicRes5ROIHeads) <-> FPN teacher, and FPN student <-> C4 teacher:
    res4 (stride 16) is paired with p3 (stride 8) / p4 (16); KD runs through both head layouts."""
    c4_student = make_cfg(
        R18_FPN_TOY,
        C4 + distill_opts(*teacher_fpn, student="['res4', 'res4']", teacher="['p3', 'p4']",
                          n=2, kd=1.0),
        data=tiny_voc,
    )
    fpn_student = make_cfg(
        R18_FPN_TOY,
        distill_opts(*teacher_c4, student="['p3', 'p4']", teacher="['res4', 'res4']", n=2,
                     kd=1.0),
        data=tiny_voc,
    )
    for cfg in (c4_student, fpn_student):
        model = build_model(cfg).train()
        losses = _step(model, _batch(cfg))
        assert losses["loss_nst"].item() > 0 and math.isfinite(losses["loss_kd"].item())
        sum(losses.values()).backward()


def test_teacher_bit_identical_and_student_learns(tiny_voc, teacher_fpn):
    cfg = make_cfg(R18_FPN_TOY, distill_opts(*teacher_fpn, kd=1.0), data=tiny_voc)
    model = build_model(cfg).train()
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    student_before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    loader = iter(build_detection_train_loader(cfg))
    for _ in range(3):
        opt.zero_grad()
        sum(_step(model, next(loader)).values()).backward()
        opt.step()
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # incl. BN running stats
    assert any(not torch.equal(v, student_before[k]) for k, v in model.state_dict().items())


def test_student_state_dict_and_inference_are_generalized_rcnn(tiny_voc, teacher_fpn):
    cfg = make_cfg(R18_FPN_TOY, distill_opts(*teacher_fpn), data=tiny_voc)
    model = build_model(cfg).eval()
    plain_cfg = cfg.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    plain = build_model(plain_cfg).eval()
    state = model.state_dict()
    assert set(state) == set(plain.state_dict())  # no teacher keys at all
    assert not any("teacher" in k for k in state)
    assert not any(p is q for p in model.parameters() for q in model.teacher.parameters())
    plain.load_state_dict(state)

    calls = []
    handle = model.teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    handle_bb = model.teacher.backbone.register_forward_pre_hook(lambda *a: calls.append(1))
    batch = _batch(cfg)
    with torch.no_grad():
        out, ref = model(batch), plain(batch)
    handle.remove()
    handle_bb.remove()
    assert not calls  # no teacher work at inference
    for a, b in zip(out, ref):
        a, b = a["instances"], b["instances"]
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
        torch.testing.assert_close(a.scores, b.scores)


def test_teacher_follows_student_device_and_dtype(tiny_voc, teacher_fpn):
    model = build_model(make_cfg(R18_FPN_TOY, distill_opts(*teacher_fpn), data=tiny_voc))
    model.double()
    assert all(p.dtype == torch.float64 for p in model.teacher.parameters())
    model.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())


def _bad_teacher(tmp_path, teacher_fpn, edit):
    yaml, weights = teacher_fpn
    state = torch.load(weights, weights_only=True)["model"]
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    return make_cfg(R18_FPN_TOY, distill_opts(yaml, path))


def test_a_zoo_checkpoint_with_its_old_anchor_buffers_loads_strictly(tmp_path, teacher_fpn):
    """detectron2's model-zoo weights of its yacs configs still hold the RPN's cell anchors,
    buffers no longer saved (detectron2's checkpointer drops them): strict loading refused them."""
    def add_old_buffers(state):
        for level in range(5):
            state[f"proposal_generator.anchor_generator.cell_anchors.{level}"] = torch.zeros(3, 4)

    model = build_model(_bad_teacher(tmp_path, teacher_fpn, add_old_buffers))
    assert model.teacher is not None  # built: the teacher loaded
    with pytest.raises(TeacherWeightsError,
                       match=r"unexpected keys \(1\).*anchor_generator\.sizes"):
        build_model(_bad_teacher(tmp_path, teacher_fpn, lambda s: s.__setitem__(
            "proposal_generator.anchor_generator.sizes", torch.zeros(1))))  # others still refused


def test_wrong_teacher_weights_raise_naming_keys(tmp_path, teacher_fpn):
    yaml, weights = teacher_fpn
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model(make_cfg(R18_FPN_TOY, distill_opts(yaml, tmp_path / "nowhere.pth")))

    key = "roi_heads.box_predictor.cls_score.weight"
    with pytest.raises(TeacherWeightsError, match=r"missing keys \(1\).*cls_score\.weight"):
        build_model(_bad_teacher(tmp_path, teacher_fpn, lambda s: s.pop(key)))
    with pytest.raises(TeacherWeightsError, match=r"unexpected keys \(1\).*extra\.weight"):
        build_model(_bad_teacher(tmp_path, teacher_fpn,
                                 lambda s: s.__setitem__("extra.weight", torch.zeros(1))))
    with pytest.raises(TeacherWeightsError, match=r"shape mismatches \(1\).*cls_score\.weight"):
        build_model(_bad_teacher(tmp_path, teacher_fpn,
                                 lambda s: s.__setitem__(key, torch.zeros(3, 128))))

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsFileError, match=f"MODEL.TEACHER.WEIGHTS {truncated}: .*truncated"):
        build_model(make_cfg(R18_FPN_TOY, distill_opts(yaml, truncated)))
    # a teacher config that does not match its weights (R-34 for R-18 weights)
    mismatched = make_cfg(R18_FPN_TOY, distill_opts(yaml, weights))
    mismatched.MODEL.TEACHER.OPTS = ["MODEL.RESNETS.DEPTH", "34"]
    with pytest.raises(TeacherWeightsError, match="missing keys"):
        build_model(mismatched)


def test_bad_feature_pairs_raise_listing_available_names(teacher_fpn):
    opts = distill_opts(*teacher_fpn, student="['p2', 'res9']", teacher="['p2', 'p3']", n=2)
    with pytest.raises(ValueError, match=r"res9.*available: \['p2', 'p3', 'p4', 'p5', 'p6'\]"):
        build_model(make_cfg(R18_FPN_TOY, opts))
    opts = distill_opts(*teacher_fpn, student=LEVELS, teacher="['p2']", n=5)
    with pytest.raises(ValueError, match="same length"):
        build_model(make_cfg(R18_FPN_TOY, opts))
    opts = distill_opts(*teacher_fpn) + ["MODEL.NST.KERNEL", "cubic"]
    with pytest.raises(ValueError, match="cubic"):
        build_model(make_cfg(R18_FPN_TOY, opts))
