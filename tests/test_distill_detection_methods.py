"""The detection KD methods (CWD, PKD, MGD, FGD, DeFeat, FGFI, ReviewKD, DKD) in the detectors.

Each method trains in a tiny Faster R-CNN and (feature methods) RetinaNet student with an inert
teacher, its learned modules in the optimizer, restored exactly on resume and absent from the
export; GT boxes and RoI targets reach the losses as the formulas need them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _detection_common import (
    NST_TOY,
    RETINA_TINY,
    TOY,
    make_cfg,
    write_retina_teacher,
    write_teacher,
)
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from nst_det.distill import record_first_call
from nst_det.engine.checkpointer import ReliableCheckpointer
from nst_det.export.student import student_state_dict
from nst_det.losses import FGFIAdapter, dkd_loss, fgd_loss, fgfi_loss
from nst_det.modeling.roi_logits import box_class_logits

RETINA_STUDENT = TOY / "retinanet_R_18_FPN_toy_nst.yaml"
FEATURE_METHODS = ["cwd", "pkd", "mgd", "fgd", "defeat", "fgfi", "reviewkd"]
LEARNED = {"mgd", "fgd", "defeat", "fgfi", "reviewkd"}
ALL = FEATURE_METHODS + ["dkd"]


@pytest.fixture(scope="module")
def teachers(module_tmp_path):
    """(R-CNN teacher yaml, weights), (RetinaNet teacher yaml, weights): random, saved once."""
    rcnn = write_teacher(module_tmp_path)
    return rcnn, write_retina_teacher(module_tmp_path)


def _cfg(teachers, kind, names, extra=()):
    """A tiny distilling student of `kind` ("rcnn" | "retina") with MODEL.TRANSFER `names`."""
    (r_yaml, r_w), (t_yaml, t_w) = teachers
    opts = ["MODEL.NST.LOSS_WEIGHT", "0.0", "MODEL.FGFI.WARMUP_ITERS", "0",
            "MODEL.TRANSFER.NAMES", repr(list(names)),
            "MODEL.TRANSFER.WEIGHTS", repr([1.0] * len(names))]
    if kind == "rcnn":
        return make_cfg(NST_TOY, ["MODEL.WEIGHTS", "", "MODEL.TEACHER.CONFIG_FILE", str(r_yaml),
                                  "MODEL.TEACHER.WEIGHTS", str(r_w)] + opts + list(extra))
    return make_cfg(RETINA_STUDENT, RETINA_TINY + [
        "MODEL.TEACHER.CONFIG_FILE", str(t_yaml), "MODEL.TEACHER.WEIGHTS", str(t_w)]
        + opts + list(extra))


def _batch(seed=0):
    """Two images of different sizes (the batch is padded at the bottom/right) with GT boxes;
    height/width name an original twice as large, which the boxes must not be scaled to."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for (h, w), boxes, classes in (
        ((90, 120), [[8.0, 10.0, 60.0, 70.0], [40.0, 20.0, 118.0, 88.0]], [1, 3]),
        ((70, 100), [[50.0, 30.0, 100.0, 70.0]], [2]),  # touches the bottom/right edge
    ):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.tensor(classes)
        image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g)
        batch.append({"image": image, "instances": inst, "height": 2 * h, "width": 2 * w})
    return batch


def _step(model, batch, it=0):
    with EventStorage(it):
        return model(batch)


def _learned_params(model):
    return [p for m in model.distill.regressors.values() for p in m.parameters()]


CASES = [("rcnn", m) for m in ALL] + [("retina", m) for m in FEATURE_METHODS]


@pytest.mark.parametrize("kind,method", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_method_trains_with_an_inert_teacher_and_its_modules_in_the_optimizer(
        teachers, kind, method):
    cfg = _cfg(teachers, kind, [method])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    teacher = model.teacher
    teacher_before = copy.deepcopy(teacher.state_dict())
    learned = _learned_params(model)
    assert bool(learned) == (method in LEARNED)
    opt = build_optimizer(cfg, model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in learned} <= in_opt
    before = {k: copy.deepcopy(m.state_dict()) for k, m in model.distill.regressors.items()}
    for it in range(2):
        losses = _step(model, _batch(it), it)
        value = losses[f"loss_{method}"]
        assert value.dtype == torch.float32 and math.isfinite(value.item()), losses
        assert value.item() > 0
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None for p in learned)
        assert not learned or any(p.grad.abs().sum() > 0 for p in learned)
        opt.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    for k, m in model.distill.regressors.items():  # each module trained (zero-init parts of
        # FGD's context blocks get no gradient yet, so not every tensor moves)
        assert any(not torch.equal(v, before[k][n]) for n, v in m.state_dict().items()), k


