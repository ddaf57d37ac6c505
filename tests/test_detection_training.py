"""Toy distillation runs end to end: VOC evaluation, teacher vs student, resume, 2-process gloo."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from _detection_common import (
    NST_TOY,
    R18_FPN_TOY,
    distill_opts,
    distributed_worker,
    load_train_net,
    make_cfg,
    write_teacher,
)
from detectron2.engine import launch

from nst_det.data.toy_world import TOY_CLASSES
from nst_det.engine import DetectionTrainer
from nst_det.engine.teacher_eval import TeacherEvalHook

pytestmark = pytest.mark.slow


def _metrics(output_dir):
    with open(output_dir / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def _run(train_net, config_file, *extra):
    args = train_net.default_argument_parser().parse_args(["--config-file", str(config_file),
                                                           *extra])
    return train_net.main(args)


def test_toy_distillation_run_evaluates_and_resumes(tmp_path, tiny_voc):
    teacher = write_teacher(tmp_path)
    out = tmp_path / "run"
    cfg = make_cfg(
        NST_TOY,  # the real toy distillation config, with a tiny teacher, data and schedule
        distill_opts(*teacher, kd=1.0) + [
            "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
            "MODEL.WEIGHTS", "",  # no classification-stage weights in tests
        ],
        data=tiny_voc[:2], output_dir=out,
    )
    config_file = tmp_path / "nst.yaml"
    config_file.write_text(cfg.dump())
    train_net = load_train_net()

    _run(train_net, config_file)
    teacher_metrics = json.loads((out / "teacher_metrics.json").read_text())
    assert math.isfinite(teacher_metrics["bbox/AP50"])
    metrics = _metrics(out)
    assert any("teacher/bbox/AP50" in m for m in metrics)
    evals = {m["iteration"]: m["bbox/AP50"] for m in metrics if "bbox/AP50" in m}
    assert sorted(evals) == [1, 4] and all(math.isfinite(v) for v in evals.values())  # 2, end
    # the trainer's evaluator also reports AP50 per class (the pipeline report's bar chart)
    per_class = [k for k in metrics[-1] if k.startswith("bbox/AP50-")]
    assert sorted(per_class) == [f"bbox/AP50-{c}" for c in sorted(TOY_CLASSES)]
    nst = [m["loss_nst"] for m in metrics if "loss_nst" in m]
    assert nst and all(math.isfinite(v) and v > 0 for v in nst)
    assert any("loss_kd" in m for m in metrics)
    assert "Teacher vs student" in (out / "log.txt").read_text()  # the side-by-side table
    for name in ("model_final.pth", "model_best.pth", "model_0000001.pth"):
        state = torch.load(out / name, weights_only=True)["model"]
        assert state and not any("teacher" in k for k in state), name

    # --resume continues from the last checkpoint (model_final, iteration 3) to MAX_ITER 6
    teacher_mtime = (out / "teacher_metrics.json").stat().st_mtime_ns
    _run(train_net, config_file, "--resume", "SOLVER.MAX_ITER", "6")
    iterations = [m["iteration"] for m in _metrics(out) if "loss_nst" in m]
    assert sorted(set(iterations)) == [3, 5]  # the writer's last line of each run: 3, then 5
    assert (out / "teacher_metrics.json").stat().st_mtime_ns == teacher_mtime  # evaluated once


def test_teacher_evaluation_before_training_can_be_turned_off(tmp_path, tiny_voc):
    teacher = write_teacher(tmp_path)
    cfg = make_cfg(NST_TOY, distill_opts(*teacher) + ["MODEL.WEIGHTS", ""],
                   data=tiny_voc[:2], output_dir=tmp_path / "out")
    hooks = {flag: DetectionTrainer(_with(cfg, flag))._hooks for flag in (True, False)}
    assert any(isinstance(h, TeacherEvalHook) for h in hooks[True])
    assert not any(isinstance(h, TeacherEvalHook) for h in hooks[False])


def test_a_teacher_of_other_classes_is_not_evaluated_on_the_students_test_set(
        tmp_path, tiny_voc, caplog):
    """A teacher for feature losses may predict other classes (a zoo model's 80): its ids would
    be scored as the test set's classes (VOC) or end the evaluation (COCO)."""
    teacher = write_teacher(tmp_path, ["MODEL.ROI_HEADS.NUM_CLASSES", "8"], name="eight")
    cfg = make_cfg(NST_TOY, distill_opts(*teacher) + ["MODEL.WEIGHTS", ""],
                   data=tiny_voc[:2], output_dir=tmp_path / "out")
    hooks = DetectionTrainer(_with(cfg, True))._hooks
    assert not any(isinstance(h, TeacherEvalHook) for h in hooks)
    assert "The teacher predicts 8 classes, the test sets have 5" in caplog.text


def _with(cfg, eval_teacher: bool):
    cfg = cfg.clone()
    cfg.MODEL.TEACHER.EVAL_BEFORE_TRAIN = eval_teacher
    return cfg


def test_two_process_gloo_distillation(tmp_path, tiny_voc):
    teacher = write_teacher(tmp_path)
    out = tmp_path / "ddp"
    cfg = make_cfg(NST_TOY, distill_opts(*teacher, kd=1.0) + ["SOLVER.MAX_ITER", "2",
                                                             "MODEL.WEIGHTS", ""],
                   data=tiny_voc[:2], output_dir=out)
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(cfg.dump())
    prefix = tiny_voc[0][: -len("_trainval")]
    launch(distributed_worker, 2, dist_url="auto",
           args=(str(config_file), prefix, tiny_voc[2], (8, 4)))
    assert (out / "model_final.pth").exists()
    assert (out / "teacher_metrics.json").exists()
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert not any("teacher" in k for k in state)


@pytest.mark.slow
def test_a_two_process_run_resumed_ends_as_the_uninterrupted_one(tmp_path, tiny_voc):
    """Each rank resumes its own RNG state: with rank 0's on every rank (all a checkpoint
    written by rank 0 alone held) rank 1's RPN/RoI sampling differed, and 129 of 150 tensors of
    model_final with it."""
    prefix = tiny_voc[0][: -len("_trainval")]
    finals = {}
    for name in ("whole", "resumed"):
        out = tmp_path / name
        cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "4", "SEED", "7",
                                     "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.IMS_PER_BATCH", "4"],
                       data=tiny_voc[:2], output_dir=out)
        cfg.DATASETS.TEST = ()  # no evaluation: the weights alone are compared
        config_file = tmp_path / f"{name}.yaml"
        config_file.write_text(cfg.dump())
        if name == "resumed":  # as if stopped after iteration 1's checkpoint
            out.mkdir()
            (out / "model_0000001.pth").write_bytes(
                (tmp_path / "whole" / "model_0000001.pth").read_bytes())
            (out / "last_checkpoint").write_text("model_0000001.pth")
        launch(distributed_worker, 2, dist_url="auto",
               args=(str(config_file), prefix, tiny_voc[2], (8, 4), name == "resumed"))
        finals[name] = torch.load(out / "model_final.pth", weights_only=True)["model"]
    # it did resume (a run started afresh with the same SEED would end the same too)
    assert "Starting training from iteration 2" in (tmp_path / "resumed" / "log.txt").read_text()
    differ = [k for k in finals["whole"] if not torch.equal(finals["whole"][k],
                                                            finals["resumed"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_an_evaluation_leaves_the_global_random_state_as_it_found_it(tmp_path, tiny_voc):
    """The test loader draws its base seed from torch's global RNG: an evaluation after a
    checkpoint moved the stream that a run resumed from that checkpoint, which skips the
    evaluation, did not (its RPN/ROI sampling then differed: 129 of 150 tensors)."""
    import random

    import numpy as np
    from detectron2.modeling import build_model

    cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", ""], data=tiny_voc[:2],
                   output_dir=tmp_path / "out")
    model = build_model(cfg).eval()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert "bbox" in DetectionTrainer.test(cfg, model)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()


def test_a_resumed_run_keeps_the_best_model_of_before_its_interruption(tmp_path, tiny_voc):
    """detectron2's BestCheckpointer kept its best metric in memory only: the first evaluation
    after a resume replaced model_best.pth, however much worse it was. The trainer's checkpoint
    of an iteration is written before that iteration's evaluation, so it cannot hold it."""
    from detectron2.utils.events import EventStorage

    from nst_det.engine.best_checkpoint import ResumableBestCheckpointer

    out = tmp_path / "out"
    cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "8",
                                 "TEST.EVAL_PERIOD", "2"], data=tiny_voc[:2], output_dir=out)

    def at(iteration, trainer, ap50=None):
        """The best hook of `trainer` at `iteration`: its start, or an evaluation's end."""
        (hook,) = [h for h in trainer._hooks if isinstance(h, ResumableBestCheckpointer)]
        trainer.iter = iteration
        if ap50 is None:
            hook.before_train()
        else:
            with torch.no_grad():  # trained since the last evaluation (unchanged weights would
                next(trainer.model.parameters()).add_(0.1)  # share model_best's file)
            with EventStorage(iteration) as trainer.storage:
                trainer.storage.put_scalar("bbox/AP50", ap50, smoothing_hint=False)
                hook.after_step()
        return hook

    def best_file_iteration():
        return torch.load(out / "model_best.pth", weights_only=False)["iteration"]

    first = DetectionTrainer(cfg)
    at(0, first)
    at(1, first, 1.212)  # evaluated after its checkpoint: only the record file knows it
    at(3, first, 2.5)  # a better one, then the run is killed after iteration 3's evaluation
    assert best_file_iteration() == 3
    resumed = DetectionTrainer(cfg)  # from iteration 1's checkpoint: 2, 3, ... run again
    hook = at(2, resumed)
    assert (hook.best_iter, hook.best_metric) == (1, 1.212)
    at(3, resumed, 0.5)  # worse than the best before iteration 2: model_best is kept
    assert best_file_iteration() == 3 and hook.best_iter == 1
    at(5, resumed, 1.5)
    assert best_file_iteration() == 5 and (hook.best_iter, hook.best_metric) == (5, 1.5)
    again = at(0, DetectionTrainer(cfg))  # a fresh run in the same folder forgets the record
    assert again.best_metric is None and not json.loads((out / "model_best.json").read_text())
    # a checkpoint of the version before the record file held the best itself
    (out / "model_best.json").unlink()
    older = DetectionTrainer(cfg)
    older.load_state_dict({**older.state_dict(), "hooks": {
        "ResumableBestCheckpointer": {"best_metric": 2.5, "best_iter": 3}}})
    assert (at(4, older).best_iter, at(4, older).best_metric) == (3, 2.5)


