"""The methods axis (issue 18): method -> config opts, the plan's method stages, the weight rule,
and the report's methods table from fabricated stage records."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from nst_det.config import load_config
from nst_det.pipeline.calibrate import opts_to_yaml, weights_from
from nst_det.pipeline.methods import (
    METHODS,
    add_method_stages,
    loss_keys,
    method_opts,
    parse_methods,
)
from nst_det.pipeline.plan import TOY_CONFIGS, TOY_SCALES, Stage, build_plan
from nst_det.pipeline.report_methods import methods_section

REPO = Path(__file__).resolve().parents[1]
NST_CONFIG = str(REPO / TOY_CONFIGS.det_student_nst)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_opts_select_exactly_the_methods_losses(method):
    weights = {k: 0.5 + i for i, k in enumerate(loss_keys(method))}
    cfg = load_config(NST_CONFIG, method_opts(method, weights))
    on = {"loss_nst": cfg.MODEL.NST.LOSS_WEIGHT, "loss_kd": cfg.MODEL.KD.LOSS_WEIGHT,
          **{f"loss_{n}": w for n, w in zip(cfg.MODEL.TRANSFER.NAMES, cfg.MODEL.TRANSFER.WEIGHTS)}}
    assert {k: v for k, v in on.items() if v} == weights
    if "nst" in METHODS[method]:
        assert cfg.MODEL.NST.KERNEL == METHODS[method]["nst"]


def test_parse_methods_names_unknown_ones():
    assert parse_methods("kd+nst, sp") == ["kd+nst", "sp"]
    with pytest.raises(ValueError, match="nst_cubic"):
        parse_methods("nst_poly,nst_cubic")


def test_method_stages_differ_from_the_distillation_stage_only_by_the_loss(tmp_path):
    scale = replace(TOY_SCALES["ci"], seeds=(0, 1))
    plan = build_plan(str(tmp_path), scale, TOY_CONFIGS)
    stages = add_method_stages(plan, ["nst_poly", "kd+nst"])
    by_name = {s.name: s for s in stages}
    assert len(stages) == len(plan) + 2 + 2 * 2
    for method, slug in (("nst_poly", "nst_poly"), ("kd+nst", "kd_nst")):
        calib = by_name[f"calibrate_{slug}"]
        assert calib.kind == "calibrate" and calib.inputs == {"method": method}
        for seed in (0, 1):
            run, base = by_name[f"det_method_{slug}_s{seed}"], by_name[f"det_plain_detnst_s{seed}"]
            assert run.config == str(tmp_path / f"calibrate_{slug}" / "method.yaml")
            strip = [i for i, o in enumerate(base.opts) if o == "OUTPUT_DIR"][0]
            same = base.opts[:strip] + base.opts[strip + 2:]
            assert run.opts == [*same, "OUTPUT_DIR", run.out_dir]
            assert set(run.after) == {*base.after, calib.name}
            assert run.meta == {"stage": "det", "role": "method", "method": method, "seed": seed}
    # calibrations one after the other; the report waits for every method run
    assert "calibrate_nst_poly" in by_name["calibrate_kd_nst"].after
    assert "det_method_kd_nst_s1" in by_name["report"].after
    assert stages[-1].kind == "report"
    assert add_method_stages(plan, []) is plan


def test_calibration_rule_and_method_yaml(tmp_path):
    weights = weights_from([2.0, 4.0], {"loss_nst": [0.5, 1.5], "loss_kd": [6.0, 6.0]}, 0.25)
    assert weights == pytest.approx({"loss_nst": 0.75, "loss_kd": 0.125})
    with pytest.raises(ValueError, match="loss_at"):
        weights_from([1.0], {"loss_at": [0.0]}, 0.25)
    path = tmp_path / "method.yaml"
    path.write_text(opts_to_yaml(NST_CONFIG, method_opts("kd+nst", weights)))
    cfg = load_config(str(path))
    assert cfg.MODEL.NST.LOSS_WEIGHT == pytest.approx(0.75)
    assert cfg.MODEL.KD.LOSS_WEIGHT == pytest.approx(0.125)
    assert cfg.MODEL.META_ARCHITECTURE == "DistillationRCNN"  # the base config is kept
    assert list(cfg.MODEL.TRANSFER.NAMES) == []


def _fake(tmp_path, name, meta, metrics, times=()):
    stage = Stage(name, "calibrate" if meta["role"] == "calibration" else "train",
                  str(tmp_path / name), meta=meta)
    Path(stage.out_dir).mkdir()
    (Path(stage.out_dir) / "stage.json").write_text(json.dumps(
        {"name": name, "kind": stage.kind, "seconds": 1.0, "meta": meta, "metrics": metrics}))
    (Path(stage.out_dir) / "metrics.json").write_text(
        "".join(json.dumps({"iteration": i, "time": t}) + "\n" for i, t in enumerate(times)))
    return stage


def test_methods_table_and_plot_from_stage_records(tmp_path):
    stages = []
    for seed, (plain, at, sp) in enumerate([(10.0, 20.0, 10.5), (12.0, 21.0, 11.0),
                                            (11.0, 22.0, 12.5)]):
        stages.append(_fake(tmp_path, f"det_plain_s{seed}", {
            "stage": "det", "role": "student", "method": "plain", "seed": seed, "det_nst": False},
            {"bbox": {"AP50": plain, "AP": plain / 2}}, times=[0.2] * 3))
        for method, ap50 in (("at", at), ("sp", sp)):
            bbox = {"AP50": ap50, "AP": ap50 / 2, **({"AP75": 1.0} if method == "sp" else {})}
            stages.append(_fake(tmp_path, f"det_method_{method}_s{seed}", {
                "stage": "det", "role": "method", "method": method, "seed": seed},
                {"bbox": bbox}, times=[0.1, 0.1, 0.3]))
    # a distillation run that is not the plain student must not count as the baseline
    stages.append(_fake(tmp_path, "det_plain_detnst_s0", {
        "stage": "det", "role": "student", "method": "plain", "seed": 0, "det_nst": True},
        {"bbox": {"AP50": 99.0, "AP": 50.0}}))
    for method, ms in (("at", 5.0), ("sp", 2.0)):
        stages.append(_fake(tmp_path, f"calibrate_{method}", {
            "stage": "det", "role": "calibration", "method": method},
            {"calibration": {"weights": {f"loss_{method}": 0.123}, "loss_ms": ms}}))
    stages.append(Stage("det_method_kd_s0", "train", str(tmp_path / "unfinished"),
                        meta={"stage": "det", "role": "method", "method": "kd", "seed": 0}))

    lines, numbers = methods_section(stages, str(tmp_path))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines if line.startswith("| ")}
    assert set(rows) == {"Method", "plain", "at", "sp"}  # the unfinished kd run is left out
    assert rows["Method"][5] == "AP75"  # a COCO metric present in one run gets a column
    assert rows["plain"][3:5] == ["11.0 ± 1.0", "5.5 ± 0.5"]
    assert rows["at"][1:4] == ["at 0.123", "0,1,2", "21.0 ± 1.0"]
    # paired over seeds: at - plain = 10, 9, 11 (interval excludes 0); sp: 0.5, -1, 1.5
    assert rows["at"][6:10] == ["+10.0 [+7.5, +12.5]", "better (3 seeds)",
                                "+5.0 [+3.8, +6.2]", "better (3 seeds)"]
    assert rows["at"][12:] == ["5.0", "5.0% of 100 ms"]
    assert rows["sp"][6:8] == ["+0.3 [-2.8, +3.5]",
                               "no difference detected at this size (3 seeds)"]
    assert rows["sp"][10:12] == ["n/a", "no paired seeds: not compared"]  # no plain AP75
    assert numbers["sp"]["AP75"] == [1.0, 1.0, 1.0] and numbers["plain"]["step_ms"] == 200
    assert (tmp_path / "figures" / "methods_forest_ap50.png").stat().st_size > 5_000
    plain_only = [s for s in stages if s.meta["role"] == "student"]
    assert methods_section(plain_only, str(tmp_path)) == ([], {})  # no method runs: no section
