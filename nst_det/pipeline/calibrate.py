"""The `calibrate` stage of the methods axis: one transfer method's loss weights, by rule.

Rule (`methods.CALIBRATION`): weight of loss L = FRACTION * detection loss / L at weight 1, both
the mean over the first BATCHES training batches of the initial model (the pretrained student of
the calibration seed, the teacher detector), forward only: no optimizer step, no test data.

The stage folder gets
  calibration.json  the measured per-batch values, the weights, and the loss's cost;
  method.yaml       the config the method's training stages run: the distillation config as
                    _BASE_ plus the method's calibrated weights.
It also times the method's transfer losses alone, forward + backward, through the model's own
distillation core on the inputs the core got in the first batch (features, RoI logits, gt_boxes,
DKD's target; learned modules included): the report sets it against the training step time.
The calibration config has FGFI's warm-up off (`methods.method_opts`): it would read 0 here.
"""

from __future__ import annotations

import ast
import json
import math
import os
import statistics
import time
from contextlib import contextmanager

from ..utils.atomic import atomic_write
from .methods import loss_keys, method_opts
from .plan import Stage

__all__ = ["calibrate_stage", "weights_from", "opts_to_yaml", "method_loss_step",
           "time_method_loss", "teacher_of", "record_core_inputs", "measure"]


def weights_from(detection: list, raw: dict, fraction: float) -> dict:
    """{loss key: fraction * mean(detection) / mean(raw[key])}; raw values must be > 0."""
    det = statistics.mean(detection)
    weights = {}
    for key, values in raw.items():
        value = statistics.mean(values)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{key} is {value} at weight 1 on the calibration batches: "
                             "its weight cannot be calibrated (a loss that starts at 0)")
        weights[key] = fraction * det / value
    return weights


def opts_to_yaml(base_config: str, opts: list) -> str:
    """A config file text: `_BASE_: base_config` plus opts (KEY, VALUE, ...) as nested keys."""
    import yaml

    tree: dict = {}
    for key, value in zip(opts[::2], opts[1::2]):
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value  # a plain string, e.g. a kernel name
    return yaml.safe_dump({"_BASE_": os.path.abspath(base_config), **tree}, sort_keys=False)


def teacher_of(model):
    """The frozen teacher of a distilling detector (model.teacher or model.distill.teacher)."""
    teacher = getattr(model, "teacher", None)
    if teacher is None and hasattr(model, "distill"):
        teacher = model.distill.teacher
    return teacher


@contextmanager
def record_core_inputs(core, record: dict):
    """Within the block, store the arguments of the first `core.feature_losses` and `core.kd`
    calls (the distillation core's: what the model hands its losses in a training step).

    `record` gets "feature_losses" / "kd": (args, kwargs), the supplied values included
    (gt_boxes, DKD's target); the core's own methods are back on exit.
    """
    def wrap(name):
        original = getattr(core, name)

        def recording(*args, **kwargs):
            record.setdefault(name, (args, kwargs))
            return original(*args, **kwargs)
        return recording

    for name in ("feature_losses", "kd"):
        setattr(core, name, wrap(name))  # an instance attribute: shadows the method
    try:
        yield record
    finally:
        for name in ("feature_losses", "kd"):
            delattr(core, name)


def _fresh(value, grad: bool):
    """A recorded argument as leaves: each tensor detached (floating ones requiring grad if
    `grad`: the student's side), in dicts / lists / tuples like the recorded one."""
    import torch

    if isinstance(value, torch.Tensor):
        leaf = value.detach()
        return leaf.requires_grad_() if grad and leaf.is_floating_point() else leaf
    if isinstance(value, dict):
        return {k: _fresh(v, grad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v, grad) for v in value)
    return value


