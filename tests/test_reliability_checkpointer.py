"""ReliableCheckpointer unit contracts (the SIGKILL tests are in test_reliability_resume.py)."""

import os

import pytest
import torch

from nst_det.engine.checkpointer import ReliableCheckpointer, unfilled_keys


def test_best_checkpoint_never_becomes_the_resume_point(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt = ReliableCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000009", iteration=9)
    ckpt.save("model_best", iteration=4)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert [os.path.basename(p) for p in ckpt._resume_candidates()] == ["model_0000009.pth"]
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 9


def test_saves_leave_no_temporary_files(tmp_path):
    ckpt = ReliableCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    ckpt.save("model_0000001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]


class _State:
    """A checkpointable standing in for the optimizer/trainer state."""

    def state_dict(self):
        return {"momentum": torch.ones(3)}


def test_weights_only_names_keep_model_and_iteration_but_drop_trainer_state(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt = ReliableCheckpointer(model, str(tmp_path), weights_only=["model_best", "model_final"],
                                trainer=_State())
    ckpt.save("model_best", iteration=2)
    weight_at_2 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # a training step
    ckpt.save("model_0000003", iteration=3)
    ckpt.save("model_final", iteration=4)
    load = lambda name: torch.load(tmp_path / f"{name}.pth", weights_only=True)  # noqa: E731
    assert sorted(load("model_0000003")) == ["iteration", "model", "trainer"]
    expected = (("model_final", 4, model.weight), ("model_best", 2, weight_at_2))
    for name, iteration, weight in expected:
        data = load(name)
        assert sorted(data) == ["iteration", "model"] and data["iteration"] == iteration
        assert torch.equal(data["model"]["weight"], weight)
    # a weights-only model_final still is the resume point, with its iteration
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 4


def test_by_default_only_model_best_is_weights_only(tmp_path):
    ckpt = ReliableCheckpointer(torch.nn.Linear(2, 2), str(tmp_path), trainer=_State())
    ckpt.save("model_final", iteration=1)
    ckpt.save("model_best", iteration=1)
    assert "trainer" in torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert "trainer" not in torch.load(tmp_path / "model_best.pth", weights_only=True)


def test_best_of_unchanged_weights_links_to_model_final(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt = ReliableCheckpointer(model, str(tmp_path), weights_only=["model_best", "model_final"])
    best, final = tmp_path / "model_best.pth", tmp_path / "model_final.pth"
    ckpt.save("model_best", iteration=1)
    with torch.no_grad():
        model.weight.add_(1.0)  # a training step
    ckpt.save("model_final", iteration=4)
    assert best.stat().st_ino != final.stat().st_ino
    assert torch.load(best, weights_only=True)["iteration"] == 1
    # detectron2 labels the final evaluation max_iter, one more than model_final: same weights
    ckpt.save("model_best", iteration=5)
    assert best.stat().st_ino == final.stat().st_ino
    assert torch.equal(torch.load(best, weights_only=True)["model"]["weight"], model.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # a later save under one name replaces that name only
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.save("model_final", iteration=6)
    assert best.stat().st_ino != final.stat().st_ino
    assert torch.load(best, weights_only=True)["iteration"] == 4
    assert torch.load(final, weights_only=True)["iteration"] == 6


def test_resume_into_a_different_model_names_the_keys(tmp_path):
    """A resumed run must continue the same model: a changed layer shape or a missing key is an
    error naming the keys (detectron2 would only warn), on either detectron2."""
    ReliableCheckpointer(torch.nn.Sequential(torch.nn.Linear(2, 3)), str(tmp_path)).save(
        "model_0000001", iteration=1)
    wider = ReliableCheckpointer(torch.nn.Sequential(torch.nn.Linear(2, 4)), str(tmp_path))
    with pytest.raises(KeyError, match=r"does not match the model.*'0\.weight', '0\.bias'"):
        wider.resume_or_load("", resume=True)
    deeper = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with pytest.raises(KeyError, match=r"does not match the model.*'1\.weight', '1\.bias'"):
        ReliableCheckpointer(deeper, str(tmp_path)).resume_or_load("", resume=True)
    same = torch.nn.Sequential(torch.nn.Linear(2, 3))
    ckpt = ReliableCheckpointer(same, str(tmp_path))
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 1
    assert ckpt.resumed_from == str(tmp_path / "model_0000001.pth")


def test_unfilled_keys_reports_what_a_load_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with unfilled_keys(model) as (unfilled, _):
        model.load_state_dict({"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(3)},
                              strict=False)
    assert unfilled == ["1.weight", "1.bias"]
    model.load_state_dict(model.state_dict())  # the hook is gone after the block
    assert unfilled == ["1.weight", "1.bias"]


# ---- what a load from MODEL.WEIGHTS must fill -----------------------------------------------

class _Distiller(torch.nn.Module):
    """A classification distiller's layout: `student` (its last Linear the class head) and the
    distillation core's training-only modules under `distill`."""

    def __init__(self, classes=5):
        super().__init__()
        self.student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                           torch.nn.Linear(4, classes))
        self.distill = torch.nn.Linear(4, 4)


def _saved(tmp_path, name, state):
    path = tmp_path / name
    torch.save({"model": state}, path)
    return str(path)


def test_a_classifier_initialised_from_weights_of_another_model_is_refused(tmp_path):
    trained = _Distiller().state_dict()
    # another class count: only the class head differs, which a new task re-initialises
    ReliableCheckpointer(_Distiller(classes=7), str(tmp_path)).resume_or_load(
        _saved(tmp_path, "cls.pth", trained), resume=False)
    # a detector's checkpoint: none of the student's keys (detectron2 would only warn)
    detector = _saved(tmp_path, "det.pth", {"backbone.bottom_up.stem.conv1.weight":
                                            torch.zeros(4, 3, 3, 3)})
    with pytest.raises(KeyError, match=r"does not match the model's pretrained part \(student\."
                                       r"\*\): keys missing from it .*student.0.weight"):
        ReliableCheckpointer(_Distiller(), str(tmp_path)).resume_or_load(detector, resume=False)


def test_a_detector_initialised_from_a_deeper_backbone_is_refused(tmp_path):
    """An R-34 file holds every R-18 key with its shape, and more blocks: detectron2 warns about
    the unused ones and trains a mix of the two networks."""
    from _detection_common import R18_FPN_TOY, make_cfg
    from detectron2.modeling import build_model

    def detector(depth):
        return build_model(make_cfg(R18_FPN_TOY, ["MODEL.RESNETS.DEPTH", str(depth)]))

    r34 = _saved(tmp_path, "r34.pth", detector(34).state_dict())
    with pytest.raises(KeyError, match=r"keys in it that the model does not have "
                                       r"\['backbone.bottom_up.res2.2"):
        ReliableCheckpointer(detector(18), str(tmp_path)).resume_or_load(r34, resume=False)
    r18 = _saved(tmp_path, "r18.pth", {k: v for k, v in detector(18).state_dict().items()
                                       if k.startswith("backbone.bottom_up.")})
    ReliableCheckpointer(detector(18), str(tmp_path)).resume_or_load(r18, resume=False)  # fits


def test_weights_to_evaluate_must_fill_the_model_but_its_training_only_modules(tmp_path):
    trained = _Distiller().state_dict()
    no_core = _saved(tmp_path, "student.pth",
                     {k: v for k, v in trained.items() if not k.startswith("distill.")})
    ReliableCheckpointer(_Distiller(), str(tmp_path)).resume_or_load(
        no_core, resume=False, whole_model=True)
    other_head = _saved(tmp_path, "other.pth", _Distiller(classes=7).state_dict())
    ReliableCheckpointer(_Distiller(), str(tmp_path)).resume_or_load(other_head, resume=False)
    with pytest.raises(KeyError, match=r"does not fill the model to evaluate: .*student.2.weight"
                                       r".* scored with random values"):
        ReliableCheckpointer(_Distiller(), str(tmp_path)).resume_or_load(
            other_head, resume=False, whole_model=True)


def test_eval_only_with_weights_of_another_network_is_refused(tmp_path):
    """tools/train_net.py --eval-only: an R-18 checkpoint in an R-50 config was scored (AP 0)."""
    from _detection_common import R18_FPN_TOY, make_cfg
    from detectron2.modeling import build_model

    from nst_det.engine.train_or_evaluate import train_or_evaluate

    weights = _saved(tmp_path, "r18.pth", build_model(make_cfg(R18_FPN_TOY)).state_dict())
    cfg = make_cfg(R18_FPN_TOY, ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS",
                                 "256", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(KeyError, match="does not fill the model to evaluate"):
        train_or_evaluate(cfg, eval_only=True)
