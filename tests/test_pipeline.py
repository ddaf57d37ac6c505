"""The main job at reduced size: every stage runs, every artefact exists, every reported number
is finite and comes from a run's metrics file, and a second run skips what is done."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# the methods benchmark's mechanics at CI scale: one method through the weight grid (weights
# chosen on the toy minival split), and the two controls
METHODS_ARGS = ["--methods", "pkd", "--weight-grid", "--controls"]


@pytest.fixture(scope="module")
def pipeline_run(module_tmp_path):
    root = module_tmp_path
    # an empty data root and two stages side by side, as `make demo` on a fresh clone: the
    # classification teacher and the plain student start together and both ask for the toy
    # set (toy_cls_tiny has the demo's number of training images, so writing it takes long
    # enough for them to race; an unsafe writer once deleted the copy the other stage read)
    assert not (root / "datasets").exists()
    env = dict(os.environ, DETECTRON2_DATASETS=str(root / "datasets"))
    cmd = [sys.executable, str(REPO / "tools" / "run_pipeline.py"), "--scale", "ci",
           "--jobs", "2", "--output", str(root / "out"), *METHODS_ARGS]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    # one finished copy of each set, no writer's leftovers beside it
    toy = root / "datasets" / "toy"
    assert (toy / "cls_tiny" / "toy_spec.json").is_file()
    assert [p.name for p in toy.iterdir() if p.name.startswith(".") and p.is_dir()] == []
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    return root / "out", first.stdout, second.stdout


def _stage(out, name):
    return json.loads((out / name / "stage.json").read_text())


def test_every_stage_and_artefact_exists(pipeline_run):
    out, log, _ = pipeline_run
    assert "pipeline finished" in log and "ETA" in log
    for name in ("cls_teacher", "cls_plain_s0", "cls_nst_s0", "cls_kd_nst_s0", "det_teacher",
                 "det_plain_s0", "det_plain_detnst_s0", "det_nst_s0", "det_nst_detnst_s0",
                 "det_kd_nst_s0", "det_kd_nst_detnst_s0"):
        final = torch.load(out / name / "model_final.pth", map_location="cpu", weights_only=True)
        assert sorted(final) == ["iteration", "model"], name  # no optimizer state: half the disk
        assert _stage(out, name)["kind"] == "train"
    for name in ("cls_teacher", "cls_plain_s0", "cls_nst_s0", "cls_kd_nst_s0"):
        # the classification stage's job converted its model before recording it finished
        converted = _stage(out, name)["d2_backbone"]
        assert converted["file"] == str(out / name / "backbone_d2.pth") and converted["converted"]
        left = set(converted["not_converted"])  # the classifier head and BN's step counters
        assert {"fc.weight", "fc.bias"} <= left, name
        assert all(k.startswith("fc.") or k.endswith(".num_batches_tracked") for k in left)
        assert set(torch.load(converted["file"], weights_only=True)["model"]) >= {
            "stem.conv1.weight", "res5.0.conv1.weight"}
    # one evaluation (at the end) at this size: the best model is model_final, stored once
    best, final = (out / "det_plain_s0" / f"model_{n}.pth" for n in ("best", "final"))
    assert best.stat().st_ino == final.stat().st_ino
    export = _stage(out, "export")["metrics"]
    for fmt in ("checkpoint", "onnx"):
        verification = json.loads((out / "export" / fmt / "verification.json").read_text())
        assert verification["passed"] and export[fmt]["passed"]
    for fig in ("curves", "per_class_ap50", "detections", "selectivity"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 10_000, fig


def test_report_numbers_are_finite_and_traceable(pipeline_run):
    out, _, _ = pipeline_run
    report = (out / "report.md").read_text()
    assert report.startswith("# nst_det reproduction report")
    rows = [line for line in report.splitlines() if line.startswith("| Teacher")
            or line.startswith("| R-18")]
    assert len(rows) == 1 + 3 * 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        for cell in cells:
            assert math.isfinite(float(cell.split(" ± ")[0])), row
    # the teacher row and one student row, against the files they were read from
    teacher = [c.strip() for c in rows[0].strip("|").split("|")]
    cls_top1 = _stage(out, "cls_teacher")["metrics"]["classification"]["top1"]
    det = _stage(out, "det_teacher")["metrics"]["bbox"]
    assert teacher[1:4] == [f"{cls_top1:.1f}", f"{det['AP50']:.1f}", f"{det['AP']:.1f}"]
    nst_row = next(r for r in rows if "R-18 NST → NST" in r)
    ap50 = _stage(out, "det_nst_detnst_s0")["metrics"]["bbox"]["AP50"]
    assert f"{ap50:.1f}" in [c.strip() for c in nst_row.strip("|").split("|")]
    assert re.search(r"MMD² \(poly\).*: [0-9.]+ without .*, [0-9.]+ with it", report)


def _plan(out):
    from nst_det.pipeline.methods import add_method_stages, parse_methods
    from nst_det.pipeline.plan import TOY_CONFIGS, TOY_SCALES, build_plan

    return add_method_stages(build_plan(str(out), TOY_SCALES["ci"], TOY_CONFIGS),
                             parse_methods("pkd"), weight_grid=True, controls=True)


def test_weights_are_chosen_on_minival_and_the_seeds_train_at_the_choice(pipeline_run):
    out, _, _ = pipeline_run
    choice = _stage(out, "select_pkd")["metrics"]["weight_select"]
    grid = {}
    for label in ("x0.25", "x1", "x4"):
        record = _stage(out, f"det_grid_pkd_{label}")
        config = (out / f"det_grid_pkd_{label}" / "config.yaml").read_text()
        assert "- toy_voc_tiny_minival" in config and "toy_voc_tiny_test" not in config, label
        assert record["meta"]["split"] == "minival"
        grid[record["meta"]["factor"]] = record["metrics"]["bbox"]["AP50"]
    assert choice["split"] == "minival" and choice["dataset"] == "toy_voc_tiny_minival"
    assert choice["points"] == [{"factor": f, "AP50": grid[f]} for f in sorted(grid)]
    assert grid[choice["chosen"]] == max(grid.values())
    # the seed trained from the chosen point's config, and was evaluated on test
    chosen = (out / "grid_pkd" / f"x{choice['chosen']:g}.yaml").read_text()
    assert (out / "select_pkd" / "method.yaml").read_text() == chosen
    seed_config = (out / "det_method_pkd_s0" / "config.yaml").read_text()
    weights = _stage(out, "grid_pkd")["metrics"]["weight_grid"]["weights"]
    for label, point in weights.items():  # {"loss_pkd": weight} per grid point
        (weight,) = point.values()
        assert (f"- {weight!r}\n" in seed_config) == (label == f"x{choice['chosen']:g}"), label
    assert "- toy_voc_tiny_test" in seed_config
    report = (out / "report.md").read_text()
    assert "toy_voc_tiny_minival" in report and "control: A/A, expect no difference" in report
    assert "control: hand-set NST" in report
    for name in ("det_control_plain_aa_s0", "det_control_nst_handset_s0"):
        assert math.isfinite(_stage(out, name)["metrics"]["bbox"]["AP50"]), name


def test_second_run_skips_finished_stages(pipeline_run):
    out, _, second = pipeline_run
    stages = _plan(out)
    assert second.count("done earlier: skipped") == len(stages)
    for stage in stages:  # each stage of the plan, by name
        assert f" {stage.name}] done earlier: skipped" in second, stage.name
    assert "starting" not in second
