"""The report describes what was run, from the runs' configs and records: rendered here from a
paper-scale plan's stage records (fabricated stage.json files: no ImageNet, VOC or GPU needed)."""

import json
import re
import statistics
from pathlib import Path

import pytest

from nst_det.pipeline.paired import format_interval, paired_difference
from nst_det.pipeline.plan import PAPER_CONFIGS, TOY_SCALES, build_plan

VOC_KEYS = {"AP": 40.0, "AP50": 70.0, "AP75": 45.0}
COCO_KEYS = {"AP": 30.0, "AP50": 50.0, "AP75": 32.0, "APs": 15.0, "APm": 33.0, "APl": 41.0}


def _fabricate(root, det_keys, methods=()):
    """A paper plan (+ the given methods and the controls, when any) whose training/evaluation
    stages all hold a stage.json (numbers made up, distinct per stage); returns (stages, records
    by stage name)."""
    stages = build_plan(str(root), TOY_SCALES["paper"], PAPER_CONFIGS)
    if methods:
        from nst_det.pipeline.methods import add_method_stages

        stages = add_method_stages(stages, list(methods), controls=True)
    records = {}
    for i, stage in enumerate(s for s in stages if s.kind in ("train", "evaluate")):
        if stage.meta["stage"] == "cls":
            metrics = {"classification": {"top1": 60.0 + i, "top5": 85.0 + i / 10}}
        else:
            bbox = {k: v + i / 4 for k, v in det_keys.items()}
            bbox.update({"AP50-aeroplane": 60.0 + i, "AP50-bicycle": 70.0 - i})
            metrics = {"bbox": bbox}
        record = {"kind": stage.kind, "seconds": 100.0 * (i + 1), "meta": stage.meta,
                  "metrics": metrics}
        (root / stage.name).mkdir(parents=True, exist_ok=True)
        (root / stage.name / "stage.json").write_text(json.dumps(record))
        records[stage.name] = record
    return stages, records


