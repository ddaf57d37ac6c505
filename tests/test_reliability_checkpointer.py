"""ReliableCheckpointer unit contracts (the SIGKILL tests are in test_reliability_resume.py)."""

import os

import torch

from nst_det.engine.checkpointer import ReliableCheckpointer


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
