"""Loud NaN: a non-finite loss term stops training before its step is applied."""

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage

from nst_det.engine.nan_guard import install_nan_guard


class TwoLosses(torch.nn.Module):
    """loss_cls = w^2; loss_nst = w * scale (scale = nan / inf poisons it)."""

    def __init__(self, scale):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.scale = scale

    def forward(self, batch):
        return {"loss_cls": (self.w ** 2).sum(), "loss_nst": self.w.sum() * self.scale}


def _step(scale, iteration=7):
    model = TwoLosses(scale)
    install_nan_guard(model)
    trainer = SimpleTrainer(model, [[0]] * 10, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.iter = iteration
    with EventStorage(iteration) as storage:
        trainer.storage = storage
        trainer.run_step()
    return model


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_stops_before_the_step(bad):
    model = TwoLosses(bad)
    install_nan_guard(model)
    before = model.w.detach().clone()
    trainer = SimpleTrainer(model, [[0]] * 10, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.iter = 7
    with EventStorage(7) as storage:
        trainer.storage = storage
        with pytest.raises(FloatingPointError, match=r"iteration 7.*'loss_nst': (nan|-?inf)"):
            trainer.run_step()
    assert torch.equal(model.w.detach(), before)  # the poisoned update was never applied


def test_finite_losses_train_normally():
    model = _step(1.0)
    assert not torch.equal(model.w.detach(), torch.ones(3))


def test_guard_ignores_eval_mode_outputs():
    model = TwoLosses(float("nan")).eval()
    install_nan_guard(model)
    assert torch.isnan(model(None)["loss_nst"])  # inference outputs are not training losses


class WithTeacher(torch.nn.Module):
    """loss_nst compares w with a teacher's output; loss_cls = w^2 (scale poisons it)."""

    def __init__(self, teacher_value, scale=1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.teacher = torch.nn.Linear(3, 3)
        with torch.no_grad():
            self.teacher.weight.fill_(teacher_value)
        self.scale = scale

    def forward(self, batch):
        with torch.no_grad():
            target = self.teacher(torch.ones(3))
        return {"loss_cls": (self.w ** 2).sum() * self.scale,
                "loss_nst": ((self.w - target) ** 2).sum()}


def _message(model, output_dir=None):
    install_nan_guard(model, output_dir)
    with EventStorage(0), pytest.raises(FloatingPointError) as info:
        model(None)
    return str(info.value)


def test_message_names_the_loss_and_says_the_teacher_output_is_non_finite():
    text = _message(WithTeacher(float("nan")))
    assert "iteration 0: loss_nst = nan (all losses:" in text
    assert "The teacher's output is non-finite: check MODEL.TEACHER.WEIGHTS" in text
    # the cause is the teacher's input or weights: no advice to tune the student's run
    assert "Lower SOLVER.BASE_LR" not in text and "MODEL.NST.LOSS_WEIGHT" not in text
    assert "The learning rate and loss weights are not the cause" in text
    # nothing was saved: no checkpoint is promised
    assert "No checkpoint had been saved yet" in text and "intact" not in text


def test_message_says_the_teacher_is_finite_and_names_an_existing_checkpoint(tmp_path):
    torch.save({"model": {}}, tmp_path / "model_0000004.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    text = _message(WithTeacher(0.5, scale=float("inf")), str(tmp_path))
    assert "loss_cls = inf" in text and "loss_nst =" not in text
    assert "The teacher's outputs are finite: the student or the loss diverged" in text
    assert "Lower SOLVER.BASE_LR" in text
    assert f"The last checkpoint, {tmp_path / 'model_0000004.pth'}, is intact" in text
    # a tag without its file is no checkpoint
    (tmp_path / "model_0000004.pth").unlink()
    assert "No checkpoint had been saved yet" in _message(WithTeacher(0.5, float("inf")),
                                                         str(tmp_path))


def test_message_without_a_teacher_says_nothing_about_one():
    text = _message(TwoLosses(float("nan")))
    assert "teacher" not in text.lower() and "loss_nst = nan" in text


@pytest.mark.parametrize("config, kd, nan_key, loss", [
    ("faster_rcnn_R_18_FPN_toy.yaml", 0.0, "backbone.bottom_up.stem.conv1.weight", "loss_nst"),
    # KD on RoI logits calls the teacher's box head and predictor directly, past the hooks on
    # the teacher and its children: the message said the teacher was finite
    ("faster_rcnn_R_18_FPN_toy_kd_nst.yaml", 1.0, "roi_heads.box_predictor.cls_score.weight",
     "loss_kd"),
])
def test_detection_distiller_with_nan_teacher_weights_is_blamed_on_the_teacher(
        tmp_path, config, kd, nan_key, loss):
    """The real DistillationRCNN: its teacher is called part by part (backbone, heads)."""
    from _detection_common import TOY, distill_opts, make_cfg, write_teacher
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    yaml, weights = write_teacher(tmp_path)
    state = torch.load(weights, weights_only=True)
    state["model"][nan_key].fill_(float("nan"))
    torch.save(state, weights)
    model = build_model(make_cfg(TOY / config, distill_opts(yaml, weights, kd=kd))).train()
    instances = Instances((96, 128), gt_boxes=Boxes(torch.tensor([[10.0, 10.0, 60.0, 70.0]])),
                          gt_classes=torch.tensor([1]))
    batch = [{"image": torch.rand(3, 96, 128) * 255, "instances": instances}]
    install_nan_guard(model)
    with EventStorage(0), pytest.raises(FloatingPointError) as info:
        model(batch)
    assert f"{loss} = nan" in str(info.value)
    assert "The teacher's output is non-finite" in str(info.value)
