"""What distillation costs: a DistillationRCNN step against a plain student step + teacher forward.

    .venv/bin/python benchmarks/bench_distill_overhead.py                 # toy configs, CPU
    .venv/bin/python benchmarks/bench_distill_overhead.py --paper-shapes  # + NST at 800x1333 FPN
    .venv/bin/python benchmarks/bench_distill_overhead.py --device cuda --iters 50
    .venv/bin/python benchmarks/bench_distill_overhead.py --ablations     # what each choice saves
    .venv/bin/python benchmarks/bench_distill_overhead.py --setup paper --iters 3  # VOC shapes
    .venv/bin/python benchmarks/bench_distill_overhead.py --setup paper --methods all --iters 2

All variants run on the same batch and are interleaved iteration by iteration, so machine noise
hits them alike; the figures are ratios of medians measured in this one run:
- overhead = distillation step / (student step + teacher backbone forward): the distiller needs
  only the teacher's backbone features, so this is the cost it cannot avoid (target <= 1.10);
  the same against the teacher's full inference forward is printed too;
- NST share = nst_loss forward + backward on the step's own feature pairs / distillation step.

--methods (a list from nst_det/pipeline/methods.py, or all): one distiller per transfer method
(the pipeline's method opts, every weight 1: the cost does not depend on it), all from the same
student weights and teacher, timed side by side in the same interleaved loop: each method's
overhead, and its loss share = the method's losses alone (forward + backward through the
distiller's own core on the inputs it got in its warm-up step: features, RoI logits, gt_boxes,
DKD's target, learned modules included, as the calibration stage times them) / its step. The
detection methods (cwd, ..., dkd) run on their reference levels and hyper-parameters for the
setup's R-CNN student, FGFI without its warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nst_det.config import load_config
from nst_det.losses import mmd2, nst_loss
from nst_det.losses.nst import nst_samples

REPO = Path(__file__).resolve().parents[1]
Q = REPO / "configs" / "quick_schedules"


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


V = REPO / "configs" / "VOC-Detection"
SETUPS = {
    # (student + NST config, teacher config): the toy pair, and the paper's VOC pair (R-18 FPN
    # with 256-channel FPN, R-50 FPN teacher) at its input size
    "toy": (Q / "faster_rcnn_R_18_FPN_toy_nst.yaml", Q / "faster_rcnn_R_50_FPN_toy_teacher.yaml"),
    "paper": (V / "faster_rcnn_R_18_FPN_NST.yaml", V / "faster_rcnn_R_50_FPN_teacher.yaml"),
}


def paper_batch(num_images: int = 1, height: int = 800, width: int = 1333):
    """Random images at the paper's VOC input size, each with three boxes (20 VOC classes)."""
    from detectron2.structures import Boxes, Instances

    batch = []
    for i in range(num_images):
        g = torch.Generator().manual_seed(i)
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.tensor([[100.0, 80, 500, 400], [600, 300, 1200, 760],
                                            [300, 500, 520, 700]]))
        inst.gt_classes = torch.tensor([3, 11, 14])
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
        batch.append({"image": image, "instances": inst, "height": height, "width": width})
    return batch


def build_pair(device: str, tmp: str, student_file, teacher_file, student_opts=()):
    """(plain student, distiller with the same initial weights, distiller's config), random
    weights, for a detection student config (+ `student_opts`) and its teacher's config."""
    # random weights: nothing is downloaded, and timing does not depend on the values
    opts = ["MODEL.DEVICE", device, "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", ""]
    teacher_cfg = load_config(str(teacher_file), opts)
    teacher_weights = str(Path(tmp) / "teacher.pth")
    torch.save({"model": build_model(teacher_cfg).state_dict()}, teacher_weights)
    distill_cfg = load_config(str(student_file), [
        *opts, *student_opts, "MODEL.TEACHER.WEIGHTS", teacher_weights,
        "MODEL.TEACHER.CONFIG_FILE", str(teacher_file), "MODEL.TEACHER.OPTS", str(opts)])
    distill = build_model(distill_cfg)
    # the plain student: the very same detector without the distillation
    student = build_model(load_config(str(student_file), [
        *opts, *student_opts, "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"]))
    distill.load_state_dict(student.state_dict())
    return student, distill, distill_cfg


