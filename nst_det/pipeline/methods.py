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
"""

from __future__ import annotations

import os
from dataclasses import replace

from .plan import Stage

__all__ = ["METHODS", "CALIBRATION", "loss_keys", "method_opts", "method_slug",
           "add_method_stages", "parse_methods"]

# method -> the losses it switches on. "nst": MODEL.NST.KERNEL (loss_nst); "kd": Hinton KD on
# the RoI class logits (loss_kd); "transfer": a name in nst_det.losses' registry under
# MODEL.TRANSFER (loss_<name>), on the same feature pairs as NST. The KD^2M metrics (mmd,
# gaussian_*, sinkhorn) see each level's pooled [B, C] features: one sample per image.
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
}

# the weight rule (module doc): each loss starts at FRACTION of the detection loss
CALIBRATION = {"fraction": 0.25, "batches": 4, "seed": 0}


def method_slug(method: str) -> str:
    """A folder-safe name: "kd+nst" -> "kd_nst"."""
    return method.replace("+", "_")


def parse_methods(text: str) -> list:
    """"nst_poly,kd" -> ["nst_poly", "kd"]; a ValueError names unknown methods."""
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


def method_opts(method: str, weights: dict | None = None) -> list:
    """Config overrides (KEY, VALUE, ...) that select `method` with `weights` per loss key.

    weights: {loss key: weight}; None: every weight 1 (what calibration measures). Losses the
    method does not use are switched off, so the overrides fully replace the base config's.
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
    ]


def _without(opts: list, keys: tuple) -> list:
    """opts (KEY, VALUE, ...) without the pairs whose key is in `keys`."""
    pairs = list(zip(opts[::2], opts[1::2]))
    return [x for k, v in pairs if k not in keys for x in (k, v)]


def add_method_stages(stages: list, methods: list, seeds=None) -> list:
    """The plan with a calibration stage per method and a training stage per method and seed.

    Built from the plan's `det_plain_detnst_s<seed>` stages (everything but the loss equal);
    the new stages go before export/report, which also wait for them.
    """
    if not methods:
        return stages
    by_name = {s.name: s for s in stages}
    seeds = sorted({s.meta["seed"] for s in stages if s.name.startswith("det_plain_detnst_s")}
                   if seeds is None else seeds)
    calib_seed = CALIBRATION["seed"] if CALIBRATION["seed"] in seeds else seeds[0]
    reference = by_name[f"det_plain_detnst_s{calib_seed}"]
    out_root = os.path.dirname(reference.out_dir)
    new, previous = [], []
    for method in methods:
        slug = method_slug(method)
        calib_dir = os.path.join(out_root, f"calibrate_{slug}")
        base_opts = _without(reference.opts, ("OUTPUT_DIR",))
        # one calibration at a time (each loads student and teacher): chained, not side by side
        new.append(Stage(
            f"calibrate_{slug}", "calibrate", calib_dir, reference.config,
            [*base_opts, *method_opts(method), "OUTPUT_DIR", calib_dir],
            inputs={"method": method}, after=[*reference.after, *previous],
            meta={"stage": "det", "role": "calibration", "method": method}))
        previous = [f"calibrate_{slug}"]
        for seed in seeds:
            base = by_name[f"det_plain_detnst_s{seed}"]
            name = f"det_method_{slug}_s{seed}"
            out_dir = os.path.join(out_root, name)
            opts = [*_without(base.opts, ("OUTPUT_DIR",)), "OUTPUT_DIR", out_dir]
            new.append(replace(
                base, name=name, out_dir=out_dir,
                config=os.path.join(calib_dir, "method.yaml"), opts=opts,
                after=[*base.after, f"calibrate_{slug}"],
                meta={"stage": "det", "role": "method", "method": method, "seed": seed}))
    summary = [s for s in stages if s.kind in ("export", "report")]
    rest = [s for s in stages if s.kind not in ("export", "report")]
    trained = [s.name for s in new if s.kind == "train"]
    summary = [replace(s, after=[*s.after, *trained]) for s in summary]
    return rest + new + summary
