"""The methods axis (issue 18): method -> config opts, the plan's method stages, the weight rule,
and the report's methods table from fabricated stage records."""

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nst_det.config import load_config
from nst_det.pipeline.calibrate import (
    measure,
    method_loss_step,
    opts_to_yaml,
    record_core_inputs,
    time_method_loss,
    weights_from,
)
from nst_det.pipeline.methods import (
    CALIBRATION,
    DETECTION,
    METHODS,
    add_method_stages,
    detector_of,
    loss_keys,
    method_opts,
    parse_methods,
)
from nst_det.pipeline.plan import (
    TOY_CONFIGS,
    TOY_RETINANET_CONFIGS,
    TOY_SCALES,
    Stage,
    build_plan,
)
from nst_det.pipeline.records import STAGE_FILE, definition
from nst_det.pipeline.report_methods import methods_section
from nst_det.pipeline.run import PipelineRunner

REPO = Path(__file__).resolve().parents[1]
NST_CONFIG = str(REPO / TOY_CONFIGS.det_student_nst)
RETINA_NST_CONFIG = str(REPO / TOY_RETINANET_CONFIGS.det_student_nst)
TOY = REPO / "configs" / "quick_schedules"
DET_METHODS = ["cwd", "pkd", "mgd", "fgd", "defeat", "fgfi", "reviewkd", "dkd"]
FEATURE_METHODS = DET_METHODS[:-1]


@pytest.mark.parametrize("method", list(METHODS))
def test_method_opts_select_exactly_the_methods_losses(method):
    weights = {k: 0.5 + i for i, k in enumerate(loss_keys(method))}
    detector = detector_of(load_config(NST_CONFIG))
    cfg = load_config(NST_CONFIG, method_opts(method, weights, detector))
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
        assert calib.kind == "calibrate"
        assert calib.inputs == {"method": method, "rule": CALIBRATION}
        for seed in (0, 1):
            run, base = by_name[f"det_method_{slug}_s{seed}"], by_name[f"det_plain_detnst_s{seed}"]
            assert run.config == str(tmp_path / f"calibrate_{slug}" / "method.yaml")
            strip = [i for i, o in enumerate(base.opts) if o == "OUTPUT_DIR"][0]
            same = base.opts[:strip] + base.opts[strip + 2:]
            assert run.opts == [*same, "OUTPUT_DIR", run.out_dir]
            assert set(run.after) == {*base.after, calib.name}
            assert run.meta == {"stage": "det", "role": "method", "method": method, "seed": seed}
    # a calibration reads no other calibration; the report waits for every method run
    assert by_name["calibrate_kd_nst"].after == by_name["det_plain_detnst_s0"].after
    assert "det_method_kd_nst_s1" in by_name["report"].after
    assert stages[-1].kind == "report"
    assert add_method_stages(plan, []) is plan


def test_another_method_list_keeps_the_finished_method_runs_and_a_new_rule_redoes_them(
        tmp_path, monkeypatch):
    plan = build_plan(str(tmp_path), TOY_SCALES["ci"], TOY_CONFIGS)
    for stage in add_method_stages(plan, ["nst_poly", "kd+nst"]):  # all finished, as recorded
        os.makedirs(stage.out_dir, exist_ok=True)
        with open(os.path.join(stage.out_dir, STAGE_FILE), "w") as f:
            json.dump({"name": stage.name, "metrics": {}, "seconds": 1.0, "run_id": stage.name,
                       "inputs": {n: n for n in stage.after},
                       "definition": definition(stage, str(tmp_path))}, f)

    def states(methods):
        runner = PipelineRunner(add_method_stages(plan, methods), {}, root=str(tmp_path))
        return {name: state for name, (state, _, _) in runner.states().items()}

    assert {n: s for n, s in states(["nst_poly", "kd+nst"]).items() if s != "done"} == {}
    # kd+nst's calibration once followed nst_poly's: dropping or adding a method redid it;
    # now only the summaries, which read every training run, are redone
    assert {n for n, state in states(["kd+nst"]).items() if state != "done"} == {
        "export", "report"}
    grown = states(["nst_poly", "sp", "kd+nst"])
    assert {n for n, state in grown.items() if state != "done"} == {
        "calibrate_sp", "det_method_sp_s0", "export", "report"}
    monkeypatch.setitem(CALIBRATION, "fraction", 0.5)  # another rule: the weights are redone
    assert {n for n, state in states(["kd+nst"]).items() if state != "done"} == {
        "calibrate_kd_nst", "det_method_kd_nst_s0", "export", "report"}


