"""nst_det's config keys, added to a detectron2 config by `add_nst_config(cfg)`.

Only new keys live here, each in its own namespace; detectron2's defaults are never copied.
"""

from detectron2.config import CfgNode as CN


def add_nst_config(cfg: CN) -> None:
    """Add nst_det's keys (with their defaults) to `cfg` in place."""
    # Which trainer tools/train_net.py uses (a name in nst_det.engine.TRAINER_REGISTRY).
    cfg.NST_DET = CN()
    cfg.NST_DET.TRAINER = "DetectionTrainer"
    # A training image that cannot be read or mapped: False stops with an error naming the file;
    # True skips it, counts it and lists the skipped files at the end of training.
    cfg.NST_DET.SKIP_BAD_IMAGES = False
    # Convert the model (student and teacher) to channels_last memory layout: faster convolutions
    # on tensor-core GPUs, usually with AMP (SOLVER.AMP.ENABLED). See benchmarks/README.md.
    cfg.NST_DET.CHANNELS_LAST = False
    # Save model_final.pth with the model and iteration only (no optimizer/scheduler state): half
    # the disk, but the run cannot be extended with --resume. The pipeline, which never extends a
    # finished stage, turns it on. model_best.pth is always weights-only.
    cfg.NST_DET.FINAL_CHECKPOINT_WEIGHTS_ONLY = False
    # The metric model_best.pth follows: a key of the first test set's "bbox" results ("AP",
    # "AP50", "AP75", ...); "" = AP50 for a VOC-style test set, AP for a COCO-style one.
    cfg.NST_DET.BEST_METRIC = ""
    # The training stream's seed (image order and augmentation); -1 = SEED. Set alone, it changes
    # the data order and keeps everything SEED draws (the new layers' initialisation): the
    # methods benchmark's A/A control.
    cfg.NST_DET.DATA_SEED = -1

    # Data sets registered by name from the config (nst_det/data/from_config.py), for
    # DATASETS.TRAIN/TEST. COCO format: [[name, json_file, image_root], ...].
    cfg.DATASETS.COCO = []
    # VOC layout: [[name, dirname, split], ...] or [name, dirname, split, classes, year] entries
    # (classes: list or "a,b,c", empty = found in the annotations; year 2007 = 11-point AP).
    cfg.DATASETS.VOC = []

    # The frozen teacher. Detection: a detectron2 config file + weights + overrides, built and
    # loaded strictly. Classification: ARCH names a torchvision classifier, WEIGHTS its state dict.
    cfg.MODEL.TEACHER = CN()
    cfg.MODEL.TEACHER.CONFIG_FILE = ""
    cfg.MODEL.TEACHER.WEIGHTS = ""
    cfg.MODEL.TEACHER.OPTS = []  # e.g. ["MODEL.RESNETS.DEPTH", "50"]
    cfg.MODEL.TEACHER.ARCH = ""  # classification only, e.g. "resnet101"
    # Detection: evaluate the teacher once before training (teacher/* scalars, a side-by-side
    # table at the end). A pipeline that has just evaluated the same teacher turns it off.
    cfg.MODEL.TEACHER.EVAL_BEFORE_TRAIN = True

    # Neuron Selectivity Transfer: LOSS_WEIGHT * MMD^2 between normalised channel maps of paired
    # student/teacher features. The paper's lambda enters as L = CE + lambda/2 * MMD^2, so the
    # paper's lambda = 50 is LOSS_WEIGHT = 25. 0 disables NST.
    cfg.MODEL.NST = CN()
    cfg.MODEL.NST.LOSS_WEIGHT = 0.0
    cfg.MODEL.NST.KERNEL = "poly"  # "linear" | "poly" | "gaussian"
    cfg.MODEL.NST.POLY_DEGREE = 2
    cfg.MODEL.NST.POLY_C = 0.0
    cfg.MODEL.NST.GAUSSIAN_SIGMA2 = 0.0  # <= 0: data-driven bandwidth (see nst_det.losses.nst)

    # The student/teacher feature pairs of every feature loss (NST and MODEL.TRANSFER), paired
    # position by position, one weight per pair (nst_det.distill). Names are backbone outputs
    # (detection: e.g. p2..p6, res4) or classifier features (res2..res5, torchvision node names).
    cfg.MODEL.DISTILL = CN()
    cfg.MODEL.DISTILL.STUDENT_FEATURES = ["res4"]
    cfg.MODEL.DISTILL.TEACHER_FEATURES = ["res4"]
    cfg.MODEL.DISTILL.FEATURE_WEIGHTS = [1.0]
    # Detection: FGD/MGD's "inheriting strategy": the student's neck (backbone without bottom_up,
    # e.g. the FPN) and heads start as copies of the teacher's (same names and shapes, else an
    # error at build time). Only the initialisation: a resumed checkpoint restores the student.
    cfg.MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD = False
    for key in ("STUDENT_FEATURES", "TEACHER_FEATURES", "FEATURE_WEIGHTS"):  # moved 2026-11
        cfg.register_renamed_key(f"MODEL.NST.{key}", f"MODEL.DISTILL.{key}",
                                 "the feature pairs serve every feature loss, not only NST")

    # Hinton KD on class logits: LOSS_WEIGHT * T^2 * KL(teacher || student) at TEMPERATURE T.
    # Detection: on the RoI head's class logits, the teacher's box head run on student proposals.
    cfg.MODEL.KD = CN()
    cfg.MODEL.KD.LOSS_WEIGHT = 0.0
    cfg.MODEL.KD.TEMPERATURE = 4.0

    # The other transfer losses of nst_det.losses (registry names, e.g. "at", "sp", "fitnet"),
    # each with its weight, applied to the same feature pairs as NST. Empty: none.
    cfg.MODEL.TRANSFER = CN()
    cfg.MODEL.TRANSFER.NAMES = []
    cfg.MODEL.TRANSFER.WEIGHTS = []

    # ---- Detection distillation methods (issue 25), each picked by its name in
    # MODEL.TRANSFER.NAMES with its weight in MODEL.TRANSFER.WEIGHTS, on the MODEL.DISTILL pairs
    # (list them finest first, e.g. p2..p6). A namespace holds a method's own hyper-parameters
    # (nst_det.distill.core.METHOD_KEYS maps them to the loss); the defaults are the reference
    # implementations' (docs/detection_methods.md names each one's file). Learned modules (MGD
    # generator, FGD context blocks, DeFeat / FGFI adapters, ReviewKD fusion) are trained with
    # the student, saved in training checkpoints and dropped from the export. "pkd" (Cao et al.
    # 2022) has no hyper-parameter: no namespace.
    # Reference weights: cwd 10 (all 5 FPN levels), pkd 6 (Faster R-CNN p2-p5) / 10 (RetinaNet,
    # first 4 levels), mgd 5e-7 (two-stage) / 2e-5 (one-stage), fgd 1 (its weights are inside),
    # defeat 1 (fg/bg weights inside; the reference averages over 5 levels: FEATURE_WEIGHTS 0.2),
    # fgfi 0.01, reviewkd 1.0 (R-50 <- R-101) / 1.2 (R-18 <- R-101), dkd 1.
    # CWD (Shu et al. 2021): softmax temperature tau of each channel's spatial distribution.
    cfg.MODEL.CWD = CN()
    cfg.MODEL.CWD.TAU = 1.0
    # MGD (Yang et al. 2022): the fraction lambda of student positions masked before the
    # generator; 0.45 is the Faster/Mask R-CNN reference, one-stage detectors use 0.65.
    cfg.MODEL.MGD = CN()
    cfg.MODEL.MGD.MASK_RATIO = 0.45
    # FGD (Yang et al. 2022): attention temperature and the weights of its four terms
    # (foreground, background, attention, global). Defaults: the two-stage reference (p2-p5);
    # RetinaNet's: ALPHA 1e-3, BETA 5e-4, GAMMA 5e-4, LAMBDA 5e-6.
    cfg.MODEL.FGD = CN()
    cfg.MODEL.FGD.TEMPERATURE = 0.5
    cfg.MODEL.FGD.ALPHA = 5e-5
    cfg.MODEL.FGD.BETA = 2.5e-5
    cfg.MODEL.FGD.GAMMA = 5e-5
    cfg.MODEL.FGD.LAMBDA = 5e-7
    # DeFeat (Guo et al. 2021): weights of the separately normalised foreground and background
    # squared errors (the released VOC config's 3 and 12). Each GT is marked on the one level
    # its size picks among the distilled pairs' strides.
    cfg.MODEL.DEFEAT = CN()
    cfg.MODEL.DEFEAT.FG_WEIGHT = 3.0
    cfg.MODEL.DEFEAT.BG_WEIGHT = 12.0
    # FGFI (Wang et al. 2019): imitation-mask threshold psi (anchors with IoU > psi * the GT's
    # best IoU), and the iterations at the start of training with the loss off (reference: 400).
    # Its anchors are the detector's own (its anchor generator's cell anchors per level).
    cfg.MODEL.FGFI = CN()
    cfg.MODEL.FGFI.PSI = 0.5
    cfg.MODEL.FGFI.WARMUP_ITERS = 400
    # ReviewKD (Chen et al. 2021): width of the ABF fusion chain over all pairs (reference 256).
    # It takes all pairs at once: FEATURE_WEIGHTS do not apply to it.
    cfg.MODEL.REVIEWKD = CN()
    cfg.MODEL.REVIEWKD.MID_CHANNELS = 256
    # DKD (Zhao et al. 2022), R-CNN only: alpha * TCKD + beta * NCKD on the RoI head's (K+1)-way
    # class logits (teacher box head on the student's sampled proposals, their gt classes as
    # targets), at temperature T (mdistiller's detection defaults 1, 0.25, 1).
    cfg.MODEL.DKD = CN()
    cfg.MODEL.DKD.ALPHA = 1.0
    cfg.MODEL.DKD.BETA = 0.25
    cfg.MODEL.DKD.TEMPERATURE = 1.0

    # ---- Classification pretraining stage (issue 4) ----
    # The student classifier (a name in nst_det.modeling.classification.CLASSIFIER_REGISTRY:
    # resnet18 | resnet34 | resnet50 | resnet101 | inception_bn, else any torchvision
    # classification model name, e.g. mobilenet_v3_large, or "torchvision:<name>") and its
    # number of classes, which the classification teacher (MODEL.TEACHER.ARCH) shares.
    cfg.MODEL.CLASSIFIER = CN()
    cfg.MODEL.CLASSIFIER.ARCH = "resnet18"
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = 1000
    # Optional local state dict (torchvision layout or our checkpoint) loaded strictly into the
    # student when it is built; MODEL.WEIGHTS still loads/resumes whole-distiller checkpoints.
    cfg.MODEL.CLASSIFIER.WEIGHTS = ""
    # Transfer features taken before the last ReLU of their stage (the paper's choice).
    cfg.MODEL.CLASSIFIER.PRE_RELU_FEATURES = True

    # Inception-BN detection backbone: its output stages (C4: ["stage4"]; FPN: stage2..stage5)
    # and the norm of every conv (a detectron2 norm name).
    cfg.MODEL.INCEPTION_BN = CN()
    cfg.MODEL.INCEPTION_BN.OUT_FEATURES = ["stage4"]
    cfg.MODEL.INCEPTION_BN.NORM = "FrozenBN"

    # Any torchvision classifier as a detection backbone (build_torchvision_backbone, C4-style,
    # or build_torchvision_fpn_backbone with MODEL.FPN.IN_FEATURES = these nodes): its name, the
    # feature-extraction node names it returns (e.g. mobilenet_v3_large: features.3, .6, .12,
    # .16), "FrozenBN" | "BN", and the parameter-name prefixes kept frozen (e.g. the stem).
    cfg.MODEL.TORCHVISION = CN()
    cfg.MODEL.TORCHVISION.ARCH = "mobilenet_v3_large"
    cfg.MODEL.TORCHVISION.OUT_FEATURES = ["features.3", "features.6", "features.12", "features.16"]
    cfg.MODEL.TORCHVISION.NORM = "FrozenBN"
    cfg.MODEL.TORCHVISION.FROZEN_PREFIXES = []

    # ImageFolder transforms. Train: RandomResizedCrop(TRAIN_CROP_SIZE, TRAIN_SCALE, TRAIN_RATIO)
    # + optional horizontal flip; test: Resize(shorter side TEST_RESIZE) + CenterCrop.
    cfg.INPUT.CLS = CN()
    cfg.INPUT.CLS.TRAIN_CROP_SIZE = 224
    cfg.INPUT.CLS.TRAIN_SCALE = (0.08, 1.0)  # crop area as a fraction of the image area
    cfg.INPUT.CLS.TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # crop aspect ratio range
    cfg.INPUT.CLS.HFLIP = True  # random horizontal flip in training
    cfg.INPUT.CLS.TEST_RESIZE = 256  # shorter side before the centre crop
    cfg.INPUT.CLS.TEST_CROP_SIZE = 224

    # Classification evaluation: images per batch per process, and the reported top-k.
    cfg.TEST.CLS = CN()
    cfg.TEST.CLS.IMS_PER_BATCH = 64
    cfg.TEST.CLS.TOPK = (1, 5)

    # Classification optimizer: "SGD" (detectron2's, with SOLVER.MOMENTUM/NESTEROV: the paper's)
    # or "AdamW" (SOLVER.BASE_LR, SOLVER.WEIGHT_DECAY; the toy schedules, too short for SGD).
    cfg.SOLVER.CLS = CN()
    cfg.SOLVER.CLS.OPTIMIZER = "SGD"


