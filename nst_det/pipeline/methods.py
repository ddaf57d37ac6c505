"""The methods axis of the pipeline: one detection-stage student per transfer method and seed.

Every method run is the plan's own "plain pretrained student + detection-stage distillation"
stage (`det_plain_detnst_s<seed>`: the same pretrained student, teacher detector, data, schedule
and seed) with only the transfer loss changed. Which losses a method switches on is plain data
(`METHODS`); their weights are not hand-set but calibrated by one rule (`CALIBRATION`):

    weight of loss L = FRACTION * (detection loss) / (L at weight 1),

both measured on the first BATCHES training batches of the seed-0 plain pretrained student (no
optimizer step), so each loss starts at FRACTION of the detection loss. A method with two losses
(kd+nst) calibrates each one so. The rule never looks at test AP. The `calibrate_<method>` stage
records the measured values and weights in its folder (calibration.json, stage.json) and writes
the config the method's training stages run (method.yaml: the distillation config plus the
calibrated weights).

The detection methods (CWD, PKD, MGD, FGD, DeFeat, FGFI, ReviewKD, DKD; docs/detection_methods.md)
run on their reference FPN levels and hyper-parameters for the plan's detector (R-CNN or
RetinaNet, read from the distillation config: `detector_of`), with only the weight calibrated.
"""

from __future__ import annotations

import ast
import os
from dataclasses import replace

from .plan import Stage, is_plain_student, select_stages

__all__ = ["METHODS", "CALIBRATION", "DETECTION", "loss_keys", "method_opts", "method_slug",
           "add_method_stages", "parse_methods", "detector_of", "fgfi_warmup",
           "methods_benchmark_only"]

# method -> the losses it switches on. "nst": MODEL.NST.KERNEL (loss_nst); "kd": Hinton KD on
# the RoI class logits (loss_kd); "transfer": a name in nst_det.losses' registry under
# MODEL.TRANSFER (loss_<name>), on the same feature pairs as NST (the detection methods: on their
# own levels, `DETECTION`). The KD^2M metrics (mmd, gaussian_*, sinkhorn) see each level's pooled
# [B, C] features: one sample per image.
METHODS = {
    "nst_poly": {"nst": "poly"},
    "nst_linear": {"nst": "linear"},
    "nst_gauss": {"nst": "gaussian"},
    "mmd_rbf": {"transfer": "mmd"},
    "gauss_w2": {"transfer": "gaussian_w2"},
    "gauss_kl": {"transfer": "gaussian_kl"},
    "sinkhorn": {"transfer": "sinkhorn"},
    "sp": {"transfer": "sp"},
    "at": {"transfer": "at"},
    "fitnet": {"transfer": "fitnet"},
    "kd": {"kd": True},
    "kd+nst": {"kd": True, "nst": "poly"},
    "cwd": {"transfer": "cwd"},
    "pkd": {"transfer": "pkd"},
    "mgd": {"transfer": "mgd"},
    "fgd": {"transfer": "fgd"},
    "defeat": {"transfer": "defeat"},
    "fgfi": {"transfer": "fgfi"},
    "reviewkd": {"transfer": "reviewkd"},
    "dkd": {"transfer": "dkd"},
}