def test_dkd_needs_an_rcnn_student(teachers):
    with pytest.raises(ValueError, match=r"'dkd' needs \['target'\].*DistillationRetinaNet"):
        build_model(_cfg(teachers, "retina", ["dkd"]))


@pytest.mark.parametrize("extra", [["MODEL.KD.LOSS_WEIGHT", "1.0"], []],
                         ids=["kd", "dkd"])
def test_kd_on_roi_logits_refuses_a_teacher_without_roi_heads(teachers, extra):
    (_, _), (t_yaml, t_w) = teachers  # a RetinaNet teacher for an R-CNN student
    cfg = _cfg(teachers, "rcnn", [] if extra else ["dkd"], extra)
    cfg.MODEL.TEACHER.CONFIG_FILE, cfg.MODEL.TEACHER.WEIGHTS = str(t_yaml), str(t_w)
    with pytest.raises(ValueError, match="KD on RoI logits .* the teacher has RetinaNet"):
        build_model(cfg)


def test_reviewkd_needs_its_pairs_finest_first(teachers):
    cfg = _cfg(teachers, "rcnn", ["reviewkd"])
    assert cfg.MODEL.DISTILL.STUDENT_FEATURES == ["p2", "p3", "p4", "p5", "p6"]
    build_model(cfg)
    cfg.MODEL.DISTILL.STUDENT_FEATURES = cfg.MODEL.DISTILL.TEACHER_FEATURES = [
        "p6", "p5", "p4", "p3", "p2"]
    with pytest.raises(ValueError, match=r"'reviewkd'.*finest first \(student strides \[64"):
        build_model(cfg)


def test_a_method_with_weight_0_is_off_and_names_are_listed_once(teachers):
    cfg = _cfg(teachers, "rcnn", ["reviewkd", "cwd"])
    cfg.MODEL.TRANSFER.WEIGHTS = [0.0, 1.0]  # reviewkd off: its MID_CHANNELS must not count
    model = build_model(cfg)
    assert list(model.distill.regressors) == []
    assert set(_step(model.train(), _batch())) >= {"loss_cwd"}
    cfg.MODEL.TRANSFER.NAMES, cfg.MODEL.TRANSFER.WEIGHTS = ["fgd", "fgd"], [1.0, 2.0]
    with pytest.raises(ValueError, match=r"MODEL.TRANSFER.NAMES .* lists \['fgd'\] more than"):
        build_model(cfg)


@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_resume_restores_learned_modules_and_export_drops_them(teachers, kind, tmp_path):
    names = ["mgd", "fgd", "reviewkd"]
    cfg = _cfg(teachers, kind, names)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = build_optimizer(cfg, model)
    losses = _step(model, _batch())
    sum(losses.values()).backward()
    opt.step()
    ReliableCheckpointer(model, str(tmp_path), optimizer=opt).save("model_0000000")
    saved = {k: v.clone() for k, v in model.distill.regressors.state_dict().items()}
    assert saved

    torch.manual_seed(1)  # other initial modules
    resumed = build_model(cfg).train()
    assert any(not torch.equal(v, saved[k])
               for k, v in resumed.distill.regressors.state_dict().items())
    opt2 = build_optimizer(cfg, resumed)
    ReliableCheckpointer(resumed, str(tmp_path), optimizer=opt2).resume_or_load("", resume=True)
    for k, v in resumed.distill.regressors.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert opt2.state_dict()["state"]  # the modules' optimizer state came back too

    exported = student_state_dict(model)
    plain = cfg.clone()
    plain.MODEL.META_ARCHITECTURE = "GeneralizedRCNN" if kind == "rcnn" else "RetinaNet"
    assert set(exported) == set(build_model(plain).state_dict())
    assert not any(k.startswith("distill.") for k in exported)


@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_a_distilling_student_starts_and_draws_as_the_plain_one_of_its_seed(teachers, kind):
    # the methods table's pairing: method_s - plain_s is the method's own effect only if both
    # runs start from the same weights and the teacher's and the losses' initialisation do not
    # shift the student's random stream (RPN / ROI sampling, ...)
    cfg = _cfg(teachers, kind, ["mgd", "reviewkd"])  # both with learned modules
    plain_cfg = cfg.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN" if kind == "rcnn" else "RetinaNet"
    torch.manual_seed(0)
    plain = build_model(plain_cfg).state_dict()
    after_plain = torch.get_rng_state()
    torch.manual_seed(0)
    student = student_state_dict(build_model(cfg))
    assert torch.equal(torch.get_rng_state(), after_plain)
    assert student.keys() == plain.keys()
    for k, v in plain.items():
        assert torch.equal(student[k], v), k


