"""report.md of a finished pipeline: what was run, the paper-style table, what the numbers show,
the methods section (report_methods.py), the figures and the runs. A pure reader: every number
comes from the stages' records (each stage.json read once) or is measured from their weights
(measure.py; skipped, saying why, without them); what was run, from each run's config."""

from __future__ import annotations

import math
import os
import statistics
import time

from detectron2.data import MetadataCatalog

from ..utils.atomic import atomic_write
from . import describe, figures, measure
from .describe import section, select, set_list, stage_config
from .paired import format_interval, mean_sd, paired_difference
from .plan import STUDENT_METHODS
from .records import finished_results
from .report_methods import METRICS, group_numbers, methods_section
from .steps import best_student

FIG_DIR = "figures"
PLAIN = "Student → fine-tune"


class Report:
    """The records of one pipeline run's finished stages, and what the report says of them."""

    def __init__(self, stages: list, out_dir: str):
        self.results = finished_results(stages)
        self.stages = [s for s in stages if s.name in self.results]
        self.metrics = {name: r["metrics"] for name, r in self.results.items()}
        self.out_dir = out_dir
        self.cls_teacher = self.find(stage="cls", role="teacher")[0]
        self.teacher = self.find(stage="det", role="teacher")[0]
        self.students = self.find(stage="det", role="student")
        self.plain, self.nst = (self.find(stage="det", role="student", det_nst=nst)
                                for nst in (False, True))
        # the first (student, teacher) feature pair of the detection-stage NST runs
        self.pair = [stage_config(s).MODEL.DISTILL[k][0] for s in self.nst[:1]
                     for k in ("STUDENT_FEATURES", "TEACHER_FEATURES")]

    def find(self, **meta) -> list:
        """The finished training and evaluation runs whose meta has the given values."""
        return select([s for s in self.stages if s.kind in ("train", "evaluate")], **meta)

    def student_name(self, method: str = "plain") -> str:
        """The pretrained student's classifier, e.g. 'R-18', from its classification config."""
        runs = self.find(stage="cls", role="student", method=method)
        return describe.classifier_name(stage_config(runs[0]).MODEL.CLASSIFIER.ARCH) if runs \
            else "?"

    def table(self, measured: dict | str) -> tuple[str, dict]:
        """The paper-layout table: a column per detection metric the records hold, and the
        teacher's and a student's parameters and speed when `measured` holds them."""
        t_cfg = stage_config(self.teacher)
        bbox = {s.name: self.metrics[s.name]["bbox"] for s in [self.teacher, *self.students]}
        common = set.intersection(*({k for k in b if "-" not in k} for b in bbox.values()))
        voc = describe.evaluator_label(t_cfg.DATASETS.TEST[0])[0] == "pascal_voc"
        order = METRICS[:3] if voc else ("AP", "AP50", *METRICS[2:])  # others follow, sorted
        self.columns = [k for k in order if k in common] + sorted(common - set(order))
        cost = {who: [f"{measured['params'][who]:.1f}", f"{measured['speed'][who]:.0f}"]
                if isinstance(measured, dict) else [] for who in ("teacher", "student")}
        top1 = self.metrics[self.cls_teacher.name]["classification"]["top1"]
        numbers = {"teacher": {"top1": top1, **{k: bbox[self.teacher.name][k]
                                                for k in self.columns}}}
        rows = [[f"Teacher {describe.backbone_name(t_cfg)}",
                 *[f"{v:.1f}" for v in numbers["teacher"].values()], *cost["teacher"]]]
        for method, label in STUDENT_METHODS.items():
            top1 = [self.metrics[s.name]["classification"]["top1"]
                    for s in self.find(stage="cls", role="student", method=method)]
            for det_nst in (False, True):
                runs = self.find(stage="det", role="student", method=method, det_nst=det_nst)
                if runs:
                    name = f"{label} → {'NST' if det_nst else 'fine-tune'}"
                    numbers[name] = {"top1": top1, **group_numbers(runs, self.results)}
                    rows.append([f"{self.student_name(method)} {name}", mean_sd(top1),
                                 *[mean_sd(numbers[name][k]) for k in self.columns],
                                 *cost["student"]])
        header = ["Method (pretraining → detection)", "top-1 of pretrained backbone (%)",
                  *self.columns, *(["Params (M)", "CPU ms/img"] if cost["teacher"] else [])]
        return describe.markdown_table(rows, header) + "\n", numbers

    def what_was_run(self) -> list[str]:
        """One line per kind of run: network, transfer losses and data sets, from its config."""
        def line(title, cfg, net, test="top-1 on", end=""):
            return (f"{title}: {net}; train {set_list(cfg.DATASETS.TRAIN)}, {test} "
                    f"{set_list(cfg.DATASETS.TEST)}{end}.")

        cfg, kind = stage_config(self.cls_teacher), self.cls_teacher.kind
        how = "trained here" if kind == "train" else \
            f"published weights `{cfg.MODEL.CLASSIFIER.WEIGHTS}`, evaluated here"
        lines = [line("Classification teacher", cfg,
                      f"{describe.classifier_name(cfg.MODEL.CLASSIFIER.ARCH)} ({how})")]
        lines += [line(f'Pretrained student "{label}"', cfg,
                       f"{describe.classifier_name(cfg.MODEL.CLASSIFIER.ARCH)}, "
                       f"{describe.distillation_summary(cfg) or 'cross-entropy only'}")
                  for method, label in STUDENT_METHODS.items()
                  for cfg in map(stage_config,  # the first seed's (they differ in SEED only)
                                 self.find(stage="cls", role="student", method=method)[:1])]
        cfg = stage_config(self.teacher)
        lines.append(line("Teacher detector", cfg, describe.detector_name(cfg), "test",
                          f" ({describe.evaluator_label(cfg.DATASETS.TEST[0])[1]})"))
        return lines + [
            line(f"Student detectors {'with' if nst else 'without'} detection-stage NST", cfg,
                 f"{describe.detector_name(cfg)}, " + (describe.distillation_summary(cfg)
                                                       or "detection losses only (fine-tuning)"),
                 "test")
            for nst, runs in ((False, self.plain), (True, self.nst))
            for cfg in map(stage_config, runs[:1])]

    def figures(self, best, with_weights: bool) -> tuple[list, dict]:
        """[(title, its anchor in docs/reading_the_report.md, path)] of the figures, and the MMD²
        measured for the selectivity maps; without the runs' weights only those drawn from the
        records."""
        out = self.out_dir
        # the main table's runs only: the method and control runs have their own plot, and the
        # weight grid's are scored on the validation split
        dets = [s for s in self.find(stage="det") if s.meta.get("role") in ("teacher", "student")]
        # VOC's evaluator records AP50-<class>, COCO's AP-<class> (AP at IoU .50:.95)
        metric = "AP50" if any(k.startswith("AP50-") for s in dets
                               for k in self.metrics[s.name]["bbox"]) else "AP"
        drawn = [("Loss and AP curves", "loss-and-ap-curves", figures.curves(
            {s.name: describe.metrics_rows(s.out_dir) for s in self.find(stage="cls")},
            {s.name: describe.metrics_rows(s.out_dir) for s in dets}, out,
            f"{FIG_DIR}/curves.png")),
            (f"Per-class {metric}", "per-class-ap50", figures.per_class_ap(
                {s.name: self.metrics[s.name]["bbox"] for s in dets}, metric, out,
                f"{FIG_DIR}/per_class_ap50.png"))]
        if not with_weights:
            return drawn, {}
        cfg, found = measure.detections(best)
        meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        drawn.append((f"Detections of the best student ({best.name})", "detections",
                      figures.detections(found, meta, cfg.INPUT.FORMAT != "BGR",
                                         f"{best.name}: detections with score >= 0.5 "
                                         f"({', '.join(meta.thing_classes)})",
                                         out, f"{FIG_DIR}/detections.png")))
        if not self.plain or not self.pair:
            return drawn, {}
        first, mmd = measure.features_and_mmd(
            self.teacher, {"without NST": self.plain[0], "with NST": self.nst[0]}, *self.pair)
        drawn.append(("Neuron selectivity: teacher vs student channels, before and after NST",
                      "neuron-selectivity", figures.selectivity(
                          {("student " + k if k != "teacher" else k): f for k, f in first.items()},
                          f"neuron selectivity maps: student {self.pair[0]}, teacher "
                          f"{self.pair[1]} (normalised channel activations)",
                          out, f"{FIG_DIR}/selectivity.png")))
        return drawn, mmd

    def verdict(self, numbers: dict, mmd: dict) -> list[str]:
        """Plain statements, computed, about what the numbers show: the capacity gap, each row
        against the plain student of the same seed (as the methods section judges), the MMD²."""
        main, lines = self.columns[0], []
        plain, teacher = numbers.get(PLAIN, {}), numbers["teacher"][main]
        base = [v for v in plain.get(main, []) if math.isfinite(v)]  # as the table's mean_sd
        if not math.isfinite(teacher):
            lines.append(f"The teacher detector's {main} is {teacher}: it diverged, so there is "
                         "no capacity gap to read.")
        elif base:
            mean = statistics.mean(base)
            lines.append(f"Capacity gap: the teacher detector's {main} is {teacher:.1f}, the plain "
                         f"{self.student_name()} student's {mean:.1f} ({teacher - mean:+.1f}); "
                         + ("the teacher has not learned the task at this schedule: the gap "
                            "says nothing about transfer." if teacher <= 1 else
                            "there is something to transfer." if teacher - mean > 1 else
                            "the task is too easy for a teacher to help at this scale."))
            if mean < 0.25 * teacher:
                lines.append(f"The plain student is far from converged at this schedule (under "
                             f"a quarter of the teacher's {main}): the differences below measure "
                             "how fast each method learns, not where longer training would end.")
        for name, values in numbers.items():
            if name not in ("teacher", PLAIN) and values[main] and base:
                p = paired_difference(values["by_seed"][main], plain["by_seed"][main])
                level = f", {int(100 * p.level)}% interval" if p.low is not None else ""
                lines.append(f"{name}: {main} {format_interval(p)} against the plain student of "
                             f"the same seed{level} ({p.verdict}).")
        if mmd:
            lines.append(f"MMD² (poly) between student {self.pair[0]} and teacher {self.pair[1]} "
                         f"features on test images: {mmd['without NST']:.4f} without "
                         f"detection-stage NST, {mmd['with NST']:.4f} with it.")
        return lines


