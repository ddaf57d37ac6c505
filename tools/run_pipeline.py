#!/usr/bin/env python
"""The main job: the whole NST method end to end, then a report.

    tools/run_pipeline.py                          # toy data, this CPU
    tools/run_pipeline.py --scale ci               # a few iterations per stage (tests)
    tools/run_pipeline.py --paper --num-gpus 8     # ImageNet + VOC2007 under $DETECTRON2_DATASETS
    tools/run_pipeline.py --paper --cluster slurm --slurm-gpus 8 --slurm-partition learnfair
    tools/run_pipeline.py --paper --cluster slurm --status   # each stage: state, job id, log

Stages: classification teacher -> students (plain, NST, KD+NST) -> conversion to detectron2
backbones -> teacher detector -> student detectors from each pretrained student, without and with
detection-stage NST -> VOC07 evaluation -> export of the best student -> report.md. Finished
stages are skipped when the command is run again (same --output), so it can be resumed.

Each stage is a submitit job: on this machine (`--cluster local`, at most --jobs training,
evaluation or calibration stages at a time) or on SLURM (`--cluster slurm`: the whole plan
submitted at once, each stage `afterok` the stages it reads; settings from --slurm-* options or a
--slurm-config YAML file with the same keys, e.g.
`{partition: learnfair, time: {cls: 4320, det: 720}, gpus: 8, sbatch: {qos: high}}`).
"""

import argparse
import os
import sys
import warnings
from dataclasses import replace

# upstream deprecation notices (raised while detectron2 imports and at every stage) would bury
# the progress lines; they are about torch APIs detectron2 v0.6 uses, not about this run
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release")

from detectron2.engine import default_argument_parser  # noqa: E402

from nst_det.engine.cpu_amp import cpu_has_native_bfloat16  # noqa: E402
from nst_det.pipeline import (  # noqa: E402
    PAPER_CONFIGS,
    TOY_SCALES,
    PipelineRunner,
    build_plan,
)
from nst_det.pipeline.calibrate import calibrate_stage  # noqa: E402
from nst_det.pipeline.cluster import ClusterSettings  # noqa: E402
from nst_det.pipeline.methods import (  # noqa: E402
    METHODS,
    add_method_stages,
    methods_benchmark_only,
    parse_methods,
)
from nst_det.pipeline.plan import TOY_PLANS, select_stages  # noqa: E402
from nst_det.pipeline.report import write_report  # noqa: E402
from nst_det.pipeline.steps import export_stage  # noqa: E402
from nst_det.pipeline.weight_grid import (  # noqa: E402
    grid_configs_stage,
    select_weight_stage,
)
from nst_det.utils.atomic import exit_on_sigterm  # noqa: E402


