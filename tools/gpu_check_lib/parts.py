"""The parts of the GPU check. Each is `f(ctx) -> {"summary", "metrics", "rows"}`, run in its own
process by runner.py; it raises (any exception) when what it checks does not hold.

ctx: {"repo", "device" ("cuda" | "cpu"), "tiny" (bool), "work_dir", "bundle", "site",
"results": {earlier part: its metrics}}. Heavy imports (torch, detectron2) happen inside the
functions: the package is imported by the bare interpreter before anything is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

Q = Path("configs") / "quick_schedules"
TINY_DATA = ["DATASETS.TRAIN", "('toy_voc_tiny_trainval',)",
             "DATASETS.TEST", "('toy_voc_tiny_test',)", "DATALOADER.NUM_WORKERS", "0"]
# the CI plan's stages kept in --tiny mode: one student through pretraining, conversion,
# detection and export (the full CI plan has 13 stages, minutes on a shared 2-core CPU)
TINY_PIPELINE = ("cls_plain_s0", "det_plain_s0", "export")
EXPORT_SCORE_THRESH = 0.01


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _repo(ctx) -> Path:
    return Path(ctx["repo"])


# ---- install ------------------------------------------------------------------------------
def install(ctx) -> dict:
    """The bundle's wheels and detectron2 tree into ctx["site"] (pip --no-index --target)."""
    from gpu_check_lib.bundle import install as install_bundle

    done = install_bundle(Path(ctx["bundle"]), Path(ctx["site"]))
    return {"summary": f"{len(done['installed'])} wheels + detectron2 tree into {ctx['site']} "
                       f"(via {done['via']}, {done['seconds']:.0f} s)",
            "metrics": done}


# ---- environment --------------------------------------------------------------------------
IMPORTS = ["detectron2", "fvcore", "iopath", "yacs", "pycocotools", "omegaconf", "hydra",
           "submitit", "ot", "scipy", "onnx", "onnxruntime", "cv2", "matplotlib", "tabulate",
           "tensorboard", "nst_det"]


def _version(module) -> str:
    return str(getattr(module, "__version__", "?"))


def _command_line(cmd: list) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({type(e).__name__})"
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit {out.returncode}"


def _nccl_version() -> str:
    import torch

    version = torch.cuda.nccl.version()  # a tuple in torch 2.x, an int in older releases
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def detectron2_flavour() -> dict:
    """Which detectron2 imports: the patched v0.6 of this project or another build, and whether
    its compiled ops (detectron2._C) are there."""
    import importlib.metadata as md

    import detectron2
    import detectron2._C as ext

    compiled = not str(getattr(ext, "__file__", "")).endswith(".py")
    try:
        md.distribution("pb1-detectron2")
        dist = "pb1-detectron2 (v0.6 sdist + third_party/detectron2/patches)"
    except md.PackageNotFoundError:
        dist = "detectron2 (built from source)"
    info = {"version": detectron2.__version__, "path": os.path.dirname(detectron2.__file__),
            "distribution": dist, "compiled_ops": compiled}
    if compiled:
        info.update(compiler=ext.get_compiler_version(), cuda=ext.get_cuda_version(),
                    has_cuda=bool(ext.has_cuda()))
    return info


