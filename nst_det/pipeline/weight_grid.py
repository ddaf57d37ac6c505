"""Optional parts of the methods axis: a validation weight grid per method, and two controls.

Weight grid (`--weight-grid`): per method, one run trained at the calibrated weight times each
of GRID_FACTORS, each evaluated on the toy set's `minival` split only (disjoint from trainval and
test). The runs start from the calibration seed's pretrained student but train with their own
SEED (that seed + GRID_SEED_OFFSET: other new-layer initialisation and data order), so the
training luck that picks the weight is not the luck of the reported run of that seed (which
would otherwise be the chosen grid run itself, its result biased upward by the choice). A
`select_<method>` stage then picks the factor with the best validation AP50 (`select_weight`: a
pure function of the grid runs' stage.json records, which hold only minival metrics and are
refused unless marked as such) and writes the config every reported seed of the method trains
from. Test AP never enters the choice.

    grid_<m> (writes x<f>.yaml) -> det_grid_<m>_x<f> (minival) -> select_<m> (method.yaml)
        -> det_method_<m>_s<seed>

Controls (`--controls`), rows of the methods table compared with plain like every method:
  plain_aa     negative (A/A) control: the plain student again, only its data order changed
               (NST_DET.DATA_SEED; the same SEED, so the same initialisation); a verdict
               other than "no difference" means the interval is too optimistic.
  nst_handset  positive control: NST at the main table's hand-set MODEL.NST.LOSS_WEIGHT (the
               NST config's own value), no calibration.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

from ..utils.atomic import atomic_write
from .plan import Stage

__all__ = ["GRID_FACTORS", "AA_SEED_OFFSET", "GRID_SEED_OFFSET", "factor_label", "minival_name",
           "grid_stages", "control_stages", "select_weight", "grid_configs_stage",
           "select_weight_stage"]

GRID_FACTORS = (0.25, 1.0, 4.0)  # times the calibrated weight
VALIDATION_SPLIT = "minival"
# the A/A run's data seed is its pair's SEED + this, far from any seed a plan trains (0, 1, ...)
AA_SEED_OFFSET = 1000
# a grid run's SEED is its pretrained student's seed + this (module doc)
GRID_SEED_OFFSET = 2000


def factor_label(factor: float) -> str:
    """0.25 -> "x0.25", 1.0 -> "x1", 4.0 -> "x4" (stage and file names)."""
    return f"x{factor:g}"


def minival_name(test_name: str) -> str:
    """The validation set next to a toy test set: "toy_voc_tiny_test" -> "toy_voc_tiny_minival"
    (nst_det.data.datasets registers both); a ValueError for a set without one (the paper's
    VOC2007: its `val` is part of trainval)."""
    from detectron2.data import DatasetCatalog

    prefix = test_name[:-len("_test")] if test_name.endswith("_test") else test_name
    name = f"{prefix}_{VALIDATION_SPLIT}"
    if name not in DatasetCatalog.list():
        have = sorted(n for n in DatasetCatalog.list() if n.endswith(f"_{VALIDATION_SPLIT}"))
        raise ValueError(f"--weight-grid needs a validation split disjoint from trainval and "
                         f"test; {test_name!r} has none (registered: {have})")
    return name


def _without(opts: list, keys: tuple) -> list:
    pairs = list(zip(opts[::2], opts[1::2]))
    return [x for k, v in pairs if k not in keys for x in (k, v)]


def grid_stages(method: str, slug: str, reference: Stage, calib_dir: str, detector,
                extra_opts: list, minival: str) -> list:
    """[grid_<slug>, det_grid_<slug>_x<f> for f in GRID_FACTORS, select_<slug>].

    reference: the calibration seed's det_plain_detnst stage; extra_opts: what the method's
    training stages add to its opts (FGFI's warm-up). Each grid run is that stage with the
    method at factor x the calibrated weight, DATASETS.TEST = (minival,), SEED + GRID_SEED_OFFSET,
    its own folder.
    """
    train_seed = reference.meta["seed"] + GRID_SEED_OFFSET
    out_root = os.path.dirname(reference.out_dir)
    grid_dir = os.path.join(out_root, f"grid_{slug}")
    new = [Stage(f"grid_{slug}", "weight_grid", grid_dir, reference.config,
                 inputs={"method": method, "factors": list(GRID_FACTORS),
                         "calibration": os.path.join(calib_dir, "calibration.json"),
                         **({"detector": detector} if detector else {})},
                 after=[f"calibrate_{slug}"],
                 meta={"role": "weight_grid", "method": method})]
    points = []
    for factor in GRID_FACTORS:
        name = f"det_grid_{slug}_{factor_label(factor)}"
        out_dir = os.path.join(out_root, name)
        opts = [*_without(reference.opts, ("OUTPUT_DIR", "DATASETS.TEST", "SEED")), *extra_opts,
                "DATASETS.TEST", f"('{minival}',)", "SEED", str(train_seed), "OUTPUT_DIR",
                out_dir]
        new.append(replace(
            reference, name=name, out_dir=out_dir, opts=opts,
            config=os.path.join(grid_dir, f"{factor_label(factor)}.yaml"),
            after=[*reference.after, f"grid_{slug}"],
            meta={"stage": "det", "role": "grid", "method": method,
                  "seed": reference.meta["seed"], "train_seed": train_seed, "factor": factor,
                  "split": VALIDATION_SPLIT, "dataset": minival}))
        points.append({"factor": factor, "stage": name,
                       "record": os.path.join(out_dir, "stage.json")})
    new.append(Stage(f"select_{slug}", "select_weight", os.path.join(out_root, f"select_{slug}"),
                     inputs={"method": method, "grid": points, "configs": grid_dir},
                     after=[p["stage"] for p in points],
                     meta={"role": "weight_select", "method": method}))
    return new


def control_stages(by_name: dict, seeds: list, handset_weight: float, detector) -> list:
    """plain_aa and nst_handset training stages for each seed (module doc)."""
    from .methods import method_opts

    new = []
    for seed in seeds:
        plain = by_name[f"det_plain_s{seed}"]
        out_root = os.path.dirname(plain.out_dir)
        name = f"det_control_plain_aa_s{seed}"
        out_dir = os.path.join(out_root, name)
        # only the data order changes (NST_DET.DATA_SEED): the same SEED, so the same new
        # layers' initialisation, pretrained weights, config, schedule and data
        opts = [*_without(plain.opts, ("OUTPUT_DIR",)), "NST_DET.DATA_SEED",
                str(seed + AA_SEED_OFFSET), "OUTPUT_DIR", out_dir]
        new.append(replace(plain, name=name, out_dir=out_dir, opts=opts, meta={
            "stage": "det", "role": "control", "control": "negative", "method": "plain_aa",
            "seed": seed, "data_seed": seed + AA_SEED_OFFSET}))
    for seed in seeds:
        base = by_name[f"det_plain_detnst_s{seed}"]
        out_root = os.path.dirname(base.out_dir)
        name = f"det_control_nst_handset_s{seed}"
        out_dir = os.path.join(out_root, name)
        weights = {"loss_nst": handset_weight}
        opts = [*_without(base.opts, ("OUTPUT_DIR",)),
                *method_opts("nst_poly", weights, detector), "OUTPUT_DIR", out_dir]
        new.append(replace(base, name=name, out_dir=out_dir, opts=opts, meta={
            "stage": "det", "role": "control", "control": "positive", "method": "nst_handset",
            "seed": seed, "weights": weights}))
    return new


def _validation_ap50(record: dict) -> float:
    """A grid run's AP50, from a record that says it evaluated the validation split."""
    meta = record["meta"]
    if meta.get("role") != "grid" or meta.get("split") != VALIDATION_SPLIT:
        raise ValueError(f"{record.get('name')}: not a {VALIDATION_SPLIT} grid record "
                         f"(role {meta.get('role')!r}, split {meta.get('split')!r}): a weight "
                         "is never chosen on another split")
    return record["metrics"]["bbox"]["AP50"]


def select_weight(records: list) -> dict:
    """The grid point with the best validation AP50, from the grid runs' stage.json records.

    Pure: reads each record's meta (role, split, factor) and metrics["bbox"]["AP50"] only;
    records of any other split are refused. Ties go to the factor nearest the calibrated
    weight (x1), then to the smaller one. Returns {"chosen": factor, "split", "dataset",
    "points": [{"factor", "AP50"}] by factor}.
    """
    if not records:
        raise ValueError("no grid records to choose a weight from")
    points = sorted(({"factor": r["meta"]["factor"], "AP50": _validation_ap50(r)}
                     for r in records), key=lambda p: p["factor"])
    best = max(points, key=lambda p: (p["AP50"] if math.isfinite(p["AP50"]) else -math.inf,
                                      -abs(math.log(p["factor"])), -p["factor"]))  # NaN: diverged
    return {"chosen": best["factor"], "split": VALIDATION_SPLIT,
            "dataset": records[0]["meta"].get("dataset"), "points": points}


def grid_configs_stage(stage: Stage) -> dict:
    """Write x<f>.yaml per grid factor: the method at factor x its calibrated weights."""
    from .calibrate import opts_to_yaml
    from .methods import method_opts

    with open(stage.inputs["calibration"]) as f:
        calibrated = json.load(f)["weights"]
    os.makedirs(stage.out_dir, exist_ok=True)
    grid = {}
    for factor in stage.inputs["factors"]:
        weights = {k: factor * w for k, w in calibrated.items()}
        opts = method_opts(stage.inputs["method"], weights, stage.inputs.get("detector"))
        path = os.path.join(stage.out_dir, f"{factor_label(factor)}.yaml")
        with atomic_write(path, "w") as f:
            f.write(opts_to_yaml(stage.config, opts))
        grid[factor_label(factor)] = weights
    return {"weight_grid": {"calibrated": calibrated, "weights": grid}}


def select_weight_stage(stage: Stage) -> dict:
    """Choose the factor (`select_weight`) and copy its config to method.yaml."""
    records = []
    for point in stage.inputs["grid"]:
        with open(point["record"]) as f:
            records.append(json.load(f))
    choice = select_weight(records)
    label = factor_label(choice["chosen"])
    os.makedirs(stage.out_dir, exist_ok=True)
    with open(os.path.join(stage.inputs["configs"], f"{label}.yaml")) as f:
        text = f.read()
    with atomic_write(os.path.join(stage.out_dir, "method.yaml"), "w") as f:
        f.write(text)
    return {"weight_select": choice}