_FGD_RCNN = {"TEMPERATURE": 0.5, "ALPHA": 5e-5, "BETA": 2.5e-5, "GAMMA": 5e-5, "LAMBDA": 5e-7}
_FGD_RETINANET = {"TEMPERATURE": 0.5, "ALPHA": 1e-3, "BETA": 5e-4, "GAMMA": 5e-4, "LAMBDA": 5e-6}
# detection method -> {detector: (levels, per-level weight, MODEL.<METHOD> keys)}: the reference
# settings (docs/detection_methods.md), as in configs/quick_schedules/{faster_rcnn,retinanet}_
# R_18_FPN_toy_<method>.yaml. levels: the first N of the plan's distillation pairs (finest first;
# p2.. for R-CNN, p3.. for RetinaNet); 0: no feature pairs (DKD is on the RoI logits, R-CNN only).
# Not here but in `method_opts`: ReviewKD's fusion width = the student's FPN width (as the toy
# configs' 64), FGFI's warm-up off (calibration measures at iteration 0; training stages get
# `fgfi_warmup`).
DETECTION = {
    "cwd": {"rcnn": (5, 1.0, {"TAU": 1.0}), "retinanet": (5, 1.0, {"TAU": 1.0})},
    "pkd": {"rcnn": (4, 1.0, {}), "retinanet": (4, 1.0, {})},
    "mgd": {"rcnn": (4, 1.0, {"MASK_RATIO": 0.45}), "retinanet": (5, 1.0, {"MASK_RATIO": 0.65})},
    "fgd": {"rcnn": (4, 1.0, _FGD_RCNN), "retinanet": (5, 1.0, _FGD_RETINANET)},
    "defeat": {d: (5, 0.2, {"FG_WEIGHT": 3.0, "BG_WEIGHT": 12.0}) for d in ("rcnn", "retinanet")},
    "fgfi": {d: (5, 1.0, {"PSI": 0.5}) for d in ("rcnn", "retinanet")},
    "reviewkd": {d: (5, 1.0, {}) for d in ("rcnn", "retinanet")},
    "dkd": {"rcnn": (0, 0.0, {"ALPHA": 1.0, "BETA": 0.25, "TEMPERATURE": 1.0})},
}
_DETECTORS = {"DistillationRCNN": "rcnn", "DistillationRetinaNet": "retinanet"}

# the weight rule (module doc): each loss starts at FRACTION of the detection loss
CALIBRATION = {"fraction": 0.25, "batches": 4, "seed": 0}


def method_slug(method: str) -> str:
    """A folder-safe name: "kd+nst" -> "kd_nst"."""
    return method.replace("+", "_")


def parse_methods(text: str) -> list:
    """"nst_poly,kd" -> ["nst_poly", "kd"]; "all": every method; a ValueError names unknown
    methods."""
    if text.strip() == "all":
        return list(METHODS)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return methods


def loss_keys(method: str) -> list:
    """The loss-dict keys a method adds, e.g. ["loss_kd", "loss_nst"]."""
    spec = METHODS[method]
    keys = []
    if "kd" in spec:
        keys.append("loss_kd")
    if "nst" in spec:
        keys.append("loss_nst")
    if "transfer" in spec:
        keys.append(f"loss_{spec['transfer']}")
    return keys


