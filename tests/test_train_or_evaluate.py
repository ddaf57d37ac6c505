"""One way to evaluate: a pipeline's evaluate stage loads MODEL.WEIGHTS as --eval-only does."""

from pathlib import Path

import torch
from detectron2.modeling import build_model

from nst_det.config import load_config
from nst_det.engine import DetectionTrainer
from nst_det.pipeline.plan import Stage
from nst_det.pipeline.worker import run_stage

TOY = Path(__file__).resolve().parents[1] / "configs" / "quick_schedules"
CONFIG = str(TOY / "faster_rcnn_R_18_FPN_toy.yaml")


def _checksum(model) -> float:
    return float(sum(p.double().sum() for p in model.state_dict().values()))


def test_run_stage_evaluates_the_model_of_its_weights(tmp_path, monkeypatch):
    # the evaluation itself is the trainer's (tested elsewhere); here: which model it is given
    monkeypatch.setattr(DetectionTrainer, "test",
                        classmethod(lambda cls, cfg, model: {"checksum": _checksum(model)}))
    torch.manual_seed(123)
    saved = build_model(load_config(CONFIG, ["MODEL.DEVICE", "cpu"]))
    weights = tmp_path / "weights.pth"
    torch.save({"model": saved.state_dict()}, weights)

    def evaluate(name, weights_opt):
        return run_stage(Stage(name, "evaluate", str(tmp_path / name), CONFIG,
                                    ["OUTPUT_DIR", str(tmp_path / name), "MODEL.DEVICE", "cpu",
                                     "MODEL.WEIGHTS", weights_opt]))

    assert evaluate("loaded", str(weights)) == {"checksum": _checksum(saved)}
    # set up as tools/train_net.py sets a run up: detectron2's log file and the config it ran
    assert "Full config saved" in (tmp_path / "loaded" / "log.txt").read_text()
    assert load_config(str(tmp_path / "loaded" / "config.yaml")).MODEL.WEIGHTS == str(weights)
    # empty MODEL.WEIGHTS: the model as its config builds it, not the saved one
    assert evaluate("as_built", "")["checksum"] != _checksum(saved)
