"""The reproduction pipeline as a list of stages: what runs, from which config, into which folder.

The plan mirrors the paper: a classification teacher; students pretrained plain / with NST /
with KD+NST; their conversion to detectron2 backbones; a teacher detector; student detectors
fine-tuned from each pretrained student without and with detection-stage NST; export of the best
student. `toy_plan` runs it on the generated data on a CPU; `paper_plan` on ImageNet + VOC2007.
Every stage writes into its own folder under the pipeline's output root, so stages can be
skipped when done and the pipeline resumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

# (name, pretraining config suffix) of the pretrained students; the paper's transfer methods
STUDENT_METHODS = {"plain": "Student", "nst": "NST", "kd_nst": "KD+NST"}


@dataclass
class Stage:
    """One step of the pipeline.

    kind: "train" (tools/train_net-style training + evaluation), "evaluate" (evaluation only),
    "export" (best student detector) or "report".
    d2_backbone: for a classification stage, {"src": its classifier weights, "dst": a file}: the
    job converts src to detectron2 backbone weights at dst before it records the stage finished,
    so that a detector stage reads them from the stage it waits for.
    """

    name: str
    kind: str
    out_dir: str
    config: str = ""
    opts: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)  # paths produced by earlier stages
    meta: dict = field(default_factory=dict)  # what the report needs to place the result
    iters: int = 0  # training iterations (for the ETA)
    after: list = field(default_factory=list)  # names of the stages whose outputs it reads
    d2_backbone: dict = field(default_factory=dict)


@dataclass
class Scale:
    """Iteration counts (and eval sizes) of a plan; CI uses a tiny one."""

    cls_teacher_iters: int
    cls_student_iters: int
    det_teacher_iters: int
    det_student_iters: int
    seeds: tuple = (0,)
    cls_data_opts: tuple = ()  # e.g. a smaller data set for a quick run
    det_data_opts: tuple = ()


TOY_SCALES = {
    # classification: the toy configs' own schedules (shorter runs stay at chance); one seed by
    # default, --seeds 0,1,2 gives the spread at three times the cost
    "demo": Scale(cls_teacher_iters=450, cls_student_iters=300, det_teacher_iters=300,
                  det_student_iters=120, seeds=(0,)),
    "ci": Scale(cls_teacher_iters=4, cls_student_iters=3, det_teacher_iters=4,
                det_student_iters=3, seeds=(0,),
                cls_data_opts=("DATASETS.TRAIN", "('toy_cls_tiny_train',)",
                               "DATASETS.TEST", "('toy_cls_tiny_val',)"),
                det_data_opts=("DATASETS.TRAIN", "('toy_voc_tiny_trainval',)",
                               "DATASETS.TEST", "('toy_voc_tiny_test',)",
                               "DATALOADER.NUM_WORKERS", "0")),
    # paper scale: every config's own schedule, three seeds for the students
    "paper": Scale(0, 0, 0, 0, seeds=(0, 1, 2)),
}


def _train(name, out_root, config, opts, iters, after, **meta) -> Stage:
    out_dir = os.path.join(out_root, name)
    opts = [*opts, "OUTPUT_DIR", out_dir, "SOLVER.MAX_ITER", str(iters)]
    return Stage(name, "train", out_dir, config, opts, meta=meta, iters=iters, after=after)


def _schedule(iters: int, eval_twice: bool = False) -> list:
    """LR steps at 75% / 95% of `iters` (detectron2's usual shape), warm-up 10%."""
    steps = sorted({s for s in (int(iters * 0.75), int(iters * 0.95)) if 0 < s < iters})
    opts = ["SOLVER.STEPS", f"({''.join(f'{s},' for s in steps)})"]
    if iters >= 100:  # a tiny run keeps the config's (longer) warm-up, so its LR stays small
        opts += ["SOLVER.WARMUP_ITERS", str(iters // 10)]
    if eval_twice and iters >= 20:
        opts += ["TEST.EVAL_PERIOD", str(iters // 2)]
    elif eval_twice:  # a tiny run: evaluate only at the end
        opts += ["TEST.EVAL_PERIOD", "0"]
    return opts


@dataclass
class PlanConfigs:
    """Which configs a plan trains from; paths are relative to the repository root."""

    cls_teacher: str  # trained here (toy) or only evaluated (paper: a published teacher)
    cls_students: dict  # method -> config
    det_teacher: str
    det_student: str  # the plain fine-tuning config
    det_student_nst: str  # the same plus detection-stage NST
    train_cls_teacher: bool = True
    cls_teacher_weights: str = ""  # when not trained here: its weights file
    det_extra_opts: list = field(default_factory=list)  # for every detector fine-tuned here
    det_teacher_opts: list = field(default_factory=list)  # for the teacher detector only


TOY_CONFIGS = PlanConfigs(
    cls_teacher="configs/quick_schedules/cls_teacher_toy.yaml",
    cls_students={"plain": "configs/quick_schedules/cls_R18_toy.yaml",
                  "nst": "configs/quick_schedules/cls_R18_NST_toy.yaml",
                  "kd_nst": "configs/quick_schedules/cls_R18_KD_NST_toy.yaml"},
    det_teacher="configs/quick_schedules/faster_rcnn_R_50_FPN_toy_teacher.yaml",
    # the same base for both student variants (pretrained backbone, FrozenBN, every stage
    # trained): the _nst config differs only by the distillation loss
    det_student="configs/quick_schedules/faster_rcnn_R_18_FPN_toy_pretrained.yaml",
    det_student_nst="configs/quick_schedules/faster_rcnn_R_18_FPN_toy_nst.yaml",
    det_extra_opts=[],
    # the toy teacher classifier is a ResNet-34 (CPU cost), so the teacher detector is R-34 FPN
    det_teacher_opts=["MODEL.RESNETS.DEPTH", "34", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"],
)

PAPER_CONFIGS = PlanConfigs(
    cls_teacher="configs/ImageNet-Pretrain/R18_R50_NST_poly.yaml",
    cls_students={"plain": "configs/ImageNet-Pretrain/R18.yaml",
                  "nst": "configs/ImageNet-Pretrain/R18_R50_NST_poly.yaml",
                  "kd_nst": "configs/ImageNet-Pretrain/R18_R50_KD_NST.yaml"},
    det_teacher="configs/VOC-Detection/faster_rcnn_R_50_FPN_teacher.yaml",
    det_student="configs/VOC-Detection/faster_rcnn_R_18_FPN.yaml",
    det_student_nst="configs/VOC-Detection/faster_rcnn_R_18_FPN_NST.yaml",
    train_cls_teacher=False,
    # torchvision's published file, downloaded once and checked (nst_det/checkpoint/remote.py)
    cls_teacher_weights="https://download.pytorch.org/models/resnet50-0676ba61.pth",
)

# Other toy students (tools/run_pipeline.py --toy-students): the same teachers and schedule.
# mnv3: torchvision's MobileNetV3-Large, plain and NST-pretrained from the ResNet-34 teacher,
# fine-tuned as an FPN Faster R-CNN without / with NST from the R-34 FPN teacher detector.
TOY_MNV3_CONFIGS = replace(
    TOY_CONFIGS,
    cls_students={"plain": "configs/quick_schedules/cls_MNV3_toy.yaml",
                  "nst": "configs/quick_schedules/cls_MNV3_NST_toy.yaml"},
    det_student="configs/quick_schedules/faster_rcnn_MNV3_FPN_toy_pretrained.yaml",
    det_student_nst="configs/quick_schedules/faster_rcnn_MNV3_FPN_toy_nst.yaml",
)
# retinanet: the R-18 students as RetinaNets, distilled from a RetinaNet R-34 teacher detector
TOY_RETINANET_CONFIGS = replace(
    TOY_CONFIGS,
    det_teacher="configs/quick_schedules/retinanet_R_34_FPN_toy_teacher.yaml",
    det_student="configs/quick_schedules/retinanet_R_18_FPN_toy_pretrained.yaml",
    det_student_nst="configs/quick_schedules/retinanet_R_18_FPN_toy_nst.yaml",
    det_teacher_opts=[],
)
TOY_PLANS = {"r18": TOY_CONFIGS, "mnv3": TOY_MNV3_CONFIGS, "retinanet": TOY_RETINANET_CONFIGS}


def build_plan(out_root: str, scale: Scale, configs: PlanConfigs, train_opts=()) -> list:
    """The stages of one reproduction: pretraining, conversion, detection, export, report.

    A scale with iteration counts of 0 keeps each config's own schedule (paper scale).
    `train_opts` are config overrides for every training stage (e.g. SOLVER.AMP.ENABLED).
    """
    def schedule(iters, eval_twice=False):
        return _schedule(iters, eval_twice) if iters else []

    def train(name, config, opts, iters, after=(), **meta):
        data = scale.cls_data_opts if meta["stage"] == "cls" else scale.det_data_opts
        # a finished stage is never extended, so its model_final needs no optimizer state
        opts = [*train_opts, "NST_DET.FINAL_CHECKPOINT_WEIGHTS_ONLY", "True", *data, *opts]
        stage = _train(name, out_root, config, opts, iters, list(after), **meta)
        if not iters:  # keep the config's MAX_ITER
            stage.opts = stage.opts[:-2]
        return stage

    stages = []
    teacher_dir = os.path.join(out_root, "cls_teacher")
    if configs.train_cls_teacher:
        stages.append(train("cls_teacher", configs.cls_teacher,
                            [*schedule(scale.cls_teacher_iters), "SEED", "0"],
                            scale.cls_teacher_iters, role="teacher", stage="cls"))
        teacher_ckpt = os.path.join(teacher_dir, "model_final.pth")
    else:  # a published teacher: evaluate it (for the table) and use its weights as they are
        teacher_ckpt = configs.cls_teacher_weights
        stages.append(Stage("cls_teacher", "evaluate", teacher_dir, configs.cls_teacher,
                            ["OUTPUT_DIR", teacher_dir, "MODEL.NST.LOSS_WEIGHT", "0.0",
                             "MODEL.CLASSIFIER.ARCH", "resnet50",
                             "MODEL.CLASSIFIER.WEIGHTS", teacher_ckpt],
                            meta={"role": "teacher", "stage": "cls"}))
    teacher_d2 = os.path.join(teacher_dir, "backbone_d2.pth")
    stages[-1].d2_backbone = {"src": teacher_ckpt, "dst": teacher_d2}

    extra = configs.det_extra_opts
    # listed (so started) before the classification students: the teacher detector heads the
    # longest chain (it and then every distilled student detector)
    det_teacher = train("det_teacher", configs.det_teacher,
                        [*extra, *configs.det_teacher_opts,
                         *schedule(scale.det_teacher_iters, eval_twice=True),
                         "MODEL.WEIGHTS", teacher_d2, "SEED", "0"],
                        scale.det_teacher_iters, after=["cls_teacher"],
                        role="teacher", stage="det")
    stages.append(det_teacher)

    student_d2 = {}
    for seed in scale.seeds:
        for method, config in configs.cls_students.items():
            name = f"cls_{method}_s{seed}"
            opts = [*schedule(scale.cls_student_iters), "SEED", str(seed)]
            if method != "plain":
                opts += ["MODEL.TEACHER.WEIGHTS", teacher_ckpt]
            stage = train(name, config, opts, scale.cls_student_iters,
                          after=[] if method == "plain" else ["cls_teacher"],
                          role="student", stage="cls", method=method, seed=seed)
            student_d2[method, seed] = os.path.join(stage.out_dir, "backbone_d2.pth")
            stage.d2_backbone = {"src": os.path.join(stage.out_dir, "model_final.pth"),
                                 "dst": student_d2[method, seed]}
            stages.append(stage)

    # the distillation runs rebuild the teacher from the very config it was trained with
    teacher_cfg = os.path.join(det_teacher.out_dir, "config.yaml")
    teacher_weights = os.path.join(det_teacher.out_dir, "model_final.pth")
    for seed in scale.seeds:
        for method in configs.cls_students:
            for det_nst in (False, True):
                name = f"det_{method}{'_detnst' if det_nst else ''}_s{seed}"
                opts = [*extra, *schedule(scale.det_student_iters, eval_twice=True),
                        "MODEL.WEIGHTS", student_d2[method, seed], "SEED", str(seed)]
                if det_nst:  # the det_teacher stage has evaluated this teacher already
                    opts += ["MODEL.TEACHER.CONFIG_FILE", teacher_cfg,
                             "MODEL.TEACHER.WEIGHTS", teacher_weights,
                             "MODEL.TEACHER.EVAL_BEFORE_TRAIN", "False"]
                config = configs.det_student_nst if det_nst else configs.det_student
                after = [f"cls_{method}_s{seed}", *(["det_teacher"] if det_nst else [])]
                stages.append(train(name, config, opts, scale.det_student_iters, after=after,
                                    role="student", stage="det", method=method, seed=seed,
                                    det_nst=det_nst))
    trained = [s.name for s in stages if s.kind in ("train", "evaluate")]
    stages.append(Stage("export", "export", os.path.join(out_root, "export"), after=trained))
    stages.append(Stage("report", "report", out_root, after=[*trained, "export"]))
    return stages


def is_plain_student(stage: Stage) -> bool:
    """A `det_plain_s<seed>` stage: the plain student detector the methods are compared with."""
    m = stage.meta
    return (stage.kind == "train" and m.get("stage") == "det" and m.get("role") == "student"
            and m.get("method") == "plain" and not m.get("det_nst"))


def select_stages(stages: list, names) -> list:
    """The named stages and every stage they read, transitively, in the plan's order.

    An unknown name is an error listing the plan's stage names.
    """
    by_name = {s.name: s for s in stages}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"--stages: no stage named {', '.join(unknown)} in this plan; its "
                         f"stages: {', '.join(by_name)}")
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].after)
    return [s for s in stages if s.name in wanted]
