"""The classification distiller: loss dict, inert teacher, a few trainer iterations on toy data."""

import itertools
import os
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg

from nst_det import add_nst_config
from nst_det.data.imagefolder import register_toy_imagefolder
from nst_det.engine import ClassificationTrainer
from nst_det.modeling.classification import ClassificationDistiller, build_classifier

REPO = Path(__file__).resolve().parents[1]
_counter = itertools.count()


@pytest.fixture(scope="module")
def tiny_cls(module_tmp_path):
    """A registered 4-train / 2-val-per-class toy ImageFolder set of 32 px images."""
    root = module_tmp_path / "tiny_cls"
    prefix = f"tiny_cls_{next(_counter)}"
    train, val = register_toy_imagefolder(prefix, str(root / "cls"), seed=3, train_per_class=4,
                                          val_per_class=2, size=32)
    return train, val


@pytest.fixture(scope="module")
def teacher_file(module_tmp_path):
    """A ResNet-18 'teacher' (random weights, random BN statistics), torchvision layout."""
    torch.manual_seed(1)
    teacher = build_classifier("resnet18", 5)
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
    path = module_tmp_path / "teacher_r18.pth"
    torch.save(teacher.state_dict(), path)
    return str(path)


def _cfg(tiny_cls, teacher_file, tmp_path, **overrides):
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "quick_schedules" / "cls_Base-Toy.yaml"))
    opts = {
        "DATASETS.TRAIN": (tiny_cls[0],), "DATASETS.TEST": (tiny_cls[1],),
        "DATALOADER.NUM_WORKERS": 0, "INPUT.CLS.TRAIN_CROP_SIZE": 32,
        "INPUT.CLS.TEST_RESIZE": 32, "INPUT.CLS.TEST_CROP_SIZE": 32,
        "SOLVER.IMS_PER_BATCH": 4, "SOLVER.MAX_ITER": 3, "SOLVER.WARMUP_ITERS": 1,
        "MODEL.CLASSIFIER.ARCH": "resnet18",
        "MODEL.TEACHER.ARCH": "resnet18", "MODEL.TEACHER.WEIGHTS": teacher_file,
        "MODEL.NST.LOSS_WEIGHT": 25.0, "MODEL.DISTILL.STUDENT_FEATURES": ["res4", "res5"],
        "MODEL.DISTILL.TEACHER_FEATURES": ["res4", "res5"],
        "MODEL.DISTILL.FEATURE_WEIGHTS": [0.5, 0.5],
        "MODEL.KD.LOSS_WEIGHT": 1.0,
        "MODEL.TRANSFER.NAMES": ["at", "fitnet", "class_gaussian_w2"],
        "MODEL.TRANSFER.WEIGHTS": [100.0, 1.0, 1.0],
        "OUTPUT_DIR": str(tmp_path),
    }
    opts.update(overrides)
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    return cfg


def _batch(n=4, size=32):
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8), "label": i % 5}
            for i in range(n)]


def test_loss_dict_and_inert_teacher(tiny_cls, teacher_file, tmp_path):
    model = ClassificationDistiller(_cfg(tiny_cls, teacher_file, tmp_path))
    teacher = model.teacher
    model.train()
    losses = model(_batch())
    assert set(losses) == {"loss_cls", "loss_nst", "loss_kd", "loss_at", "loss_fitnet",
                           "loss_class_gaussian_w2"}
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value) and value > 0, name

    # outside the module tree: no parameters, state_dict entries or submodules of the teacher
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert all(k.startswith(("student.", "distill.regressors.")) for k in model.state_dict())
    assert all(m is not teacher for m in model.modules())
    # frozen and in eval mode, whatever the distiller's mode
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training and model.training
    model.eval()
    model.train()
    assert not teacher.training
    # .to() / dtype casts reach it
    model.double()
    assert next(teacher.parameters()).dtype == torch.float64
    model.float()

    # gradients reach the student (and regressors) only
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.student.conv1.weight.grad is not None
    assert model.distill.regressors["fitnet_0"].conv.weight.grad is not None


def test_eval_returns_logits_per_image(tiny_cls, teacher_file, tmp_path):
    model = ClassificationDistiller(_cfg(tiny_cls, teacher_file, tmp_path)).eval()
    with torch.no_grad():
        out = model(_batch(3))
    assert len(out) == 3 and out[0]["logits"].shape == (5,)


def test_no_teacher_only_ce(tiny_cls, teacher_file, tmp_path):
    cfg = _cfg(tiny_cls, teacher_file, tmp_path, **{
        "MODEL.TEACHER.ARCH": "", "MODEL.NST.LOSS_WEIGHT": 0.0, "MODEL.KD.LOSS_WEIGHT": 0.0,
        "MODEL.TRANSFER.NAMES": [], "MODEL.TRANSFER.WEIGHTS": []})
    model = ClassificationDistiller(cfg).train()
    assert model.teacher is None
    assert set(model(_batch())) == {"loss_cls"}


def test_kd_only_ignores_feature_pairs(tiny_cls, teacher_file, tmp_path):
    cfg = _cfg(tiny_cls, teacher_file, tmp_path, **{
        "MODEL.NST.LOSS_WEIGHT": 0.0, "MODEL.TRANSFER.NAMES": [], "MODEL.TRANSFER.WEIGHTS": [],
        "MODEL.DISTILL.STUDENT_FEATURES": ["unused"],
        "MODEL.DISTILL.TEACHER_FEATURES": ["unused"], "MODEL.DISTILL.FEATURE_WEIGHTS": [1.0]})
    model = ClassificationDistiller(cfg).train()
    assert set(model(_batch())) == {"loss_cls", "loss_kd"}


