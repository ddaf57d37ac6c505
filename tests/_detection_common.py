"""Shared helpers of the detection tests: tiny configs and a saved (untrained) teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from nst_det import add_nst_config

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "quick_schedules"
R18_FPN_TOY = TOY / "faster_rcnn_R_18_FPN_toy.yaml"
NST_TOY = TOY / "faster_rcnn_R_18_FPN_toy_nst.yaml"
LEVELS = "['p2', 'p3', 'p4', 'p5', 'p6']"

# tiny images, batches and heads: these tests check contracts, not accuracy
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.BASE_LR", "0.01",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
]

# C4 layout (detectron2's Base-RCNN-C4 values), as opts on top of a toy FPN config
C4 = [
    "MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.OUT_FEATURES", "['res4']",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 32, 64, 128]]", "MODEL.RPN.IN_FEATURES", "['res4']",
    "MODEL.ROI_HEADS.NAME", "BasicRes5ROIHeads", "MODEL.ROI_HEADS.IN_FEATURES", "['res4']",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "8",
]


def make_cfg(config_file, opts=(), data=None, output_dir=None):
    """A mutable nst_det config: file, then TINY, then `opts`; `data` = (train, test) names."""
    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(TINY))
    if data is not None:
        train, test = data[:2]
        cfg.merge_from_list(["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)"])
    if output_dir is not None:
        cfg.OUTPUT_DIR = str(output_dir)
    cfg.merge_from_list(list(opts))
    return cfg


def write_teacher(tmp_path: Path, opts=(), name="teacher", seed=123):
    """Write a teacher config (toy R-18 FPN + TINY + opts) and its random weights; return paths."""
    yaml = tmp_path / f"{name}.yaml"
    lines = [f"_BASE_: {str(R18_FPN_TOY)!r}"]
    yaml.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(yaml, opts)
    torch.manual_seed(seed)
    model = build_model(cfg)
    weights = tmp_path / f"{name}.pth"
    torch.save({"model": model.state_dict()}, weights)
    # the teacher's own opts must reach it: write them into its file as a full dump
    yaml.write_text(cfg.dump())
    return yaml, weights


def distill_opts(teacher_yaml, teacher_weights, student=LEVELS, teacher=LEVELS, n=5, kd=0.0):
    """Opts turning a toy config into a DistillationRCNN with NST on the given pairs."""
    weights = "[" + ", ".join(["0.2"] * n) + "]"
    return [
        "MODEL.META_ARCHITECTURE", "DistillationRCNN",
        "MODEL.TEACHER.CONFIG_FILE", str(teacher_yaml),
        "MODEL.TEACHER.WEIGHTS", str(teacher_weights),
        "MODEL.NST.LOSS_WEIGHT", "25.0",
        "MODEL.DISTILL.STUDENT_FEATURES", student, "MODEL.DISTILL.TEACHER_FEATURES", teacher,
        "MODEL.DISTILL.FEATURE_WEIGHTS", weights, "MODEL.KD.LOSS_WEIGHT", str(kd),
    ]


def load_train_net():
    """tools/train_net.py as a module (tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nst_train_net", REPO / "tools" / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def distributed_worker(config_file: str, data_prefix: str, data_dir: str, num_images: tuple,
                       resume: bool = False):
    """Body of each launched process: register the tiny data set, then train_net's main()."""
    from nst_det.data.datasets import register_toy_voc

    register_toy_voc(data_prefix, data_dir, seed=1, num_trainval=num_images[0],
                     num_test=num_images[1])
    train_net = load_train_net()
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", config_file, *(["--resume"] if resume else [])])
    return train_net.launched_main(args)


def zoo_ships_configs() -> bool:
    """Whether the installed detectron2 has its model-zoo configs (upstream builds; not v0.6)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("detectron2.model_zoo")
    return any(os.path.isdir(os.path.join(p, "configs")) for p in spec.submodule_search_locations)


RETINA_TEACHER = TOY / "retinanet_R_34_FPN_toy_teacher.yaml"
RETINA_TINY = ["MODEL.WEIGHTS", "", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50"]


def write_retina_teacher(tmp_path: Path, seed=7):
    """The toy R-34 FPN RetinaNet teacher (+ RETINA_TINY) as a config and random weights."""
    cfg = make_cfg(RETINA_TEACHER, RETINA_TINY)
    torch.manual_seed(seed)
    weights = tmp_path / "retina_teacher.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    yaml = tmp_path / "retina_teacher.yaml"
    yaml.write_text(cfg.dump())
    return yaml, weights


def edit_voc_xml(voc, pattern: str, replacement: str, split: str = "trainval"):
    """Replace the first match of `pattern` in the annotation of the split's first image;
    returns that file."""
    import re

    first = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[0]
    xml = voc / "Annotations" / f"{first}.xml"
    text = xml.read_text()
    new = re.sub(pattern, replacement, text, count=1)
    assert new != text
    xml.write_text(new)
    return xml