def environment(ctx) -> dict:
    """GPU, driver, torch/CUDA/cuDNN/NCCL, torchvision's ops on the device, detectron2's
    flavour and every module the project imports."""
    import platform

    import torch
    import torchvision

    device = ctx["device"]
    m = {"python": platform.python_version(), "torch": torch.__version__,
         "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
         "torchvision": torchvision.__version__, "cpus": os.cpu_count(),
         "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} but torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(0)
        m.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                 capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                 bf16=torch.cuda.is_bf16_supported(),
                 nccl=_nccl_version(),
                 driver=_command_line(["nvidia-smi", "--query-gpu=driver_version",
                                       "--format=csv,noheader"]))
    m["nvcc"] = _command_line(["nvcc", "--version"]) if shutil.which("nvcc") else "not found"
    # detectron2's Faster R-CNN takes ROIAlign and NMS from torchvision: its kernels on the device
    from torchvision.ops import nms, roi_align

    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(64, 4, generator=g) * 50
    boxes[:, 2:] += boxes[:, :2] + 1
    scores, feats = torch.rand(64, generator=g), torch.rand(1, 8, 32, 32, generator=g)
    rois = torch.cat([torch.zeros(64, 1), boxes / 2], dim=1)
    keep_dev = nms(boxes.to(device), scores.to(device), 0.5).cpu()
    pooled_dev = roi_align(feats.to(device), rois.to(device), (7, 7), 0.5, 2).cpu()
    if not torch.equal(keep_dev, nms(boxes, scores, 0.5)):
        raise RuntimeError(f"torchvision nms on {device} differs from the CPU")
    torch.testing.assert_close(pooled_dev, roi_align(feats, rois, (7, 7), 0.5, 2))
    m["torchvision_ops"] = f"nms, roi_align on {device} match the CPU"
    missing, versions = [], {}
    for name in IMPORTS:
        try:
            versions[name] = _version(importlib.import_module(name))
        except Exception as e:  # any import-time error is a finding
            missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    try:
        from torch.utils.tensorboard import SummaryWriter  # detectron2's default writer
        del SummaryWriter
    except Exception as e:
        missing.append(f"torch.utils.tensorboard ({type(e).__name__}: {e})")
    m["modules"] = versions
    if "onnxruntime" in versions:
        import onnxruntime

        m["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if "detectron2" in versions:
        m["detectron2"] = detectron2_flavour()
        site = ctx.get("site")
        if site and not m["detectron2"]["path"].startswith(str(Path(site).resolve())):
            missing.append(f"detectron2 imported from {m['detectron2']['path']}, not the bundle")
    m["missing"] = missing
    if missing:
        raise RuntimeError("cannot import: " + "; ".join(missing))
    d2 = m["detectron2"]
    gpu = (f"{m['gpu']} ({m['gpu_memory_gib']} GiB, sm {m['capability']}), driver "
           f"{m['driver']}, " if "gpu" in m else "CPU only, ")
    summary = (f"{gpu}python {m['python']}, torch {m['torch']} (CUDA {m['torch_cuda']}), "
               f"torchvision {m['torchvision']}, detectron2 {d2['version']} "
               f"{d2['distribution']}, compiled ops: {'yes' if d2['compiled_ops'] else 'no'}")
    return {"summary": summary, "metrics": m}


# ---- toy pipeline at CI scale -------------------------------------------------------------
def _load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _print_tracebacks(folder: Path, lines: int = 40) -> None:
    """The last lines of every log under `folder` that holds a traceback."""
    for log in sorted(folder.rglob("*")):
        if log.is_file() and log.suffix in (".err", ".out", ".log") and log.stat().st_size:
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                print(f"---- {log} (last {lines} lines)", flush=True)
                print("\n".join(text.splitlines()[-lines:]), flush=True)


def pipeline(ctx) -> dict:
    """tools/run_pipeline.py's CI-scale toy plan (classification, teacher and
    student detectors without and with NST, export verified, report), trained on ctx's device;
    --tiny keeps one student's chain (TINY_PIPELINE)."""
    from dataclasses import replace

    from nst_det.pipeline import TOY_SCALES, PipelineRunner, build_plan, stage_result
    from nst_det.pipeline.plan import TOY_PLANS
    from nst_det.pipeline.report import write_report
    from nst_det.pipeline.steps import export_stage

    rp = _load_script(_repo(ctx) / "tools" / "run_pipeline.py", "run_pipeline")
    out = _fresh(Path(ctx["work_dir"]) / "pipeline")
    args = rp.parse_args(["--scale", "ci", "--output", str(out), "--jobs", "2", "--amp", "on"])
    # as tools/run_pipeline.py main() builds it, plus the device (the toy configs say cpu)
    train_opts = [*rp.amp_opts(args.amp, False), "MODEL.DEVICE", ctx["device"]]
    stages = build_plan(str(out), TOY_SCALES["ci"], TOY_PLANS["r18"], train_opts=train_opts)
    if ctx["tiny"]:
        stages = [replace(s, after=[a for a in s.after if a in TINY_PIPELINE])
                  for s in stages if s.name in TINY_PIPELINE]
    settings = rp.cluster_settings(args)
    if ctx["device"].startswith("cuda") and settings.gpus != {"default": 1}:
        raise RuntimeError(f"tools/run_pipeline.py gives the local stages GPUs {settings.gpus} "
                           "at --num-gpus 1 on a GPU machine, not {'default': 1}: submitit "
                           "hides the GPU from a job given none")
    handlers = {"export": lambda stage: export_stage(stage, stages),
                "report": lambda stage: write_report(stages, stage.out_dir)}
    start = time.perf_counter()
    try:
        PipelineRunner(stages, handlers, settings).run()
    except BaseException:
        _print_tracebacks(out)  # the stage logs stay on the machine; this log comes back
        raise
    wall = time.perf_counter() - start
    results = {s.name: stage_result(s) for s in stages}
    not_done = [n for n, r in results.items() if not r]
    if not_done:
        raise RuntimeError(f"stages without a result: {not_done}")
    ap50 = {n: r["metrics"]["bbox"]["AP50"] for n, r in results.items()
            if n.startswith("det_") and "bbox" in r.get("metrics", {})}
    export = results["export"]["metrics"]
    verified = [f for f in ("checkpoint", "onnx") if export.get(f, {}).get("passed")]
    if verified != ["checkpoint", "onnx"]:
        raise RuntimeError(f"export not verified: {export}")
    report = out / "report.md"
    m = {"stages": len(stages), "wall_s": round(wall, 1), "ap50": ap50, "export": export,
         "report": str(report) if report.is_file() else None, "output": str(out)}
    rows = [[n, f"AP50 {v:.1f}"] for n, v in ap50.items()]
    return {"summary": f"{len(stages)} stages on {ctx['device']} in {wall:.0f} s; export "
                       f"({export['student']}) checkpoint + ONNX verified"
                       f"{'; report.md written' if m['report'] else ''}",
            "metrics": m, "rows": rows}


# ---- paper-shape step timings -------------------------------------------------------------
def paper_shapes(ctx) -> dict:
    """Student / distillation steps, teacher forward, NST share, peak memory, fp32 vs AMP."""
    from gpu_check_lib.paper_shapes import measure_all

    return measure_all(ctx)


# ---- tools/train_net.py on one GPU, resumed through detectron2's distributed worker ---------
def _iterations_from_log(text: str) -> list:
    marker = "Starting training from iteration "
    return [int(ln.split(marker)[1].split()[0]) for ln in text.splitlines() if marker in ln]


def train_net(ctx) -> dict:
    """`tools/train_net.py --num-gpus 1` on the toy NST student (AMP, random R-50 FPN teacher)
    for a few iterations, then `--resume` to twice as many through detectron2's
    `_distributed_worker` (the process group launch() sets up for several GPUs: NCCL on a GPU,
    gloo on a CPU), checking each run starts where the checkpoint says and ends at max_iter."""
    import torch
    from detectron2.modeling import build_model

    from nst_det.config import load_config
    from nst_det.pipeline.describe import metrics_rows

    repo, device = _repo(ctx), ctx["device"]
    work = _fresh(Path(ctx["work_dir"]) / "train_net")
    out = work / "output"
    teacher_cfg = repo / Q / "faster_rcnn_R_50_FPN_toy_teacher.yaml"
    teacher_opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    teacher_file = work / "teacher_random.pth"
    # the teacher's random weights and the student's SEED fixed: a few iterations leave scores
    # near the export's threshold, and unseeded runs sometimes kept no detection to verify
    torch.manual_seed(0)
    torch.save({"model": build_model(load_config(str(teacher_cfg), teacher_opts)).state_dict()},
               teacher_file)
    iters = 4 if ctx["tiny"] else 20
    common = ["--config-file", str(repo / Q / "faster_rcnn_R_18_FPN_toy_nst.yaml"),
              "--num-gpus", "1",
              "MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "SEED", "0",
              "MODEL.TEACHER.CONFIG_FILE", str(teacher_cfg),
              "MODEL.TEACHER.WEIGHTS", str(teacher_file),
              "MODEL.TEACHER.OPTS", str(teacher_opts[2:]),
              "MODEL.TEACHER.EVAL_BEFORE_TRAIN", "False", *TINY_DATA,
              "SOLVER.AMP.ENABLED", "True", "SOLVER.CHECKPOINT_PERIOD", str(iters // 2),
              "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "2", "TEST.EVAL_PERIOD", "0",
              "OUTPUT_DIR", str(out)]
    backend_file = work / "backend.txt"
    runs = {
        "train": ([sys.executable, str(repo / "tools" / "train_net.py"), *common,
                   "SOLVER.MAX_ITER", str(iters)], 0, iters),
        "resume": ([sys.executable, "-m", "gpu_check_lib.nccl_launch", str(backend_file),
                    "--resume", *common, "SOLVER.MAX_ITER", str(2 * iters)], iters, 2 * iters),
    }
    m, rows = {"output_dir": str(out), "iterations": iters}, []
    for name, (cmd, first, max_iter) in runs.items():
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        (work / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            _print_tracebacks(work)
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:]
            raise RuntimeError(f"{name} run exited {done.returncode}: {tail} "
                               f"(log {work / (name + '.log')})")
        starts = _iterations_from_log(done.stdout + done.stderr)
        if starts != [first]:
            raise RuntimeError(f"{name} run started from iteration {starts}, expected {first}")
        final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
        if final["iteration"] != max_iter - 1:
            raise RuntimeError(f"{name}: model_final.pth at iteration {final['iteration']}, "
                               f"expected {max_iter - 1}")
        steps = [r for r in metrics_rows(str(out))
                 if first <= r.get("iteration", -1) < max_iter and "total_loss" in r]
        if not steps or not all(math.isfinite(r["total_loss"]) for r in steps):
            raise RuntimeError(f"{name}: no finite total_loss in metrics.json: {steps}")
        times = sorted(r["time"] for r in steps if "time" in r)
        m[name] = {"seconds": round(seconds, 1), "start_iter": first, "end_iter": max_iter - 1,
                   "total_loss": steps[-1]["total_loss"], "loss_nst": steps[-1].get("loss_nst"),
                   "sec_per_iter": times[len(times) // 2] if times else None}
        rows.append([name, f"iterations {first}-{max_iter - 1} in {seconds:.1f} s, total_loss "
                           f"{steps[-1]['total_loss']:.3f}, loss_nst "
                           f"{steps[-1].get('loss_nst', float('nan')):.4f}"])
    m["backend"] = backend_file.read_text().strip()
    expected = "nccl" if device.startswith("cuda") else "gloo"
    if m["backend"] != expected:
        raise RuntimeError(f"the distributed worker ran with {m['backend']}, expected {expected}")
    evals = [r for r in metrics_rows(str(out)) if "bbox/AP50" in r]
    m["final_ap50"] = evals[-1]["bbox/AP50"] if evals else None
    rows[-1][1] += f", {m['backend']} process group"
    return {"summary": f"{iters} iterations (AMP) via tools/train_net.py --num-gpus 1, resumed "
                       f"to {2 * iters} through detectron2's distributed worker "
                       f"({m['backend']})", "metrics": m, "rows": rows}


# ---- export of the student trained by train_net ---------------------------------------------
def export(ctx) -> dict:
    """TorchScript and ONNX of train_net's student (nst_det.export: student only, no
    teacher), each verified against the eager model on test images (on the CPU, as
    tools/export_model.py does)."""
    from nst_det.config import load_config
    from nst_det.export.api import export_and_verify

    out = Path(ctx["results"]["train_net"]["output_dir"])
    work = _fresh(Path(ctx["work_dir"]) / "export")
    # a few iterations from random weights score below the configured 0.05: a lower threshold
    # keeps detections to compare (a verification over no detections would prove nothing)
    cfg = load_config(str(out / "config.yaml"),
                      ["MODEL.WEIGHTS", str(out / "model_final.pth"), "MODEL.DEVICE", "cpu",
                       "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(EXPORT_SCORE_THRESH)])
    m, rows = {"score_thresh_test": EXPORT_SCORE_THRESH}, []
    for fmt in ("torchscript", "onnx"):
        s = export_and_verify(cfg, fmt, str(work / fmt), num_images=2 if ctx["tiny"] else 3)
        m[fmt] = {k: s[k] for k in ("file", "size_bytes", "max_box_dev", "max_score_dev",
                                    "total_detections", "passed")}
        if not s["passed"]:
            raise RuntimeError(f"{fmt} export failed verification: {m[fmt]}")
        if not s["total_detections"]:
            raise RuntimeError(f"{fmt}: the verification compared no detections")
        rows.append([fmt, f"{s['size_bytes'] / 1e6:.1f} MB, {s['total_detections']} "
                          f"detections, max |box - eager| {s['max_box_dev']:.1e} px, "
                          f"max |score - eager| {s['max_score_dev']:.1e}: verified"])
    return {"summary": "TorchScript and ONNX of the trained student verified", "metrics": m,
            "rows": rows}


# ---- optional: upstream detectron2 with its compiled (CUDA) ops -----------------------------
def upstream_ops(ctx) -> dict:
    """Build the bundle's upstream detectron2 archive with its compiled ops (CUDA where nvcc
    and a GPU are there) into its own folder and call a compiled op on the device."""
    import torch

    sys.path.insert(0, str(_repo(ctx) / "tools"))
    from setup_upstream_env import build_tree

    manifest = json.loads((Path(ctx["bundle"]) / "bundle.json").read_text())
    if not manifest.get("upstream_archive"):
        return {"status": "not run: the bundle has no upstream archive (--with-upstream)"}
    work = _fresh(Path(ctx["work_dir"]) / "upstream")
    (work / "src").mkdir()
    root = build_tree(Path(ctx["bundle"]) / manifest["upstream_archive"], work / "src")
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 2))
    # --no-build-isolation: setuptools and wheel come from the bundle's build-only folder, as
    # for the detectron2 tree (bundle._pip_install); the GPU machine may have neither
    build_site = [ctx["site"] + "-build"] if ctx.get("site") else []
    env["PYTHONPATH"] = os.pathsep.join(
        [*build_site, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    if ctx["device"].startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(0)
        env.update(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=f"{major}.{minor}")
    target = work / "site"
    start = time.perf_counter()
    built = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                            "--no-build-isolation", "--target", str(target), str(root)],
                           env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (work / "build.log").write_text(built.stdout + built.stderr)
    if built.returncode != 0:
        raise RuntimeError(f"build failed after {seconds:.0f} s (log {work / 'build.log'})")
    probe = ("import torch, detectron2._C as C; from detectron2.layers import nms_rotated; "
             "b = torch.tensor([[10., 10, 8, 6, 0], [10, 10, 8, 6, 5]], "
             f"device='{ctx['device']}'); "
             "k = nms_rotated(b, torch.tensor([0.9, 0.8], device=b.device), 0.5); "
             "print(C.get_compiler_version(), '|', C.get_cuda_version(), '|', C.has_cuda(), "
             "'|', k.tolist())")
    env["PYTHONPATH"] = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    ran = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         cwd=work)
    if ran.returncode != 0:
        raise RuntimeError(f"compiled op failed: {ran.stderr.strip().splitlines()[-1:]}")
    compiler, cuda, has_cuda, keep = (s.strip() for s in ran.stdout.strip().split("|"))
    m = {"build_s": round(seconds, 1), "compiler": compiler, "cuda": cuda,
         "has_cuda": has_cuda, "nms_rotated_keep": keep}
    return {"summary": f"built in {seconds:.0f} s ({compiler}, CUDA {cuda}); nms_rotated on "
                       f"{ctx['device']} keeps {keep}", "metrics": m}
