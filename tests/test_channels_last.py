"""NST_DET.CHANNELS_LAST: student and teacher in channels_last layout, and a step still trains."""

import torch
from _detection_common import R18_FPN_TOY, distill_opts, make_cfg, write_teacher
from detectron2.utils.events import EventStorage

from nst_det.engine import DetectionTrainer


def _conv_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_student_and_teacher_train(tiny_voc, tmp_path):
    teacher_yaml, teacher_weights = write_teacher(tmp_path)
    cfg = make_cfg(R18_FPN_TOY, [*distill_opts(teacher_yaml, teacher_weights),
                                 "NST_DET.CHANNELS_LAST", "True"], data=tiny_voc)
    model = DetectionTrainer.build_model(cfg).train()
    for module in (model, model.teacher):
        weights = _conv_weights(module)
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last)
                               for w in weights if w.shape[-1] > 1 or w.shape[-2] > 1)
    batch = next(iter(DetectionTrainer.build_train_loader(cfg)))
    with EventStorage(0):
        losses = model(batch)
    assert losses["loss_nst"] > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(w.grad).all() for w in _conv_weights(model) if w.grad is not None)
