"""report.md for a finished pipeline: the paper-style table first, then the pictures.

Every number is read from the stage files of the runs just made (each stage.json once, each
metrics.json once) or measured from their weights by measure.py (parameters, inference time,
MMD between teacher and student features); the report names the file each number comes from.
What was run (backbones, detectors, the feature levels NST pairs, the data sets) is read from
each run's own config by describe.py, and the results table has a column for each detection
metric the stage records hold (VOC: AP50, AP, AP75; COCO: AP, AP50, AP75, APs, APm, APl), so the
same code describes a toy run and a paper-scale one. Figures are drawn by figures.py;
measurements that need a run's weights and test images are skipped, saying so, when those
files are not there.
"""

from __future__ import annotations

import os
import statistics
import time

from detectron2.data import MetadataCatalog

from ..utils.atomic import atomic_write
from . import figures, measure
from .describe import (
    backbone_name,
    classifier_name,
    detector_name,
    distillation_summary,
    evaluator_label,
    markdown_table,
    metrics_rows,
    set_list,
    stage_config,
    training_precision,
)
from .paired import format_interval, mean_sd, paired_difference
from .plan import STUDENT_METHODS, Stage
from .report_methods import methods_section
from .worker import finished_results

FIG_DIR = "figures"
# preferred column order of the detection metrics, by evaluator type; others follow sorted
_METRIC_ORDER = {"pascal_voc": ("AP50", "AP", "AP75"),
                 "coco": ("AP", "AP50", "AP75", "APs", "APm", "APl")}


class Report:
    """The records of one pipeline run's finished stages, and what the report says of them."""

    def __init__(self, stages: list, out_dir: str):
        self.results = finished_results(stages)
        self.stages = [s for s in stages if s.name in self.results]
        self.out_dir = out_dir

    def _find(self, **meta) -> list:
        return [s for s in self.stages if s.kind in ("train", "evaluate")
                and all(s.meta.get(k) == v for k, v in meta.items())]

    def _metrics(self, stage: Stage) -> dict:
        return self.results[stage.name]["metrics"]

    def student_name(self, method: str = "plain") -> str:
        """The pretrained student's classifier, e.g. 'R-18', from its classification config."""
        runs = self._find(stage="cls", role="student", method=method)
        return classifier_name(stage_config(runs[0]).MODEL.CLASSIFIER.ARCH) if runs else "?"

    def table(self, measured: dict | str) -> tuple[str, dict]:
        """The paper-layout table: one column per detection metric in the stage records, and
        the teacher's and a student's parameters and speed when `measured` holds them."""
        det_teacher = self._find(stage="det", role="teacher")[0]
        cls_teacher = self._find(stage="cls", role="teacher")[0]
        students = self._find(stage="det", role="student")
        t_cfg = stage_config(det_teacher)
        kind, _ = evaluator_label(t_cfg.DATASETS.TEST[0])
        bbox = {s.name: self._metrics(s)["bbox"] for s in [det_teacher, *students]}
        common = set.intersection(*({k for k in b if "-" not in k} for b in bbox.values()))
        order = _METRIC_ORDER.get(kind, _METRIC_ORDER["coco"])
        self.metrics = [k for k in order if k in common] + sorted(common - set(order))
        has_cost = isinstance(measured, dict)

        def cost(who):
            return [f"{measured['params'][who]:.1f}", f"{measured['speed'][who]:.0f}"] \
                if has_cost else []

        t_top1 = self._metrics(cls_teacher)["classification"]["top1"]
        t_det = bbox[det_teacher.name]
        rows = [[f"Teacher {backbone_name(t_cfg)}", f"{t_top1:.1f}",
                 *[f"{t_det[k]:.1f}" for k in self.metrics], *cost("teacher")]]
        numbers = {"teacher": {"top1": t_top1, **{k: t_det[k] for k in self.metrics}}}
        for method, label in STUDENT_METHODS.items():
            top1 = [self._metrics(s)["classification"]["top1"]
                    for s in self._find(stage="cls", role="student", method=method)]
            for det_nst in (False, True):
                runs = self._find(stage="det", role="student", method=method, det_nst=det_nst)
                if not runs:
                    continue
                values = {k: [bbox[s.name][k] for s in runs] for k in self.metrics}
                name = f"{label} → {'NST' if det_nst else 'fine-tune'}"
                numbers[name] = {"top1": top1, "seeds": [s.meta.get("seed") for s in runs],
                                 **values}
                rows.append([f"{self.student_name(method)} {name}", mean_sd(top1),
                             *[mean_sd(values[k]) for k in self.metrics], *cost("student")])
        header = ["Method (pretraining → detection)", "top-1 of pretrained backbone (%)",
                  *self.metrics, *(["Params (M)", "CPU ms/img"] if has_cost else [])]
        return markdown_table(header, rows) + "\n", numbers

    def what_was_run(self) -> list[str]:
        """One line per kind of run: network, data sets and transfer losses, from the configs."""
        cls_teacher = self._find(stage="cls", role="teacher")[0]
        cfg = stage_config(cls_teacher)
        how = "trained here" if cls_teacher.kind == "train" else \
            f"published weights `{cfg.MODEL.CLASSIFIER.WEIGHTS}`, evaluated here"
        lines = [f"Classification teacher: {classifier_name(cfg.MODEL.CLASSIFIER.ARCH)} "
                 f"({how}); train {set_list(cfg.DATASETS.TRAIN)}, top-1 on "
                 f"{set_list(cfg.DATASETS.TEST)}."]
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

    def figures(self, best: Stage, with_weights: bool) -> tuple[list, dict]:
        """[(title, path)] of the figures, and the MMD^2 measured for the selectivity maps;
        without the runs' weights (with_weights False) only those drawn from the records."""
        out = self.out_dir
        dets = [s for s in self._find(stage="det") if s.meta.get("role") != "method"]
        drawn = [
            ("Loss and AP curves", figures.curves(
                {s.name: metrics_rows(s.out_dir) for s in self._find(stage="cls")},
                {s.name: metrics_rows(s.out_dir) for s in dets},  # methods: their own plot
                out, os.path.join(FIG_DIR, "curves.png"))),
            ("Per-class AP50", figures.per_class_ap(
                {s.name: self._metrics(s)["bbox"] for s in dets},
                out, os.path.join(FIG_DIR, "per_class_ap50.png")))]
        if not with_weights:
            return drawn, {}
        cfg, found = measure.detections(best)
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        drawn.append((f"Detections of the best student ({best.name})", figures.detections(
            found, metadata, cfg.INPUT.FORMAT != "BGR",
            f"{best.name}: detections with score >= 0.5 ({', '.join(metadata.thing_classes)})",
            out, os.path.join(FIG_DIR, "detections.png"))))
        plain = self._find(stage="det", role="student", det_nst=False)
        nst = self._find(stage="det", role="student", det_nst=True)
        if not plain or not nst:
            return drawn, {}
        s_feature, t_feature = self.nst_feature()
        first, mmd = measure.features_and_mmd(
            self._find(stage="det", role="teacher")[0],
            {"without NST": plain[0], "with NST": nst[0]}, s_feature, t_feature)
        maps = {("student " + k if k != "teacher" else k): f for k, f in first.items()}
        drawn.append(("Neuron selectivity: teacher vs student channels, before and after NST",
                      figures.selectivity(
                          maps, f"neuron selectivity maps: student {s_feature}, teacher "
                          f"{t_feature} (normalised channel activations)",
                          out, os.path.join(FIG_DIR, "selectivity.png"))))
        return drawn, mmd


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
    plain = dict(zip(numbers.get("Student → fine-tune", {}).get("seeds", []), base))
    for name, values in numbers.items():
        if name in ("teacher", "Student → fine-tune") or not values[main] or not base:
            continue
        # seed by seed, as the methods section judges (paired.py): a row and the plain student
        # of the same seed start from the same initialisation and data order
        p = paired_difference(dict(zip(values["seeds"], values[main])), plain)
        lines.append(f"{name}: {main} {format_interval(p)} against the plain student of the "
                     f"same seed, {int(100 * p.level)}% interval ({p.verdict}).")
    if mmd:
        lines.append(f"MMD² (poly) between student {pair[0]} and teacher {pair[1]} features on "
                     f"test images: {mmd['without NST']:.4f} without detection-stage NST, "
                     f"{mmd['with NST']:.4f} with it (NST minimises exactly this).")
    return lines


