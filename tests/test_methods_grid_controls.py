"""Issue 26 items 2-3: the methods axis' validation weight grid and its A/A / positive controls,
as plans (no training), the pure weight choice, and the report rows from fabricated records."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from nst_det.config import load_config
from nst_det.pipeline.methods import add_method_stages
from nst_det.pipeline.plan import TOY_CONFIGS, TOY_SCALES, Stage, build_plan
from nst_det.pipeline.report_methods import methods_section
from nst_det.pipeline.weight_grid import (
    AA_SEED_OFFSET,
    GRID_FACTORS,
    GRID_SEED_OFFSET,
    grid_configs_stage,
    minival_name,
    select_weight,
    select_weight_stage,
)

REPO = Path(__file__).resolve().parents[1]
HANDSET = float(load_config(str(REPO / TOY_CONFIGS.det_student_nst)).MODEL.NST.LOSS_WEIGHT)


def _plan(tmp_path):
    scale = replace(TOY_SCALES["ci"], seeds=(0, 1))
    return build_plan(str(tmp_path), scale, TOY_CONFIGS), scale


def _opt(opts, key):
    values = [v for k, v in zip(opts[::2], opts[1::2]) if k == key]
    assert len(values) <= 1, (key, values)
    return values[0] if values else None


def test_without_the_flags_the_plan_has_no_grid_or_control_stage(tmp_path):
    plan, _ = _plan(tmp_path)
    stages = add_method_stages(plan, ["nst_poly"])
    roles = {s.meta.get("role") for s in stages}
    assert not roles & {"weight_grid", "grid", "weight_select", "control"}, roles
    assert not [s.name for s in stages if s.name.startswith(("grid_", "det_grid_", "select_",
                                                             "det_control_"))]
    # each seed trains from the calibration's config, not a grid's choice
    assert {s.config for s in stages if s.meta.get("role") == "method"} == {
        str(tmp_path / "calibrate_nst_poly" / "method.yaml")}
    assert add_method_stages(plan, []) is plan


def test_grid_stages_per_method_on_minival_and_the_seeds_wait_for_them(tmp_path):
    plan, _ = _plan(tmp_path)
    stages = add_method_stages(plan, ["nst_poly", "fgfi"], weight_grid=True)
    by_name = {s.name: s for s in stages}
    for slug in ("nst_poly", "fgfi"):
        grid_dir = tmp_path / f"grid_{slug}"
        assert by_name[f"grid_{slug}"].after == [f"calibrate_{slug}"]
        assert by_name[f"grid_{slug}"].inputs["factors"] == [0.25, 1.0, 4.0]
        points = [by_name[f"det_grid_{slug}_{lab}"] for lab in ("x0.25", "x1", "x4")]
        assert [p.meta["factor"] for p in points] == list(GRID_FACTORS) == [0.25, 1.0, 4.0]
        for point, lab in zip(points, ("x0.25", "x1", "x4")):
            assert point.kind == "train" and point.meta["seed"] == 0  # one pretrained student
            # trained with its own SEED: the reported seed-0 run is not a grid point again
            assert _opt(point.opts, "SEED") == str(GRID_SEED_OFFSET)
            assert _opt(point.opts, "SEED") != _opt(by_name[f"det_method_{slug}_s0"].opts,
                                                    "SEED")
            assert point.config == str(grid_dir / f"{lab}.yaml")
            assert _opt(point.opts, "DATASETS.TEST") == "('toy_voc_tiny_minival',)"
            assert "toy_voc_tiny_test" not in " ".join(point.opts)  # evaluates minival only
            assert f"grid_{slug}" in point.after
        select = by_name[f"select_{slug}"]
        assert select.after == [p.name for p in points]
        for seed in (0, 1):
            run = by_name[f"det_method_{slug}_s{seed}"]
            assert run.config == str(tmp_path / f"select_{slug}" / "method.yaml")
            assert {p.name for p in points} | {select.name} <= set(run.after)
            assert _opt(run.opts, "DATASETS.TEST") == "('toy_voc_tiny_test',)"  # reported: test
    assert len([s for s in stages if s.meta.get("role") == "grid"]) == 2 * 3
    assert minival_name("toy_voc_2007_test") == "toy_voc_2007_minival"
    with pytest.raises(ValueError, match="validation split"):
        minival_name("voc_2007_test")  # the paper set has no disjoint validation split


def _grid_record(factor, ap50, split="minival", **extra_metrics):
    return {"name": f"det_grid_m_x{factor:g}", "meta": {
        "role": "grid", "method": "m", "factor": factor, "split": split,
        "dataset": f"toy_voc_tiny_{split}"}, "metrics": {"bbox": {"AP50": ap50}, **extra_metrics}}


class _TestTripwire(dict):
    """A record whose test-set entries fail the test when read."""

    def __getitem__(self, key):
        if "test" in str(key):
            raise AssertionError(f"selection read a test metric: {key}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if "test" in str(key):
            raise AssertionError(f"selection read a test metric: {key}")
        return super().get(key, default)


def test_selection_picks_the_best_validation_ap50_and_never_a_test_metric():
    records = [_grid_record(0.25, 30.0), _grid_record(1.0, 41.0), _grid_record(4.0, 35.0)]
    choice = select_weight(records)
    assert choice["chosen"] == 1.0 and choice["split"] == "minival"
    assert [p["AP50"] for p in choice["points"]] == [30.0, 41.0, 35.0]
    assert select_weight(records[::-1])["chosen"] == 1.0  # order does not matter
    # with test numbers that rank x4 first in the records, the choice stays the validation one
    poisoned = []
    for r, test_ap in zip(records, (10.0, 20.0, 90.0)):
        r = json.loads(json.dumps(r))
        r["metrics"] = _TestTripwire(r["metrics"], toy_voc_tiny_test={"bbox": {"AP50": test_ap}})
        poisoned.append(_TestTripwire(r, test={"bbox": {"AP50": test_ap}}))
    assert select_weight(poisoned)["chosen"] == 1.0
    # a record from the test split (e.g. a reported seed's) is refused, never ranked
    with pytest.raises(ValueError, match="not a minival grid record"):
        select_weight([*records[:2], _grid_record(4.0, 99.0, split="test")])
    assert select_weight([_grid_record(0.25, 5.0), _grid_record(4.0, 50.0)])["chosen"] == 4.0
    # a tie goes to the calibrated weight; a diverged (NaN) point never wins
    tie = [_grid_record(0.25, 40.0), _grid_record(1.0, 40.0), _grid_record(4.0, float("nan"))]
    assert select_weight(tie)["chosen"] == 1.0
    # ... and is listed as its record holds it (NaN), not as the -inf that ranks it last
    assert math.isnan(select_weight(tie)["points"][2]["AP50"])


def test_grid_and_select_handlers_write_the_chosen_config(tmp_path):
    calib = tmp_path / "calibration.json"
    calib.write_text(json.dumps({"weights": {"loss_nst": 2.0}}))
    nst = str(REPO / TOY_CONFIGS.det_student_nst)
    grid = Stage("grid_nst_poly", "weight_grid", str(tmp_path / "grid"), nst, inputs={
        "method": "nst_poly", "factors": list(GRID_FACTORS), "calibration": str(calib)})
    out = grid_configs_stage(grid)["weight_grid"]
    assert out["weights"] == {"x0.25": {"loss_nst": 0.5}, "x1": {"loss_nst": 2.0},
                              "x4": {"loss_nst": 8.0}}
    assert load_config(str(tmp_path / "grid" / "x4.yaml")).MODEL.NST.LOSS_WEIGHT == 8.0
    points = []
    for factor, ap in zip(GRID_FACTORS, (10.0, 12.0, 30.0)):
        path = tmp_path / f"p{factor}.json"
        path.write_text(json.dumps(_grid_record(factor, ap)))
        points.append({"factor": factor, "stage": f"p{factor}", "record": str(path)})
    select = Stage("select_nst_poly", "select_weight", str(tmp_path / "select"), inputs={
        "method": "nst_poly", "grid": points, "configs": str(tmp_path / "grid")})
    assert select_weight_stage(select)["weight_select"]["chosen"] == 4.0
    assert load_config(str(tmp_path / "select" / "method.yaml")).MODEL.NST.LOSS_WEIGHT == 8.0


def test_controls_aa_differs_only_by_seed_and_positive_has_the_handset_weight(tmp_path):
    plan, _ = _plan(tmp_path)
    stages = add_method_stages(plan, [], controls=True)
    by_name = {s.name: s for s in stages}
    assert HANDSET == 25.0  # the NST config's own weight (faster_rcnn_R_18_FPN_toy_nst.yaml)
    for seed in (0, 1):
        aa, plain = by_name[f"det_control_plain_aa_s{seed}"], by_name[f"det_plain_s{seed}"]
        assert (aa.config, aa.after, aa.iters, aa.kind) == (
            plain.config, plain.after, plain.iters, plain.kind)
        differ = {k for k in set(aa.opts[::2]) | set(plain.opts[::2])
                  if _opt(aa.opts, k) != _opt(plain.opts, k)}
        assert differ == {"NST_DET.DATA_SEED", "OUTPUT_DIR"}  # SEED (initialisation) kept
        assert _opt(aa.opts, "NST_DET.DATA_SEED") == str(seed + AA_SEED_OFFSET)
        assert _opt(aa.opts, "MODEL.WEIGHTS") == _opt(plain.opts, "MODEL.WEIGHTS")
        assert aa.meta["seed"] == seed and aa.meta["control"] == "negative"
        pos = by_name[f"det_control_nst_handset_s{seed}"]
        cfg = load_config(pos.config, [o for k, v in zip(pos.opts[::2], pos.opts[1::2])
                                       if not k.startswith("MODEL.TEACHER") for o in (k, v)])
        assert cfg.MODEL.NST.LOSS_WEIGHT == HANDSET and cfg.MODEL.KD.LOSS_WEIGHT == 0.0
        assert pos.meta == {"stage": "det", "role": "control", "control": "positive",
                            "method": "nst_handset", "seed": seed,
                            "weights": {"loss_nst": HANDSET}}
    names = {s.name for s in stages}
    assert {f"det_control_{c}_s{s}" for c in ("plain_aa", "nst_handset")
            for s in (0, 1)} <= set(next(s for s in stages if s.name == "report").after)
    assert names - {s.name for s in plan} == {f"det_control_{c}_s{s}" for c in (
        "plain_aa", "nst_handset") for s in (0, 1)}


def _fake(tmp_path, name, kind, meta, metrics):
    stage = Stage(name, kind, str(tmp_path / name), meta=meta)
    Path(stage.out_dir).mkdir()
    (Path(stage.out_dir) / "stage.json").write_text(json.dumps(
        {"name": name, "kind": kind, "seconds": 1.0, "meta": meta, "metrics": metrics}))
    return stage


def test_report_rows_for_controls_and_the_weight_grid(tmp_path):
    stages = []
    for seed, (plain, aa, pos, nst) in enumerate([(10.0, 10.2, 15.0, 12.0),
                                                  (12.0, 11.8, 18.0, 13.0),
                                                  (11.0, 11.1, 16.0, 12.5)]):
        stages.append(_fake(tmp_path, f"det_plain_s{seed}", "train", {
            "stage": "det", "role": "student", "method": "plain", "seed": seed,
            "det_nst": False}, {"bbox": {"AP50": plain, "AP": plain / 2}}))
        stages.append(_fake(tmp_path, f"det_control_plain_aa_s{seed}", "train", {
            "stage": "det", "role": "control", "control": "negative", "method": "plain_aa",
            "seed": seed}, {"bbox": {"AP50": aa, "AP": aa / 2}}))
        stages.append(_fake(tmp_path, f"det_control_nst_handset_s{seed}", "train", {
            "stage": "det", "role": "control", "control": "positive", "method": "nst_handset",
            "seed": seed, "weights": {"loss_nst": 25.0}}, {"bbox": {"AP50": pos, "AP": pos / 2}}))
        stages.append(_fake(tmp_path, f"det_method_nst_poly_s{seed}", "train", {
            "stage": "det", "role": "method", "method": "nst_poly", "seed": seed},
            {"bbox": {"AP50": nst, "AP": nst / 2}}))
    stages.append(_fake(tmp_path, "calibrate_nst_poly", "calibrate", {
        "stage": "det", "role": "calibration", "method": "nst_poly"},
        {"calibration": {"weights": {"loss_nst": 2.0}, "loss_ms": 1.0}}))
    stages.append(_fake(tmp_path, "grid_nst_poly", "weight_grid", {
        "role": "weight_grid", "method": "nst_poly"}, {"weight_grid": {"weights": {
            "x0.25": {"loss_nst": 0.5}, "x1": {"loss_nst": 2.0}, "x4": {"loss_nst": 8.0}}}}))
    stages.append(_fake(tmp_path, "select_nst_poly", "select_weight", {
        "role": "weight_select", "method": "nst_poly"}, {"weight_select": select_weight(
            [_grid_record(0.25, 20.0), _grid_record(1.0, 21.0), _grid_record(4.0, 33.0)])}))

    lines, numbers = methods_section(stages, str(tmp_path))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines
             if line.startswith("| ")]
    rows = {r[0]: r for r in cells if len(r) > 4}  # the methods table (the grid's has 4)
    aa = rows["plain_aa (control: A/A, expect no difference)"]
    pos = rows["nst_handset (control: hand-set NST)"]
    # paired against plain: A/A 0.2, -0.2, 0.1 (interval covers 0); positive 5, 6, 5
    assert aa[1:3] == ["—", "0,1,2"] and aa[6].startswith("no difference detected")
    assert pos[1] == "nst 25" and pos[6] == "better (3 seeds)"
    assert numbers["plain_aa"]["control"] == "negative"
    assert numbers["nst_handset"]["control"] == "positive"
    # the method's weight cell is the chosen grid weight, and the grid table shows each point
    assert rows["nst_poly"][1] == "nst 8"
    grid = next(r for r in cells if r[:2] == ["nst_poly", "toy_voc_tiny_minival"])
    assert grid[2] == "x0.25: nst 0.5 → 20.0; x1: nst 2 → 21.0; x4: nst 8 → 33.0"
    assert grid[3] == "x4 (nst 8)"
    assert numbers["nst_poly"]["grid"]["chosen"] == 4.0
    assert any("scaled by the grid factor with the best validation AP50" in line
               for line in lines)  # the section says where the weights come from
    assert "### Loss weights chosen on the validation split" in lines
    # how to read the grid and the controls is on the page the section points to
    assert lines[2] == "How to read this section: `docs/reading_the_report.md#transfer-methods` " \
        "in the nst_det repository."
    reading = (REPO / "docs" / "reading_the_report.md").read_text()
    for part in ("## Transfer methods", "### Loss weights chosen on the validation split",
                 "### Controls"):
        assert f"\n{part}\n" in reading, part
    assert "plain_aa" in reading and "nst_handset" in reading


def test_methods_only_keeps_the_benchmark_and_what_it_reads_and_a_report_over_it(tmp_path):
    from nst_det.pipeline.methods import methods_benchmark_only

    plan, _ = _plan(tmp_path)
    full = add_method_stages(plan, ["nst_poly"], weight_grid=True, controls=True)
    cut = methods_benchmark_only(full)
    names = [s.name for s in cut]
    by_name = {s.name: s for s in full}
    assert names == [s.name for s in full if s.name in set(names)]  # the plan's order
    for s in cut:  # everything a kept stage reads is kept, and comes before it
        assert all(d in names[:names.index(s.name)] for d in s.after), s.name
    benchmark = {f"det_method_nst_poly_s{k}" for k in (0, 1)} | {
        f"det_control_{c}_s{k}" for c in ("plain_aa", "nst_handset") for k in (0, 1)}
    assert benchmark | {"det_plain_s0", "det_plain_s1", "select_nst_poly"} <= set(names)
    # the main table's distilled students (and only what they alone read) are left out
    assert not {"det_nst_s0", "det_plain_detnst_s0", "det_kd_nst_s0", "cls_nst_s0",
                "cls_kd_nst_s0", "export"} & set(names)
    report = cut[-1]
    assert report.kind == "report" and report.out_dir == by_name["report"].out_dir
    assert sorted(report.after) == sorted(s.name for s in cut if s.kind == "train")
    with pytest.raises(ValueError, match="--methods-only"):
        methods_benchmark_only(plan)
