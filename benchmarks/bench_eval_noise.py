#!/usr/bin/env python
"""Training noise against evaluation noise in a finished methods table (issue 26, item 3).

    python benchmarks/bench_eval_noise.py --output output/methods
    python benchmarks/bench_eval_noise.py --output output/methods --rows control_nst_handset

Each finished student detector of the methods axis (det_plain_s<seed>, det_method_<m>_s<seed>,
det_control_<c>_s<seed>) is evaluated once on the whole test set and, from the same detections,
on its even and its odd images (disjoint halves, VOC AP of detectron2's evaluator on each).
Printed per row, for AP50 and AP: the spread over seeds of the paired Δ (row − plain of the
same seed), split into the part a larger test set would remove (evaluation noise) and the part
only more seeds average out (training noise); `nst_det.pipeline.paired.noise_split` says how.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader  # noqa: E402
from detectron2.evaluation import (  # noqa: E402
    DatasetEvaluator,
    PascalVOCDetectionEvaluator,
    inference_on_dataset,
)
from tabulate import tabulate  # noqa: E402

import nst_det  # noqa: E402,F401  (registers the toy data sets)
from nst_det.pipeline.measure import load_detector  # noqa: E402
from nst_det.pipeline.paired import noise_split  # noqa: E402
from nst_det.pipeline.plan import Stage  # noqa: E402

METRICS = ("AP50", "AP")


class _Halves(DatasetEvaluator):
    """The whole test set's evaluator, and one per half fed only that half's images."""

    def __init__(self, test_name: str, halves: dict):
        self.whole = PascalVOCDetectionEvaluator(test_name)
        self.halves = {name: PascalVOCDetectionEvaluator(name) for name in halves}
        self.half_of = {image_id: name for name, ids in halves.items() for image_id in ids}

    def reset(self):
        for evaluator in (self.whole, *self.halves.values()):
            evaluator.reset()

    def process(self, inputs, outputs):
        self.whole.process(inputs, outputs)
        for inp, out in zip(inputs, outputs):
            self.halves[self.half_of[inp["image_id"]]].process([inp], [out])

    def evaluate(self):
        return {"whole": self.whole.evaluate()["bbox"],
                **{name: e.evaluate()["bbox"] for name, e in self.halves.items()}}


_HALVES = {}  # test set name -> {half name: image ids}, registered once per process


def register_halves(test_name: str, folder: str) -> dict:
    """Two VOC metadata entries, `<test>_even` / `<test>_odd`, over the test set's annotations
    (symlinked into `folder`) with an image set of every other image id; name -> image ids."""
    if test_name in _HALVES:
        return _HALVES[test_name]
    meta = MetadataCatalog.get(test_name)
    ids = sorted(r["image_id"] for r in DatasetCatalog.get(test_name))
    folder = os.path.join(folder, test_name)
    os.makedirs(os.path.join(folder, "ImageSets", "Main"))
    annotations = os.path.abspath(os.path.join(meta.dirname, "Annotations"))
    os.symlink(annotations, os.path.join(folder, "Annotations"))
    halves = {}
    for k, half in enumerate(("even", "odd")):
        name = f"{test_name}_{half}"
        halves[name] = ids[k::2]
        with open(os.path.join(folder, "ImageSets", "Main", f"{half}.txt"), "w") as f:
            f.write("\n".join(halves[name]) + "\n")
        MetadataCatalog.get(name).set(thing_classes=list(meta.thing_classes), dirname=folder,
                                      year=meta.year, split=half)
    _HALVES[test_name] = halves
    return halves


def evaluate_halves(stage_dir: str, folder: str) -> dict:
    """{"whole" | "even" | "odd": {"AP50", "AP", "AP75"}} of one finished stage's model."""
    cfg, model = load_detector(Stage(os.path.basename(stage_dir), "train", stage_dir))
    test = cfg.DATASETS.TEST[0]
    evaluator = _Halves(test, register_halves(test, folder))
    with torch.no_grad():
        results = inference_on_dataset(model, build_detection_test_loader(cfg, test), evaluator)
    return {k.rsplit("_", 1)[-1] if k != "whole" else k: v for k, v in results.items()}


def _by_row(output: str, rows) -> dict:
    """row name -> {seed: stage folder} of the finished students (plain included)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(output, "det_*_s*", "stage.json"))):
        folder = os.path.dirname(path)
        m = re.fullmatch(r"det_(plain|method_.+|control_.+)_s(\d+)", os.path.basename(folder))
        if m and (m.group(1) == "plain" or not rows or m.group(1) in rows):
            found.setdefault(m.group(1), {})[int(m.group(2))] = folder
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="output/methods", help="a finished methods run")
    parser.add_argument("--rows", default="", help="comma-separated rows (e.g. method_cwd, "
                        "control_plain_aa); default: every row found")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    found = _by_row(args.output, [r for r in args.rows.split(",") if r])
    if "plain" not in found:
        sys.exit(f"{args.output}: no finished det_plain_s<seed> stage (run tools/run_pipeline.py "
                 f"--methods ... first)")
    with tempfile.TemporaryDirectory(prefix="eval_noise_") as folder:
        values = {row: {seed: evaluate_halves(d, folder) for seed, d in seeds.items()}
                  for row, seeds in found.items()}
    plain = values.pop("plain")
    table = []
    for metric in METRICS:
        seeds = sorted(plain)
        one = noise_split(*[[plain[s][p][metric] for s in seeds] for p in ("whole", "even",
                                                                             "odd")])
        table.append(["plain (one model, unpaired)", metric, *_cells(one)])
        for row, by_seed in values.items():
            seeds = sorted(set(by_seed) & set(plain))
            delta = [[by_seed[s][p][metric] - plain[s][p][metric] for s in seeds]
                     for p in ("whole", "even", "odd")]
            table.append([f"{row} − plain (paired Δ)", metric, *_cells(noise_split(*delta))])
    # finite seeds: those with a finite value on the whole set and on both halves (noise_split)
    print(tabulate(table, headers=["row", "metric", "finite seeds", "sd over seeds", "eval sd",
                                   "train sd", "eval share of variance"], tablefmt="github"))
    return 0


def _cells(split: dict) -> list:
    def f(x, fmt="{:.2f}"):
        return "n/a" if x is None else fmt.format(x)
    return [split["n"], f(split["sd_total"]), f(split["sd_eval"]), f(split["sd_train"]),
            f(split["eval_share"], "{:.0%}")]


if __name__ == "__main__":
    sys.exit(main())
