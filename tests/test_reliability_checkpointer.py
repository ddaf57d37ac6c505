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
    with unfilled_keys(model) as unfilled:
        model.load_state_dict({"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(3)},
                              strict=False)
    assert unfilled == ["1.weight", "1.bias"]
    model.load_state_dict(model.state_dict())  # the hook is gone after the block
    assert unfilled == ["1.weight", "1.bias"]