@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_bf16_autocast_on_cpu(teachers, kind):
    names = ALL if kind == "rcnn" else FEATURE_METHODS
    torch.manual_seed(0)
    model = build_model(_cfg(teachers, kind, names)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _step(model, _batch())
    for name in names:
        value = losses[f"loss_{name}"]
        assert value.dtype == torch.float32 and math.isfinite(value.item()), name
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in _learned_params(model))


@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_gt_boxes_reach_the_losses_in_padded_input_pixels(teachers, kind):
    torch.manual_seed(0)
    model = build_model(_cfg(teachers, kind, ["fgd"])).train()
    batch = _batch()
    rec = {}
    with record_first_call(model.backbone, rec):
        losses = _step(model, batch)
    with torch.no_grad():
        t_feats = model.teacher.backbone(rec["args"][0])

    def by_hand(boxes):
        total = 0.0
        for i, p in enumerate(model.feature_pairs):
            total = total + p.weight * fgd_loss(
                rec["output"][p.student], t_feats[p.teacher], boxes, p.student_stride,
                model.distill.regressors[f"fgd_{i}"])
        return total

    given = [x["instances"].gt_boxes.tensor for x in batch]  # the image tensors' pixels
    torch.testing.assert_close(losses["loss_fgd"], by_hand(given))
    original = [b * 2 for b in given]  # in the "height"/"width" frame: must not be used
    assert not torch.allclose(losses["loss_fgd"], by_hand(original))


@pytest.mark.parametrize("kind,offset", [("rcnn", 0.0), ("rcnn", 0.5), ("retina", 0.0)])
def test_fgfi_imitates_where_the_detectors_own_anchors_are(teachers, kind, offset):
    # the toy R-CNN's anchors are 3 x stride, the toy RetinaNet's two sizes of 1.5 and ~2.1 x
    # stride a cell: not the default 8 x stride FPN anchors the mask assumed until 2026-12-06
    cfg = _cfg(teachers, kind, ["fgfi"], ["MODEL.ANCHOR_GENERATOR.OFFSET", str(offset)])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch, rec = _batch(), {}
    with record_first_call(model.backbone, rec):
        losses = _step(model, batch)
    with torch.no_grad():
        t_feats = model.teacher.backbone(rec["args"][0])
    anchors = cfg.MODEL.ANCHOR_GENERATOR
    in_features = cfg.MODEL.RPN.IN_FEATURES if kind == "rcnn" else cfg.MODEL.RETINANET.IN_FEATURES
    shapes = model.backbone.output_shape()
    sizes = {shapes[f].stride: anchors.SIZES[j if len(anchors.SIZES) > 1 else 0]
             for j, f in enumerate(in_features)}  # from the config, not the model
    levels = tuple(sorted({p.student_stride for p in model.feature_pairs}))
    boxes = [x["instances"].gt_boxes.tensor for x in batch]

    def by_hand(own_anchors):
        return sum(p.weight * fgfi_loss(
            rec["output"][p.student], t_feats[p.teacher], boxes, p.student_stride,
            model.distill.regressors[f"fgfi_{i}"], psi=cfg.MODEL.FGFI.PSI, level_strides=levels,
            anchor_sizes=sizes[p.student_stride] if own_anchors else None,
            aspect_ratios=anchors.ASPECT_RATIOS[0] if own_anchors else (0.5, 1.0, 2.0),
            anchor_offset=anchors.OFFSET if own_anchors else 0.0)
            for i, p in enumerate(model.feature_pairs))

    assert set(levels) <= set(sizes) and anchors.OFFSET == offset
    torch.testing.assert_close(losses["loss_fgfi"], by_hand(True))
    assert not torch.allclose(losses["loss_fgfi"], by_hand(False))


def test_fgfi_refuses_distilled_levels_without_anchors(teachers):
    # the toy R-CNN's RPN reads p2-p6: p2-p5 alone is fine, a level without anchors is not
    assert build_model(_cfg(teachers, "rcnn", ["fgfi"], [
        "MODEL.RPN.IN_FEATURES", "['p2', 'p3', 'p4', 'p5']",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[12], [24], [48], [96]]",
        "MODEL.DISTILL.STUDENT_FEATURES", "['p2', 'p3']",
        "MODEL.DISTILL.TEACHER_FEATURES", "['p2', 'p3']",
        "MODEL.DISTILL.FEATURE_WEIGHTS", "[1.0, 1.0]"]))
    with pytest.raises(ValueError, match=r"strides \[4, 64\] are not all anchor levels of the "
                                         r"student \(\[4, 8, 16, 32\]\)"):
        build_model(_cfg(teachers, "rcnn", ["fgfi"], [
            "MODEL.RPN.IN_FEATURES", "['p2', 'p3', 'p4', 'p5']",
            "MODEL.ANCHOR_GENERATOR.SIZES", "[[12], [24], [48], [96]]",
            "MODEL.DISTILL.STUDENT_FEATURES", "['p2', 'p6']",
            "MODEL.DISTILL.TEACHER_FEATURES", "['p2', 'p6']",
            "MODEL.DISTILL.FEATURE_WEIGHTS", "[1.0, 1.0]"]))
    with pytest.raises(ValueError, match="no anchors at stride 64"):
        fgfi_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), [torch.zeros(0, 4)], 64,
                  FGFIAdapter(2, 2), level_strides=None, anchor_cells={4: torch.zeros(3, 4)})


