"""report.md for a finished pipeline: the paper-style table first, then the pictures.

Every number is read from the stage files of the runs just made (stage.json, metrics.json) or
measured here (parameters, inference time, MMD between teacher and student features); the
report names the file each number comes from. What was run (backbones, detectors, the feature
levels NST pairs, the data sets) is read from each run's own config by describe.py (its
`config.yaml`, else the plan's config file and overrides), and the results table has a column
for each detection metric the stage records hold (VOC: AP50, AP, AP75; COCO: AP, AP50, AP75, APs,
APm, APl), so the same code describes a toy run and a paper-scale one. Measurements that need a
run's weights and test images are skipped, saying so, when those files are not there.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image

from ..config import load_config
from ..export import eager_runner, preprocess
from ..export.student import load_student_detector
from ..losses import nst_loss
from .describe import (
    backbone_name,
    classifier_name,
    detector_name,
    distillation_summary,
    evaluator_label,
    set_list,
    stage_config,
    training_precision,
)
from .paired import mean_sd
from .plan import STUDENT_METHODS, Stage
from .report_methods import methods_section
from .run import stage_result

FIG_DIR = "figures"
# preferred column order of the detection metrics, by evaluator type; others follow sorted
_METRIC_ORDER = {"pascal_voc": ("AP50", "AP", "AP75"),
                 "coco": ("AP", "AP50", "AP75", "APs", "APm", "APl")}
def _subplots(nrows: int = 1, ncols: int = 1, **fig_kw):
    """A figure on its own Agg canvas and its axes, as `pyplot.subplots` returns them.

    The canvas is chosen here, where figures are drawn, rather than with `matplotlib.use` at
    import: importing the report then leaves matplotlib's backend and pyplot's figure list
    alone for whoever imported nst_det (a notebook, an interactive session).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**fig_kw)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols)