def method_loss_step(model, recorded: dict):
    """A function running the model's transfer losses once, forward + backward, as training does.

    model: a distilling detector (its `distill` core holds the method's losses, learned modules
    and hyper-parameters); recorded: `record_core_inputs`' record of one training step (student
    and teacher features, RoI logits, gt_boxes, DKD's target). The student-side inputs are fresh
    leaves each run (their gradient is computed, as the backbone's would be); the teacher's and
    the supplied values are detached; the learned modules get their gradients, as in a step.
    A loss's warm-up applies as configured (the callers turn FGFI's off; off, no EventStorage
    is needed).
    """
    core = model.distill
    if not recorded:
        raise ValueError("no distillation loss ran in the recorded step (every weight 0?)")

    def step():
        losses = {}
        for name in ("feature_losses", "kd"):
            if name in recorded:
                args, kwargs = recorded[name]
                s, *rest = args
                losses.update(getattr(core, name)(
                    _fresh(s, True), *_fresh(rest, False), **_fresh(kwargs, False)))
        sum(losses.values()).backward()

    return step


def time_method_loss(model, recorded: dict, repeats: int = 10) -> float:
    """Median ms of `method_loss_step` after one warm-up run."""
    step = method_loss_step(model, recorded)
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(model, batches, keys: list) -> tuple:
    """(detection losses, {key: losses at the model's weights}, recorded inputs of the first
    batch): forward only, under no_grad, in training mode, one value per batch."""
    import torch
    from detectron2.utils.events import EventStorage

    detection, raw, recorded = [], {k: [] for k in keys}, {}
    with torch.no_grad(), EventStorage():  # the R-CNN heads log training statistics
        for i, batch in enumerate(batches):
            if i == 0:
                with record_core_inputs(model.distill, recorded):
                    losses = model(batch)
            else:
                losses = model(batch)
            detection.append(float(sum(v for k, v in losses.items() if k not in keys)))
            for k in keys:
                raw[k].append(float(losses[k]))
    return detection, raw, recorded


def _shapes(value):
    """Shapes of the tensors in a recorded argument (nested like it)."""
    if hasattr(value, "shape"):
        return list(value.shape)
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    return value


def calibrate_stage(stage: Stage) -> dict:
    """Measure the method's losses at weight 1 and the detection loss; write the weights."""
    import itertools

    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.env import seed_all_rng

    from ..config import load_config
    from ..engine import TRAINER_REGISTRY

    method, rule = stage.inputs["method"], stage.inputs["rule"]  # the rule the plan recorded
    cfg = load_config(stage.config, stage.opts)
    cfg.freeze()
    os.makedirs(stage.out_dir, exist_ok=True)
    seed_all_rng(cfg.SEED)  # the same initial heads as the training run of this seed
    trainer_cls = TRAINER_REGISTRY.get(cfg.NST_DET.TRAINER)
    model = trainer_cls.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.train()
    keys = loss_keys(method)
    data = iter(trainer_cls.build_train_loader(cfg))
    detection, raw, recorded = measure(model, itertools.islice(data, rule["batches"]),
                                       keys)
    del data
    weights = weights_from(detection, raw, rule["fraction"])
    loss_ms = time_method_loss(model, recorded)
    opts = method_opts(method, weights, stage.inputs.get("detector"))
    with atomic_write(os.path.join(stage.out_dir, "method.yaml"), "w") as f:
        f.write(opts_to_yaml(stage.config, opts))
    record = {
        "method": method, "rule": "weight = fraction * mean detection loss / mean loss at "
        "weight 1, over the first batches of the initial model (no optimizer step)",
        **{k: rule[k] for k in ("fraction", "batches")},
        "detection_loss": detection, "loss_at_weight_1": raw, "weights": weights,
        "loss_ms": loss_ms,
        "loss_ms_inputs": {name: _shapes(args) for name, (args, _) in recorded.items()},
        "opts": opts, "torch_threads": torch.get_num_threads(),
    }
    with atomic_write(os.path.join(stage.out_dir, "calibration.json"), "w") as f:
        json.dump(record, f, indent=2)
    return {"calibration": {"weights": weights, "detection_loss": statistics.mean(detection),
                            "loss_at_weight_1": {k: statistics.mean(v) for k, v in raw.items()},
                            "loss_ms": loss_ms}}