def write_report(stages: list, out_dir: str) -> dict:
    """Write out_dir/report.md (+ figures/) and return the table's numbers.

    Figures that need weights and test images (detections, selectivity) are left out, saying
    why, when those files are not there (e.g. a report written on another machine)."""
    os.makedirs(os.path.join(out_dir, FIG_DIR), exist_ok=True)
    report = Report(stages, out_dir)
    students = report._find(stage="det", role="student")
    measured = measure.params_and_speed(report._find(stage="det", role="teacher")[0],
                                        students[0])
    with_weights = isinstance(measured, dict)
    table, numbers = report.table(measured)
    main = report.metrics[0]
    best = max(students, key=lambda s: report._metrics(s)["bbox"][main])
    drawn, mmd = report.figures(best, with_weights)
    skipped = [] if with_weights else [
        f"Parameters, speed, detections and selectivity maps were not measured: {measured}.", ""]
    seeds = sorted({s.meta.get("seed") for s in students})
    cls_test = stage_config(report._find(stage="cls", role="teacher")[0]).DATASETS.TEST
    det_test = stage_config(students[0]).DATASETS.TEST
    timing = " CPU ms/img: median eager inference at the test size, teacher and student timed " \
        "in the same run." if with_weights else ""
    verdict = _verdict(numbers, mmd, main, report.student_name(), report.nst_feature())
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
        f"{', '.join(report.metrics)}) on {set_list(det_test)}.{timing}", "", *skipped,
        "## What the numbers show", "", *[f"- {line}" for line in verdict], "",
    ]
    method_lines, method_numbers = methods_section(report.stages, out_dir, FIG_DIR,
                                                   results=report.results)  # --methods
    lines += method_lines
    for title, path in drawn:
        lines += [f"## {title}", "", f"![{title}]({path})", ""]
    runs = [[stage.name, f"{report.results[stage.name]['seconds']:.0f}",
             f"`{os.path.relpath(os.path.join(stage.out_dir, 'stage.json'), out_dir)}`"]
            for stage in report.stages]
    lines += ["## Runs", "", markdown_table(["stage", "wall-clock (s)", "result file"], runs)]
    with atomic_write(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"table": numbers, "mmd": mmd, "methods": method_numbers}