def build(device: str, tmp: str, setup: str = "toy"):
    """Student, distiller (same initial weights, random) and a batch: two toy training images,
    or one random 800x1333 image for the paper setup."""
    student, distill, distill_cfg = build_pair(device, tmp, *SETUPS[setup])
    if setup == "paper":
        batch = paper_batch()
    else:
        mapper = DatasetMapper(distill_cfg, is_train=True)
        batch = [mapper(r) for r in DatasetCatalog.get(distill_cfg.DATASETS.TRAIN[0])[:2]]
    return student.train(), distill.train(), batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--channels-last", action="store_true",
                        help="student and teacher in channels_last layout (NST_DET.CHANNELS_LAST)")
    parser.add_argument("--paper-shapes", action="store_true",
                        help="also time nst_loss on FPN p2-p6 of an 800x1333 input (C=256)")
    parser.add_argument("--setup", choices=sorted(SETUPS), default="toy",
                        help="toy: the toy configs on two toy images; paper: the VOC configs "
                             "(R-18 FPN student, R-50 FPN teacher, 256-ch FPN) on one random "
                             "800x1333 image, random weights")
    parser.add_argument("--ablations", action="store_true",
                        help="also time what each design choice saves (see `ablations`)")
    parser.add_argument("--methods", default="",
                        help="comma-separated transfer methods (nst_det/pipeline/methods.py) or "
                             "'all': overhead and loss share of each, side by side (only this)")
    args = parser.parse_args()
    if args.iters < 1:
        parser.error("--iters must be at least 1")
    if args.methods:
        from nst_det.pipeline.methods import METHODS, parse_methods

        methods_overhead(args, list(METHODS) if args.methods == "all"
                         else parse_methods(args.methods))
        return

    with tempfile.TemporaryDirectory() as tmp:
        student, distill, batch = build(args.device, tmp, args.setup)
    if args.channels_last:
        for model in (student, distill):  # DistillationRCNN converts its teacher too
            model.to(memory_format=torch.channels_last)
    teacher = distill.teacher
    optimizers = {m: torch.optim.SGD(m.parameters(), lr=1e-5) for m in (student, distill)}

    def train_step(model):
        losses = model(batch)
        optimizers[model].zero_grad()
        sum(losses.values()).backward()
        optimizers[model].step()

    images = distill.preprocess_image(batch).tensor
    pairs = [(p.student, p.teacher) for p in distill.feature_pairs]

    def teacher_backbone():
        with torch.no_grad():
            teacher.backbone(images)

    def teacher_inference():
        with torch.no_grad():
            teacher.inference([{"image": b["image"]} for b in batch])

    def nst_only():
        s_feats = {k: v.detach().requires_grad_() for k, v in student.backbone(images).items()}
        with torch.no_grad():
            t_feats = teacher.backbone(images)
        start = time.perf_counter()
        loss = sum(nst_loss(s_feats[s], t_feats[t]) for s, t in pairs)
        loss.backward()
        _sync(args.device)
        return time.perf_counter() - start

    names = ["student step", "teacher backbone fwd", "teacher inference fwd", "distill step"]
    times = {n: [] for n in names + ["nst loss fwd+bwd"]}
    with EventStorage(0):
        for model in (student, distill):
            train_step(model)  # warm-up
        for _ in range(args.iters):
            times["student step"].append(_timed(lambda: train_step(student), args.device))
            times["teacher backbone fwd"].append(_timed(teacher_backbone, args.device))
            times["teacher inference fwd"].append(_timed(teacher_inference, args.device))
            times["distill step"].append(_timed(lambda: train_step(distill), args.device))
            times["nst loss fwd+bwd"].append(nst_only())
    med = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    shapes = {s: tuple(v.shape) for s, v in student.backbone(images).items()}
    print(f"device {args.device}{' channels_last' if args.channels_last else ''}, "
          f"{args.iters} interleaved iterations, {args.setup} setup, batch of {len(batch)} "
          f"{tuple(images.shape)}; NST pairs {pairs}; student feature shapes {shapes}")
    for name, value in med.items():
        print(f"  {name:24s} {value:9.1f} ms (median)")
    base = med["student step"] + med["teacher backbone fwd"]
    print(f"overhead = distill / (student + teacher backbone fwd) = "
          f"{med['distill step'] / base:.3f} (target <= 1.10)")
    print(f"         = distill / (student + teacher inference fwd) = "
          f"{med['distill step'] / (med['student step'] + med['teacher inference fwd']):.3f}")
    print(f"NST share of the distillation step: "
          f"{100 * med['nst loss fwd+bwd'] / med['distill step']:.2f}% (target <= 5%)")

    per_level = nst_per_level(student, teacher, images, pairs, args.device, args.iters)
    print("NST loss fwd+bwd per feature pair (median ms, share of the distillation step):")
    for pair, ms in per_level.items():
        print(f"  {str(pair):24s} {ms:9.1f} ms  {100 * ms / med['distill step']:5.2f}%")

    if args.ablations:
        ablations(teacher, student, images, pairs, med, args.device, args.iters)
    if args.paper_shapes:
        paper_nst(args.device)