def _table(report: str) -> list[list[str]]:
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method"))
    rows = []
    for line in lines[start:]:
        if line.startswith("| stage"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_paper_scale_report_names_what_ran_and_nothing_toy(tmp_path):
    from nst_det.pipeline.report import write_report

    stages, records = _fabricate(tmp_path, VOC_KEYS)
    write_report(stages, str(tmp_path))
    report = (tmp_path / "report.md").read_text()

    assert "toy" not in report.lower()
    run = report.split("## What was run", 1)[1].split("## Results", 1)[0]
    # networks, data sets and feature levels, as the paper configs set them
    assert "Classification teacher: R-50 (published weights `https://download.pytorch.org/" \
        "models/resnet50-0676ba61.pth`, evaluated here)" in run
    assert "train `imagenet_train`, top-1 on `imagenet_val`" in run
    assert 'Pretrained student "NST": R-18, NST (poly kernel, MODEL.NST.LOSS_WEIGHT 25) on ' \
        "student→teacher features res5→res5" in run
    assert "Teacher detector: Faster R-CNN, R-50 FPN backbone; train `voc_2007_trainval`, test " \
        "`voc_2007_test` (VOC2007 metric)" in run
    assert "with detection-stage NST: Faster R-CNN, R-18 FPN backbone, NST (poly kernel, " \
        "MODEL.NST.LOSS_WEIGHT 25) on student→teacher features p2→p2, p3→p3, p4→p4, p5→p5, " \
        "p6→p6" in run

    rows = _table(report)
    # VOC's metrics, AP50 first (the paper's); no measured columns without weights
    assert rows[0] == ["Method (pretraining → detection)", "top-1 of pretrained backbone (%)",
                       "AP50", "AP", "AP75"]
    assert [r[0] for r in rows[1:]] == [
        "Teacher R-50", "R-18 Student → fine-tune", "R-18 Student → NST",
        "R-18 NST → fine-tune", "R-18 NST → NST", "R-18 KD+NST → fine-tune",
        "R-18 KD+NST → NST"]
    teacher = records["det_teacher"]["metrics"]["bbox"]
    assert rows[1][1:] == [f"{records['cls_teacher']['metrics']['classification']['top1']:.1f}",
                           f"{teacher['AP50']:.1f}", f"{teacher['AP']:.1f}",
                           f"{teacher['AP75']:.1f}"]
    ap75 = [records[f"det_nst_detnst_s{seed}"]["metrics"]["bbox"]["AP75"] for seed in (0, 1, 2)]
    expected = f"{statistics.mean(ap75):.1f} ± {statistics.stdev(ap75):.1f}"
    assert rows[5][4] == expected
    assert "over seeds [0, 1, 2]" in report
    assert re.search(r"not measured: \S+det_teacher/model_final\.pth is not there", report)
    assert "detection metrics (AP50, AP, AP75) on `voc_2007_test`" in report
    # judged seed by seed against the plain student, as the methods section is
    plain = {s: records[f"det_plain_s{s}"]["metrics"]["bbox"]["AP50"] for s in (0, 1, 2)}
    nst = {s: records[f"det_nst_detnst_s{s}"]["metrics"]["bbox"]["AP50"] for s in (0, 1, 2)}
    p = paired_difference(nst, plain)
    assert p.verdict == "better (3 seeds)"  # the fabricated records differ by a constant
    assert f"- NST → NST: AP50 {format_interval(p)} against the plain student of the same " \
        f"seed, 95% interval (better (3 seeds))." in report


@pytest.mark.parametrize("keys", [COCO_KEYS, {"AP50": 60.0, "AP": 30.0}], ids=["coco", "ap50"])
def test_table_has_a_column_for_each_metric_the_records_hold(tmp_path, keys):
    from nst_det.pipeline.report import write_report

    stages, records = _fabricate(tmp_path, keys)
    write_report(stages, str(tmp_path))
    header = _table((tmp_path / "report.md").read_text())[0]
    # the paper's VOC order first, then the rest; never a per-class key
    order = ["AP50", "AP", "AP75", *sorted(set(keys) - {"AP50", "AP", "AP75"})]
    assert header[2:] == [k for k in order if k in keys]


def _reading_anchors() -> set:
    """The GitHub anchors of docs/reading_the_report.md's headings."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "reading_the_report.md").read_text()
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
            for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE)}


def test_each_section_points_to_a_part_of_reading_the_report_that_exists(tmp_path, monkeypatch):
    # every section the report can have: the methods (and controls), and the figures measured
    # from the weights (their measurements faked here: no weights, no test images)
    from nst_det.pipeline import figures, measure
    from nst_det.pipeline.describe import stage_config
    from nst_det.pipeline.report import write_report

    stages, _ = _fabricate(tmp_path, VOC_KEYS, methods=["nst_poly"])
    monkeypatch.setattr(measure, "params_and_speed", lambda teacher, student: {
        "params": {"teacher": 41.4, "student": 28.3}, "speed": {"teacher": 90, "student": 60}})
    monkeypatch.setattr(measure, "detections", lambda stage: (stage_config(stage), []))
    monkeypatch.setattr(measure, "features_and_mmd", lambda teacher, students, s, t: (
        {}, {name: 0.25 for name in students}))
    monkeypatch.setattr(figures, "detections", lambda *args: "figures/detections.png")
    monkeypatch.setattr(figures, "selectivity", lambda *args: "figures/selectivity.png")
    write_report(stages, str(tmp_path))
    lines = (tmp_path / "report.md").read_text().splitlines()

    headings = [i for i, line in enumerate(lines) if line.startswith("## ")]
    assert [lines[i] for i in headings] == [
        "## What was run", "## Results (the paper's detection-table layout)",
        "## What the numbers show", "## Transfer methods at the detection stage",
        "## Loss and AP curves", "## Per-class AP50",
        "## Detections of the best student (det_kd_nst_detnst_s2)",
        "## Neuron selectivity: teacher vs student channels, before and after NST", "## Runs"]
    anchors = _reading_anchors()
    for i in headings:
        link = re.fullmatch(r"How to read this section: `docs/reading_the_report\.md#([\w-]+)` "
                            r"in the nst_det repository\.", lines[i + 2])
        assert link and link[1] in anchors, lines[i:i + 3]
    # the numbers stay in the report; the fixed explanations are on that page only
    report = "\n".join(lines)
    assert "| plain_aa (control: A/A, expect no difference) |" in report
    assert "MMD² (poly) between student p2 and teacher p2 features on test images: 0.2500 " \
        "without detection-stage NST, 0.2500 with it." in report
    assert "Student-t" not in report and "Student-t" in \
        (Path(__file__).resolve().parents[1] / "docs" / "reading_the_report.md").read_text()


def test_the_report_draws_the_detections_of_the_student_the_export_picks(tmp_path, monkeypatch):
    # a COCO-evaluated test set (its table leads with AP) where AP and AP50 disagree: the
    # export's rule (AP50 on the first test set) picks the student, not the table's first column
    from nst_det.pipeline import describe, figures, measure
    from nst_det.pipeline.describe import stage_config
    from nst_det.pipeline.report import write_report
    from nst_det.pipeline.steps import best_student

    stages, records = _fabricate(tmp_path, COCO_KEYS)
    top_ap = "det_plain_s0"  # the best AP, the worst AP50
    records[top_ap]["metrics"]["bbox"].update(AP=99.0, AP50=1.0)
    (tmp_path / top_ap / "stage.json").write_text(json.dumps(records[top_ap]))
    monkeypatch.setattr(describe, "evaluator_label", lambda test_set: ("coco", "COCO metric"))
    monkeypatch.setattr(measure, "params_and_speed", lambda teacher, student: {
        "params": {"teacher": 41.4, "student": 28.3}, "speed": {"teacher": 90, "student": 60}})
    monkeypatch.setattr(measure, "detections", lambda stage: (stage_config(stage), []))
    monkeypatch.setattr(measure, "features_and_mmd", lambda teacher, students, s, t: ({}, {}))
    monkeypatch.setattr(figures, "detections", lambda *args: "figures/detections.png")
    monkeypatch.setattr(figures, "selectivity", lambda *args: "figures/selectivity.png")
    write_report(stages, str(tmp_path))
    best, report = best_student(stages).name, (tmp_path / "report.md").read_text()
    assert best != top_ap and _table(report)[0][2:4] == ["AP", "AP50"]
    assert f"## Detections of the best student ({best})" in report


def test_metrics_rows_parses_a_file_once_per_version(tmp_path, monkeypatch):
    import os

    from nst_det.pipeline.describe import metrics_rows

    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 0, "time": 0.5}\n')
    parsed = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda text: parsed.append(text) or loads(text))
    assert metrics_rows(str(tmp_path)) == metrics_rows(str(tmp_path)) == [
        {"iteration": 0, "time": 0.5}]
    assert len(parsed) == 1  # the second call came from the cache
    with open(path, "a") as f:  # the run went on: a new version of the file is read again
        f.write('{"iteration": 20, "time": 0.4}\n')
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # coarse clocks: surely newer
    assert [r["iteration"] for r in metrics_rows(str(tmp_path))] == [0, 20]
    assert metrics_rows(str(tmp_path / "none")) == []


def test_a_report_of_one_seed_claims_no_interval_and_no_spread(tmp_path):
    from nst_det.pipeline.report import write_report

    stages, records = _fabricate(tmp_path, VOC_KEYS)
    for stage in stages:  # the runs of seeds 1 and 2 never finished
        if stage.meta.get("seed", 0) != 0:
            (tmp_path / stage.name / "stage.json").unlink(missing_ok=True)
    write_report(stages, str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    p = paired_difference(*({0: records[f"det_{m}_s0"]["metrics"]["bbox"]["AP50"]}
                            for m in ("nst_detnst", "plain")))
    assert p.low is None and p.verdict == "1 seed only: no interval, no verdict"
    # the mean alone: no "95% interval" named beside it
    assert f"- NST → NST: AP50 {format_interval(p)} against the plain student of the same " \
        "seed (1 seed only: no interval, no verdict)." in report
    assert "% interval (1 seed only" not in report
    assert "Student rows: one seed (0), so no spread." in report


def test_metrics_rows_of_a_resumed_run_have_one_row_per_iteration(tmp_path, caplog):
    from nst_det.pipeline.describe import metrics_rows

    # rows 19 and 39 written, killed while writing row 59 (cut short, no newline), resumed from
    # the checkpoint at 20: row 39 written again (other values), then 59
    (tmp_path / "metrics.json").write_text(
        '{"iteration": 19, "total_loss": 2.0}\n{"iteration": 39, "total_loss": 1.5}\n'
        '{"iteration": 59, "total_l'
        '{"iteration": 39, "total_loss": 1.4, "time": 0.3}\n'
        '{"iteration": 59, "total_loss": 1.2}\n')
    rows = metrics_rows(str(tmp_path))
    assert [(r["iteration"], r["total_loss"]) for r in rows] == [(19, 2.0), (39, 1.5), (59, 1.2)]
    assert "metrics.json line 3 is not JSON" in caplog.text

    (tmp_path / "again").mkdir()  # the rewrite on its own line: its values win
    (tmp_path / "again" / "metrics.json").write_text(
        '{"iteration": 39, "total_loss": 1.5}\n{"iteration": 19, "total_loss": 2.0}\n'
        '{"iteration": 39, "total_loss": 1.4, "time": 0.3}\n')
    assert metrics_rows(str(tmp_path / "again")) == [
        {"iteration": 19, "total_loss": 2.0}, {"iteration": 39, "total_loss": 1.4, "time": 0.3}]


def test_the_main_figures_draw_the_main_tables_runs_only(tmp_path, monkeypatch):
    """The curves and per-class bars drew the method, control and weight-grid runs too (the
    grid's scored on the validation split), unlabelled beside the test-set ones."""
    from nst_det.pipeline import figures
    from nst_det.pipeline.report import write_report

    stages, _ = _fabricate(tmp_path, VOC_KEYS, methods=["nst_poly"])
    drawn = {}
    monkeypatch.setattr(figures, "per_class_ap", lambda per_run, *args: drawn.update(
        bars=sorted(per_run)) or "figures/per_class_ap50.png")
    monkeypatch.setattr(figures, "curves", lambda cls, det, *args: drawn.update(
        curves=sorted(det)) or "figures/curves.png")
    write_report(stages, str(tmp_path))
    main = sorted(s.name for s in stages if s.meta.get("stage") == "det"
                  and s.meta.get("role") in ("teacher", "student"))
    assert drawn == {"bars": main, "curves": main}
    assert any(s.meta.get("role") in ("method", "control") for s in stages)  # left out


def test_the_capacity_gap_leaves_a_nan_seed_out_as_the_table_does(tmp_path):
    from nst_det.pipeline.report import write_report

    stages, records = _fabricate(tmp_path, VOC_KEYS)
    records["det_plain_s0"]["metrics"]["bbox"]["AP50"] = float("nan")
    (tmp_path / "det_plain_s0" / "stage.json").write_text(json.dumps(records["det_plain_s0"]))
    write_report(stages, str(tmp_path))
    gap = next(line for line in (tmp_path / "report.md").read_text().splitlines()
               if "Capacity gap" in line)
    plain = statistics.mean(records[f"det_plain_s{s}"]["metrics"]["bbox"]["AP50"] for s in (1, 2))
    assert f"the plain R-18 student's {plain:.1f}" in gap and "nan" not in gap


def test_a_nan_seed_left_out_of_a_cell_is_said_and_a_nan_teacher_has_no_gap(tmp_path):
    """The cells dropped a diverged seed silently, under a line listing every seed; a NaN
    teacher fell through to "the task is too easy"."""
    from nst_det.pipeline.report import write_report

    stages, records = _fabricate(tmp_path, VOC_KEYS)
    for name in ("det_plain_s1", "det_teacher"):
        records[name]["metrics"]["bbox"]["AP50"] = float("nan")
        (tmp_path / name / "stage.json").write_text(json.dumps(records[name]))
    write_report(stages, str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    plain = [records[f"det_plain_s{s}"]["metrics"]["bbox"]["AP50"] for s in (0, 2)]
    row = next(r for r in _table(report) if "fine-tune" in r[0] and "Student" in r[0])
    assert (f"{statistics.mean(plain):.1f} ± {statistics.stdev(plain):.1f} (1 non-finite left "
            "out)") in row
    assert "it diverged, so there is no capacity gap to read" in report
    assert "too easy" not in report


@pytest.mark.parametrize("metric", ["AP50", "AP"])
def test_per_class_bars_read_vocs_ap50_and_cocos_ap_keys(tmp_path, monkeypatch, metric):
    """COCO's evaluator records AP-<class>: the per-class figure drew no bar for a COCO set."""
    from matplotlib.axes import Axes

    from nst_det.pipeline import figures

    heights = []
    real = Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda ax, x, h, *a, **k: heights.append(list(h))
                        or real(ax, x, h, *a, **k))
    runs = {"teacher": {f"{metric}-cat": 50.0, f"{metric}-dog": 40.0, "AP": 1.0},
            "student": {f"{metric}-cat": 30.0, f"{metric}-dog": 20.0, "AP": 1.0}}
    figures.per_class_ap(runs, metric, str(tmp_path), "bars.png")
    assert heights == [[50.0, 40.0], [30.0, 20.0]]


def test_the_report_draws_per_class_ap_of_cocos_records(tmp_path, monkeypatch):
    """The report picks the per-class metric the records hold: AP-<class> for COCO."""
    from nst_det.pipeline import figures
    from nst_det.pipeline.report import write_report

    stages, records = _fabricate(tmp_path, COCO_KEYS)
    for name, record in records.items():
        bbox = record["metrics"].get("bbox", {})
        for key in [k for k in bbox if k.startswith("AP50-")]:
            bbox[f"AP-{key[5:]}"] = bbox.pop(key)
        (tmp_path / name / "stage.json").write_text(json.dumps(record))
    asked = []
    monkeypatch.setattr(figures, "per_class_ap", lambda per_run, metric, *args: asked.append(
        metric) or "figures/per_class_ap50.png")
    write_report(stages, str(tmp_path))
    assert asked == ["AP"] and "## Per-class AP\n" in (tmp_path / "report.md").read_text()


def test_a_teacher_that_learned_nothing_is_not_called_a_too_easy_task(tmp_path):
    """At CI scale every AP is 0: the report called the task 'too easy for a teacher to help'."""
    from nst_det.pipeline.report import write_report

    stages, records = _fabricate(tmp_path, VOC_KEYS)
    for name, record in records.items():
        if "bbox" in record["metrics"]:
            record["metrics"]["bbox"]["AP50"] = 0.0
            (tmp_path / name / "stage.json").write_text(json.dumps(record))
    write_report(stages, str(tmp_path))
    gap = next(line for line in (tmp_path / "report.md").read_text().splitlines()
               if "Capacity gap" in line)
    assert "the teacher has not learned the task at this schedule" in gap
    assert "too easy" not in gap


def test_each_run_of_a_figure_has_a_colour_of_its_own(tmp_path, monkeypatch):
    """Two seeds make 13 detection runs: matplotlib's 10-colour cycle drew the teacher and a
    student alike, with nothing in the legend to tell them apart."""
    from matplotlib.axes import Axes

    from nst_det.pipeline import figures

    drawn = {}

    def recording(real):
        def record(ax, *args, **kw):
            drawn.setdefault(id(ax), {})[kw.get("label")] = kw.get("color")
            return real(ax, *args, **kw)
        return record

    for method in ("plot", "bar"):
        monkeypatch.setattr(Axes, method, recording(getattr(Axes, method)))
    runs = {f"run_{i}": [{"iteration": 1, "total_loss": 1.0, "bbox/AP50": float(i)}]
            for i in range(13)}
    figures.curves({"cls": runs["run_0"]}, runs, str(tmp_path), "curves.png")
    figures.per_class_ap({n: {"AP50-cat": 1.0} for n in runs}, "AP50", str(tmp_path), "bars.png")
    per_axes = [colours for colours in drawn.values() if len(colours) == 13]
    assert len(per_axes) == 3  # loss, AP50 and the per-class bars
    for colours in per_axes:
        assert None not in colours.values()
        assert len({tuple(c) for c in colours.values()}) == 13
    many = figures.run_colours(range(25))  # beyond tab20: a continuous map
    assert len({tuple(c) for c in many.values()}) == 25