def test_kd_from_a_teacher_trained_on_the_classes_in_another_order_is_refused(
        tmp_path, tiny_voc):
    """Only the class count was checked: logit i of the teacher meant another class than the
    student's, and KD/DKD pushed the student towards it."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = f"reversed_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(thing_classes=list(reversed(sorted(TOY_CLASSES))))
    try:
        teacher = write_teacher(tmp_path, ["DATASETS.TRAIN", f"('{name}',)"], name="reversed")
        cfg = make_cfg(NST_TOY, distill_opts(*teacher, kd=1.0) + ["MODEL.WEIGHTS", ""],
                       data=tiny_voc[:2], output_dir=tmp_path / "out")
        with pytest.raises(ValueError, match=r"its training set names its classes \['triangle', "
                                             r"'star', .* the student's \['circle', "
                                             r"'triangle'"):
            DetectionTrainer(cfg)
        cfg.MODEL.KD.LOSS_WEIGHT = 0.0  # features only: the classes are not compared
        DetectionTrainer(cfg)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.parametrize("classes", ["cross,star,square,triangle,circle", ""])
def test_kd_from_a_teacher_whose_own_config_declares_its_set_compares_its_classes(
        tmp_path, tiny_voc, classes):
    """A teacher's config registers none of its sets (they may have moved), so the class list of
    a set declared only there is read from its DATASETS.VOC entry (given, or found in the
    folder): KD against it was no longer compared."""
    from detectron2.data import DatasetCatalog

    voc = tmp_path / "VOC2007"
    shutil.copytree(tiny_voc[2], voc)
    if not classes:  # the names found in the folder: rename two classes there
        for xml in (voc / "Annotations").glob("*.xml"):
            xml.write_text(xml.read_text().replace("<name>circle</name>", "<name>zz</name>"))
    name = f"teacher_only_{tmp_path.name}"
    teacher = write_teacher(tmp_path, ["DATASETS.VOC", repr([[name, str(voc), "trainval",
                                                              classes]]),
                                       "DATASETS.TRAIN", f"('{name}',)"], name="declared")
    cfg = make_cfg(NST_TOY, distill_opts(*teacher, kd=1.0) + ["MODEL.WEIGHTS", ""],
                   data=tiny_voc[:2], output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"its training set names its classes \['(cross|cross',"
                                         r" 'square|square)'"):
        DetectionTrainer(cfg)
    assert name not in DatasetCatalog.list()


def test_expected_results_are_verified_on_the_first_test_set_and_after_eval_only(
        tmp_path, tiny_voc):
    """--eval-only ignored TEST.EXPECTED_RESULTS (detectron2's train_net verifies them), and
    with several test sets the verification ended on a bare KeyError after training."""
    from nst_det.engine.train_or_evaluate import train_or_evaluate

    cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "TEST.EXPECTED_RESULTS",
                                 "[['bbox', 'AP50', 99.0, 0.1]]"], data=tiny_voc[:2],
                   output_dir=tmp_path / "out")
    with pytest.raises(SystemExit) as verdict:  # a random detector is far from AP50 99
        train_or_evaluate(cfg, eval_only=True)
    assert verdict.value.code == 1  # detectron2's verify_results: failed (not a clean exit)
    cfg.DATASETS.TEST = (tiny_voc[1], tiny_voc[1] + "_again")
    results = {tiny_voc[1]: {"bbox": {"AP50": 99.05}}, cfg.DATASETS.TEST[1]: {"bbox": {}}}
    DetectionTrainer.verify_expected(cfg, results)  # the first set's: met
    results[tiny_voc[1]]["bbox"]["AP50"] = 50.0
    with pytest.raises(SystemExit) as verdict:
        DetectionTrainer.verify_expected(cfg, results)
    assert verdict.value.code == 1
    cfg.TEST.EXPECTED_RESULTS = [["segm", "AP", 1.0, 0.1]]
    with pytest.raises(ValueError, match=r"names tasks \['segm'\].*reports \['bbox'\]"):
        DetectionTrainer.verify_expected(cfg, results)


def test_a_resume_past_max_iter_is_refused(tmp_path, tiny_voc):
    """A checkpoint of iteration 5 resumed with SOLVER.MAX_ITER 4 'trained' from iteration 6 and
    labelled its unchanged weights model_final of iteration 3."""
    out = tmp_path / "out"

    def trainer(max_iter):
        return DetectionTrainer(make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "SOLVER.MAX_ITER",
                                                       str(max_iter)], data=tiny_voc[:2],
                                         output_dir=out))

    first = trainer(8)
    first.iter = 5
    first.checkpointer.save("model_0000005", iteration=5)
    with pytest.raises(ValueError, match=r"model_0000005.pth ended iteration 5, past "
                                         r"SOLVER.MAX_ITER 4"):
        trainer(4).resume_or_load(resume=True)
    resumed = trainer(6)  # the last iteration was done: only the final evaluation is left
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 6


def test_best_metric_and_test_sets_are_checked_and_one_evaluator_is_accepted(tmp_path, tiny_voc):
    from detectron2.modeling import build_model

    from nst_det.evaluation import PerClassVOCEvaluator

    cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "NST_DET.BEST_METRIC", "ap50"],
                   data=tiny_voc[:2], output_dir=tmp_path / "out")
    # a key the evaluation does not report: model_best was never written, with a warning only
    with pytest.raises(ValueError, match=r"BEST_METRIC 'ap50' is not reported.*'AP50'"):
        DetectionTrainer.best_metric(cfg)
    cfg.NST_DET.BEST_METRIC = "AP50-circle"
    assert DetectionTrainer.best_metric(cfg) == "bbox/AP50-circle"
    cfg.NST_DET.BEST_METRIC = "AP50-circel"  # not one of the set's classes
    with pytest.raises(ValueError, match="'AP50-circel' is not reported"):
        DetectionTrainer.best_metric(cfg)
    cfg.NST_DET.BEST_METRIC = ""
    cfg.DATASETS.TEST = (tiny_voc[1], tiny_voc[1])  # results are keyed by set name
    with pytest.raises(ValueError, match="names a set twice"):
        DetectionTrainer(cfg)
    cfg.DATASETS.TEST = (tiny_voc[1],)
    model = build_model(cfg).eval()
    assert "bbox" in DetectionTrainer.test(cfg, model, PerClassVOCEvaluator(tiny_voc[1]))