def _seeds(text: str) -> tuple:
    """--seeds "0,1,2" -> (0, 1, 2). detectron2 draws a random seed for a negative SEED, which
    no rerun could repeat, and a seed given twice would name one stage twice."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, "
                                         "e.g. 0,1,2") from None
    if min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give each seed once, each >= 0")
    return seeds


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return int(text)


def parse_args(argv=None):
    # detectron2's launch flags (--num-gpus, --num-machines, --machine-rank, --dist-url)
    parser = default_argument_parser()
    parser.description = __doc__.splitlines()[0]
    # detectron2's epilog shows train_net usage; --machine-rank/--dist-url are unused here (a
    # multi-node stage's ranks and address come from its SLURM job)
    parser.epilog = None
    parser.add_argument("--output", default="output/pipeline", help="root of every stage's folder")
    parser.add_argument("--scale", choices=sorted(TOY_SCALES), default=None,
                        help="iteration counts: demo (default toy), ci (tiny), paper")
    parser.add_argument("--paper", action="store_true",
                        help="ImageNet + VOC2007 (configs/ImageNet-Pretrain, VOC-Detection)")
    parser.add_argument("--toy-students", choices=sorted(TOY_PLANS), default="r18",
                        help="toy plan: r18 (ResNet-18 Faster R-CNN students), mnv3 "
                             "(MobileNetV3-Large FPN), retinanet (RetinaNet R-18 from R-34)")
    parser.add_argument("--seeds", type=_seeds, default=None,
                        help="comma-separated student seeds, e.g. 0,1,2")
    parser.add_argument("--methods", default="",
                        help="also train one detection-stage student per transfer method and "
                             "seed from the plain pretrained student, each loss weight "
                             f"calibrated (nst_det/pipeline/methods.py); any of "
                             f"{','.join(METHODS)}, or all")
    parser.add_argument("--weight-grid", action="store_true",
                        help="with --methods: train each method at its calibrated weight x1/4, "
                             "x1, x4 (one seed, evaluated on the toy minival split only) and run "
                             "its seeds at the best validation AP50 (nst_det/pipeline/"
                             "weight_grid.py)")
    parser.add_argument("--controls", action="store_true",
                        help="add the methods table's controls: plain_aa (plain student, only "
                             "its data order changed, NST_DET.DATA_SEED: negative) and "
                             "nst_handset (NST at the config's hand-set weight: positive)")
    parser.add_argument("--methods-only", action="store_true",
                        help="the methods benchmark alone: the method and control students, the "
                             "plain students they are compared with, what those read and the "
                             "report (not the main table's distilled students, not the export)")
    parser.add_argument("--stages", default="",
                        help="comma-separated stage names: run only these and the stages they "
                             "read, e.g. det_teacher (names: --status)")
    parser.add_argument("--jobs", type=_positive, default=None,
                        help="--cluster local: training stages run side by side, each a job with "
                             "cpu_count/jobs threads (default: 2 for toy runs on a CPU with 2+ "
                             "cores, else 1: one stage at a time with --num-gpus processes)")
    parser.add_argument("--cluster", choices=("local", "slurm"), default="local",
                        help="run the stages as submitit jobs on this machine or on SLURM")
    parser.add_argument("--status", action="store_true",
                        help="list every stage (pending/queued/running/done/failed/stale, job id, "
                             "log) and exit")
    parser.add_argument("--no-wait", action="store_true",
                        help="--cluster slurm: submit the plan and exit (follow with --status)")
    slurm = parser.add_argument_group(
        "SLURM", "per stage kind as KIND=VALUE,... (kinds: cls, det = training/evaluation "
                 "stages; other = export, report, calibration) or one VALUE for all")
    slurm.add_argument("--slurm-config", default=None,
                       help="YAML file with keys partition, account, time, gpus, tasks, nodes, "
                            "cpus, sbatch (command-line options win)")
    slurm.add_argument("--slurm-partition", default=None)
    slurm.add_argument("--slurm-account", default=None)
    slurm.add_argument("--slurm-time", default=None, help="time limit in minutes")
    slurm.add_argument("--slurm-gpus", default=None, help="GPUs per node (one task per GPU)")
    slurm.add_argument("--slurm-tasks", default=None,
                       help="processes per node (default: the GPUs, or 1; >1 without GPUs: "
                            "gloo on CPUs)")
    slurm.add_argument("--slurm-nodes", default=None, help="nodes per stage")
    slurm.add_argument("--slurm-cpus", default=None, help="CPUs per task (= torch threads)")
    slurm.add_argument("--slurm-sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch option, e.g. qos=high (repeatable)")
    parser.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                        help="SOLVER.AMP.ENABLED for every training stage; auto: on, with "
                             "NST_DET.CHANNELS_LAST, for toy runs on a CPU with native bfloat16 "
                             "(1.1-1.8x faster steps there, benchmarks/bench_mixed_precision.py), "
                             "else as configured")
    args = parser.parse_args(argv)
    # default_argument_parser also has tools/train_net.py's own options: a stage's config and
    # overrides come from the plan, so these would be ignored silently
    given = [flag for flag, value in (("--config-file", args.config_file),
                                      ("--resume", args.resume), ("--eval-only", args.eval_only),
                                      ("KEY VALUE", args.opts)) if value]
    if given:
        parser.error(f"{', '.join(given)}: tools/train_net.py's options, not the pipeline's (its "
                     "stages take their configs and overrides from nst_det/pipeline/plan.py)")
    try:
        parse_methods(args.methods)
        cluster_settings(args)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if args.weight_grid and not args.methods:
        parser.error("--weight-grid picks the loss weight of each of --methods: give --methods")
    if args.jobs is None:
        cpu_toy = not args.paper and args.num_gpus <= 1 and args.num_machines == 1
        args.jobs = 2 if cpu_toy and (os.cpu_count() or 1) >= 2 else 1
    if args.jobs > 1 and (args.num_gpus > 1 or args.num_machines > 1):
        parser.error("--jobs > 1 runs single-process stages side by side: use it without "
                     "--num-gpus/--num-machines (those launch one stage at a time)")
    if args.cluster == "local" and args.num_machines > 1:
        parser.error("--num-machines > 1 needs --cluster slurm (--slurm-nodes)")
    return args


def _per_kind(value, option: str) -> dict:
    """`8`, `cls=8,det=4` or a YAML mapping -> {kind: int}; kind "default" for a plain value.
    A ValueError names `option` for anything else."""
    if value is None:
        return {}
    try:
        if isinstance(value, dict):
            return {k: int(v) for k, v in value.items()}
        if "=" not in str(value):
            return {"default": int(value)}
        return {k.strip(): int(v) for k, v in (p.split("=", 1) for p in str(value).split(","))}
    except ValueError:
        raise ValueError(f"{option} {value!r}: give a whole number, or KIND=NUMBER,... for the "
                         "kinds cls, det, other") from None


def cluster_settings(args) -> ClusterSettings:
    """ClusterSettings from --slurm-config and the --slurm-* / --num-gpus options."""
    conf = {}
    if args.slurm_config:
        import yaml

        if not os.path.isfile(args.slurm_config):
            raise ValueError(f"--slurm-config {args.slurm_config}: no such file")
        with open(args.slurm_config) as f:
            conf = yaml.safe_load(f) or {}
    def pick(name) -> dict:  # the option wins over the file; an error names where it came from
        if getattr(args, f"slurm_{name}"):
            return _per_kind(getattr(args, f"slurm_{name}"), f"--slurm-{name}")
        return _per_kind(conf.get(name), f"{args.slurm_config}: {name}")

    tasks = pick("tasks")
    if args.num_gpus > 1:  # detectron2's flag: processes (GPUs) per training stage
        tasks = {"default": args.num_gpus, **tasks}
    gpus = pick("gpus")
    if args.cluster == "local" and not gpus:  # (submitit hides the GPUs of a job given none)
        import torch

        gpus = {"default": args.num_gpus} if torch.cuda.is_available() else {}
    nodes = pick("nodes")
    if args.num_machines > 1:
        nodes = {"default": args.num_machines, **nodes}
    sbatch = dict(conf.get("sbatch") or {})
    bad = [item for item in args.slurm_sbatch if "=" not in item]
    if bad:
        raise ValueError(f"--slurm-sbatch {bad[0]!r}: give KEY=VALUE, e.g. qos=high")
    sbatch.update(item.split("=", 1) for item in args.slurm_sbatch)
    return ClusterSettings(
        cluster=args.cluster, jobs=args.jobs, tasks=tasks, gpus=gpus, nodes=nodes,
        time_min=pick("time"), cpus=pick("cpus"),
        partition=args.slurm_partition or conf.get("partition"),
        account=args.slurm_account or conf.get("account"), sbatch=sbatch)


def amp_opts(choice: str, paper: bool) -> list:
    """Config overrides for --amp."""
    if choice == "auto":
        # with channels_last: 1.13-1.26x (classification) / 1.71-1.76x (detection) the fp32 NCHW
        # step speed on the CPU measured (benchmarks/README.md), 1.24-1.31x / 1.48-1.52x for
        # bfloat16 alone
        on = not paper and cpu_has_native_bfloat16()
        return ["SOLVER.AMP.ENABLED", "True", "NST_DET.CHANNELS_LAST", "True"] if on else []
    return ["SOLVER.AMP.ENABLED", str(choice == "on")]


def main(argv=None):
    args = parse_args(argv)
    exit_on_sigterm()  # a plain `kill` unwinds, so the runner stops the stage jobs it started
    scale = TOY_SCALES[args.scale or ("paper" if args.paper else "demo")]
    if args.seeds:
        scale = replace(scale, seeds=args.seeds)
    stages = build_plan(args.output, scale,
                        PAPER_CONFIGS if args.paper else TOY_PLANS[args.toy_students],
                        train_opts=amp_opts(args.amp, args.paper))
    try:  # options that do not fit the plan (e.g. dkd on RetinaNet) are named, no traceback
        stages = add_method_stages(stages, parse_methods(args.methods),
                                   weight_grid=args.weight_grid, controls=args.controls)
        if args.methods_only:
            stages = methods_benchmark_only(stages)
        if args.stages:
            stages = select_stages(stages, [n.strip() for n in args.stages.split(",")])
    except ValueError as e:
        sys.exit(str(e))
    handlers = {
        "calibrate": calibrate_stage,
        "export": lambda stage: export_stage(stage, stages),
        "report": lambda stage: write_report(stages, stage.out_dir),
    }
    if args.weight_grid:  # the grid's own stages
        handlers.update({"weight_grid": grid_configs_stage, "select_weight": select_weight_stage})
    runner = PipelineRunner(stages, handlers, cluster_settings(args), root=args.output)
    if args.status:
        print(runner.status())
        return 0
    os.makedirs(args.output, exist_ok=True)
    runner.run(wait=not args.no_wait)
    if not args.no_wait and any(s.kind == "report" for s in stages):
        print(f"report: {os.path.join(args.output, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
