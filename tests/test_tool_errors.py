"""The command-line tools end on a message naming the bad file or option, not a traceback."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "quick_schedules" / "faster_rcnn_R_18_FPN_toy.yaml"


def _run(tool: str, argv: list, monkeypatch) -> str:
    """The message `tools/<tool>.py argv` exits with (SystemExit), run in this process."""
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(REPO / "tools" / f"{tool}.py"), run_name="__main__")
    return str(info.value.code)


@pytest.mark.parametrize("tool, argv", [
    ("train_net", ["--config-file", "/nonexistent.yaml"]),
    ("export_model", ["--config-file", "/nonexistent.yaml", "--format", "onnx", "--output", "o"]),
    ("predict", ["--config-file", "/nonexistent.yaml", "--input", "x.jpg", "--output", "o"]),
])
def test_a_missing_config_file_is_named(tool, argv, monkeypatch):
    assert "config file /nonexistent.yaml does not exist" in _run(tool, argv, monkeypatch)


@pytest.mark.parametrize("tool, argv", [
    ("train_net", ["--config-file", str(TOY), "MODEL.NOPE", "1"]),
    ("export_model", ["--config-file", str(TOY), "--format", "onnx", "--output", "o",
                      "MODEL.NOPE", "1"]),
])
def test_an_unknown_override_is_named(tool, argv, monkeypatch):
    assert "MODEL.NOPE" in _run(tool, argv, monkeypatch)


def test_predict_refuses_a_model_its_export_info_does_not_describe(tmp_path, monkeypatch):
    """A checkpoint export's model_final.pth given to --model went to torch.jit.load and ended in
    a PytorchStreamReader traceback."""
    export = tmp_path / "checkpoint"
    export.mkdir()
    (export / "model_final.pth").write_bytes(b"weights")
    (export / "verification.json").write_text(json.dumps({"passed": True}))
    (export / "export_info.json").write_text(json.dumps({
        "format": "checkpoint", "file": "model_final.pth", "input_format": "RGB",
        "min_size_test": 96, "max_size_test": 160, "class_names": ["a"]}))
    said = _run("predict", ["--model", str(export / "model_final.pth"), "--input", "x.jpg",
                            "--output", str(tmp_path / "out")], monkeypatch)
    assert "describes a checkpoint export, model_final.pth: give that file to --model (a .onnx" \
        in said and "--config-file" in said