def _metrics_rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
        return [s for s in self.stages if s.kind in ("train", "evaluate")
                and all(s.meta.get(k) == v for k, v in meta.items())]

    def student_name(self, method: str = "plain") -> str:
        """The pretrained student's classifier, e.g. 'R-18', from its classification config."""
        runs = self._find(stage="cls", role="student", method=method)
        return classifier_name(stage_config(runs[0]).MODEL.CLASSIFIER.ARCH) if runs else "?"

    def measure(self, teacher: Stage, student: Stage) -> dict | str:
        """Parameters and CPU time per image of the teacher and a student detector, or why they
        cannot be measured here (a run's weights, config or test images are not there)."""
        for stage in (teacher, student):
            for name in ("model_final.pth", "config.yaml"):
                if not os.path.isfile(os.path.join(stage.out_dir, name)):
                    return f"{os.path.join(stage.out_dir, name)} is not there"
        try:
            t_cfg, t_model = _load_detector(teacher)
            _, tensors = _test_images(t_cfg, self.timing_images)
            _, s_model = _load_detector(student)
        except OSError as e:  # e.g. the test images are on another machine
            return f"{type(e).__name__}: {e}"
        # timed in one run, alternating, so both see the same machine load
        return {"params": {"teacher": sum(p.numel() for p in t_model.parameters()) / 1e6,
                           "student": sum(p.numel() for p in s_model.parameters()) / 1e6},
                "speed": {"teacher": _ms_per_image(t_model, tensors),
                          "student": _ms_per_image(s_model, tensors)}}

    # ---------------------------------------------------------------- the table
    def table(self) -> tuple[str, dict]:
        """The paper-layout table: one column per detection metric in the stage records."""
        det_teacher = self._find(stage="det", role="teacher")[0]
        cls_teacher = self._find(stage="cls", role="teacher")[0]
        students = self._find(stage="det", role="student")
        t_cfg = stage_config(det_teacher)
        kind, _ = evaluator_label(t_cfg.DATASETS.TEST[0])
        bbox = {s.name: stage_result(s)["metrics"]["bbox"] for s in [det_teacher, *students]}
        common = set.intersection(*({k for k in b if "-" not in k} for b in bbox.values()))
        order = _METRIC_ORDER.get(kind, _METRIC_ORDER["coco"])
        self.metrics = [k for k in order if k in common] + sorted(common - set(order))
        measured = self.measure(det_teacher, students[0])
        self.not_measured = measured if isinstance(measured, str) else ""
        extra_cols = [] if self.not_measured else ["Params (M)", "CPU ms/img"]
        cols = ["Method (pretraining → detection)", "top-1 of pretrained backbone (%)",
                *self.metrics, *extra_cols]
        header = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"

        def extra(who):
            if self.not_measured:
                return ""
            return (f" {measured['params'][who]:.1f} | {measured['speed'][who]:.0f} |")

        t_top1 = stage_result(cls_teacher)["metrics"]["classification"]["top1"]
        t_det = bbox[det_teacher.name]
        rows = [f"| Teacher {backbone_name(t_cfg)} | {t_top1:.1f} | "
                + " | ".join(f"{t_det[k]:.1f}" for k in self.metrics) + " |" + extra("teacher")]
        numbers = {"teacher": {"top1": t_top1, **{k: t_det[k] for k in self.metrics}}}
        for method, label in STUDENT_METHODS.items():
            top1 = [stage_result(s)["metrics"]["classification"]["top1"]
                    for s in self._find(stage="cls", role="student", method=method)]
            for det_nst in (False, True):
                runs = self._find(stage="det", role="student", method=method, det_nst=det_nst)
                if not runs:
                    continue
                values = {k: [bbox[s.name][k] for s in runs] for k in self.metrics}
                name = f"{label} → {'NST' if det_nst else 'fine-tune'}"
                numbers[name] = {"top1": top1, **values}
                rows.append(f"| {self.student_name(method)} {name} | {mean_sd(top1)} | "
                            + " | ".join(mean_sd(values[k]) for k in self.metrics) + " |"
                            + extra("student"))
        return header + "\n".join(rows) + "\n", numbers

    def what_was_run(self) -> list[str]:
        """One line per kind of run: network, data sets and transfer losses, from the configs."""
        lines = []
        cls_teacher = self._find(stage="cls", role="teacher")[0]
        cfg = stage_config(cls_teacher)
        how = "trained here" if cls_teacher.kind == "train" else \
            f"published weights `{cfg.MODEL.CLASSIFIER.WEIGHTS}`, evaluated here"
        lines.append(f"Classification teacher: {classifier_name(cfg.MODEL.CLASSIFIER.ARCH)} "
                     f"({how}); train {set_list(cfg.DATASETS.TRAIN)}, top-1 on "
                     f"{set_list(cfg.DATASETS.TEST)}.")
        for method, label in STUDENT_METHODS.items():
            runs = self._find(stage="cls", role="student", method=method)
            if runs:
                cfg = stage_config(runs[0])
                losses = distillation_summary(cfg) or "cross-entropy only"
                lines.append(f"Pretrained student \"{label}\": "
                             f"{classifier_name(cfg.MODEL.CLASSIFIER.ARCH)}, {losses}; train "
                             f"{set_list(cfg.DATASETS.TRAIN)}, top-1 on "
                             f"{set_list(cfg.DATASETS.TEST)}.")
        cfg = stage_config(self._find(stage="det", role="teacher")[0])
        lines.append(f"Teacher detector: {detector_name(cfg)}; train "
                     f"{set_list(cfg.DATASETS.TRAIN)}, test {set_list(cfg.DATASETS.TEST)} "
                     f"({evaluator_label(cfg.DATASETS.TEST[0])[1]}).")
        for det_nst in (False, True):
            runs = self._find(stage="det", role="student", det_nst=det_nst)
            if runs:
                cfg = stage_config(runs[0])
                losses = distillation_summary(cfg) or "detection losses only (fine-tuning)"
                lines.append(f"Student detectors {'with' if det_nst else 'without'} "
                             f"detection-stage NST: {detector_name(cfg)}, {losses}; train "
                             f"{set_list(cfg.DATASETS.TRAIN)}, test {set_list(cfg.DATASETS.TEST)}.")
        return lines

    def nst_feature(self) -> tuple[str, str] | None:
        """The first (student, teacher) feature pair of the detection-stage NST runs."""
        runs = self._find(stage="det", role="student", det_nst=True)
        if not runs:
            return None
        cfg = stage_config(runs[0])
        return cfg.MODEL.DISTILL.STUDENT_FEATURES[0], cfg.MODEL.DISTILL.TEACHER_FEATURES[0]

    # ---------------------------------------------------------------- pictures
    def curves(self) -> str:
        fig, axes = _subplots(1, 3, figsize=(15, 4))
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
                                    "detection: total loss", "detection: AP50")):
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
        fig, ax = _subplots(figsize=(12, 4))
        if classes:
            width = 0.8 / len(dets)
            for i, stage in enumerate(dets):
                bbox = stage_result(stage)["metrics"]["bbox"]
                ax.bar(np.arange(len(classes)) + i * width,
                       [bbox.get(f"AP50-{c}", 0.0) for c in classes], width, label=stage.name)
            ax.set_xticks(np.arange(len(classes)) + 0.4, classes)
        ax.set_ylabel("AP50 (%)")
        ax.set_title("per-class AP50")
        ax.legend(fontsize=6, ncol=3)
        return self._save(fig, "per_class_ap50.png")

    def detections(self, stage: Stage, count: int = 4) -> str:
        from detectron2.structures import Boxes, Instances
        from detectron2.utils.visualizer import Visualizer

        from ..export import rescale_boxes

        cfg, model = _load_detector(stage)
        images, tensors = _test_images(cfg, count)
        run = eager_runner(model)
        fig, axes = _subplots(1, count, figsize=(4 * count, 4))
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

    def selectivity(self, channels: int = 5, images: int = 8) -> tuple:
        """Teacher channels' normalised activation maps next to the best-matching student channel
        of the student detector without and with detection-stage NST (the paper's picture),
        plus the MMD^2 (poly) between teacher and student features on `images` test images, at
        the first feature pair the NST runs' config names."""
        teacher_stage = self._find(stage="det", role="teacher")[0]
        plain = self._find(stage="det", role="student", det_nst=False)
        nst = self._find(stage="det", role="student", det_nst=True)
        if not plain or not nst:
            return "", {}
        s_feature, t_feature = self.nst_feature()
        models = {}
        for key, stage in (("teacher", teacher_stage), ("without NST", plain[0]),
                           ("with NST", nst[0])):
            cfg, model = _load_detector(stage)
            models[key] = model
        _, tensors = _test_images(cfg, images)
        feats = {}
        with torch.no_grad():
            for key, model in models.items():
                feature = t_feature if key == "teacher" else s_feature
                batch = model.preprocess_image([{"image": t} for t in tensors[:1]])
                feats[key] = model.backbone(batch.tensor)[feature][0]
                mmd = []
                for t in tensors:
                    fs = model.backbone(model.preprocess_image([{"image": t}]).tensor)[feature]
                    ft = models["teacher"].backbone(
                        models["teacher"].preprocess_image([{"image": t}]).tensor)[t_feature]
                    mmd.append(float(nst_loss(fs, ft, kernel="poly")))
                feats[key + "_mmd"] = statistics.mean(mmd)
        t = feats["teacher"].flatten(1)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-10)
        picked = torch.argsort(t.var(dim=1), descending=True)[:channels]
        fig, axes = _subplots(3, channels, figsize=(2.2 * channels, 6.6))
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
        fig.suptitle(f"neuron selectivity maps: student {s_feature}, teacher {t_feature} "
                     "(normalised channel activations)")
        mmd = {k: feats[k + "_mmd"] for k in ("without NST", "with NST")}
        return self._save(fig, "selectivity.png"), mmd

    def _save(self, fig, name: str) -> str:
        path = os.path.join(FIG_DIR, name)
        fig.tight_layout()
        fig.savefig(os.path.join(self.out_dir, path), dpi=90)
        return path


