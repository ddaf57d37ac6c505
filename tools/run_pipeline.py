#!/usr/bin/env python
"""The main job: the whole NST method end to end, then a report.

    tools/run_pipeline.py                          # toy data, this CPU, ~10 minutes
    tools/run_pipeline.py --scale ci               # a few iterations per stage (tests)
    tools/run_pipeline.py --paper --num-gpus 8     # ImageNet + VOC2007 under $DETECTRON2_DATASETS

Stages: classification teacher -> students (plain, NST, KD+NST) -> conversion to detectron2
backbones -> teacher detector -> student detectors from each pretrained student, without and with
detection-stage NST -> VOC07 evaluation -> export of the best student -> report.md. Finished
stages are skipped when the command is run again (same --output), so it can be resumed.
"""

import os
import sys
from dataclasses import replace

from detectron2.engine import default_argument_parser

from nst_det.pipeline import PAPER_CONFIGS, TOY_CONFIGS, TOY_SCALES, PipelineRunner, build_plan
from nst_det.pipeline.report import write_report
from nst_det.pipeline.steps import convert_stage, export_stage


def parse_args(argv=None):
    # detectron2's launch flags (--num-gpus, --num-machines, --machine-rank, --dist-url)
    parser = default_argument_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--output", default="output/pipeline", help="root of every stage's folder")
    parser.add_argument("--scale", choices=sorted(TOY_SCALES), default=None,
                        help="iteration counts: demo (default toy), ci (tiny), paper")
    parser.add_argument("--paper", action="store_true",
                        help="ImageNet + VOC2007 (configs/ImageNet-Pretrain, VOC-Detection)")
    parser.add_argument("--seeds", default=None, help="comma-separated student seeds, e.g. 0,1,2")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    scale = TOY_SCALES[args.scale or ("paper" if args.paper else "demo")]
    if args.seeds:
        scale = replace(scale, seeds=tuple(int(s) for s in args.seeds.split(",")))
    stages = build_plan(args.output, scale, PAPER_CONFIGS if args.paper else TOY_CONFIGS)
    handlers = {
        "convert": convert_stage,
        "export": lambda stage: export_stage(stage, stages),
        "report": lambda stage: write_report(stages, stage.out_dir),
    }
    os.makedirs(args.output, exist_ok=True)
    PipelineRunner(stages, args, handlers).run()
    print(f"report: {os.path.join(args.output, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
