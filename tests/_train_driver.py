"""A real training process for reliability tests: python tests/_train_driver.py OUT_DIR [options].

It trains the tiny toy R-18 FPN detector with nst_det's reliable trainer, appends every
iteration's raw losses to OUT_DIR/losses.jsonl (flushed each step, so a killed process leaves its
history), and can SIGKILL itself at a chosen iteration, after or in the middle of a checkpoint
save, the way a machine failure would.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.engine import HookBase

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nst_det import add_nst_config  # noqa: E402
from nst_det.data.datasets import register_toy_voc  # noqa: E402
from nst_det.data.imagefolder import register_toy_imagefolder  # noqa: E402
from nst_det.engine import TRAINER_REGISTRY  # noqa: E402


class LossRecorder(HookBase):
    """Append {iteration: raw losses} to a JSON-lines file after every step."""

    def __init__(self, path, kill_at=None):
        self._path, self._kill_at = path, kill_at

    def after_step(self):
        latest = self.trainer.storage.latest()
        row = {k: v for k, (v, it) in latest.items() if k.startswith(("loss", "total_loss"))
               and it == self.trainer.iter}
        with open(self._path, "a") as f:
            f.write(json.dumps({"iter": self.trainer.iter, **row}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.trainer.iter == self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--max-iter", type=int, default=8)
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL after this iteration")
    parser.add_argument("--kill-during-save-at", type=int, default=None,
                        help="SIGKILL half-way through writing the checkpoint of this iteration")
    parser.add_argument("--kill-before-save", default=None, metavar="NAME",
                        help="SIGKILL when the checkpointer is asked to save NAME (not written)")
    parser.add_argument("--kill-after-save", default=None, metavar="NAME",
                        help="SIGKILL right after the checkpointer saved NAME")
    parser.add_argument("--test", action="store_true",
                        help="evaluate on the toy test split at the end; results -> results.json")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--trainer", default="DetectionTrainer")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--task", choices=["det", "cls"], default="det",
                        help="toy R-18 FPN detector, or toy R-18 classifier")
    args = parser.parse_args()

    cfg = get_cfg()
    add_nst_config(cfg)
    common = ["SOLVER.MAX_ITER", str(args.max_iter), "SOLVER.WARMUP_ITERS", "2",
              "SOLVER.CHECKPOINT_PERIOD", "3", "DATALOADER.NUM_WORKERS", str(args.num_workers),
              "SEED", "7"]
    if args.task == "det":
        train, test = register_toy_voc("driver_voc", args.data_dir, seed=1, num_trainval=8,
                                       num_test=4)
        cfg.merge_from_file(str(REPO / "configs/quick_schedules/faster_rcnn_R_18_FPN_toy.yaml"))
        cfg.merge_from_list([
            *common, "INPUT.MIN_SIZE_TRAIN", "(96, 128)", "INPUT.MAX_SIZE_TRAIN", "160",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "(5,)",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "NST_DET.TRAINER", args.trainer,
        ])
    else:
        train, test = register_toy_imagefolder("driver_cls", args.data_dir, seed=1,
                                               train_per_class=4, val_per_class=2)
        cfg.merge_from_file(str(REPO / "configs/quick_schedules/cls_R18_toy.yaml"))
        cfg.merge_from_list([*common, "SOLVER.IMS_PER_BATCH", "4"])
    cfg.DATASETS.TRAIN = (train,)
    cfg.DATASETS.TEST = (test,) if args.test else ()
    if args.test:
        cfg.TEST.EVAL_PERIOD = 0  # only the final evaluation
    cfg.OUTPUT_DIR = args.out_dir
    torch.manual_seed(cfg.SEED)

    if args.kill_during_save_at is not None:
        real_save = torch.save
        target = args.kill_during_save_at

        def save_then_die(obj, f, *a, **k):
            if isinstance(obj, dict) and obj.get("trainer", {}).get("iteration") == target:
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)

        torch.save = save_then_die

    trainer = TRAINER_REGISTRY.get(cfg.NST_DET.TRAINER)(cfg)
    trainer.register_hooks([LossRecorder(Path(args.out_dir) / "losses.jsonl", args.kill_at)])
    if args.kill_before_save or args.kill_after_save:
        real_ckpt_save = trainer.checkpointer.save  # the hooks call it through this object

        def save_or_die(name, **kwargs):
            if name == args.kill_before_save:
                os.kill(os.getpid(), signal.SIGKILL)
            real_ckpt_save(name, **kwargs)
            if name == args.kill_after_save:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.checkpointer.save = save_or_die
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    if args.test:
        with open(Path(args.out_dir) / "results.json", "w") as f:
            json.dump(results, f, sort_keys=True)


if __name__ == "__main__":
    main()