def _verdict(numbers: dict, mmd: dict, main: str, student: str, pair) -> list[str]:
    """Plain statements about what the numbers do and do not show (computed, not hand-written).

    `main`: the detection metric compared (the table's first, e.g. AP50 for VOC, AP for COCO);
    `student`: the student's name (e.g. R-18); `pair`: the (student, teacher) features of MMD."""
    lines = []
    base = numbers.get("Student → fine-tune", {}).get(main, [])
    teacher = numbers["teacher"][main]
    if base:
        gap = teacher - statistics.mean(base)
        lines.append(f"Capacity gap: the teacher detector's {main} is {teacher:.1f}, the plain "
                     f"{student} student's {statistics.mean(base):.1f} ({gap:+.1f}); "
                     + ("there is something to transfer." if gap > 1 else
                        "the task is too easy for a teacher to help at this scale."))
        if statistics.mean(base) < 0.25 * teacher:
            lines.append(f"The plain student is far from converged at this schedule (under a "
                         f"quarter of the teacher's {main}): the differences below say how much "
                         "faster each method learns in a short fine-tuning, not where longer "
                         "training would end.")
    spread = statistics.stdev(base) if len(base) > 1 else None
    for name, values in numbers.items():
        if name in ("teacher", "Student → fine-tune") or not values[main] or not base:
            continue
        diff = statistics.mean(values[main]) - statistics.mean(base)
        if spread is None:
            judged = "one seed only: no spread to judge it against"
        elif abs(diff) <= 2 * spread:
            judged = f"within twice the seed spread ({spread:.1f}): not a measurable effect here"
        else:
            judged = f"beyond twice the seed spread ({spread:.1f})"
        lines.append(f"{name}: {main} {diff:+.1f} against the plain student ({judged}).")
    if mmd:
        lines.append(f"MMD² (poly) between student {pair[0]} and teacher {pair[1]} features on "
                     f"test images: {mmd['without NST']:.4f} without detection-stage NST, "
                     f"{mmd['with NST']:.4f} with it (NST minimises exactly this).")
    return lines


