"""The distillation core: renamed config keys, the inert teacher, loss arguments, the loss sum."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from torch import nn

from nst_det.config import load_config
from nst_det.distill import DistillationCore
from nst_det.losses import nst_loss

REPO = Path(__file__).resolve().parents[1]
CLS_TOY = REPO / "configs" / "quick_schedules" / "cls_R18_toy.yaml"


@pytest.mark.parametrize("key", ["STUDENT_FEATURES", "TEACHER_FEATURES", "FEATURE_WEIGHTS"])
def test_old_feature_pair_keys_name_the_new_key(tmp_path, key):
    with pytest.raises(KeyError, match=rf"MODEL.NST.{key} was renamed to MODEL.DISTILL.{key}"):
        load_config(str(CLS_TOY), [f"MODEL.NST.{key}", "['res5']"])
    old = tmp_path / "old.yaml"
    old.write_text(f"_BASE_: {str(CLS_TOY)!r}\nMODEL:\n  NST:\n    {key}: ['res5']\n")
    with pytest.raises(KeyError, match=rf"config file {old}: .*MODEL.DISTILL.{key}"):
        load_config(str(old))
    cfg = load_config(str(CLS_TOY), [f"MODEL.DISTILL.{key}", "['res5']"])
    assert list(cfg.MODEL.DISTILL[key]) == ["res5"]


def test_no_config_uses_the_old_keys():
    for path in (REPO / "configs").rglob("*.yaml"):
        text = path.read_text()
        for line in text.splitlines():
            assert not (line.strip().startswith(("STUDENT_FEATURES", "TEACHER_FEATURES"))
                        and "DISTILL" not in text), path


class _Net(nn.Module):
    """Two feature maps: a [B, 4, H/2, W/2] and b [B, 4, H/4, W/4]."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, 2, 1)
        self.b = nn.Conv2d(4, 4, 3, 2, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn(self.a(x))
        return {"a": a, "b": self.b(a)}


SHAPES = {"a": ShapeSpec(channels=4, stride=2), "b": ShapeSpec(channels=4, stride=4)}


def _core(teacher, **kw):
    args = dict(teacher=teacher, student_shapes=SHAPES, teacher_shapes=SHAPES,
                student_features=["a", "b"], teacher_features=["b", "b"],
                feature_weights=[0.25, 0.75], nst_weight=2.0)
    args.update(kw)
    return DistillationCore(**args)


def test_core_holds_an_inert_teacher_outside_the_module_tree():
    teacher = _Net()
    owner = nn.Module()
    owner.student = _Net()
    owner.distill = _core(teacher)
    assert owner.distill.teacher is teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(k.startswith("student.") for k in owner.state_dict())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in owner.parameters()}
    owner.train()
    assert not teacher.training
    owner.double()
    assert teacher.a.weight.dtype == torch.float64
    owner.float()


def test_weighted_sum_over_aligned_pairs_matches_the_formula():
    torch.manual_seed(0)
    teacher, student = _Net().eval(), _Net()
    core = _core(teacher, transfer_losses=[("at", 3.0)])
    x = torch.randn(2, 3, 16, 12)
    s, t = student(x), teacher(x)
    losses = core.feature_losses(s, t)
    # pair a (stride 2) <-> b (stride 4): the student map is 2x2 average-pooled first
    a_pooled = torch.nn.functional.avg_pool2d(s["a"], 2, 2, ceil_mode=True)
    expected = 2.0 * (0.25 * nst_loss(a_pooled, t["b"]) + 0.75 * nst_loss(s["b"], t["b"]))
    torch.testing.assert_close(losses["loss_nst"], expected)
    assert set(losses) == {"loss_nst", "loss_at"} and losses["loss_at"] > 0


def test_loss_arguments_checked_at_construction():
    teacher = _Net()
    with pytest.raises(ValueError, match=r"'class_gaussian_w2' needs \['labels'\].*RetinaNet"):
        _core(teacher, transfer_losses=[("class_gaussian_w2", 1.0)], context="RetinaNet")
    core = _core(teacher, transfer_losses=[("class_gaussian_w2", 1.0)], supplies=("labels",))
    core_fit = _core(teacher, transfer_losses=[("fitnet", 1.0)])
    assert set(core_fit.regressors) == {"fitnet_0", "fitnet_1"}  # one learned regressor per pair
    assert core.feature_losses(_Net()(torch.randn(4, 3, 8, 8)), teacher(torch.randn(4, 3, 8, 8)),
                               labels=torch.tensor([0, 0, 1, 1]))["loss_class_gaussian_w2"] >= 0
    with pytest.raises(ValueError, match="own weight"):
        _core(teacher, transfer_losses=[("kd", 1.0)])
    with pytest.raises(ValueError, match="no teacher"):
        _core(None)
    with pytest.raises(ValueError, match=r"\['zz'\].*available: \['a', 'b'\]"):
        _core(teacher, student_features=["a", "zz"])


@pytest.mark.parametrize("name", ["cwd", "pkd", "mmd", "gaussian_w2", "gaussian_kl", "w2",
                                  "sinkhorn"])
def test_a_loss_of_one_width_on_pairs_of_two_widths_is_refused_when_built(name):
    """These losses have no adapter: before, the model built and the first step failed inside
    the loss, naming neither the pair nor the config keys."""
    wide = {"a": ShapeSpec(channels=6, stride=2), "b": ShapeSpec(channels=6, stride=4)}
    with pytest.raises(ValueError, match=rf"{name!r}, which compares .* equal channel counts, "
                                         r"but the pairs \['a \(4\) / b \(6\)', 'b \(4\) / b \(6\)'"
                                         r"\] .*MODEL.DISTILL.STUDENT_FEATURES"):
        _core(_Net(), teacher_shapes=wide, nst_weight=0.0, transfer_losses=[(name, 1.0)])
    _core(_Net(), nst_weight=0.0, transfer_losses=[(name, 1.0)])  # one width: built
    # losses that take any widths (nst, sp) or adapt them (fitnet, mgd) build on these pairs
    _core(_Net(), teacher_shapes=wide, transfer_losses=[("sp", 1.0), ("fitnet", 1.0),
                                                         ("mgd", 1.0)])