def write_report(stages: list, out_dir: str) -> dict:
    """Write out_dir/report.md (+ figures/) and return its numbers: the table's, the MMD² and
    the methods section's. Figures that need weights and test images (detections, selectivity)
    are left out, saying why, when those files are not there (e.g. on another machine)."""
    os.makedirs(os.path.join(out_dir, FIG_DIR), exist_ok=True)
    report = Report(stages, out_dir)
    measured = measure.params_and_speed(report.teacher, report.students[0])
    with_weights = isinstance(measured, dict)
    table, numbers = report.table(measured)
    best = best_student(report.stages, report.results)
    drawn, mmd = report.figures(best, with_weights)
    cls_test = stage_config(report.cls_teacher).DATASETS.TEST
    cfg = stage_config(report.students[0])  # how the students trained, and their test set
    amp, cuda = cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE.startswith("cuda")
    precision = ("float16 autocast (SOLVER.AMP.ENABLED, detectron2's AMPTrainer)" if amp and cuda
                 else "bfloat16 autocast on the CPU (SOLVER.AMP.ENABLED)" if amp else "float32") \
        + (", channels_last" if cfg.NST_DET.CHANNELS_LAST else "") \
        + ("; evaluation in float32" if amp and not cuda else "")
    method_lines, method_numbers = methods_section(report.stages, out_dir, FIG_DIR,
                                                   results=report.results)
    seeds = sorted({s.meta.get("seed") for s in report.students})
    spread = f"mean ± standard deviation over seeds {seeds}" if len(seeds) > 1 else \
        f"one seed ({seeds[0]}), so no spread"
    runs = [[s.name, f"{report.results[s.name]['seconds']:.0f}",
             f"`{os.path.relpath(os.path.join(s.out_dir, 'stage.json'), out_dir)}`"]
            for s in report.stages]
    lines = [
        "# nst_det reproduction report", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from the runs in `{out_dir}`.", "",
        *section("What was run", "what-was-run", *[f"- {x}" for x in report.what_was_run()], ""),
        *section("Results (the paper's detection-table layout)", "results", table),
        f"Training precision: {precision}. Student rows: {spread}. "
        f"Top-1 is the pretrained classification backbone's, on {set_list(cls_test)}; "
        f"detection metrics ({', '.join(report.columns)}) on {set_list(cfg.DATASETS.TEST)}.", "",
        *([] if with_weights else [f"Parameters, speed, detections and selectivity maps were "
                                   f"not measured: {measured}.", ""]),
        *section("What the numbers show", "what-the-numbers-show",
                 *[f"- {line}" for line in report.verdict(numbers, mmd)], ""),
        *method_lines,
        *[x for title, anchor, path in drawn
          for x in section(title, anchor, f"![{title}]({path})", "")],
        *section("Runs", "runs", describe.markdown_table(
            runs, ["stage", "wall-clock (s)", "result file"]))]
    with atomic_write(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"table": numbers, "mmd": mmd, "methods": method_numbers}