def test_the_detection_methods_are_on_the_methods_axis():
    assert set(DET_METHODS) <= set(METHODS) and set(DETECTION) == set(DET_METHODS)
    assert parse_methods(",".join(DET_METHODS)) == DET_METHODS
    assert parse_methods("all") == list(METHODS)
    assert all(loss_keys(m) == [f"loss_{m}"] for m in DET_METHODS)
    with pytest.raises(ValueError, match="detector"):
        method_opts("fgd")  # its levels depend on the detector


def _toy_method_cfg(kind, method):
    """The method's own toy config (the reference setting, docs/detection_methods.md)."""
    prefix = {"rcnn": "faster_rcnn", "retinanet": "retinanet"}[kind]
    return load_config(str(TOY / f"{prefix}_R_18_FPN_toy_{method}.yaml"))


def _namespace(cfg, method):
    return dict(cfg.MODEL[method.upper()]) if method.upper() in cfg.MODEL else {}


def _same_setting(cfg, toy, method, warmup):
    """cfg runs `method` as its toy config does, but for the weight and FGFI's warm-up."""
    assert list(cfg.MODEL.TRANSFER.NAMES) == [method]
    assert cfg.MODEL.NST.LOSS_WEIGHT == 0 and cfg.MODEL.KD.LOSS_WEIGHT == 0
    assert cfg.MODEL.META_ARCHITECTURE == toy.MODEL.META_ARCHITECTURE
    if method != "dkd":  # DKD is on the RoI logits: no feature pairs
        for key in ("STUDENT_FEATURES", "TEACHER_FEATURES", "FEATURE_WEIGHTS"):
            assert list(cfg.MODEL.DISTILL[key]) == list(toy.MODEL.DISTILL[key]), (method, key)
    expected = _namespace(toy, method)
    if method == "fgfi":
        expected["WARMUP_ITERS"] = warmup
    assert _namespace(cfg, method) == pytest.approx(expected), method


@pytest.mark.parametrize("plan_configs,kind,methods", [
    (TOY_CONFIGS, "rcnn", DET_METHODS), (TOY_RETINANET_CONFIGS, "retinanet", FEATURE_METHODS)])
def test_plan_has_a_calibrated_detection_stage_per_new_method(tmp_path, plan_configs, kind,
                                                              methods):
    scale = replace(TOY_SCALES["demo"], seeds=(0, 1))
    plan = build_plan(str(tmp_path), scale, plan_configs)
    stages = add_method_stages(plan, methods)
    by_name = {s.name: s for s in stages}
    assert len(stages) == len(plan) + len(methods) * 3
    for method in methods:
        toy = _toy_method_cfg(kind, method)
        calib = by_name[f"calibrate_{method}"]
        assert calib.config == plan_configs.det_student_nst
        assert calib.inputs["method"] == method and calib.inputs["detector"]["kind"] == kind
        # the calibration measures the method at weight 1 with FGFI's warm-up off
        calib_cfg = load_config(calib.config, calib.opts)
        _same_setting(calib_cfg, toy, method, warmup=0)
        assert list(calib_cfg.MODEL.TRANSFER.WEIGHTS) == [1.0]
        # what the calibration writes, and the training stages run from it
        yaml = Path(calib.out_dir) / "method.yaml"
        yaml.parent.mkdir(parents=True)
        yaml.write_text(opts_to_yaml(calib.config, method_opts(
            method, {f"loss_{method}": 0.37}, calib.inputs["detector"])))
        for seed in (0, 1):
            run = by_name[f"det_method_{method}_s{seed}"]
            assert run.config == str(yaml) and calib.name in run.after
            assert run.meta["method"] == method and run.meta["seed"] == seed
            cfg = load_config(run.config, run.opts)
            _same_setting(cfg, toy, method, warmup=20)  # 120 iterations: a sixth
            assert list(cfg.MODEL.TRANSFER.WEIGHTS) == pytest.approx([0.37])
            assert cfg.SEED == seed and cfg.OUTPUT_DIR == run.out_dir
    if kind == "retinanet":
        with pytest.raises(ValueError, match="dkd"):
            add_method_stages(plan, ["dkd"])


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


RETINA_TINY = ["MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50"]


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory):
    """{kind: (teacher yaml, weights)}: random tiny R-CNN and RetinaNet teachers, saved once."""
    from _detection_common import make_cfg, write_teacher
    from detectron2.modeling import build_model

    tmp = tmp_path_factory.mktemp("teachers")
    cfg = make_cfg(TOY / "retinanet_R_34_FPN_toy_teacher.yaml", ["MODEL.WEIGHTS", "",
                                                                *RETINA_TINY])
    torch.manual_seed(7)
    weights = tmp / "retina_teacher.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    yaml = tmp / "retina_teacher.yaml"
    yaml.write_text(cfg.dump())
    return {"rcnn": write_teacher(tmp), "retinanet": (yaml, weights)}


