"""Paper-shape step timings: what distillation costs at the paper's shapes, fp32 against AMP.

Setups (random weights: timing does not depend on them; the models are built from the
project's paper configs with benchmarks/bench_distill_overhead.py's `build_pair` and
`paper_batch`):
- detection: R-18 FPN and R-50 FPN students, NST on p2-p6 from an R-101 FPN teacher, batch 2
  at 800x1333 (configs/VOC-Detection);
- classification: R-18 student, NST on res5 from an R-50 teacher, batch 64 at 224x224
  (configs/ImageNet-Pretrain/R18*.yaml).
For fp32, bf16 and fp16 autocast (fp16 with a GradScaler, as detectron2's AMPTrainer) it times,
interleaved on the same batch: the plain student's training step, the teacher's forward (its
backbone / feature extractor: all the distiller needs), the distiller's training step and the
NST loss alone (forward + backward on the step's feature pairs), and measures peak memory of
each step on a GPU. Ratios: overhead = distill step / (student step + teacher forward); NST share
= NST loss / distill step. --tiny: the same code at tiny shapes and one iteration.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

V = Path("configs") / "VOC-Detection"
C = Path("configs") / "ImageNet-Pretrain"
R50 = ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256"]
# (label, kind, student config (distillation), teacher config / plain config, extra opts)
SETUPS = [
    ("det R-18 FPN <- R-101 FPN", "det", V / "faster_rcnn_R_18_FPN_NST.yaml",
     V / "faster_rcnn_R_101_FPN_teacher.yaml", []),
    ("det R-50 FPN <- R-101 FPN", "det", V / "faster_rcnn_R_18_FPN_NST.yaml",
     V / "faster_rcnn_R_101_FPN_teacher.yaml", R50),
    ("cls R-18 <- R-50", "cls", C / "R18_R50_NST_poly.yaml", C / "R18.yaml", []),
]
PRECISIONS = ("fp32", "bf16", "fp16")
SHAPES = {False: {"det": (2, 800, 1333), "cls": (64, 224, 224)},
          True: {"det": (2, 96, 160), "cls": (2, 32, 32)}}
# --tiny on a CPU: fewer proposals and RoIs per image (the student's heads only), the R-50 FPN
# student left out (the R-18 one runs the same code with other opts), and fp16 on the
# classification setup only: CPU autocast fp16 is emulated, ~50 s a detection step at 128x192
TINY_DET_OPTS = ["MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
                 "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64"]
TINY_SETUPS = ("det R-18 FPN <- R-101 FPN", "cls R-18 <- R-50")


def _bench(repo: Path):
    sys.path.insert(0, str(repo / "benchmarks"))
    import bench_distill_overhead

    return bench_distill_overhead


def build_detection(repo, device, tmp, student_file, teacher_file, opts, shape):
    """Plain student, distiller, batch, and the teacher-forward / NST functions of a pair."""
    bench = _bench(repo)
    student, distill, _ = bench.build_pair(device, tmp, repo / student_file,
                                           repo / teacher_file, opts)
    n, h, w = shape
    batch = bench.paper_batch(n, h, w)
    for b in batch:  # the boxes are drawn for 800x1333
        b["instances"].gt_boxes.scale(w / 1333, h / 800)
    images = distill.preprocess_image(batch).tensor
    pairs = [(p.student, p.teacher) for p in distill.feature_pairs]
    teacher = distill.teacher

    def teacher_forward():
        return teacher.backbone(images)

    def student_features():
        return student.backbone(images)

    return student, distill, batch, teacher_forward, student_features, pairs


def build_classification(repo, device, tmp, distill_file, plain_file, opts, shape):
    """The same for the classification distiller (teacher: a random torchvision ResNet-50)."""
    import torch
    import torchvision
    from detectron2.modeling import build_model

    from nst_det.config import load_config

    teacher_file = str(Path(tmp) / "resnet50_random.pth")
    torch.save(torchvision.models.resnet50().state_dict(), teacher_file)
    base = ["MODEL.DEVICE", device, *opts]
    student = build_model(load_config(str(repo / plain_file), base))
    distill = build_model(load_config(str(repo / distill_file),
                                      [*base, "MODEL.TEACHER.WEIGHTS", teacher_file]))
    distill.student.load_state_dict(student.student.state_dict())
    n, h, w = shape
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
              "label": i % 1000} for i in range(n)]
    images = distill.preprocess_image(batch)
    pairs = [(p.student, p.teacher) for p in distill.distill.feature_pairs]
    pre = distill.pre_relu_features

    def teacher_forward():
        return distill.teacher.forward_features(images, pre, names=[t for _, t in pairs])[1]

    def student_features():
        return student.student.forward_features(images, pre, names=[s for s, _ in pairs])[1]

    return student, distill, batch, teacher_forward, student_features, pairs


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_setup(repo, device, kind, files, opts, shape, warmup, iters, tmp,
                  precisions=PRECISIONS) -> dict:
    """Median ms, ratios and peak memory of one setup for each of `precisions`."""
    import torch
    from detectron2.utils.events import EventStorage

    from nst_det.losses import nst_loss

    builder = build_detection if kind == "det" else build_classification
    t0 = time.perf_counter()
    student, distill, batch, teacher_fwd, student_feats, pairs = builder(
        repo, device, tmp, files[0], files[1], opts, shape)
    print(f"[paper_shapes] {files[0].name} {' '.join(opts)}: built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    student.train()
    distill.train()
    dev_type = device.split(":")[0]
    optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9)
                  for m in (student, distill)}
    out = {}
    for precision in precisions:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

        def autocast(dtype=dtype):
            return torch.autocast(dev_type, dtype=dtype) if dtype else nullcontext()

        scaler = torch.amp.GradScaler(dev_type, enabled=precision == "fp16")
        nst_values = []

        def step(model, scaler=scaler, autocast=autocast, nst_values=nst_values):
            with autocast():
                losses = model(batch)
            if "loss_nst" in losses:
                nst_values.append(losses["loss_nst"].detach())
            opt = optimizers[id(model)]
            opt.zero_grad(set_to_none=True)
            scaler.scale(sum(losses.values())).backward()
            scaler.step(opt)
            scaler.update()

        def teacher(autocast=autocast):
            with torch.no_grad(), autocast():
                teacher_fwd()

        with torch.no_grad(), autocast():
            s_feats, t_feats = student_feats(), teacher_fwd()

        def nst(s_feats=s_feats, t_feats=t_feats):
            loss = sum(nst_loss(s_feats[s].detach().requires_grad_(), t_feats[t])
                       for s, t in pairs)
            loss.backward()

        variants = {"student": lambda: step(student), "teacher_fwd": teacher,
                    "distill": lambda: step(distill), "nst": nst}
        try:
            times = {k: [] for k in variants}
            peak = {}
            with EventStorage(0):
                for _ in range(warmup):
                    for fn in variants.values():
                        fn()
                for _ in range(iters):
                    for name, fn in variants.items():
                        _sync(device)
                        start = time.perf_counter()
                        fn()
                        _sync(device)
                        times[name].append(time.perf_counter() - start)
                if dev_type == "cuda":
                    for name in ("student", "distill", "teacher_fwd"):
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        variants[name]()
                        torch.cuda.synchronize()
                        peak[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception as e:  # e.g. a precision the device cannot run: a finding, not a stop
            out[precision] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"[paper_shapes]   {precision}: {ms}", flush=True)
        finite = bool(nst_values) and all(math.isfinite(float(v)) for v in nst_values)
        out[precision] = {
            **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
            "overhead": round(ms["distill"] / (ms["student"] + ms["teacher_fwd"]), 3),
            "nst_share": round(ms["nst"] / ms["distill"], 4),
            "peak_gib": peak or None, "loss_nst_finite": finite,
            "loss_nst": float(nst_values[-1]) if nst_values else None,
        }
    return out


def _row_text(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    peak = (f", peak {r['peak_gib']['student']:.1f} / {r['peak_gib']['distill']:.1f} GiB "
            "(student / distill step)" if r["peak_gib"] else "")
    nan = "" if r["loss_nst_finite"] else ", loss_nst NOT finite"
    return (f"student {r['student_ms']:.1f} ms, teacher fwd {r['teacher_fwd_ms']:.1f} ms, "
            f"distill {r['distill_ms']:.1f} ms, overhead {r['overhead']:.3f}, NST "
            f"{100 * r['nst_share']:.1f}% ({r['nst_ms']:.1f} ms){peak}{nan}")


def measure_all(ctx) -> dict:
    """Every setup x precision; the part fails if any of them raised or gave a non-finite NST."""
    import torch

    repo, device, tiny = Path(ctx["repo"]), ctx["device"], ctx["tiny"]
    warmup, iters = (0, 1) if tiny else (2, 5)
    metrics = {"warmup": warmup, "iters": iters, "device": device,
               "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
               "cudnn_tf32": torch.backends.cudnn.allow_tf32, "setups": {}}
    rows, problems, speedups = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kind, a, b, opts in SETUPS:
            if tiny and label not in TINY_SETUPS:
                continue
            shape = SHAPES[tiny][kind]
            precisions = PRECISIONS
            if tiny and kind == "det":
                opts = [*opts, *TINY_DET_OPTS]
                if not device.startswith("cuda"):
                    precisions = ("fp32", "bf16")
            res = measure_setup(repo, device, kind, (a, b), opts, shape, warmup, iters, tmp,
                                precisions)
            if device.startswith("cuda"):  # the setup's models are gone: give their memory back
                torch.cuda.empty_cache()
            metrics["setups"][label] = {"shape": shape, **res}
            for precision, r in res.items():
                rows.append([f"{label}, {shape[0]}x{shape[1]}x{shape[2]}, {precision}",
                             _row_text(r)])
                if "error" in r or not r["loss_nst_finite"]:
                    problems.append(f"{label} {precision}")
            base = res["fp32"].get("distill_ms")
            amp = [f"{p} x{base / res[p]['distill_ms']:.2f}" for p in ("bf16", "fp16")
                   if base and "distill_ms" in res.get(p, {})]
            if amp:
                speedups.append(f"{label.split(' <-')[0]}: {', '.join(amp)}")
    result = {"summary": "distill-step speed-up vs fp32: " + "; ".join(speedups),
              "metrics": metrics, "rows": rows}
    if problems:
        result["status"] = f"failed: errors or non-finite loss_nst in {', '.join(problems)}"
    return result
