"""report.md for a finished pipeline: the paper-style table first, then the pictures.

Every number is read from the stage files of the runs just made (stage.json, metrics.json) or
measured here (parameters, inference time, MMD between teacher and student features); the
report names the file each number comes from.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402

from ..config import load_config  # noqa: E402
from ..export import eager_runner, preprocess  # noqa: E402
from ..export.student import load_student_detector  # noqa: E402
from ..losses import nst_loss  # noqa: E402
from .plan import STUDENT_METHODS, Stage  # noqa: E402
from .report_methods import methods_section  # noqa: E402
from .run import stage_result  # noqa: E402

FIG_DIR = "figures"


def _metrics_rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean_std(values: list) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _load_detector(stage: Stage):
    cfg = load_config(os.path.join(stage.out_dir, "config.yaml"),
                      ["MODEL.WEIGHTS", os.path.join(stage.out_dir, "model_final.pth"),
                       "MODEL.DEVICE", "cpu"])
    return cfg, load_student_detector(cfg)


def _test_images(cfg, count: int):
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:count]
    images = [read_image(r["file_name"], format=cfg.INPUT.FORMAT) for r in records]
    tensors = [preprocess(im, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) for im in images]
    return images, tensors


def _ms_per_image(model, tensors) -> float:
    run = eager_runner(model)
    run(tensors[0])  # warm-up
    times = []
    for t in tensors:
        start = time.perf_counter()
        run(t)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


class Report:
    """Builds report.md and figures/ for the stages of one pipeline run."""

    def __init__(self, stages: list, out_dir: str, timing_images: int = 10):
        self.stages = [s for s in stages if stage_result(s) is not None]
        self.out_dir = out_dir
        self.timing_images = timing_images
        os.makedirs(os.path.join(out_dir, FIG_DIR), exist_ok=True)

    def _find(self, **meta) -> list:
        return [s for s in self.stages if s.kind == "train"
                and all(s.meta.get(k) == v for k, v in meta.items())]

    # ---------------------------------------------------------------- the table
    def table(self) -> tuple[str, dict]:
        det_teacher = self._find(stage="det", role="teacher")[0]
        cls_teacher = self._find(stage="cls", role="teacher")[0]
        t_cfg, teacher = _load_detector(det_teacher)
        _, tensors = _test_images(t_cfg, self.timing_images)
        student_stage = self._find(stage="det", role="student")[0]
        _, student = _load_detector(student_stage)
        # timed in one run, alternating, so both see the same machine load
        speed = {"teacher": _ms_per_image(teacher, tensors),
                 "student": _ms_per_image(student, tensors)}
        teacher_depth = t_cfg.MODEL.RESNETS.DEPTH
        params = {"teacher": sum(p.numel() for p in teacher.parameters()) / 1e6,
                  "student": sum(p.numel() for p in student.parameters()) / 1e6}
        header = ("| Method (pretraining → detection) | top-1 of pretrained backbone (%) | "
                  "VOC07 AP50 | AP | Params (M) | CPU ms/img |\n|---|---|---|---|---|---|\n")
        rows = []
        t_top1 = stage_result(cls_teacher)["metrics"]["classification"]["top1"]
        t_det = stage_result(det_teacher)["metrics"]["bbox"]
        rows.append(f"| Teacher R-{teacher_depth} | {t_top1:.1f} | {t_det['AP50']:.1f} | "
                    f"{t_det['AP']:.1f} | {params['teacher']:.1f} | {speed['teacher']:.0f} |")
        numbers = {"teacher": {"top1": t_top1, "AP50": t_det["AP50"], "AP": t_det["AP"]}}
        for method, label in STUDENT_METHODS.items():
            top1 = [stage_result(s)["metrics"]["classification"]["top1"]
                    for s in self._find(stage="cls", role="student", method=method)]
            for det_nst in (False, True):
                runs = self._find(stage="det", role="student", method=method, det_nst=det_nst)
                ap50 = [stage_result(s)["metrics"]["bbox"]["AP50"] for s in runs]
                ap = [stage_result(s)["metrics"]["bbox"]["AP"] for s in runs]
                name = f"{label} → {'NST' if det_nst else 'fine-tune'}"
                numbers[name] = {"top1": top1, "AP50": ap50, "AP": ap}
                rows.append(f"| R-18 {name} | {_mean_std(top1)} | {_mean_std(ap50)} | "
                            f"{_mean_std(ap)} | {params['student']:.1f} | "
                            f"{speed['student']:.0f} |")
        return header + "\n".join(rows) + "\n", numbers

    # ---------------------------------------------------------------- pictures
    def curves(self) -> str:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for stage in self._find(stage="cls"):
            rows = [r for r in _metrics_rows(stage.out_dir) if "total_loss" in r]
            axes[0].plot([r["iteration"] for r in rows], [r["total_loss"] for r in rows], ".-",
                         label=stage.name)
        for stage in self._find(stage="det"):
            if stage.meta.get("role") == "method":  # the methods section has their plot
                continue
            rows = _metrics_rows(stage.out_dir)
            loss = [r for r in rows if "total_loss" in r]
            axes[1].plot([r["iteration"] for r in loss], [r["total_loss"] for r in loss], ".-",
                         label=stage.name)
            ap = [r for r in rows if "bbox/AP50" in r]
            axes[2].plot([r["iteration"] for r in ap], [r["bbox/AP50"] for r in ap], "o-",
                         label=stage.name)
        for ax, title in zip(axes, ("classification pretraining: loss",
                                    "detection: total loss", "detection: VOC07 AP50")):
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.legend(fontsize=6)
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        return self._save(fig, "curves.png")

    def per_class_ap(self) -> str:
        dets = [s for s in self._find(stage="det") if s.meta.get("role") != "method"]
        classes = sorted({k[5:] for s in dets for k in stage_result(s)["metrics"]["bbox"]
                          if k.startswith("AP50-")})
        fig, ax = plt.subplots(figsize=(12, 4))
        if classes:
            width = 0.8 / len(dets)
            for i, stage in enumerate(dets):
                bbox = stage_result(stage)["metrics"]["bbox"]
                ax.bar(np.arange(len(classes)) + i * width,
                       [bbox.get(f"AP50-{c}", 0.0) for c in classes], width, label=stage.name)
            ax.set_xticks(np.arange(len(classes)) + 0.4, classes)
        ax.set_ylabel("AP50 (%)")
        ax.set_title("per-class VOC07 AP50")
        ax.legend(fontsize=6, ncol=3)
        return self._save(fig, "per_class_ap50.png")

    def detections(self, stage: Stage, count: int = 4) -> str:
        from detectron2.structures import Boxes, Instances
        from detectron2.utils.visualizer import Visualizer

        from ..export import rescale_boxes

        cfg, model = _load_detector(stage)
        images, tensors = _test_images(cfg, count)
        run = eager_runner(model)
        fig, axes = plt.subplots(1, count, figsize=(4 * count, 4))
        names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).thing_classes
        for ax, image, tensor in zip(np.atleast_1d(axes), images, tensors):
            det = run(tensor)
            keep = det["scores"] >= 0.5
            boxes = rescale_boxes(det["boxes"][keep], tensor.shape[1:], image.shape[:2])
            inst = Instances(image.shape[:2], pred_boxes=Boxes(boxes),
                             scores=det["scores"][keep], pred_classes=det["classes"][keep])
            rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
            vis = Visualizer(rgb, MetadataCatalog.get(cfg.DATASETS.TEST[0]))
            ax.imshow(vis.draw_instance_predictions(inst).get_image())
            ax.axis("off")
        fig.suptitle(f"{stage.name}: detections with score >= 0.5 ({', '.join(names)})")
        return self._save(fig, "detections.png")

    def selectivity(self, feature: str = "p3", channels: int = 5, images: int = 8) -> tuple:
        """Teacher channels' normalised activation maps next to the best-matching student channel
        of the student detector without and with detection-stage NST (the paper's picture),
        plus the MMD^2 (poly) between teacher and student features on `images` test images."""
        teacher_stage = self._find(stage="det", role="teacher")[0]
        plain = self._find(stage="det", role="student", det_nst=False)
        nst = self._find(stage="det", role="student", det_nst=True)
        if not plain or not nst:
            return "", {}
        models = {}
        for key, stage in (("teacher", teacher_stage), ("without NST", plain[0]),
                           ("with NST", nst[0])):
            cfg, model = _load_detector(stage)
            models[key] = model
        _, tensors = _test_images(cfg, images)
        feats = {}
        with torch.no_grad():
            for key, model in models.items():
                batch = model.preprocess_image([{"image": t} for t in tensors[:1]])
                feats[key] = model.backbone(batch.tensor)[feature][0]
                mmd = []
                for t in tensors:
                    fs = model.backbone(model.preprocess_image([{"image": t}]).tensor)[feature]
                    ft = models["teacher"].backbone(
                        models["teacher"].preprocess_image([{"image": t}]).tensor)[feature]
                    mmd.append(float(nst_loss(fs, ft, kernel="poly")))
                feats[key + "_mmd"] = statistics.mean(mmd)
        t = feats["teacher"].flatten(1)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-10)
        picked = torch.argsort(t.var(dim=1), descending=True)[:channels]
        fig, axes = plt.subplots(3, channels, figsize=(2.2 * channels, 6.6))
        for row, key in enumerate(("teacher", "without NST", "with NST")):
            f = feats[key].flatten(1)
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-10)
            for col, ch in enumerate(picked):
                match = ch if key == "teacher" else int(torch.argmax(f @ t[ch]))
                axes[row, col].imshow(f[match].reshape(feats[key].shape[1:]).numpy(),
                                      cmap="viridis")
                axes[row, col].set_xticks([])
                axes[row, col].set_yticks([])
                title = f"teacher ch {int(ch)}" if key == "teacher" else f"ch {match}"
                axes[row, col].set_title(title, fontsize=8)
            axes[row, 0].set_ylabel(key if key == "teacher" else f"student {key}")
        fig.suptitle(f"neuron selectivity maps at {feature} (normalised channel activations)")
        mmd = {k: feats[k + "_mmd"] for k in ("without NST", "with NST")}
        return self._save(fig, "selectivity.png"), mmd

    def _save(self, fig, name: str) -> str:
        path = os.path.join(FIG_DIR, name)
        fig.tight_layout()
        fig.savefig(os.path.join(self.out_dir, path), dpi=90)
        plt.close(fig)
        return path


def _precision(stage: Stage) -> str:
    cfg = load_config(os.path.join(stage.out_dir, "config.yaml"))
    layout = ", channels_last" if cfg.NST_DET.CHANNELS_LAST else ""
    if not cfg.SOLVER.AMP.ENABLED:
        return f"float32{layout}"
    if cfg.MODEL.DEVICE.startswith("cuda"):
        return f"float16 autocast (SOLVER.AMP.ENABLED, detectron2's AMPTrainer){layout}"
    return f"bfloat16 autocast on the CPU (SOLVER.AMP.ENABLED){layout}; evaluation in float32"


def _verdict(numbers: dict, mmd: dict) -> list[str]:
    """Plain statements about what the numbers do and do not show (computed, not hand-written)."""
    lines = []
    base = numbers.get("Student → fine-tune", {}).get("AP50", [])
    teacher = numbers["teacher"]["AP50"]
    if base:
        gap = teacher - statistics.mean(base)
        lines.append(f"Capacity gap: the teacher detector's AP50 is {teacher:.1f}, the plain "
                     f"R-18 student's {statistics.mean(base):.1f} ({gap:+.1f}); "
                     + ("there is something to transfer." if gap > 1 else
                        "the toy world is too easy for a teacher to help at this scale."))
        if statistics.mean(base) < 0.25 * teacher:
            lines.append("The plain student is far from converged at this schedule (under a "
                         "quarter of the teacher's AP50): the differences below say how much "
                         "faster each method learns in a short fine-tuning, not where longer "
                         "training would end.")
    spread = statistics.stdev(base) if len(base) > 1 else None
    for name, values in numbers.items():
        if name in ("teacher", "Student → fine-tune") or not values["AP50"] or not base:
            continue
        diff = statistics.mean(values["AP50"]) - statistics.mean(base)
        if spread is None:
            judged = "one seed only: no spread to judge it against"
        elif abs(diff) <= 2 * spread:
            judged = f"within twice the seed spread ({spread:.1f}): not a measurable effect here"
        else:
            judged = f"beyond twice the seed spread ({spread:.1f})"
        lines.append(f"{name}: AP50 {diff:+.1f} against the plain student ({judged}).")
    if mmd:
        lines.append(f"MMD² (poly) between student and teacher p3 features on test images: "
                     f"{mmd['without NST']:.4f} without detection-stage NST, "
                     f"{mmd['with NST']:.4f} with it (NST minimises exactly this).")
    return lines


def write_report(stages: list, out_dir: str) -> dict:
    """Write out_dir/report.md (+ figures/) and return the table's numbers."""
    report = Report(stages, out_dir)
    table, numbers = report.table()
    figures = [("Loss and AP curves", report.curves()),
               ("Per-class AP50", report.per_class_ap())]
    students = report._find(stage="det", role="student")
    best = max(students, key=lambda s: stage_result(s)["metrics"]["bbox"]["AP50"])
    figures.append((f"Detections of the best student ({best.name})", report.detections(best)))
    selectivity, mmd = report.selectivity()
    if selectivity:
        figures.append(("Neuron selectivity: teacher vs student channels, before and after NST",
                        selectivity))
    seeds = sorted({s.meta.get("seed") for s in students})
    lines = [
        "# nst_det reproduction report", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from the runs in `{out_dir}`. Every number "
        "below was read from those runs' `stage.json` / `metrics.json` files or measured while "
        "writing this report (parameters, CPU time per image, MMD).", "",
        "## Results (the paper's detection-table layout)", "", table,
        f"Training precision: {_precision(students[0])}. "
        f"Student rows: mean ± standard deviation over seeds {seeds}. Top-1 is the pretrained "
        "classification backbone's, on the toy classification val split. CPU ms/img: median "
        "eager inference at the test size, teacher and student timed in the same run.", "",
        "## What the numbers show", "", *[f"- {line}" for line in _verdict(numbers, mmd)], "",
    ]
    method_lines, method_numbers = methods_section(report.stages, out_dir, FIG_DIR)  # --methods
    lines += method_lines
    for title, path in figures:
        lines += [f"## {title}", "", f"![{title}]({path})", ""]
    lines += ["## Runs", "", "| stage | wall-clock (s) | result file |", "|---|---|---|"]
    for stage in report.stages:
        result = stage_result(stage)
        rel = os.path.relpath(os.path.join(stage.out_dir, "stage.json"), out_dir)
        lines.append(f"| {stage.name} | {result['seconds']:.0f} | `{rel}` |")
    from ..utils.atomic import atomic_write

    with atomic_write(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"table": numbers, "mmd": mmd, "methods": method_numbers}