def _tiny_batches(n):
    """n batches of two small images with GT boxes (the second touches the bottom/right)."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        batch = []
        for (h, w), boxes, classes in (((90, 120), [[8.0, 10.0, 60.0, 70.0]], [1]),
                                       ((70, 100), [[50.0, 30.0, 100.0, 70.0]], [2])):
            inst = Instances((h, w))
            inst.gt_boxes, inst.gt_classes = Boxes(torch.tensor(boxes)), torch.tensor(classes)
            image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g)
            batch.append({"image": image, "instances": inst, "height": h, "width": w})
        batches.append(batch)
    return batches


CALIBRATION_CASES = ([("rcnn", m) for m in DET_METHODS]
                     + [("retinanet", m) for m in FEATURE_METHODS])


@pytest.mark.parametrize("kind,method", CALIBRATION_CASES,
                         ids=[f"{k}-{m}" for k, m in CALIBRATION_CASES])
def test_calibration_measures_and_times_every_method_through_the_core(tiny_teachers, kind,
                                                                       method):
    from _detection_common import make_cfg
    from detectron2.modeling import build_model

    base = {"rcnn": NST_CONFIG, "retinanet": RETINA_NST_CONFIG}[kind]
    teacher_yaml, teacher_weights = tiny_teachers[kind]
    cfg = make_cfg(base, [
        "MODEL.WEIGHTS", "", *(RETINA_TINY if kind == "retinanet" else []),
        "MODEL.TEACHER.CONFIG_FILE", str(teacher_yaml),
        "MODEL.TEACHER.WEIGHTS", str(teacher_weights),
        *method_opts(method, detector=detector_of(load_config(base)))])
    if method == "fgfi":  # the calibration opts: FGFI would read 0 at iteration 0 otherwise
        assert cfg.MODEL.FGFI.WARMUP_ITERS == 0
    torch.manual_seed(0)
    model = build_model(cfg).train()
    keys = loss_keys(method)
    detection, raw, recorded = measure(model, _tiny_batches(2), keys)
    assert "feature_losses" not in vars(model.distill) and "kd" not in vars(model.distill)
    assert set(recorded) == ({"feature_losses", "kd"} if method == "dkd" else {"feature_losses"})
    weights = weights_from(detection, raw, 0.25)
    assert set(weights) == set(keys)
    assert all(math.isfinite(w) and w > 0 for w in weights.values()), (raw, detection)
    # the timed step is the core's own loss: learned modules and the student side get gradients
    learned = [p for m in model.distill.regressors.values() for p in m.parameters()]
    model.zero_grad(set_to_none=True)
    method_loss_step(model, recorded)()
    assert all(p.grad is not None for p in learned)
    assert all(p.grad is None for p in model.teacher.parameters())
    ms = time_method_loss(model, recorded, repeats=1)
    assert math.isfinite(ms) and ms > 0


def test_recorded_core_inputs_are_the_calls_arguments():
    class Core:
        def feature_losses(self, s, t, **extras):
            return {"loss_x": sum((s[k] * t[k]).sum() for k in s)}

        def kd(self, a, b, **extras):
            return {}

    core, record = Core(), {}
    s, t, boxes = torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 3.0), [torch.zeros(1, 4)]
    with record_core_inputs(core, record):
        core.feature_losses({"p2": s}, {"p2": t}, gt_boxes=boxes)
        core.feature_losses({"p2": 2 * s}, {"p2": t})  # only the first call is kept
    assert record["feature_losses"][0][0]["p2"] is s and record["feature_losses"][1] == {
        "gt_boxes": boxes}
    assert "kd" not in record and "feature_losses" not in vars(core)


def test_every_stage_of_the_fullest_plan_has_a_duration_estimate(tmp_path):
    # the runner's ETA needs an estimate of every stage before it starts; --weight-grid once
    # ended on a KeyError for its "weight_grid" stages before any job started
    from nst_det.pipeline.run import PRIOR_SEC_PER_ITER, SEC_PER_STAGE, PipelineRunner

    stages = add_method_stages(build_plan(str(tmp_path), TOY_SCALES["ci"], TOY_CONFIGS),
                               parse_methods(",".join(METHODS)), weight_grid=True,
                               controls=True)
    kinds = {s.kind for s in stages}
    assert {"train", "calibrate", "weight_grid", "select_weight", "export", "report"} <= kinds
    runner = PipelineRunner(stages, {})
    runner._waiting = {s.name: s for s in stages}  # as run() holds them before any job starts
    iters = sum(s.iters for s in stages if s.kind == "train")
    assert runner._eta() >= len(stages) * SEC_PER_STAGE + iters * min(PRIOR_SEC_PER_ITER.values())
