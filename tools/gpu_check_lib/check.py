"""tools/gpu_check.py: the parts, their limits, and the command line (see docs/gpu_check.md)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from .bundle import LIMIT_MIB, MIB, ROOT, BundleError, prepare
from .runner import Part, run_check, table, write_atomically

P = "gpu_check_lib.parts:"
# Order: the measurements the project has never had first, the long CI pipeline after them, so
# a slow pipeline cannot starve the timings. Limits: GPU (one H200) / --tiny on a shared CPU.
PARTS = [
    Part("install", P + "install", 120, 120,
         what="the bundle's wheels and patched detectron2 tree, pip --no-index --target"),
    Part("environment", P + "environment", 45, 90,
         what="GPU, driver, torch/CUDA/cuDNN/NCCL, torchvision ops on the device, detectron2 "
              "flavour, every module the project imports"),
    Part("paper_shapes", P + "paper_shapes", 150, 240, needs=("environment",),
         what="R-18/R-50 FPN <- R-101 FPN at 2x800x1333, R-18 <- R-50 at 64x224: student "
              "step, teacher forward, distillation step, NST share, peak memory, fp32/bf16/fp16"),
    Part("train_net", P + "train_net", 100, 240, needs=("environment",),
         what="tools/train_net.py --num-gpus 1 (AMP, NST), then --resume through detectron2's "
              "distributed worker (NCCL)"),
    Part("export", P + "export", 60, 120, needs=("train_net",),
         what="TorchScript and ONNX of the trained student, verified against eager"),
    Part("pipeline", P + "pipeline", 200, 300, needs=("environment",),
         what="tools/run_pipeline.py's CI-scale toy plan on the device (13 stages; --tiny: 3)"),
    Part("upstream_ops", P + "upstream_ops", 240, 300, needs=("environment",), optional=True,
         what="upstream detectron2 built with its compiled (CUDA) ops, one op called"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.py",
        description="Prepare here, then run on a lent GPU machine, the check of nst_det on a "
                    "GPU (docs/gpu_check.md).")
    parser.add_argument("--prepare", action="store_true",
                        help="gather the bundle the GPU machine lacks into --out and exit")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu_bundle",
                        help="--prepare: the bundle folder (git-ignored)")
    parser.add_argument("--with-upstream", action="store_true",
                        help="--prepare: add the upstream detectron2 source archive from "
                             "../shared/third_party/ (for --upstream-ops)")
    parser.add_argument("--skip", default="", help="--prepare: packages to leave out, a,b")
    parser.add_argument("--packages", default="",
                        help="--prepare: these distributions (a,b) instead of bundle.py's list "
                             "(wheels of others already in --out are removed)")
    parser.add_argument("--python-version", default="3.12", help="--prepare: the GPU machine's")
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB,
                        help="--prepare: what may travel, working tree + bundle (MiB)")
    parser.add_argument("--pip-arg", action="append", default=[],
                        help="--prepare: extra `pip download` argument (repeatable)")
    parser.add_argument("--no-detectron2", action="store_true",
                        help="--prepare: leave out the patched detectron2 tree")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="install this bundle first (into <bundle>/site) and run on it")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes and iterations (the CPU test of this check)")
    parser.add_argument("--json", type=Path, default=None,
                        help="report file (default <work-dir>/gpu_check.json); the table goes "
                             "beside it as .md, each part's log into <stem>_logs/")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/nst_det_gpu_check"),
                        help="scratch folder: toy data, runs, exports")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="total seconds: a part gets at most what is left, less 10 s to stop "
                             "it, and is not started with under a quarter of its own limit")
    parser.add_argument("--only", default="", help="run only these parts (a,b), e.g. a rerun")
    parser.add_argument("--upstream-ops", action="store_true",
                        help="also build the bundle's upstream detectron2 with compiled ops")
    return parser.parse_args(argv)


def run_prepare(args) -> int:
    try:
        manifest = prepare(args.out, python_version=args.python_version,
                           with_upstream=args.with_upstream,
                           with_detectron2=not args.no_detectron2,
                           skip=[s for s in args.skip.split(",") if s], pip_args=args.pip_arg,
                           packages=[(n, "--packages") for n in args.packages.split(",") if n]
                           or None,
                           limit_mib=args.limit_mib)
    except BundleError as e:
        print(f"[gpu_check] --prepare failed: {e}", file=sys.stderr)
        return 2
    size, tree, limit = (manifest[k] for k in ("bundle_bytes", "tree_bytes", "limit_bytes"))
    print(f"[gpu_check] bundle {args.out}: {size / MIB:.1f} MiB ({len(manifest['wheels'])} "
          f"wheels{', detectron2 tree' if manifest['detectron2_tree'] else ''}"
          f"{', upstream archive' if manifest['upstream_archive'] else ''}); working tree "
          f"{tree / MIB:.1f} MiB; together {(size + tree) / MIB:.1f} of {limit / MIB:.0f} MiB")
    out = args.out.resolve()
    carry = os.path.relpath(out, ROOT) if out.is_relative_to(ROOT) else str(out)
    print(f"[gpu_check] on the GPU machine, from the repository root (carry {carry}), run:")
    print(manifest["command"])
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return run_prepare(args)
    # `kill` stops the check like Ctrl-C: the running part's process group is stopped with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    json_path = (args.json or work / "gpu_check.json").resolve()
    log_dir = json_path.parent / f"{json_path.stem}_logs"
    site = (args.bundle / "site").resolve() if args.bundle else None
    skip = {}
    if args.bundle is None:
        skip["install"] = "no --bundle: this interpreter's packages are used"
    if args.only:
        wanted, by_name = set(args.only.split(",")), {p.name: p for p in PARTS}
        unknown = wanted - set(by_name)
        if unknown:
            raise SystemExit(f"--only: no part {sorted(unknown)}; parts: {list(by_name)}")
        for name in list(wanted):  # with what they need (a rerun of export retrains)
            stack = [name]
            while stack:
                for need in by_name[stack.pop()].needs:
                    if need not in wanted:
                        wanted.add(need)
                        stack.append(need)
        if site and not (site / "detectron2").is_dir():  # a fresh machine: install first
            wanted.add("install")
        skip.update({p.name: "not in --only" for p in PARTS if p.name not in wanted})
    env = dict(os.environ, DETECTRON2_DATASETS=str(work / "datasets"),
               NST_DET_WEIGHTS_CACHE=str(work / "weights_cache"))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the Makefile: no spinning on shared CPUs
    paths = [str(site)] if site else []
    env["PYTHONPATH"] = os.pathsep.join(
        [*paths, str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    ctx = {"repo": str(ROOT), "device": args.device, "tiny": args.tiny, "work_dir": str(work),
           "bundle": str(args.bundle.resolve()) if args.bundle else None,
           "site": str(site) if site else None}
    # an optional part runs when asked for by its flag or by name in --only
    requested = ({"upstream_ops"} if args.upstream_ops else set()) | set(
        filter(None, args.only.split(",")))
    report = run_check(PARTS, ctx, tiny=args.tiny, budget_s=args.budget, json_path=json_path,
                       log_dir=log_dir, env=env, requested=requested, skip_reasons=skip)
    text = table(report)
    print(text)
    heading = (f"GPU check {time.strftime('%Y-%m-%d %H:%M')}, device {args.device}"
               f"{' (tiny)' if args.tiny else ''}, {report['seconds']:.0f} s of a "
               f"{args.budget:.0f} s budget")
    write_atomically(json_path.with_suffix(".md"), f"{heading}\n\n{text}\n")
    print(f"[gpu_check] report: {json_path} (table: {json_path.with_suffix('.md')}, logs: "
          f"{log_dir})")
    failed = [p["name"] for p in report["parts"]
              if p["status"] != "ok" and not p["status"].startswith("not run: not requested")
              and p["name"] not in skip]
    return 1 if failed else 0