def check_config_files(config_file: str) -> None:
    """Raise FileNotFoundError naming a config file that does not exist, with the file whose
    `_BASE_` names it (resolved as detectron2 does: relative to the including file's folder),
    and ValueError for files that include each other (detectron2 would recurse without end)."""
    import os

    import yaml

    chain = []  # the files that include the one checked, innermost first
    path = config_file
    while path:
        if not os.path.isfile(path):
            if not chain:
                raise FileNotFoundError(
                    f"config file {path} does not exist (working directory {os.getcwd()}). Check "
                    "the path; the project's configs are under configs/")
            included = " <- ".join(chain)
            raise FileNotFoundError(
                f"config file {path} does not exist: it is the _BASE_ of {included}. Fix that "
                "_BASE_ line (a relative path is read from the including file's folder)")
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError:
            return  # detectron2's own loader reports the syntax error
        base = data.get("_BASE_") if isinstance(data, dict) else None
        if not isinstance(base, str) or "://" in base:
            return
        base = os.path.expanduser(base)
        if os.path.realpath(path) in map(os.path.realpath, chain):
            raise ValueError(f"config files include each other through _BASE_: {path} <- "
                             f"{' <- '.join(chain)}. Remove one of those _BASE_ lines")
        chain.insert(0, path)
        path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)


