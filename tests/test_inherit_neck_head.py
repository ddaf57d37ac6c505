"""MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD: FGD/MGD's "inheriting strategy".

On, the student's neck (backbone without bottom_up) and heads start as copies of the teacher's;
its bottom-up network is its own; the teacher stays inert and outside the student; a resumed
checkpoint restores the trained student; a teacher with other neck/head shapes is an error.
"""

from __future__ import annotations

import copy

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
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from nst_det.engine.checkpointer import ReliableCheckpointer

RETINA_INHERIT = TOY / "retinanet_R_18_FPN_toy_fgd_inherit.yaml"
RETINA_FGD = TOY / "retinanet_R_18_FPN_toy_fgd.yaml"
BOTTOM_UP = "backbone.bottom_up."
# tensors each kind must have among the inherited ones (so an empty selection cannot pass)
EXPECTED = {
    "retina": ["backbone.fpn_lateral3.weight", "backbone.fpn_output5.weight",
               "backbone.top_block.p6.weight", "backbone.top_block.p7.weight",
               "head.cls_subnet.0.weight", "head.cls_score.weight", "head.bbox_pred.weight"],
    "rcnn": ["backbone.fpn_lateral2.weight", "backbone.fpn_output5.weight",
             "proposal_generator.rpn_head.conv.weight", "roi_heads.box_head.fc1.weight",
             "roi_heads.box_predictor.cls_score.weight"],
}


@pytest.fixture(scope="module")
def teachers(module_tmp_path):
    """{"rcnn": (yaml, weights) toy R-18 FPN, "retina": (yaml, weights) toy R-34 FPN}, random."""
    return {"rcnn": write_teacher(module_tmp_path), "retina": write_retina_teacher(module_tmp_path)}


def _cfg(teachers, kind, inherit=True, extra=()):
    """A tiny distilling student of `kind`: RetinaNet = the toy FGD-inherit config, R-CNN = NST."""
    yaml, weights = teachers[kind]
    opts = ["MODEL.TEACHER.CONFIG_FILE", str(yaml), "MODEL.TEACHER.WEIGHTS", str(weights),
            "MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD", str(inherit)]
    if kind == "retina":
        return make_cfg(RETINA_INHERIT, RETINA_TINY + opts + list(extra))
    return make_cfg(NST_TOY, ["MODEL.WEIGHTS", ""] + opts + list(extra))


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def _split(state):
    """(neck+head, bottom-up) tensors of a student state_dict; the core's keys are neither."""
    neck_head = {k: v for k, v in state.items()
                 if not k.startswith((BOTTOM_UP, "distill.", "pixel_"))}
    bottom_up = {k: v for k, v in state.items() if k.startswith(BOTTOM_UP)}
    return neck_head, bottom_up


def _random(state):
    """The randomly initialised tensors (conv / linear weights; biases start at constants)."""
    return {k: v for k, v in state.items() if k.endswith(".weight") and v.dim() > 1}


def _batch():
    g = torch.Generator().manual_seed(0)
    batch = []
    for (h, w), boxes, classes in (((90, 120), [[8.0, 10.0, 60.0, 70.0]], [1]),
                                   ((70, 100), [[50.0, 30.0, 100.0, 70.0]], [2])):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.tensor(classes)
        image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def _train_step(cfg, model):
    opt = build_optimizer(cfg, model)
    with EventStorage(0):
        losses = model(_batch())
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    return opt


KINDS = ["retina", "rcnn"]


@pytest.mark.parametrize("kind", KINDS)
def test_on_the_neck_and_heads_are_the_teachers_and_the_bottom_up_is_the_students(
        teachers, kind):
    on = _build(_cfg(teachers, kind, inherit=True))
    off = _build(_cfg(teachers, kind, inherit=False))  # same seed: the same own initialisation
    teacher = on.teacher.state_dict()
    neck_head, bottom_up = _split(on.state_dict())
    off_neck_head, off_bottom_up = _split(off.state_dict())
    assert set(EXPECTED[kind]) <= set(neck_head)
    for k, v in neck_head.items():
        assert k in teacher and torch.equal(v, teacher[k]), k
    # the bottom-up is the student's own initialisation, untouched ...
    assert bottom_up and set(bottom_up) == set(off_bottom_up)
    for k, v in bottom_up.items():
        assert torch.equal(v, off_bottom_up[k]), k
    # ... which is not the teacher's (same-named, same-shaped convs exist on both sides)
    shared = {k: v for k, v in _random(bottom_up).items()
              if k in teacher and teacher[k].shape == v.shape}
    assert shared
    for k, v in shared.items():
        assert not torch.equal(v, teacher[k]), k
    # off: the student's own neck and heads, not the teacher's
    assert set(off_neck_head) == set(neck_head)
    random = _random(off_neck_head)
    assert set(EXPECTED[kind]) <= set(random)
    for k, v in random.items():
        assert not torch.equal(v, teacher[k]), k


