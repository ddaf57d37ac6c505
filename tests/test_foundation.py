"""The foundation: detectron2 installs, imports, trains a stock Faster R-CNN on toy VOC data."""

import filecmp
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
R18_TOY = REPO / "configs" / "quick_schedules" / "faster_rcnn_R_18_FPN_toy.yaml"
# small inputs and heads: the point is the plumbing, not the accuracy
FAST_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "200",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "200",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
]


def test_detectron2_and_nst_det_import():
    import detectron2
    from detectron2.config import get_cfg
    from detectron2.export import TracingAdapter  # needs the optional-caffe2 patch
    from detectron2.modeling import META_ARCH_REGISTRY

    import nst_det

    # the patched v0.6 or a newer upstream build: API older than v0.6 is not supported
    major, minor = (int(v) for v in detectron2.__version__.split(".")[:2])
    assert (major, minor) >= (0, 6), detectron2.__version__
    cfg = get_cfg()
    nst_det.add_nst_config(cfg)
    assert cfg.NST_DET.SKIP_BAD_IMAGES is False and cfg.MODEL.NST.LOSS_WEIGHT == 0.0
    assert "DistillationRCNN" in META_ARCH_REGISTRY  # registered by importing nst_det

    class Double(torch.nn.Module):
        def forward(self, inputs):
            return {"y": inputs[0]["x"] * 2}

    # the export path works: TracingAdapter flattens dict inputs/outputs for torch.jit.trace
    adapter = TracingAdapter(Double().eval(), [{"x": torch.ones(2)}],
                             inference_func=lambda model, inputs: model(inputs))
    traced = torch.jit.trace(adapter, adapter.flattened_inputs)
    out = adapter.outputs_schema(traced(torch.full((2,), 3.0)))
    torch.testing.assert_close(out["y"], torch.full((2,), 6.0))


def test_missing_compiled_op_raises_clear_error():
    import detectron2._C as d2_c
    from detectron2.layers import nms_rotated
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated

    if "placeholder" not in d2_c.get_compiler_version():
        pytest.skip("a compiled detectron2 is installed: the placeholder is not in use")
    boxes = torch.tensor([[10.0, 10.0, 4.0, 4.0, 0.0]])
    with pytest.raises(RuntimeError, match="nms_rotated needs detectron2's compiled ops"):
        nms_rotated(boxes, torch.ones(1), 0.5)
    with pytest.raises(RuntimeError, match="box_iou_rotated needs detectron2's compiled ops"):
        pairwise_iou_rotated(RotatedBoxes(boxes), RotatedBoxes(boxes))


def test_toy_generator_is_deterministic(tmp_path):
    from nst_det.data import make_toy_imagefolder, make_toy_voc

    kwargs = dict(num_trainval=4, num_test=2)
    a = make_toy_voc(tmp_path / "a", seed=3, **kwargs)
    b = make_toy_voc(tmp_path / "b", seed=3, **kwargs)
    c = make_toy_voc(tmp_path / "c", seed=4, **kwargs)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 * (4 + 2) + 2 + 2  # jpg+xml per image, 2 split files, spec, file list
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    jpgs = [rel for rel in files if rel.suffix == ".jpg"]
    assert any(not filecmp.cmp(a / rel, c / rel, shallow=False) for rel in jpgs)

    cls_a = make_toy_imagefolder(tmp_path / "ca", seed=3, train_per_class=2, val_per_class=1)
    cls_b = make_toy_imagefolder(tmp_path / "cb", seed=3, train_per_class=2, val_per_class=1)
    cls_files = sorted(p.relative_to(cls_a) for p in cls_a.rglob("*.jpg"))
    assert len(cls_files) == 5 * 3
    for rel in cls_files:
        assert filecmp.cmp(cls_a / rel, cls_b / rel, shallow=False), rel


def test_toy_voc_has_voc_layout_and_difficult_flags(tiny_voc):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    train, test, dirname = tiny_voc
    records = DatasetCatalog.get(train)
    assert len(records) == 8
    assert all(len(r["annotations"]) >= 2 for r in records)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main/trainval.txt"):
        assert os.path.exists(os.path.join(dirname, sub))
    assert MetadataCatalog.get(test).year == 2007
    xml = "".join(p.read_text() for p in Path(dirname, "Annotations").glob("*.xml"))
    assert "<difficult>1</difficult>" in xml and "<difficult>0</difficult>" in xml


def _toy_cfg(train, test, out_dir):
    from detectron2.config import get_cfg

    from nst_det import add_nst_config

    cfg = get_cfg()
    add_nst_config(cfg)
    cfg.merge_from_file(str(R18_TOY))
    cfg.merge_from_list(FAST_OPTS)
    cfg.DATASETS.TRAIN = (train,)
    cfg.DATASETS.TEST = (test,)
    cfg.OUTPUT_DIR = str(out_dir)
    return cfg


def test_stock_faster_rcnn_r18_trains_and_evaluates(tiny_voc, tmp_path):
    from detectron2.evaluation import PascalVOCDetectionEvaluator, inference_on_dataset

    from nst_det.engine import DetectionTrainer

    train, test, _ = tiny_voc
    cfg = _toy_cfg(train, test, tmp_path)
    trainer = DetectionTrainer(cfg)
    assert type(trainer.model).__name__ == "GeneralizedRCNN"
    assert type(trainer.model.backbone).__name__ == "FPN"
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER  # detectron2 leaves iter one past the last step
    evaluator = PascalVOCDetectionEvaluator(test)
    results = inference_on_dataset(
        trainer.model, DetectionTrainer.build_test_loader(cfg, test), evaluator
    )
    ap50 = results["bbox"]["AP50"]
    assert math.isfinite(ap50)
    # the trainer's own final evaluation (EvalHook, nst_det's evaluator choice for the set) is
    # detectron2's VOC evaluation of the same model
    assert trainer.last_eval_results["bbox"]["AP50"] == ap50


@pytest.mark.slow
def test_launch_two_process_cpu_gloo(tmp_path):
    """detectron2.engine.launch spawns 2 CPU workers (gloo) that train 2 iterations together."""
    from nst_det.data import make_toy_voc

    # generate the default toy set once, so the two ranks don't both write it
    make_toy_voc(tmp_path / "datasets" / "toy" / "VOC2007")
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    cmd = [
        sys.executable, str(REPO / "tools" / "train_net.py"), "--num-gpus", "2",
        "--config-file", str(R18_TOY), *FAST_OPTS, "SOLVER.IMS_PER_BATCH", "4",
        "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "World size: 2" in log  # default_setup logs it from rank 0
    assert (tmp_path / "out" / "model_final.pth").exists()


@pytest.mark.slow
def test_a_run_of_two_processes_ends_on_the_error_of_one(tmp_path):
    """Rank 0 fails saving its checkpoint (only rank 0 saves) while rank 1 waits in the next
    step's all_reduce: before, rank 0 waited at a barrier in its `finally`, rank 1 for rank 0,
    and the run hung until gloo's 30-minute timeout (the 300 s below is only a safety net)."""
    from nst_det.data import make_toy_voc

    make_toy_voc(tmp_path / "datasets" / "toy" / "VOC2007")
    out = tmp_path / "out"
    (out / "model_0000001.pth").mkdir(parents=True)  # a folder where the checkpoint goes
    (out / "model_0000001.pth" / "keep").write_text("x")
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--num-gpus", "2",
           "--config-file", str(R18_TOY), *FAST_OPTS, "SOLVER.IMS_PER_BATCH", "4",
           "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()",
           "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "IsADirectoryError" in proc.stdout + proc.stderr
