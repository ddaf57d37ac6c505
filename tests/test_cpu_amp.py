"""SOLVER.AMP.ENABLED on a CPU: the training forward of student and teacher runs in bfloat16,
the NST loss in float32, evaluation in float32; checkpoints are unchanged."""

from __future__ import annotations

import math

import torch
from _detection_common import NST_TOY, distill_opts, make_cfg, write_teacher
from detectron2.engine import SimpleTrainer
from torch import nn

from nst_det.engine import DetectionTrainer
from nst_det.engine.cpu_amp import TrainingAutocast


def test_autocast_only_while_training():
    layer = nn.Linear(4, 3)
    wrapped = TrainingAutocast(layer)
    x = torch.randn(2, 4)
    assert wrapped(x).dtype == torch.bfloat16
    layer.eval()  # the module's mode decides (evaluation switches the model, not the wrapper)
    assert wrapped(x).dtype == torch.float32
    assert layer.train()(x).dtype == torch.float32  # the module itself is left as it was
    assert "forward" not in vars(layer)  # no instance attribute shadows nn.Linear.forward


def test_detection_trainer_trains_under_bf16_autocast_on_cpu(tmp_path, tiny_voc):
    teacher = write_teacher(tmp_path)
    cfg = make_cfg(NST_TOY, distill_opts(*teacher) + [
        "MODEL.WEIGHTS", "", "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "2",
        "TEST.EVAL_PERIOD", "0", "MODEL.TEACHER.EVAL_BEFORE_TRAIN", "False"],
        data=tiny_voc[:2], output_dir=tmp_path / "amp")
    trainer = DetectionTrainer(cfg)  # detectron2's AMPTrainer would refuse: no CUDA
    assert type(trainer.step_trainer) is SimpleTrainer and trainer.cfg.SOLVER.AMP.ENABLED
    assert isinstance(trainer.step_trainer.model, TrainingAutocast)
    assert not isinstance(trainer.model, TrainingAutocast)  # hooks and checkpoints: the model
    assert "forward" not in vars(trainer.model)  # its forward is its class's, not patched

    model = trainer.model
    dtypes, losses = {}, {}

    def feature_dtype(name):
        def hook(_module, _inputs, out):  # returns None: the output is left as it is
            dtypes.setdefault(name, out["p3"].dtype)
        return hook

    def keep_losses(module, _inputs, out):
        if module.training:
            losses.update(out)

    hooks = [model.backbone.register_forward_hook(feature_dtype("student")),
             model.teacher.backbone.register_forward_hook(feature_dtype("teacher")),
             model.register_forward_hook(keep_losses)]
    trainer.train()
    for h in hooks:
        h.remove()
    assert dtypes == {"student": torch.bfloat16, "teacher": torch.bfloat16}
    assert losses["loss_nst"].dtype == torch.float32 and math.isfinite(losses["loss_nst"].item())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights

    model.eval()
    batch = [{"image": torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)}]
    with torch.no_grad():
        features = model.backbone(model.preprocess_image(batch).tensor)
    assert features["p3"].dtype == torch.float32
    state = torch.load(tmp_path / "amp" / "model_final.pth", weights_only=True)["model"]
    assert all(v.dtype != torch.bfloat16 for v in state.values())
    assert set(state) == set(model.state_dict())  # the model's own keys: no "module." prefix
