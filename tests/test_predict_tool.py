"""tools/predict.py on an eager toy detector: one drawing per input, none replacing another or an
input image, and detections.json naming both."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _detection_common import R18_FPN_TOY
from detectron2.modeling import build_model
from PIL import Image

from nst_det.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predict(tmp_path_factory):
    """predict.main with the arguments of an eager toy detector (random weights)."""
    spec = importlib.util.spec_from_file_location("nst_predict", REPO / "tools" / "predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    weights = tmp_path_factory.mktemp("model") / "model.pth"
    cfg = load_config(str(R18_FPN_TOY), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    return lambda *args: tool.main(["--config-file", str(R18_FPN_TOY), "--score-thresh", "0",
                                    *args, "MODEL.WEIGHTS", str(weights)])


def _image(path: Path, value: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((48, 64, 3), value, np.uint8)).save(path)
    return path.read_bytes()


def test_inputs_sharing_a_name_each_get_their_own_drawing(tmp_path, predict):
    inputs = [tmp_path / "a" / "img.jpg", tmp_path / "a" / "img.png", tmp_path / "b" / "img.jpg"]
    for i, path in enumerate(inputs):
        _image(path, 40 * (i + 1))
    out = tmp_path / "out"
    assert predict("--input", str(tmp_path / "a"), str(inputs[2]), "--output", str(out)) == 0
    results = json.loads((out / "detections.json").read_text())
    assert [r["file"] for r in results] == [str(p) for p in inputs]
    assert [r["drawn"] for r in results] == ["img.jpg", "img_1.jpg", "img_2.jpg"]
    drawn = [np.asarray(Image.open(out / r["drawn"])) for r in results]
    assert all(d.shape == (48, 64, 3) for d in drawn)
    # three different drawings (the images differ): none was written over another
    assert len({int(d.astype(np.int64).sum()) for d in drawn}) == 3


def test_an_output_folder_holding_input_images_is_refused_before_any_write(tmp_path, predict):
    photo = tmp_path / "photos" / "cat.jpg"
    before = _image(photo, 90)
    with pytest.raises(SystemExit, match="--output .*photos holds input images .*cat.jpg"):
        predict("--input", str(photo.parent), "--output", str(photo.parent))
    assert photo.read_bytes() == before
    assert sorted(p.name for p in photo.parent.iterdir()) == ["cat.jpg"]


def test_an_exported_configs_class_names_come_from_its_export_info(tmp_path):
    """An exported checkpoint's config.yaml keeps DATASETS.TEST but not the DATASETS.VOC / COCO
    entry that registered it: the names come from export_info.json beside it (they were the
    class ids, "4")."""
    spec = importlib.util.spec_from_file_location("nst_predict2", REPO / "tools" / "predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = load_config(str(R18_FPN_TOY), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    export = tmp_path / "export"
    export.mkdir()
    torch.save({"model": build_model(cfg).state_dict()}, export / "model_final.pth")
    cfg.DATASETS.TEST = ("registered_by_a_dropped_key",)
    (export / "config.yaml").write_text(cfg.dump())
    names = ["cat", "dog", "horse", "cow", "bird"]
    (export / "export_info.json").write_text(json.dumps({"class_names": names}))
    _image(tmp_path / "in" / "x.jpg", 120)
    assert tool.main(["--config-file", str(export / "config.yaml"), "--score-thresh", "0",
                      "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                      "MODEL.WEIGHTS", str(export / "model_final.pth")]) == 0
    found = json.loads((tmp_path / "out" / "detections.json").read_text())[0]["detections"]
    assert found and {d["class_name"] for d in found} <= set(names)


def test_an_unreadable_input_is_named_before_any_write(tmp_path, predict):
    _image(tmp_path / "in" / "a.png", 50)
    (tmp_path / "in" / "c.jpg").write_text("not an image")  # a drawing and a traceback before
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"--input .*c.jpg: not a readable image .* nothing "
                                         r"was written"):
        predict("--input", str(tmp_path / "in"), "--output", str(out))
    assert not out.exists()
    with pytest.raises(SystemExit, match="--output .*a.png is a file: give a folder"):
        predict("--input", str(tmp_path / "in" / "a.png"), "--output",
                str(tmp_path / "in" / "a.png"))


def test_an_exported_model_unlike_its_record_is_refused(tmp_path, monkeypatch, capsys):
    """A model file copied short went to onnxruntime / torch.jit and ended on a traceback."""
    spec = importlib.util.spec_from_file_location("nst_predict3", REPO / "tools" / "predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from nst_det.export import file_sha256

    export = tmp_path / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"the verified bytes")
    (export / "verification.json").write_text(json.dumps({"passed": True}))
    info = {"format": "onnx", "file": "model.onnx", "size_bytes": 18, "input_format": "RGB",
            "sha256": file_sha256(export / "model.onnx"), "min_size_test": 96,
            "max_size_test": 160, "class_names": ["a"], "score_thresh_test": 0.05}
    (export / "export_info.json").write_text(json.dumps(info))
    monkeypatch.setattr(tool, "onnx_runner", lambda path: "runner")
    args = tool.parse_args(["--model", str(export / "model.onnx"), "--input", "x.jpg",
                            "--output", str(tmp_path / "out")])
    assert tool.build_runner(args)[0] == "runner"  # the recorded bytes
    assert "warning" not in capsys.readouterr().out
    args.score_thresh = 0.01  # below what the traced model keeps: said, not silently ignored
    tool.build_runner(args)
    assert "--score-thresh 0.01 is below the 0.05 traced into" in capsys.readouterr().out
    (export / "model.onnx").write_bytes(b"the verified byte")  # cut short
    with pytest.raises(SystemExit, match=r"model.onnx is not the file its export verified "
                                         r"\(17 bytes, export_info.json records 18"):
        tool.build_runner(args)
    (export / "model.onnx").write_bytes(b"THE verified bytes")  # same size, other bytes
    with pytest.raises(SystemExit, match="is not the file its export verified"):
        tool.build_runner(args)