def load_config(config_file: str, opts=(), *, opts_name: str = "command-line overrides",
                more_datasets: dict | None = None, register_data: bool = True) -> CN:
    """get_cfg() + add_nst_config + the file + `opts` (KEY VALUE ...), with errors that name them:
    the one loader of student, teacher (opts_name "MODEL.TEACHER.OPTS") and saved configs. Then,
    with `register_data`, the data sets of DATASETS.COCO / VOC are registered, after appending
    `more_datasets` ({"COCO": [[name, json, image_root], ...], "VOC": [...]}, e.g. from the
    command line). A teacher's config is loaded without: a teacher reads no data, and its
    training run's sets may have moved or be elsewhere.

    yacs reports an unknown key as a bare KeyError or AssertionError; here the message also names
    the file (or `opts_name`) and the usual causes.
    """
    from detectron2.config import get_cfg

    check_config_files(config_file)
    opts = list(opts)
    if len(opts) % 2:  # yacs' own message would be reported as a misspelt key below
        raise ValueError(
            f"{opts_name}: {len(opts)} items, but they come as KEY VALUE pairs: the "
            f"last key, {opts[-1]!r}, has no value (or a value is missing before it). Give each "
            "KEY its VALUE, e.g. MODEL.NST.LOSS_WEIGHT 25")
    cfg = get_cfg()
    add_nst_config(cfg)
    for source, merge in ((f"config file {config_file}", lambda: cfg.merge_from_file(config_file)),
                          (opts_name, lambda: cfg.merge_from_list(opts))):
        try:
            merge()
        except (KeyError, AssertionError) as e:
            raise KeyError(
                f"{source}: {e.args[0] if e.args else e}. Check the spelling against "
                "detectron2's defaults and nst_det/config.py (add_nst_config)"
            ) from None
    if not register_data:
        return cfg
    from .data.from_config import register_datasets_from_config

    for key, entries in (more_datasets or {}).items():
        cfg.DATASETS[key] = [*cfg.DATASETS[key], *entries]
    register_datasets_from_config(cfg)  # DATASETS.COCO / DATASETS.VOC, in every entry point
    return cfg
