"""tools/train_net.py distils the pipeline's NST student config from a model-zoo-name teacher.

Upstream detectron2 ships its zoo configs: the zoo's Faster R-CNN R-50 FPN (random weights saved
here: nothing is downloaded) teaches the toy R-18 FPN student for two iterations. The v0.6 sdist
ships none: the same command ends on the error that says so and asks for the file's path.
"""

from __future__ import annotations

import json

import pytest
import torch
from _detection_common import LEVELS, REPO, load_train_net, make_cfg, zoo_ships_configs
from detectron2.modeling import build_model

from nst_det.modeling.teacher import build_teacher_cfg
from nst_det.pipeline.plan import TOY_CONFIGS

ZOO_NAME = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"

@pytest.mark.slow
def test_train_net_distils_the_pipeline_config_from_a_zoo_name_teacher(tmp_path, tiny_voc):
    student = REPO / TOY_CONFIGS.det_student_nst  # what run_pipeline's *_detnst stages train
    out = tmp_path / "run"
    opts = ["MODEL.TEACHER.CONFIG_FILE", ZOO_NAME, "MODEL.DISTILL.STUDENT_FEATURES", LEVELS,
            "MODEL.DISTILL.TEACHER_FEATURES", LEVELS, "SOLVER.MAX_ITER", "2",
            "TEST.EVAL_PERIOD", "0", "MODEL.WEIGHTS", "", "MODEL.TEACHER.EVAL_BEFORE_TRAIN",
            "False"]
    cfg = make_cfg(student, opts, data=tiny_voc[:2], output_dir=out)
    config_file = tmp_path / "nst_zoo_teacher.yaml"
    train_net = load_train_net()
    if not zoo_ships_configs():
        config_file.write_text(cfg.dump())
        args = train_net.default_argument_parser().parse_args(["--config-file", str(config_file)])
        with pytest.raises(FileNotFoundError, match="ships no model-zoo configs.*"
                                                    "give the config file's path"):
            train_net.main(args)
        return
    tcfg = build_teacher_cfg(cfg)
    assert tcfg.MODEL.RESNETS.DEPTH == 50 and tcfg.INPUT.FORMAT == "BGR"
    torch.manual_seed(0)
    weights = tmp_path / "zoo_teacher.pth"
    torch.save({"model": build_model(tcfg).state_dict()}, weights)
    cfg.MODEL.TEACHER.WEIGHTS = str(weights)
    config_file.write_text(cfg.dump())
    args = train_net.default_argument_parser().parse_args(["--config-file", str(config_file)])
    train_net.main(args)
    with open(out / "metrics.json") as f:
        nst = [m["loss_nst"] for m in map(json.loads, f) if "loss_nst" in m]
    assert nst and all(v > 0 for v in nst)
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert not any(k.startswith("teacher") for k in state)  # the student's weights only
    assert any(k.startswith("backbone.bottom_up") for k in state)