@pytest.mark.parametrize("kind", KINDS)
def test_the_teacher_stays_inert_and_the_copies_are_the_students_own(teachers, kind):
    cfg = _cfg(teachers, kind)
    model = _build(cfg).train()
    teacher = model.teacher
    teacher_before = copy.deepcopy(teacher.state_dict())
    assert not any(p.requires_grad for p in teacher.parameters())
    # the student's state has exactly the keys it has without inheriting: no teacher inside
    off = _build(_cfg(teachers, kind, inherit=False))
    assert set(model.state_dict()) == set(off.state_dict())
    assert not any(k.startswith("distill.teacher") or "_teacher" in k for k in model.state_dict())
    t_ids = {id(p) for p in teacher.parameters()}
    t_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not any(id(p) in t_ids or p.data_ptr() in t_ptrs for p in model.parameters())
    inherited = {n: p for n, p in model.named_parameters() if n in EXPECTED[kind]}
    assert len(inherited) == len(EXPECTED[kind])
    assert all(p.requires_grad for p in inherited.values())
    in_opt = _train_step(cfg, model)
    assert {id(p) for p in inherited.values()} <= {
        id(p) for g in in_opt.param_groups for p in g["params"]}
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    # the student's copies trained away from the (unchanged) teacher
    assert any(not torch.equal(p, teacher_before[n]) for n, p in inherited.items())


@pytest.mark.parametrize("kind", KINDS)
def test_a_resumed_checkpoint_restores_the_trained_student_not_the_teacher(
        teachers, kind, tmp_path):
    cfg = _cfg(teachers, kind)
    model = _build(cfg).train()
    opt = _train_step(cfg, model)
    ReliableCheckpointer(model, str(tmp_path), optimizer=opt).save("model_0000000")
    trained = {k: v.clone() for k, v in _split(model.state_dict())[0].items()}
    teacher = model.teacher.state_dict()
    moved = [k for k, v in trained.items() if not torch.equal(v, teacher[k])]
    assert moved  # otherwise restoring the teacher's values would look the same

    resumed = _build(cfg, seed=1).train()  # inherits again at build time
    assert all(torch.equal(resumed.state_dict()[k], teacher[k]) for k in moved)
    opt2 = build_optimizer(cfg, resumed)
    ReliableCheckpointer(resumed, str(tmp_path), optimizer=opt2).resume_or_load("", resume=True)
    state = resumed.state_dict()
    for k, v in trained.items():
        assert torch.equal(state[k], v), k


def test_backbone_weights_loaded_at_init_keep_the_inherited_neck_and_heads(teachers, tmp_path):
    # MODEL.WEIGHTS of a student is usually its bottom-up only: loading it keeps the copies
    cfg = _cfg(teachers, "retina")
    model = _build(cfg)
    donor = _build(_cfg(teachers, "retina", inherit=False), seed=5).state_dict()
    path = tmp_path / "bottom_up.pth"
    torch.save({"model": {k: v for k, v in donor.items() if k.startswith(BOTTOM_UP)}}, path)
    ReliableCheckpointer(model, str(tmp_path / "out")).resume_or_load(str(path), resume=False)
    neck_head, bottom_up = _split(model.state_dict())
    teacher = model.teacher.state_dict()
    for k, v in neck_head.items():
        assert torch.equal(v, teacher[k]), k
    for k, v in bottom_up.items():
        assert torch.equal(v, donor[k]), k


@pytest.mark.parametrize("opts,first_key", [
    (["MODEL.ROI_HEADS.NUM_CLASSES", "3"], "roi_heads.box_predictor.cls_score.weight"),
    (["MODEL.FPN.OUT_CHANNELS", "32"], "backbone.fpn_lateral2.weight"),
], ids=["classes", "fpn-channels"])
def test_a_teacher_with_other_neck_or_head_shapes_is_an_error_naming_the_keys(
        module_tmp_path, opts, first_key):
    yaml, weights = write_teacher(module_tmp_path, opts, name=f"other_{opts[0]}")
    cfg = make_cfg(NST_TOY, [
        "MODEL.WEIGHTS", "", "MODEL.TEACHER.CONFIG_FILE", str(yaml),
        "MODEL.TEACHER.WEIGHTS", str(weights), "MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD", "True"])
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    msg = str(err.value)
    assert "MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD" in msg
    assert "needs a teacher with the student's neck/head" in msg
    assert "different shapes" in msg and first_key in msg
    assert not any(line.strip().startswith("different shapes") and BOTTOM_UP in line
                   for line in msg.splitlines())  # the bottom-up is never compared


def test_a_teacher_of_another_architecture_is_an_error(teachers):
    # a RetinaNet student with an R-CNN teacher: other neck levels and no `head`
    yaml, weights = teachers["rcnn"]
    cfg = make_cfg(RETINA_INHERIT, RETINA_TINY + [
        "MODEL.TEACHER.CONFIG_FILE", str(yaml), "MODEL.TEACHER.WEIGHTS", str(weights),
        "MODEL.TRANSFER.NAMES", "[]", "MODEL.TRANSFER.WEIGHTS", "[]"])  # no p7 pair to check
    with pytest.raises(ValueError, match="not in the teacher") as err:
        build_model(cfg)
    msg = str(err.value)
    assert "backbone.top_block.p6.weight" in msg.split("not in the teacher")[1].splitlines()[0]
    assert "fpn_lateral2" not in msg  # the teacher's extra tensors are not an error ...


