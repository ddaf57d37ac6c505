"""Every path that reads weights gives one clear error for a bad file: the file, what is wrong
with it, what to do, and never torch's advice to load with `weights_only=False`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nst_det.checkpoint.weights_file import (
    WeightsFileError,
    WeightsFileNotFoundError,
    load_weights_file,
    state_dict_from,
)

REPO = Path(__file__).resolve().parents[1]
R18_TOY = REPO / "configs" / "quick_schedules" / "faster_rcnn_R_18_FPN_toy.yaml"
# the problem each damage must be reported as
PROBLEM = {
    "missing": "no such file",
    "empty": r"the file is empty \(0 bytes\)",
    "truncated": "ends early.*truncated",
    "random": "not a PyTorch weights file",
    "whole_model": "pickled Python objects besides tensors",
    "torchscript": "a TorchScript module",
    "folder": "a folder, not a file",
}
TODO = {  # and what to do about it
    "missing": "Check the path", "empty": "Copy or download it again",
    "truncated": "Copy or download it again", "random": "at a file written by torch.save",
    "whole_model": r"torch.save\(model.state_dict\(\), path\)", "torchscript": "tools/predict.py",
    "folder": "at a weights file inside it",
}


def _damaged(folder: Path, kind: str) -> Path:
    """A weights file damaged as `kind` (the good file is a small checkpoint of a Linear)."""
    model = nn.Linear(3, 2)
    good = folder / "good.pth"
    torch.save({"model": model.state_dict(), "iteration": 7}, good)
    path = folder / f"{kind}.pth"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":  # fixed bytes: not a zip (PK) nor a pickle (0x80) by chance
        path.write_bytes(bytes(range(7, 256)) * 40)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "whole_model":
        torch.save(model, path)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3)), path)
    elif kind == "folder":
        path.mkdir()
    return path


def _check(error: BaseException, path: Path, what: str, kind: str) -> None:
    text = str(error)
    assert text.startswith(f"{what} {path}: "), text
    assert re.search(PROBLEM[kind], text), text
    assert re.search(TODO[kind], text), text
    assert "weights_only" not in text


@pytest.mark.parametrize("kind", sorted(PROBLEM))
def test_each_damage_is_named_with_the_file_and_the_fix(tmp_path, kind):
    path = _damaged(tmp_path, kind)
    expected = WeightsFileNotFoundError if kind == "missing" else WeightsFileError
    with pytest.raises(expected) as info:
        load_weights_file(path, "MODEL.WEIGHTS")
    _check(info.value, path, "MODEL.WEIGHTS", kind)
    assert info.value.__cause__ is None  # torch's own message (with its advice) is not chained
    if kind == "missing":
        assert isinstance(info.value, FileNotFoundError)


def test_a_good_file_loads_and_a_checkpoint_gives_its_model(tmp_path):
    path = _damaged(tmp_path, "random").parent / "good.pth"
    data = load_weights_file(path, "MODEL.WEIGHTS")
    assert data["iteration"] == 7
    assert sorted(state_dict_from(data, path, "MODEL.WEIGHTS")) == ["bias", "weight"]
    with pytest.raises(WeightsFileError, match=r"x.pth: it holds no state dict \(it holds list"):
        state_dict_from([1, 2], "x.pth", "MODEL.WEIGHTS")


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_a_truncated_pkl_or_legacy_torch_file_is_called_truncated(tmp_path, fraction):
    """detectron2's model-zoo .pkl files and pre-zip torch.save files: cut short, they are not
    'pickled objects refused for safety' nor 'not PyTorch weights', but truncated."""
    import pickle

    whole = {"model": {"w": list(range(2000))}, "__author__": "zoo"}
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": nn.Linear(30, 20).state_dict()}, legacy,
               _use_new_zipfile_serialization=False)
    for path, data in ((tmp_path / "zoo.pkl", pickle.dumps(whole, protocol=2)),
                       (legacy, legacy.read_bytes())):
        path.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(WeightsFileError) as info:
            load_weights_file(path, "MODEL.TEACHER.WEIGHTS", allow_pickle=True)
        assert re.search(f"{re.escape(str(path))}: the file ends early: it is truncated. Copy or "
                         "download it again", str(info.value)), str(info.value)


def test_a_damaged_pkl_is_not_called_a_refused_pickle(tmp_path):
    path = tmp_path / "zoo.pkl"
    path.write_bytes(b"\x80\x02" + bytes(range(7, 256)) * 4)  # a pickle header, then garbage
    with pytest.raises(WeightsFileError, match=r"zoo.pkl: it cannot be read as a pickle .* it is "
                                               "damaged.* Copy or download it again") as info:
        load_weights_file(path, "MODEL.WEIGHTS", allow_pickle=True)
    assert "run code" not in str(info.value)


def test_a_damaged_pth_is_not_called_a_refused_pickle(tmp_path):
    """A legacy torch file with one byte flipped, or random bytes after a pickle's 0x80, were
    'pickled Python objects besides tensors ... save with torch.save(model.state_dict())'."""
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": nn.Linear(3, 2).state_dict()}, legacy,
               _use_new_zipfile_serialization=False)
    data = bytearray(legacy.read_bytes())
    data[109] ^= 0xFF  # an opcode no writer makes (torch: "Unsupported operand")
    flipped = tmp_path / "flipped.pth"
    flipped.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match=r"flipped.pth: its pickled data is damaged, or it "
                                               "is not a PyTorch weights file. Copy or download"):
        load_weights_file(flipped, "MODEL.WEIGHTS")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(b"\x80" + bytes((i * 7919) % 251 for i in range(1000)))
    with pytest.raises(WeightsFileError) as info:
        load_weights_file(noise, "MODEL.WEIGHTS")
    assert "torch.save(model)" not in str(info.value) and "noise.pth" in str(info.value)


# ---- each path that reads weights ------------------------------------------------------------

DAMAGES = ["missing", "truncated", "random", "whole_model"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_init_from_model_weights(tmp_path, kind):
    from nst_det.engine.checkpointer import ReliableCheckpointer

    path = _damaged(tmp_path, kind)
    checkpointer = ReliableCheckpointer(nn.Linear(3, 2), str(tmp_path / "out"))
    with pytest.raises((WeightsFileError, FileNotFoundError)) as info:
        checkpointer.resume_or_load(str(path), resume=False)
    assert str(path) in str(info.value) and "weights_only" not in str(info.value)
    if kind != "missing":  # the missing case keeps the checkpointer's own wording
        _check(info.value, path, "MODEL.WEIGHTS", kind)


@pytest.mark.parametrize("kind", DAMAGES)
def test_detection_teacher_weights(tmp_path, kind):
    from nst_det.modeling.teacher import read_weights

    path = _damaged(tmp_path, kind)
    with pytest.raises(WeightsFileError) as info:
        read_weights(str(path))
    _check(info.value, path, "MODEL.TEACHER.WEIGHTS", kind)


@pytest.mark.parametrize("kind", DAMAGES)
def test_classification_weights_and_conversion_input(tmp_path, kind):
    from nst_det.modeling.classification.weights import load_classifier_weights

    path = _damaged(tmp_path, kind)
    for what in ("MODEL.CLASSIFIER.WEIGHTS", "MODEL.TEACHER.WEIGHTS", "student checkpoint"):
        with pytest.raises(WeightsFileError) as info:
            load_classifier_weights(nn.Linear(3, 2), str(path), what)
        _check(info.value, path, what, kind)


@pytest.mark.parametrize("kind", DAMAGES)
def test_export_and_predict_model_weights(tmp_path, kind):
    """tools/export_model.py and tools/predict.py (eager) both load through
    load_student_detector; export_and_verify is the export's entry point."""
    from nst_det.config import load_config
    from nst_det.export.api import export_and_verify
    from nst_det.export.student import load_student_detector

    path = _damaged(tmp_path, kind)
    cfg = load_config(str(R18_TOY), ["MODEL.WEIGHTS", str(path)])
    with pytest.raises(WeightsFileError) as info:
        load_student_detector(cfg)
    _check(info.value, path, "MODEL.WEIGHTS", kind)
    with pytest.raises(WeightsFileError):
        export_and_verify(cfg, "checkpoint", str(tmp_path / "export"))
    assert not (tmp_path / "export" / "model_final.pth").exists()


def _run_tool(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_eval_only_with_random_bytes_names_the_file(tmp_path):
    """The command of the bug report: --eval-only MODEL.WEIGHTS <random bytes>."""
    path = _damaged(tmp_path, "random")
    run = _run_tool(["tools/train_net.py", "--config-file", str(R18_TOY), "--eval-only",
                     "MODEL.WEIGHTS", str(path), "OUTPUT_DIR", str(tmp_path / "out")], tmp_path)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("nst_det.checkpoint.weights_file.WeightsFileError: MODEL.WEIGHTS "
                           f"{path}: not a PyTorch weights file"), run.stderr[-3000:]
    assert "weights_only" not in run.stderr


def test_conversion_tool_with_a_truncated_file_names_it(tmp_path):
    path = _damaged(tmp_path, "truncated")
    run = _run_tool(["tools/convert_student_to_d2.py", str(path), str(tmp_path / "d2.pth")],
                    tmp_path)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert f"student checkpoint {path}: the file ends early" in last, run.stderr[-3000:]
    assert not (tmp_path / "d2.pth").exists()