def detector_of(cfg) -> dict:
    """What `method_opts` needs of a distillation config: {"kind": "rcnn" | "retinanet",
    "student_features", "teacher_features" (its pairs, finest first), "fpn_channels"}."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in _DETECTORS:
        raise ValueError(f"the detection methods need one of {sorted(_DETECTORS)}; the "
                         f"distillation config has MODEL.META_ARCHITECTURE {arch!r}")
    d = cfg.MODEL.DISTILL
    return {"kind": _DETECTORS[arch], "student_features": list(d.STUDENT_FEATURES),
            "teacher_features": list(d.TEACHER_FEATURES),
            "fpn_channels": int(cfg.MODEL.FPN.OUT_CHANNELS)}


def fgfi_warmup(iters: int) -> int:
    """FGFI's warm-up for a training run of `iters` iterations: the reference's 400, at most a
    sixth of the schedule (the toy configs' 50 of 300); 400 when the config keeps its own
    schedule (iters 0)."""
    return min(400, iters // 6) if iters else 400


def _detection_opts(method: str, detector: dict | None) -> list:
    """The reference levels and hyper-parameters of a detection method (`DETECTION`)."""
    if method not in DETECTION:
        return []
    if detector is None:
        raise ValueError(f"method {method!r} needs the detector it distils (detector_of(cfg))")
    kind = detector["kind"]
    if kind not in DETECTION[method]:
        raise ValueError(f"method {method!r} has no {kind} setting (it runs on "
                         f"{sorted(DETECTION[method])} students: dkd needs RoI class logits)")
    levels, level_weight, keys = DETECTION[method][kind]
    opts = []
    if levels:
        s, t = detector["student_features"], detector["teacher_features"]
        if min(len(s), len(t)) < levels:
            raise ValueError(f"method {method!r} distils {levels} FPN levels; the distillation "
                             f"config pairs only {s} with {t}")
        opts += ["MODEL.DISTILL.STUDENT_FEATURES", repr(s[:levels]),
                 "MODEL.DISTILL.TEACHER_FEATURES", repr(t[:levels]),
                 "MODEL.DISTILL.FEATURE_WEIGHTS", repr([level_weight] * levels)]
    ns = f"MODEL.{method.upper()}"
    keys = dict(keys)
    if method == "reviewkd":
        keys["MID_CHANNELS"] = detector["fpn_channels"]
    if method == "fgfi":
        keys["WARMUP_ITERS"] = 0  # training stages set their own (`fgfi_warmup`)
    for key, value in keys.items():
        opts += [f"{ns}.{key}", repr(value)]
    return opts


def method_opts(method: str, weights: dict | None = None, detector: dict | None = None) -> list:
    """Config overrides (KEY, VALUE, ...) that select `method` with `weights` per loss key.

    weights: {loss key: weight}; None: every weight 1 (what calibration measures). Losses the
    method does not use are switched off, so the overrides fully replace the base config's.
    detector: `detector_of(distillation config)`, needed by the detection methods (`DETECTION`:
    their levels, pair weights and MODEL.<METHOD> keys are added).
    """
    spec = METHODS[method]
    weights = weights or {k: 1.0 for k in loss_keys(method)}
    transfer = spec.get("transfer")
    return [
        "MODEL.NST.LOSS_WEIGHT", repr(float(weights.get("loss_nst", 0.0))),
        "MODEL.NST.KERNEL", spec.get("nst", "poly"),
        "MODEL.KD.LOSS_WEIGHT", repr(float(weights.get("loss_kd", 0.0))),
        "MODEL.TRANSFER.NAMES", repr([transfer] if transfer else []),
        "MODEL.TRANSFER.WEIGHTS",
        repr([float(weights[f"loss_{transfer}"])] if transfer else []),
        *_detection_opts(method, detector),
    ]


def _without(opts: list, keys: tuple) -> list:
    """opts (KEY, VALUE, ...) without the pairs whose key is in `keys`."""
    pairs = list(zip(opts[::2], opts[1::2]))
    return [x for k, v in pairs if k not in keys for x in (k, v)]


def add_method_stages(stages: list, methods: list, seeds=None, weight_grid: bool = False,
                      controls: bool = False) -> list:
    """The plan with a calibration stage per method and a training stage per method and seed.

    Built from the plan's `det_plain_detnst_s<seed>` stages (everything but the loss equal);
    the new stages go before export/report, which also wait for them. A detection method's
    stages also carry its levels and hyper-parameters for the plan's detector (read from the
    distillation config), and FGFI's training stages its warm-up (`fgfi_warmup`).
    weight_grid: each method's seeds train at the grid weight with the best minival AP50
    (weight_grid.py); controls: add the plain_aa / nst_handset control stages (weight_grid.py).
    """
    if not methods and not controls:
        return stages
    by_name = {s.name: s for s in stages}
    seeds = sorted({s.meta["seed"] for s in stages if s.name.startswith("det_plain_detnst_s")}
                   if seeds is None else seeds)
    calib_seed = CALIBRATION["seed"] if CALIBRATION["seed"] in seeds else seeds[0]
    reference = by_name[f"det_plain_detnst_s{calib_seed}"]
    out_root = os.path.dirname(reference.out_dir)
    detector = None
    if any(m in DETECTION for m in methods):
        from ..config import load_config

        detector = detector_of(load_config(reference.config))
    if weight_grid or controls:
        from ..config import load_config
        from . import weight_grid as grid

        # the config alone (its opts name weights files not written yet) plus the plan's test set
        reference_cfg = load_config(reference.config)
        opts = dict(zip(reference.opts[::2], reference.opts[1::2]))
        test = (ast.literal_eval(opts["DATASETS.TEST"]) if "DATASETS.TEST" in opts
                else reference_cfg.DATASETS.TEST)
        minival = grid.minival_name(test[0]) if weight_grid else ""
    new = []
    for method in methods:
        slug = method_slug(method)
        calib_dir = os.path.join(out_root, f"calibrate_{slug}")
        base_opts = _without(reference.opts, ("OUTPUT_DIR",))
        # the rule is part of the stage's definition: a changed rule redoes the calibration
        inputs = {"method": method, "rule": dict(CALIBRATION),
                  **({"detector": detector} if method in DETECTION else {})}
        # `after` holds only what it reads (the runner redoes a stage when one of those ran
        # again); --jobs, not a chain, keeps calibrations from crowding the machine
        new.append(Stage(
            f"calibrate_{slug}", "calibrate", calib_dir, reference.config,
            [*base_opts, *method_opts(method, detector=detector), "OUTPUT_DIR", calib_dir],
            inputs=inputs, after=list(reference.after),
            meta={"stage": "det", "role": "calibration", "method": method}))
        # the config the method's seeds train from, and the stages that write it
        config, chosen_by = os.path.join(calib_dir, "method.yaml"), [f"calibrate_{slug}"]
        if weight_grid:
            warmup = (["MODEL.FGFI.WARMUP_ITERS", str(fgfi_warmup(reference.iters))]
                      if method == "fgfi" else [])
            points = grid.grid_stages(method, slug, reference, calib_dir,
                                      inputs.get("detector"), warmup, minival)
            new += points
            select = points[-1]
            config = os.path.join(select.out_dir, "method.yaml")
            chosen_by = [*chosen_by, *select.after, select.name]
        for seed in seeds:
            base = by_name[f"det_plain_detnst_s{seed}"]
            name = f"det_method_{slug}_s{seed}"
            out_dir = os.path.join(out_root, name)
            warmup = (["MODEL.FGFI.WARMUP_ITERS", str(fgfi_warmup(base.iters))]
                      if method == "fgfi" else [])
            opts = [*_without(base.opts, ("OUTPUT_DIR",)), *warmup, "OUTPUT_DIR", out_dir]
            new.append(replace(
                base, name=name, out_dir=out_dir, config=config, opts=opts,
                after=[*base.after, *chosen_by],
                meta={"stage": "det", "role": "method", "method": method, "seed": seed}))
    if controls:
        handset = float(reference_cfg.MODEL.NST.LOSS_WEIGHT)  # the NST config's own weight
        new += grid.control_stages(by_name, seeds, handset, None)
    summary = [s for s in stages if s.kind in ("export", "report")]
    rest = [s for s in stages if s.kind not in ("export", "report")]
    trained = [s.name for s in new if s.kind == "train"]
    summary = [replace(s, after=[*s.after, *trained]) for s in summary]
    return rest + new + summary


def methods_benchmark_only(stages: list) -> list:
    """The plan cut to the methods benchmark: the method and control students, the plain
    students they are compared with (`det_plain_s<seed>`), every stage those read, and the
    report over them; the main table's distilled students and the export are left out.

    `stages`: a plan with its method stages (`add_method_stages`). Raises ValueError when it
    has none.
    """
    wanted = [s.name for s in stages if s.meta.get("role") in ("method", "control")]
    if not wanted:
        raise ValueError("--methods-only: the plan has no method or control stages (give "
                         "--methods and/or --controls)")
    wanted += [s.name for s in stages if is_plain_student(s)]
    kept = select_stages(stages, wanted)
    report = next(s for s in stages if s.kind == "report")
    trained = [s.name for s in kept if s.kind in ("train", "evaluate")]
    return [*kept, replace(report, after=trained)]