def build_methods(device: str, tmp: str, setup: str, methods: list):
    """The plain student, one distiller per method (same student weights, same teacher weights,
    random) and the batch, as `build` makes them for NST."""
    from nst_det.pipeline.methods import detector_of, method_opts

    student_file, teacher_file = SETUPS[setup]
    detector = detector_of(load_config(str(student_file)))
    opts = ["MODEL.DEVICE", device, "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", ""]
    teacher_weights = str(Path(tmp) / "teacher.pth")
    torch.save({"model": build_model(load_config(str(teacher_file), opts)).state_dict()},
               teacher_weights)
    student = build_model(load_config(str(student_file),
                                      [*opts, "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"]))
    distillers = {}
    for method in methods:
        cfg = load_config(str(student_file), [
            *opts, "MODEL.TEACHER.WEIGHTS", teacher_weights,
            "MODEL.TEACHER.CONFIG_FILE", str(teacher_file), "MODEL.TEACHER.OPTS", str(opts),
            *method_opts(method, detector=detector)])
        model = build_model(cfg)
        # student-side extras (e.g. FitNet regressors) keep their own initialisation
        model.load_state_dict(student.state_dict(), strict=False)
        distillers[method] = (cfg, model.train())
    if setup == "paper":
        batch = paper_batch()
    else:
        cfg = next(iter(distillers.values()))[0]
        mapper = DatasetMapper(cfg, is_train=True)
        batch = [mapper(r) for r in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
    return student.train(), distillers, batch


def methods_overhead(args, methods: list):
    """Every method's overhead and loss share, measured side by side (module doc)."""
    from nst_det.pipeline.calibrate import method_loss_step, record_core_inputs, teacher_of

    with tempfile.TemporaryDirectory() as tmp:
        student, distillers, batch = build_methods(args.device, tmp, args.setup, methods)
    models = [student, *(m for _, m in distillers.values())]
    # lr 0: the optimizer step still runs, but no weight moves, so every iteration times the same
    # computation (at weight 1 some losses, e.g. gauss_kl, would make a random model diverge)
    optimizers = {m: torch.optim.SGD(m.parameters(), lr=0.0) for m in models}
    teacher = teacher_of(next(iter(distillers.values()))[1])

    def train_step(model):
        losses = model(batch)
        optimizers[model].zero_grad()
        sum(losses.values()).backward()
        optimizers[model].step()

    images = student.preprocess_image(batch).tensor
    loss_steps = {}
    with EventStorage(0):
        train_step(student)  # warm-up
        for method, (_, model) in distillers.items():
            with record_core_inputs(model.distill, {}) as recorded:
                train_step(model)  # warm-up (and what the core gets)
            loss_steps[method] = method_loss_step(model, recorded)
            loss_steps[method]()

        def teacher_backbone():
            with torch.no_grad():
                teacher.backbone(images)

        times = {"student step": [], "teacher backbone fwd": [],
                 **{f"{m} step": [] for m in methods}, **{f"{m} loss": [] for m in methods}}
        for _ in range(args.iters):
            times["student step"].append(_timed(lambda: train_step(student), args.device))
            times["teacher backbone fwd"].append(_timed(teacher_backbone, args.device))
            for method, (_, model) in distillers.items():
                times[f"{method} step"].append(
                    _timed(lambda model=model: train_step(model), args.device))
                times[f"{method} loss"].append(_timed(loss_steps[method], args.device))
    med = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    base = med["student step"] + med["teacher backbone fwd"]
    print(f"device {args.device}, {args.iters} interleaved iterations (median), {args.setup} "
          f"setup, batch of {len(batch)} {tuple(images.shape)}; student step "
          f"{med['student step']:.1f} ms, teacher backbone fwd {med['teacher backbone fwd']:.1f}"
          f" ms")
    print("| method | distill step (ms) | overhead (target <= 1.10) | loss fwd+bwd (ms) | "
          "loss share of step |\n|---|---|---|---|---|")
    missed = []
    for method in methods:
        step, loss = med[f"{method} step"], med[f"{method} loss"]
        if step / base > 1.10:
            missed.append(method)
        print(f"| {method} | {step:.1f} | {step / base:.3f} | {loss:.1f} | "
              f"{100 * loss / step:.1f}% |")
    print(f"over 1.10: {', '.join(missed) if missed else 'none'}")


def nst_per_level(student, teacher, images, pairs, device: str, iters: int) -> dict:
    """Median ms of nst_loss fwd+bwd for each (student, teacher) feature pair on its own."""
    s_feats = {k: v.detach() for k, v in student.backbone(images).items()}
    with torch.no_grad():
        t_feats = teacher.backbone(images)

    def one(s, t):
        return lambda: nst_loss(s_feats[s].detach().requires_grad_(), t_feats[t]).backward()

    times = {pair: [] for pair in pairs}
    for _ in range(iters + 1):  # the first round warms up
        for pair in pairs:
            times[pair].append(_timed(one(*pair), device))
    return {pair: 1e3 * statistics.median(t[1:]) for pair, t in times.items()}


def ablations(teacher, student, images, pairs, med: dict, device: str, iters: int):
    """The distillation step's cost if one design choice were undone, measured interleaved.

    Each row times the piece that changes (as built vs undone) and adds the difference to the
    measured distillation step: a teacher run a second time (features not shared by NST and KD),
    the teacher's whole inference instead of its backbone, the teacher's forward building an
    autograd graph (parameters left trainable), the NST loss in float64, the NST rows normalised
    into [B, C, N] copies (the first implementation) instead of inside the Gram matrices.
    """
    s_feats = {k: v.detach() for k, v in student.backbone(images).items()}
    with torch.no_grad():
        t_feats = teacher.backbone(images)

    def teacher_without_autograd():  # as built: the baseline of the next one, in this loop
        with torch.no_grad():
            teacher.backbone(images)

    def teacher_with_autograd():
        for p in teacher.parameters():
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                teacher.backbone(images)
        finally:
            for p in teacher.parameters():
                p.requires_grad_(False)

    def nst(dtype):
        def run():
            feats = {k: v.to(dtype).requires_grad_() for k, v in s_feats.items()}
            sum(nst_loss(feats[s], t_feats[t].to(dtype)) for s, t in pairs).backward()
        return run

    def nst_normalised_copies():
        # the loss as first built: rows normalised into [B, C, N] copies, then the MMD^2
        feats = {k: v.requires_grad_() for k, v in s_feats.items()}
        sum(mmd2(nst_samples(feats[s]), nst_samples(t_feats[t]), "poly").mean()
            for s, t in pairs).backward()

    pieces = {"nst fp32": nst(torch.float32), "nst fp64": nst(torch.float64),
              "nst normalised copies": nst_normalised_copies,
              "teacher fwd": teacher_without_autograd,
              "teacher fwd autograd": teacher_with_autograd}
    times = {n: [] for n in pieces}
    for fn in pieces.values():
        fn()  # warm-up
    for _ in range(iters):
        for name, fn in pieces.items():
            times[name].append(_timed(fn, device))
    m = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    extra = {
        "teacher features computed twice": med["teacher backbone fwd"],
        "teacher runs its heads (full inference)":
            med["teacher inference fwd"] - med["teacher backbone fwd"],
        "teacher forward with autograd": m["teacher fwd autograd"] - m["teacher fwd"],
        "NST loss in float64": m["nst fp64"] - m["nst fp32"],
        "NST rows normalised in [B, C, N] copies": m["nst normalised copies"] - m["nst fp32"],
    }
    base = med["student step"] + med["teacher backbone fwd"]
    print("\nif a design choice were undone (extra ms measured in this run, added to the step):")
    print(f"  {'variant':42s} {'extra ms':>9s} {'step ms':>9s} {'overhead':>9s}")
    print(f"  {'as built':42s} {0:9.1f} {med['distill step']:9.1f} "
          f"{med['distill step'] / base:9.3f}")
    for name, ms in extra.items():
        step = med["distill step"] + ms
        print(f"  {name:42s} {ms:9.1f} {step:9.1f} {step / base:9.3f}")


def paper_nst(device: str, repeats: int = 3):
    """nst_loss on FPN p2..p6 of one 800x1333 image (the paper's VOC input), C=256 both sides."""
    sizes = [(200, 336), (100, 168), (50, 84), (25, 42), (13, 21)]
    feats_s = [torch.randn(1, 256, h, w, device=device, requires_grad=True) for h, w in sizes]
    feats_t = [torch.randn(1, 256, h, w, device=device) for h, w in sizes]
    runs = []
    for _ in range(repeats + 1):
        runs.append(_timed(lambda: sum(
            nst_loss(s, t) for s, t in zip(feats_s, feats_t)).backward(), device))
    print(f"paper shapes (p2-p6 of 800x1333, 256 ch, per image): nst_loss fwd+bwd "
          f"{1e3 * statistics.median(runs[1:]):.1f} ms (median of {repeats})")


if __name__ == "__main__":
    main()
