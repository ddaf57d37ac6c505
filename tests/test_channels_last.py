"""NST_DET.CHANNELS_LAST: student and teacher in channels_last layout, and a step computes what
the default layout computes."""

import torch
from _detection_common import R18_FPN_TOY, distill_opts, make_cfg, write_teacher
from detectron2.utils.events import EventStorage

from nst_det.engine import DetectionTrainer


def _conv_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_student_and_teacher_train(tiny_voc, tmp_path):
    teacher_yaml, teacher_weights = write_teacher(tmp_path)
    batch, step = None, {}
    for channels_last in (False, True):
        cfg = make_cfg(R18_FPN_TOY, [*distill_opts(teacher_yaml, teacher_weights),
                                     "NST_DET.CHANNELS_LAST", str(channels_last)], data=tiny_voc)
        torch.manual_seed(0)  # the same initial weights in both layouts
        model = DetectionTrainer.build_model(cfg).train()
        if channels_last:
            for module in (model, model.teacher):
                weights = _conv_weights(module)
                assert weights and all(w.is_contiguous(memory_format=torch.channels_last)
                                       for w in weights if w.shape[-1] > 1 or w.shape[-2] > 1)
        batch = batch or next(iter(DetectionTrainer.build_train_loader(cfg)))
        torch.manual_seed(1)  # the same RPN / RoI sampling
        with EventStorage(0):
            losses = model(batch)
        sum(losses.values()).backward()
        step[channels_last] = ({k: v.item() for k, v in losses.items()},
                               [p.grad for p in model.parameters() if p.requires_grad])
    (losses, grads), (losses_cl, grads_cl) = step[False], step[True]
    assert losses_cl["loss_nst"] > 0 and losses_cl.keys() == losses.keys()
    for key, value in losses.items():  # the layout changes the summation order only
        assert abs(losses_cl[key] - value) <= 1e-4 * max(1.0, abs(value)), key
    # every trainable weight gets a gradient, the step the same direction. Not the same values:
    # float32 channels_last convolutions round differently (~2e-5 relative on these features,
    # ~1e-6 in the default layout; both layouts agree to 1e-14 in float64), which flips a few
    # ReLUs near 0 and moves single gradient entries by several percent
    assert all(g is not None and torch.isfinite(g).all() for g in grads + grads_cl)
    flat, flat_cl = (torch.cat([g.double().flatten() for g in gs]) for gs in (grads, grads_cl))
    assert torch.nn.functional.cosine_similarity(flat, flat_cl, dim=0) > 0.99
