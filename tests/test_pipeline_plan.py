"""The pipeline plan compares like with like: runs of a comparison differ only by the method."""

from __future__ import annotations

from pathlib import Path

import pytest
from detectron2.config import CfgNode

from nst_det.config import load_config
from nst_det.pipeline.plan import PAPER_CONFIGS, TOY_CONFIGS, TOY_PLANS, TOY_SCALES, build_plan

REPO = Path(__file__).resolve().parents[1]
# what a distillation run may add to its baseline: the method, and where it writes
DISTILLATION_KEYS = ("MODEL.META_ARCHITECTURE", "MODEL.TEACHER.", "MODEL.NST.", "MODEL.KD.",
                     "MODEL.DISTILL.", "OUTPUT_DIR")


def _flat(cfg: CfgNode, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, CfgNode):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _differences(a: str, b: str) -> list[str]:
    fa, fb = _flat(load_config(str(REPO / a))), _flat(load_config(str(REPO / b)))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


@pytest.mark.parametrize("configs", [TOY_CONFIGS, PAPER_CONFIGS, *TOY_PLANS.values()],
                         ids=["toy", "paper", *(f"toy_{k}" for k in TOY_PLANS)])
def test_detection_students_differ_only_by_distillation(configs):
    differences = _differences(configs.det_student, configs.det_student_nst)
    assert differences, "the NST config must change something"
    assert [k for k in differences if not k.startswith(DISTILLATION_KEYS)] == []


def test_every_detection_student_of_a_seed_starts_from_its_own_pretrained_backbone(tmp_path):
    stages = build_plan(str(tmp_path), TOY_SCALES["demo"], TOY_CONFIGS)
    students = [s for s in stages if s.meta.get("stage") == "det" and s.meta["role"] == "student"]
    assert len(students) == 2 * len(TOY_CONFIGS.cls_students) * len(TOY_SCALES["demo"].seeds)
    for stage in students:
        weights = stage.opts[stage.opts.index("MODEL.WEIGHTS") + 1]
        assert f"cls_{stage.meta['method']}_s{stage.meta['seed']}" in weights
        # with and without detection-stage NST: the same schedule and seed
        twin = next(s for s in students if s.meta["method"] == stage.meta["method"]
                    and s.meta["seed"] == stage.meta["seed"] and s is not stage)
        assert stage.iters == twin.iters


def test_train_opts_reach_every_training_stage(tmp_path):
    amp = ["SOLVER.AMP.ENABLED", "True"]
    stages = build_plan(str(tmp_path), TOY_SCALES["ci"], TOY_CONFIGS, train_opts=amp)
    trained = [s for s in stages if s.kind == "train"]
    assert len(trained) == 11  # 1 + 3 classification, 1 + 6 detection
    for stage in trained:
        assert stage.opts[:2] == amp  # first, so a stage's own overrides still win
        assert load_config(str(REPO / stage.config), stage.opts).SOLVER.AMP.ENABLED


@pytest.mark.parametrize("name", ["mnv3", "retinanet"])
def test_other_toy_plans_load_every_training_config(tmp_path, name):
    stages = build_plan(str(tmp_path), TOY_SCALES["ci"], TOY_PLANS[name])
    archs = set()
    for stage in stages:
        if stage.kind == "train":
            cfg = load_config(str(REPO / stage.config), stage.opts)
            archs.add(cfg.MODEL.CLASSIFIER.ARCH if stage.meta["stage"] == "cls"
                      else cfg.MODEL.META_ARCHITECTURE)
    expected = {"mnv3": {"mobilenet_v3_large", "resnet34", "GeneralizedRCNN", "DistillationRCNN"},
                "retinanet": {"resnet18", "resnet34", "RetinaNet", "DistillationRetinaNet"}}
    assert archs == expected[name]