@pytest.mark.parametrize("overrides,error,match", [
    ({"MODEL.TEACHER.ARCH": ""}, ValueError, "no teacher"),
    ({"MODEL.TEACHER.WEIGHTS": ""}, ValueError, "needs MODEL.TEACHER.WEIGHTS"),
    ({"MODEL.TEACHER.WEIGHTS": "/nonexistent/t.pth"}, FileNotFoundError, "/nonexistent/t.pth"),
    ({"MODEL.TEACHER.ARCH": "resnet34"}, KeyError, "missing keys"),
    ({"MODEL.DISTILL.STUDENT_FEATURES": ["res9", "res5"]}, ValueError,
     r"\['res9'\], which the student does not produce; available: \['res2', 'res3'"),
    ({"MODEL.DISTILL.FEATURE_WEIGHTS": [1.0]}, ValueError, "same length"),
    ({"MODEL.TRANSFER.NAMES": ["nst"], "MODEL.TRANSFER.WEIGHTS": [1.0]}, ValueError,
     "own weight"),
    ({"MODEL.TRANSFER.NAMES": ["bogus"], "MODEL.TRANSFER.WEIGHTS": [1.0]}, KeyError, "bogus"),
])
def test_config_errors(tiny_cls, teacher_file, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        ClassificationDistiller(_cfg(tiny_cls, teacher_file, tmp_path, **overrides))


def test_trainer_few_iterations_teacher_untouched(tiny_cls, teacher_file, tmp_path):
    cfg = _cfg(tiny_cls, teacher_file, tmp_path)
    trainer = ClassificationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    teacher = trainer.model.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in trainer.model.student.parameters()} <= opt_params
    student_before = trainer.model.student.conv1.weight.detach().clone()

    trainer.train()

    after = teacher.state_dict()
    for k, v in before.items():  # bit-identical, BN running statistics included
        assert torch.equal(v, after[k]), k
    assert not torch.equal(student_before, trainer.model.student.conv1.weight)
    ckpt = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)
    n_student = len(trainer.model.student.state_dict())
    assert sum(k.startswith("student.") for k in ckpt["model"]) == n_student
    assert all(k.startswith(("student.", "distill.regressors.")) for k in ckpt["model"])
    result = trainer.last_eval_results["classification"]  # one test set: not keyed by name
    # the reported top-1 is the trained model's: recounted here by an argmax over the test set
    trainer.model.eval()
    hits = n = 0
    with torch.no_grad():
        for batch in trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0]):
            for inp, out in zip(batch, trainer.model(batch)):
                hits += int(out["logits"].argmax()) == int(inp["label"])
                n += 1
    assert n == result["num_images"] == 10
    assert result["top1"] == pytest.approx(100.0 * hits / n) and result["top5"] == 100.0  # 5 cls


@pytest.mark.parametrize("name,cls", [("SGD", torch.optim.SGD), ("AdamW", torch.optim.AdamW)])
def test_optimizer_choice(tiny_cls, teacher_file, tmp_path, name, cls):
    cfg = _cfg(tiny_cls, teacher_file, tmp_path, **{"SOLVER.CLS.OPTIMIZER": name})
    model = ClassificationDistiller(cfg)
    opt = ClassificationTrainer.build_optimizer(cfg, model)
    assert type(opt) is cls or isinstance(opt, cls)  # gradient clipping may subclass it
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()}


def test_the_imagenet_recipe_decays_weights_and_bn_gamma_but_not_beta_or_biases():
    """As MXNet's optimizer (the paper's code) does: only *_weight and *_gamma are decayed."""
    from detectron2.modeling import build_model

    from nst_det.config import load_config

    cfg = load_config(str(REPO / "configs" / "ImageNet-Pretrain" / "R18.yaml"),
                      ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    decay = {id(p): g["weight_decay"] for g in ClassificationTrainer.build_optimizer(
        cfg, model).param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay[id(named["student.conv1.weight"])] == decay[id(named["student.fc.weight"])] \
        == decay[id(named["student.bn1.weight"])] == 1e-4
    assert decay[id(named["student.bn1.bias"])] == decay[id(named["student.fc.bias"])] == 0.0


def test_precise_bn_statistics_of_a_resumed_run_are_an_uninterrupted_runs(
        tiny_cls, teacher_file, tmp_path):
    """detectron2's PreciseBN read one iterator through the run: batches 0..N-1 at the first
    update, N..2N-1 at the second; a run resumed between them read 0..N-1 again (every BN
    layer's running statistics then differed)."""
    import shutil

    def run(out, resume):
        cfg = _cfg(tiny_cls, teacher_file, out, **{
            "SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 2, "TEST.EVAL_PERIOD": 2,
            "DATASETS.TEST": (), "TEST.PRECISE_BN.ENABLED": True, "TEST.PRECISE_BN.NUM_ITER": 2,
            "MODEL.TRANSFER.NAMES": [], "MODEL.TRANSFER.WEIGHTS": [], "SEED": 0})
        trainer = ClassificationTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        assert trainer.start_iter == (2 if resume else 0)  # (a fresh start would match too)
        trainer.train()
        return trainer.model.student.state_dict()

    straight = run(tmp_path / "a", resume=False)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "model_0000001.pth", tmp_path / "b")
    (tmp_path / "b" / "last_checkpoint").write_text("model_0000001.pth")
    resumed = run(tmp_path / "b", resume=True)
    means = [k for k in straight if k.endswith("running_mean")]
    assert means and all(torch.equal(straight[k], resumed[k]) for k in straight), \
        [k for k in straight if not torch.equal(straight[k], resumed[k])][:5]
