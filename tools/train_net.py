#!/usr/bin/env python
"""Train or evaluate any nst_det config: classification distillation or detection.

detectron2's CLI and launch semantics, e.g.
    tools/train_net.py --config-file configs/quick_schedules/faster_rcnn_R_18_FPN_toy.yaml
    tools/train_net.py --config-file ... --num-gpus 8 SOLVER.IMS_PER_BATCH 16
    tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    tools/train_net.py --config-file ... --coco-dataset my_train train.json images/ \
        --coco-dataset my_val val.json images/ DATASETS.TRAIN "('my_train',)" \
        DATASETS.TEST "('my_val',)" MODEL.ROI_HEADS.NUM_CLASSES 3
The trainer class is the config's `NST_DET.TRAINER` (a name in nst_det.engine.TRAINER_REGISTRY).
"""

import sys

from detectron2.engine import default_argument_parser, launch

from nst_det.engine.train_or_evaluate import config_of, main, setup  # noqa: F401 (setup: tests)
from nst_det.utils.atomic import exit_on_sigterm
from nst_det.utils.dist import release_process_group


def argument_parser():
    """detectron2's parser + data sets registered from the command line (no code, no config)."""
    parser = default_argument_parser()
    parser.add_argument("--coco-dataset", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format set (repeatable; see DATASETS.COCO)")
    parser.add_argument("--voc-dataset", nargs=3, action="append", default=[],
                        metavar=("NAME", "DIRNAME", "SPLIT"),
                        help="register a VOC-layout split, classes found in its annotations "
                        "(repeatable; a class list or the metric year: DATASETS.VOC)")
    return parser


def launched_main(args):
    """main() in each launched process, ending its process group cleanly once it finished. A
    rank that fails leaves at once: a barrier there would wait for ranks that wait for it in the
    next step's collective, and the run would hang instead of ending on the error."""
    exit_on_sigterm()  # `kill` stops it like Ctrl-C: atomic writes remove their temp files
    result = main(args)
    release_process_group()
    return result


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    try:  # a missing config file or a bad override: its message, before any process starts
        config_of(args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"train_net.py: {e}")
    launch(
        launched_main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