def test_teacher_tensors_the_student_lacks_are_not_copied_and_logged(teachers, caplog):
    # ... e.g. a Mask R-CNN teacher's mask head for a Faster R-CNN student
    yaml, weights = write_teacher(teachers["rcnn"][0].parent, ["MODEL.MASK_ON", "True"],
                                  name="mask_teacher")
    cfg = _cfg({"rcnn": (yaml, weights)}, "rcnn")
    with caplog.at_level("WARNING", logger="nst_det.distill.inherit"):
        model = _build(cfg)
    logged = [r.getMessage() for r in caplog.records if r.name == "nst_det.distill.inherit"]
    assert len(logged) == 1 and "roi_heads.mask_head." in logged[0], logged
    assert not any(k.startswith("roi_heads.mask_head") for k in model.state_dict())
    teacher = model.teacher.state_dict()
    for k, v in _split(model.state_dict())[0].items():
        assert torch.equal(v, teacher[k]), k


def test_the_switch_is_off_by_default_and_the_toy_config_differs_from_fgd_only_by_it():
    from detectron2.config import get_cfg

    from nst_det import add_nst_config

    cfg = get_cfg()
    add_nst_config(cfg)
    assert cfg.MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD is False
    inherit, fgd = make_cfg(RETINA_INHERIT), make_cfg(RETINA_FGD)
    assert inherit.MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD is True
    assert fgd.MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD is False
    assert inherit.OUTPUT_DIR != fgd.OUTPUT_DIR
    inherit.MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD = False
    inherit.OUTPUT_DIR = fgd.OUTPUT_DIR
    assert inherit.dump() == fgd.dump()


def test_a_teacher_with_other_anchors_of_the_same_count_is_refused(module_tmp_path):
    """Its heads have the student's shapes (3 anchors a cell), so the tensors copied, but each
    output is for another anchor box: before, the copy went ahead silently."""
    yaml, weights = write_teacher(module_tmp_path, [
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]"], name="other_anchors")
    cfg = make_cfg(NST_TOY, [
        "MODEL.WEIGHTS", "", "MODEL.TEACHER.CONFIG_FILE", str(yaml),
        "MODEL.TEACHER.WEIGHTS", str(weights), "MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD", "True"])
    with pytest.raises(ValueError, match=r"INHERIT_TEACHER_NECK_HEAD copies the teacher's heads.*"
                                         r"anchor boxes of level 0 .* student \[\[-8.5, -4.2, "
                                         r"8.5, 4.2\], \[-6.0, -6.0, 6.0, 6.0\].* vs teacher "
                                         r"\[\[-11.3, -5.7, 11.3, 5.7\], \[-8.0, -8.0, 8.0, 8.0\]"):
        build_model(cfg)
    cfg.MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD = False
    build_model(cfg)  # NST alone does not read the heads: built


def test_retinanet_kd_on_a_teacher_with_other_anchor_shapes_is_refused(module_tmp_path):
    from _detection_common import RETINA_TEACHER

    other = make_cfg(RETINA_TEACHER, RETINA_TINY + [
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[0.25, 1.0, 4.0]]"])  # 6 a cell, as the student
    torch.manual_seed(3)
    weights = module_tmp_path / "retina_other_anchors.pth"
    torch.save({"model": build_model(other).state_dict()}, weights)
    yaml = module_tmp_path / "retina_other_anchors.yaml"
    yaml.write_text(other.dump())
    cfg = make_cfg(RETINA_FGD, RETINA_TINY + [
        "MODEL.TEACHER.CONFIG_FILE", str(yaml), "MODEL.TEACHER.WEIGHTS", str(weights),
        "MODEL.KD.LOSS_WEIGHT", "1.0"])
    with pytest.raises(ValueError, match="KD on anchor logits needs the teacher's anchors; anchor "
                                         "boxes of level 0"):
        build_model(cfg)


def test_a_student_backbone_without_bottom_up_is_refused_not_copied_whole():
    """C4: the backbone is the ResNet itself, so without the check every tensor of it would be
    'neck' and the teacher's bottom-up network would replace the student's."""
    from types import SimpleNamespace

    from nst_det.distill.inherit import inherit_neck_head

    student = {"backbone": torch.nn.Conv2d(3, 4, 3), "roi_heads": torch.nn.Linear(4, 2)}
    before = student["backbone"].weight.detach().clone()
    teacher = SimpleNamespace(backbone=torch.nn.Conv2d(3, 4, 3), roi_heads=torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Conv2d has no bottom_up"):
        inherit_neck_head(student, teacher, ["roi_heads"])
    assert torch.equal(student["backbone"].weight, before)