def test_selected_stages_are_the_named_ones_and_what_they_read(tmp_path):
    from nst_det.pipeline.plan import select_stages

    stages = build_plan(str(tmp_path), TOY_SCALES["ci"], TOY_CONFIGS)
    picked = select_stages(stages, ["det_nst_detnst_s0"])
    # plan order: the teacher detector is listed right after the classification teacher
    assert [s.name for s in picked] == ["cls_teacher", "det_teacher", "cls_nst_s0",
                                        "det_nst_detnst_s0"]
    names = {s.name for s in picked}
    assert all(set(s.after) <= names for s in picked)  # a runnable plan on its own
    assert [s.name for s in select_stages(stages, ["cls_teacher"])] == ["cls_teacher"]
    with pytest.raises(ValueError, match="no stage named det_teacherr.*det_teacher"):
        select_stages(stages, ["det_teacherr"])


@pytest.mark.parametrize("args, says", [
    (["--seeds", "a"], "argument --seeds: 'a' is not a comma-separated list of integers"),
    (["--seeds", "0,,1"], "argument --seeds: '0,,1' is not a comma-separated list"),
    (["--seeds", "0,1,0"], "argument --seeds: '0,1,0': give each seed once, each >= 0"),
    (["--seeds", "-1"], "argument --seeds: '-1': give each seed once, each >= 0"),
    (["--jobs", "0"], "argument --jobs: '0': give a whole number >= 1"),
    # train_net's options, which default_argument_parser also has: ignored before
    (["--config-file", "x.yaml", "--resume"], "--config-file, --resume: tools/train_net.py's "
     "options, not the pipeline's"),
    (["SOLVER.MAX_ITER", "5"], "KEY VALUE: tools/train_net.py's options"),
    # tracebacks before
    (["--slurm-time", "abc"], "--slurm-time 'abc': give a whole number, or KIND=NUMBER"),
    (["--slurm-gpus", "cls=x"], "--slurm-gpus 'cls=x': give a whole number"),
    (["--slurm-sbatch", "qos"], "--slurm-sbatch 'qos': give KEY=VALUE"),
    (["--slurm-config", "/nonexistent.yaml"], "--slurm-config /nonexistent.yaml: no such file"),
    (["--methods", "bogus"], "unknown method(s) ['bogus']"),
    (["--weight-grid"], "--weight-grid picks the loss weight of each of --methods"),  # ignored
])
def test_bad_pipeline_arguments_are_refused_by_name(args, says, capsys):
    tool = _run_pipeline_tool()
    assert tool.parse_args(["--seeds", "2,0,1", "--jobs", "3"]).seeds == (2, 0, 1)
    with pytest.raises(SystemExit):
        tool.parse_args(args)
    assert says in capsys.readouterr().err


def _run_pipeline_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("nst_run_pipeline",
                                                  REPO / "tools" / "run_pipeline.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("args, says", [
    (["--toy-students", "retinanet", "--methods", "dkd"], "method 'dkd' has no retinanet"),
    (["--paper", "--methods", "nst_poly", "--weight-grid"], "--weight-grid needs a validation"),
])
def test_options_that_do_not_fit_the_plan_are_named_without_a_traceback(args, says, tmp_path,
                                                                       monkeypatch):
    tool = _run_pipeline_tool()
    monkeypatch.setattr(tool, "exit_on_sigterm", lambda: None)  # pytest's own handler stays
    with pytest.raises(SystemExit, match=says):  # a ValueError's traceback before
        tool.main(["--output", str(tmp_path), "--status", *args])


def test_local_stages_see_the_gpu_at_one_gpu(monkeypatch):
    tool = _run_pipeline_tool()
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    # submitit's local executor hides the GPUs of a job given none: --num-gpus 1 gave none
    assert tool.cluster_settings(tool.parse_args([])).gpus == {"default": 1}
    assert tool.cluster_settings(tool.parse_args(["--num-gpus", "2"])).gpus == {"default": 2}
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert tool.cluster_settings(tool.parse_args([])).gpus == {}
