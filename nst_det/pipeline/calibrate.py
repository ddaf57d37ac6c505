"""The `calibrate` stage of the methods axis: one transfer method's loss weights, by rule.

Rule (`methods.CALIBRATION`): weight of loss L = FRACTION * detection loss / L at weight 1, both
the mean over the first BATCHES training batches of the initial model (the pretrained student of
the calibration seed, the teacher detector), forward only: no optimizer step, no test data.

The stage folder gets
  calibration.json  the measured per-batch values, the weights, and the loss's cost;
  method.yaml       the config the method's training stages run: the distillation config as
                    _BASE_ plus the method's calibrated weights.
It also times the method's transfer loss alone (forward + backward, on the feature pairs and RoI
logit shapes of the first batch): the report sets it against the training step time.
"""

from __future__ import annotations

import ast
import json
import math
import os
import statistics
import time

from ..utils.atomic import atomic_write
from .methods import CALIBRATION, METHODS, loss_keys, method_opts
from .plan import Stage

__all__ = ["calibrate_stage", "weights_from", "opts_to_yaml", "method_loss_step",
           "time_method_loss", "teacher_of"]


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


def _pair_names(cfg):
    """(student features, teacher features, weights) of the configured feature pairs."""
    ns = cfg.MODEL.DISTILL if "DISTILL" in cfg.MODEL else cfg.MODEL.NST
    return list(ns.STUDENT_FEATURES), list(ns.TEACHER_FEATURES), list(ns.FEATURE_WEIGHTS)


def teacher_of(model):
    """The frozen teacher of a distilling detector (model.teacher or model.distill.teacher)."""
    teacher = getattr(model, "teacher", None)
    if teacher is None and hasattr(model, "distill"):
        teacher = model.distill.teacher
    return teacher


def _loss_fns(cfg, method: str) -> list:
    """[(kind, function)] of the method's losses, kind "feature" (pairs) or "kd" (logits)."""
    from ..losses import get_transfer_loss, kd_loss, nst_loss

    spec, fns = METHODS[method], []
    if "nst" in spec:
        nst = cfg.MODEL.NST
        args = {"poly": {"degree": nst.POLY_DEGREE, "c": nst.POLY_C},
                "gaussian": {"sigma2": nst.GAUSSIAN_SIGMA2 if nst.GAUSSIAN_SIGMA2 > 0 else None},
                "linear": {}}[spec["nst"]]
        fns.append(("feature", lambda s, t: nst_loss(s, t, spec["nst"], **args)))
    if "transfer" in spec:
        fns.append(("feature", get_transfer_loss(spec["transfer"])))
    if "kd" in spec:
        fns.append(("kd", lambda s, t: kd_loss(s, t, cfg.MODEL.KD.TEMPERATURE)))
    return fns


def method_loss_step(cfg, method: str, s_feats: dict, t_feats: dict, logits_shape):
    """A function running the method's transfer losses once, forward + backward.

    Inputs: the recorded student / teacher backbone features (the configured pairs, cropped to
    their common extent as `align_pair` does at equal strides) and random [R, K + 1] RoI
    logits of the recorded shape for KD (its cost depends only on the shape).
    """
    import torch

    students, teachers, weights = _pair_names(cfg)
    pairs = []
    for s, t, w in zip(students, teachers, weights):
        f_s, f_t = s_feats[s].detach().float(), t_feats[t].detach().float()
        h, wd = min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1])
        pairs.append((w, f_s[..., :h, :wd].contiguous().requires_grad_(), f_t[..., :h, :wd]))
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(*logits_shape, generator=gen).requires_grad_(),
              torch.randn(*logits_shape, generator=gen))
    fns = _loss_fns(cfg, method)

    def step():
        total = 0.0
        for kind, fn in fns:
            if kind == "kd":
                total = total + fn(*logits)
            else:
                total = total + sum(w * fn(s, t) for w, s, t in pairs)
        total.backward()

    return step


def time_method_loss(cfg, method: str, s_feats: dict, t_feats: dict, logits_shape,
                     repeats: int = 10) -> float:
    """Median ms of `method_loss_step` after one warm-up run."""
    step = method_loss_step(cfg, method, s_feats, t_feats, logits_shape)
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def calibrate_stage(stage: Stage) -> dict:
    """Measure the method's losses at weight 1 and the detection loss; write the weights."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    from ..config import load_config
    from ..engine import TRAINER_REGISTRY

    method = stage.inputs["method"]
    cfg = load_config(stage.config, stage.opts)
    cfg.freeze()
    os.makedirs(stage.out_dir, exist_ok=True)
    seed_all_rng(cfg.SEED)  # the same initial heads as the training run of this seed
    trainer_cls = TRAINER_REGISTRY.get(cfg.NST_DET.TRAINER)
    model = trainer_cls.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.train()
    keys = loss_keys(method)
    recorded = {}
    teacher = teacher_of(model)

    def keep_first(key, pick=lambda o: o):
        def hook(module, inputs, output):  # returns None: the output is not replaced
            recorded.setdefault(key, pick(output))
        return hook

    handles = [
        model.backbone.register_forward_hook(keep_first("s")),
        teacher.backbone.register_forward_hook(keep_first("t")),
        model.roi_heads.box_predictor.register_forward_hook(
            keep_first("logits", lambda o: o[0].shape)),
    ]
    detection, raw = [], {k: [] for k in keys}
    data = iter(trainer_cls.build_train_loader(cfg))
    with torch.no_grad(), EventStorage():  # the R-CNN heads log training statistics
        for _ in range(CALIBRATION["batches"]):
            losses = model(next(data))
            detection.append(float(sum(v for k, v in losses.items() if k not in keys)))
            for k in keys:
                raw[k].append(float(losses[k]))
    del data
    for h in handles:
        h.remove()
    weights = weights_from(detection, raw, CALIBRATION["fraction"])
    loss_ms = time_method_loss(cfg, method, recorded["s"], recorded["t"], recorded["logits"])
    opts = method_opts(method, weights)
    with atomic_write(os.path.join(stage.out_dir, "method.yaml"), "w") as f:
        f.write(opts_to_yaml(stage.config, opts))
    record = {
        "method": method, "rule": "weight = fraction * mean detection loss / mean loss at "
        "weight 1, over the first batches of the initial model (no optimizer step)",
        **{k: CALIBRATION[k] for k in ("fraction", "batches")},
        "detection_loss": detection, "loss_at_weight_1": raw, "weights": weights,
        "loss_ms": loss_ms, "loss_ms_inputs": {
            "features": {k: list(v.shape) for k, v in recorded["s"].items()},
            "roi_logits": list(recorded["logits"])},
        "opts": opts, "torch_threads": torch.get_num_threads(),
    }
    with atomic_write(os.path.join(stage.out_dir, "calibration.json"), "w") as f:
        json.dump(record, f, indent=2)
    return {"calibration": {"weights": weights, "detection_loss": statistics.mean(detection),
                            "loss_at_weight_1": {k: statistics.mean(v) for k, v in raw.items()},
                            "loss_ms": loss_ms}}