def test_dkd_targets_are_the_sampled_proposals_gt_classes(teachers):
    torch.manual_seed(0)
    model = build_model(_cfg(teachers, "rcnn", ["dkd"])).train()
    batch = _batch()
    backbone, pooler, predictor = {}, {}, {}
    heads = model.roi_heads
    with record_first_call(model.backbone, backbone), \
            record_first_call(heads.box_pooler, pooler), \
            record_first_call(heads.box_predictor, predictor):
        losses = _step(model, batch)
    boxes = pooler["args"][1]
    # the target by hand: IoU >= 0.5 with a GT -> its class, else background K
    target = []
    for b, x in zip(boxes, batch):
        iou = pairwise_iou(x["instances"].gt_boxes, b)
        best, idx = iou.max(dim=0)
        cls = x["instances"].gt_classes[idx]
        target.append(torch.where(best >= 0.5, cls, torch.full_like(cls, heads.num_classes)))
    target = torch.cat(target)
    assert (target == heads.num_classes).any() and (target < heads.num_classes).any()
    with torch.no_grad():
        t_feats = model.teacher.backbone(backbone["args"][0])
        t_logits = box_class_logits(model.teacher.roi_heads, t_feats, boxes)
    expected = dkd_loss(predictor["output"][0], t_logits, target, 1.0, 0.25, 1.0)
    torch.testing.assert_close(losses["loss_dkd"], expected)
    wrong = torch.full_like(target, heads.num_classes)
    assert not torch.allclose(losses["loss_dkd"],
                              dkd_loss(predictor["output"][0], t_logits, wrong, 1.0, 0.25, 1.0))


def test_fgfi_is_off_during_its_warm_up(teachers):
    torch.manual_seed(0)
    model = build_model(_cfg(teachers, "rcnn", ["fgfi"], ["MODEL.FGFI.WARMUP_ITERS", "3"]))
    model.train()
    early = _step(model, _batch(), it=2)
    assert early["loss_fgfi"].item() == 0
    early["loss_fgfi"].backward()  # the adapters stay in the graph (DDP sees every parameter)
    assert all(p.grad is not None and not p.grad.any() for p in _learned_params(model))
    assert _step(model, _batch(), it=3)["loss_fgfi"].item() > 0


def test_method_namespaces_reach_the_losses_and_modules():
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec

    from nst_det import add_nst_config
    from nst_det.distill import DistillationCore, distill_config
    from nst_det.losses import cwd_loss

    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_list(["MODEL.TRANSFER.NAMES", "['cwd', 'reviewkd']",
                         "MODEL.TRANSFER.WEIGHTS", "[2.0, 1.0]", "MODEL.CWD.TAU", "3.0",
                         "MODEL.REVIEWKD.MID_CHANNELS", "8",
                         "MODEL.DISTILL.STUDENT_FEATURES", "['a', 'b']",
                         "MODEL.DISTILL.TEACHER_FEATURES", "['a', 'b']",
                         "MODEL.DISTILL.FEATURE_WEIGHTS", "[0.25, 0.75]"])
    shapes = {"a": ShapeSpec(channels=4, stride=4), "b": ShapeSpec(channels=4, stride=8)}
    core = DistillationCore(teacher=torch.nn.Conv2d(1, 1, 1), student_shapes=shapes,
                            teacher_shapes=shapes, **distill_config(cfg))
    assert core.regressors["reviewkd"].abfs[0].conv1[0].out_channels == 8  # MID_CHANNELS
    s = {"a": torch.randn(2, 4, 8, 8), "b": torch.randn(2, 4, 4, 4)}
    t = {k: torch.randn_like(v) for k, v in s.items()}
    expected = 2.0 * (0.25 * cwd_loss(s["a"], t["a"], 3.0) + 0.75 * cwd_loss(s["b"], t["b"], 3.0))
    torch.testing.assert_close(core.feature_losses(s, t)["loss_cwd"], expected)