def write_report(stages: list, out_dir: str) -> dict:
    """Write out_dir/report.md (+ figures/) and return the table's numbers.

    Figures that need weights and test images (detections, selectivity) are left out, saying
    why, when those files are not there (e.g. a report written on another machine)."""
    report = Report(stages, out_dir)
    table, numbers = report.table()
    main = report.metrics[0]
    figures = [("Loss and AP curves", report.curves()),
               ("Per-class AP50", report.per_class_ap())]
    students = report._find(stage="det", role="student")
    best = max(students, key=lambda s: stage_result(s)["metrics"]["bbox"][main])
    mmd = {}
    if report.not_measured:
        skipped = [f"Parameters, speed, detections and selectivity maps were not measured: "
                   f"{report.not_measured}.", ""]
    else:
        skipped = []
        figures.append((f"Detections of the best student ({best.name})", report.detections(best)))
        selectivity, mmd = report.selectivity()
        if selectivity:
            figures.append(("Neuron selectivity: teacher vs student channels, before and after "
                            "NST", selectivity))
    seeds = sorted({s.meta.get("seed") for s in students})
    cls_test = stage_config(report._find(stage="cls", role="teacher")[0]).DATASETS.TEST
    det_test = stage_config(students[0]).DATASETS.TEST
    measured = "" if report.not_measured else \
        " CPU ms/img: median eager inference at the test size, teacher and student timed in " \
        "the same run."
    lines = [
        "# nst_det reproduction report", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from the runs in `{out_dir}`. Every number "
        "below was read from those runs' `stage.json` / `metrics.json` files or measured while "
        "writing this report (parameters, CPU time per image, MMD).", "",
        "## What was run", "", *[f"- {line}" for line in report.what_was_run()], "",
        "## Results (the paper's detection-table layout)", "", table,
        f"Training precision: {training_precision(students[0])}. "
        f"Student rows: mean ± standard deviation over seeds {seeds}. Top-1 is the pretrained "
        f"classification backbone's, on {set_list(cls_test)}; detection metrics ("
        f"{', '.join(report.metrics)}) on {set_list(det_test)}.{measured}", "", *skipped,
        "## What the numbers show", "",
        *[f"- {line}" for line in _verdict(numbers, mmd, main, report.student_name(),
                                           report.nst_feature())], "",
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
