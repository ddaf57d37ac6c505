"""LazyConfig (.py) teachers and detectron2 model-zoo names for MODEL.TEACHER.CONFIG_FILE.

A tiny LazyConfig GeneralizedRCNN (ResNet-18 FPN with BatchNorm) written per test distils the
yacs toy R-18 FPN student; the toy R-50 FPN teacher's .py config matches its .yaml one exactly.
"""

from __future__ import annotations

import copy
import http.server
import importlib.util
import os
import pickle
import threading

import pytest
import torch
from _detection_common import (
    LEVELS,
    NST_TOY,
    R18_FPN_TOY,
    TOY,
    distill_opts,
    make_cfg,
    zoo_ships_configs,
)
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from nst_det.checkpoint import remote
from nst_det.modeling import DistillationRCNN, TeacherWeightsError, build_teacher
from nst_det.modeling.teacher import build_lazy_teacher_cfg, resolve_teacher_config

P2_P5 = "['p2', 'p3', 'p4', 'p5']"

# a tiny detector of detectron2's lazy building blocks: BN (not FrozenBN) so freezing shows
TINY_LAZY = """
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers
from detectron2.modeling.roi_heads import StandardROIHeads

model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
            stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
            out_features=["res2", "res3", "res4", "res5"],
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=32,
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=32, num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[12], [24], [48], [96], [192]], aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64], offset=0.0),
        anchor_matcher=L(Matcher)(
            thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=64, positive_fraction=0.5, pre_nms_topk=(200, 100),
        post_nms_topk=(50, 50), nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=5, batch_size_per_image=16, positive_fraction=0.25,
        proposal_matcher=L(Matcher)(
            thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(output_size=7, scales=(1 / 4, 1 / 8, 1 / 16, 1 / 32),
                                sampling_ratio=0, pooler_type="ROIAlignV2"),
        box_head=L(FastRCNNConvFCHead)(input_shape=ShapeSpec(channels=32, height=7, width=7),
                                       conv_dims=[], fc_dims=[64]),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=64), test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}"),
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)
"""


def _write_lazy_teacher(tmp_path, opts=(), seed=7):
    """The tiny .py teacher config and a .pth of its weights (random BN statistics too)."""
    py = tmp_path / "tiny_teacher.py"
    py.write_text(TINY_LAZY)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(py)), list(opts))
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so freezing them shows
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "tiny_teacher.pth"
    torch.save({"model": model.state_dict()}, weights)
    return py, weights, model.state_dict()


def _student_cfg(teacher_py, weights, opts=(), levels=P2_P5, n=4, kd=0.0):
    return make_cfg(R18_FPN_TOY, distill_opts(teacher_py, weights, levels, levels, n, kd)
                    + list(opts))


def _batch(seed=0, sizes=((96, 128), (112, 96))):
    """Two RGB uint8 training inputs with one box each (no data set needed)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, w * 0.6, h * 0.7]]))
        inst.gt_classes = torch.tensor([int(torch.randint(5, (1,), generator=g))])
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        out.append({"image": image, "instances": inst, "height": h, "width": w})
    return out


def _losses(model, batch):
    """One training forward (detectron2's heads log to an EventStorage)."""
    with EventStorage(0):
        return model(batch)


def test_lazy_teacher_distils_yacs_student_inert_frozen(tmp_path):
    py, weights, saved = _write_lazy_teacher(tmp_path)
    model = build_model(_student_cfg(py, weights))
    assert isinstance(model, DistillationRCNN)
    teacher = model.teacher
    assert type(teacher) is GeneralizedRCNN
    # loaded strictly: every saved tensor is the teacher's, incl. the BN statistics
    t_state = teacher.state_dict()
    for k, v in saved.items():
        if not k.endswith("num_batches_tracked"):  # FrozenBatchNorm2d keeps no counter
            torch.testing.assert_close(t_state[k], v, rtol=0, atol=0, msg=k)
    # BN frozen: no BatchNorm left, FrozenBatchNorm2d in its place
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in teacher.modules()) >= 10
    # outside the module tree, the state dict and the optimizer; eval, no grad, student's device
    t_params = {id(p) for p in teacher.parameters()}
    assert not t_params & {id(p) for p in model.parameters()}
    assert not any(m is teacher for m in model.modules())
    assert not any(k.startswith(("teacher", "distill._teacher")) for k in model.state_dict())
    assert len(model.state_dict()) == len(build_model(make_cfg(R18_FPN_TOY)).state_dict())
    model.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert {p.device for p in teacher.parameters()} == {torch.device(model.device)}
    # same mean/std/format: shared input
    assert model._share_input and not model.flip_teacher_channels

    before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for it in range(2):
        torch.manual_seed(it)
        losses = _losses(model, _batch(seed=it))
        assert {"loss_nst", "loss_cls", "loss_rpn_cls"} <= set(losses)
        assert torch.isfinite(losses["loss_nst"]) and losses["loss_nst"] > 0
        optimizer.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in model.state_dict().items())


def test_toy_py_teacher_equals_its_yaml_teacher(tmp_path):
    """configs/quick_schedules/faster_rcnn_R_50_FPN_toy_teacher.py is its .yaml twin: one
    checkpoint loads strictly into both, same features, same NST loss for one student batch."""
    tcfg = make_cfg(TOY / "faster_rcnn_R_50_FPN_toy_teacher.yaml", ["MODEL.WEIGHTS", ""])
    torch.manual_seed(3)
    weights = tmp_path / "r50_teacher.pth"
    torch.save({"model": build_model(tcfg).state_dict()}, weights)
    models = {}
    for ext in ("yaml", "py"):
        cfg = make_cfg(NST_TOY, distill_opts(TOY / f"faster_rcnn_R_50_FPN_toy_teacher.{ext}",
                                             weights, LEVELS, LEVELS, 5))
        torch.manual_seed(0)
        models[ext] = build_model(cfg)
    yaml_model, py_model = models["yaml"], models["py"]
    py_model.load_state_dict(yaml_model.state_dict())  # the same student (no teacher inside)
    t_yaml, t_py = yaml_model.teacher, py_model.teacher
    assert type(t_py) is type(t_yaml) and t_py.input_format == t_yaml.input_format == "RGB"
    torch.testing.assert_close(t_py.pixel_mean, t_yaml.pixel_mean, rtol=0, atol=0)
    assert py_model._share_input and yaml_model._share_input
    x = torch.randn(2, 3, 96, 128)
    f_yaml, f_py = t_yaml.backbone(x), t_py.backbone(x)
    assert sorted(f_py) == sorted(f_yaml) == ["p2", "p3", "p4", "p5", "p6"]
    torch.testing.assert_close(f_py, f_yaml, rtol=0, atol=0)
    losses = {}
    for ext, model in models.items():
        model.train()
        torch.manual_seed(5)
        losses[ext] = _losses(model, _batch(seed=5))
    assert losses["py"]["loss_nst"] > 0
    torch.testing.assert_close(losses["py"], losses["yaml"], rtol=0, atol=0)


def test_lazy_teacher_opts_and_own_preprocessing(tmp_path):
    """OPTS are LazyConfig overrides; a BGR teacher with its own mean/std gets its own input,
    channels flipped: here exactly the student's normalised batch with its channels reversed."""
    bgr = ["model.input_format=BGR", "model.pixel_mean=[103.53,116.28,123.675]",
           "model.pixel_std=[57.375,57.12,58.395]",
           "model.roi_heads.box_predictor.test_score_thresh=0.25"]
    py, weights, _ = _write_lazy_teacher(tmp_path)
    cfg = _student_cfg(py, weights, ["MODEL.TEACHER.OPTS", str(bgr)])
    model = build_model(cfg)
    teacher = model.teacher
    assert teacher.input_format == "BGR"
    assert teacher.roi_heads.box_predictor.test_score_thresh == 0.25
    torch.testing.assert_close(teacher.pixel_mean.flatten(),
                               torch.tensor([103.53, 116.28, 123.675]))
    assert model.flip_teacher_channels and not model._share_input
    batch = _batch(sizes=((96, 128), (96, 128)))  # same size: no padding differences
    student_input = model.preprocess_image(batch).tensor
    got = model.teacher_features(batch, student_input)
    with torch.no_grad():
        want = teacher.backbone(student_input.flip(1))
    torch.testing.assert_close(got, want)
    # the same teacher without overrides shares the student's input
    assert build_model(_student_cfg(py, weights))._share_input

    cfg.MODEL.TEACHER.OPTS = ["MODEL.ROI_HEADS.NUM_CLASSES", "3"]  # yacs form: refused
    with pytest.raises(ValueError, match="key=value"):
        build_teacher(cfg)
    cfg.MODEL.TEACHER.OPTS = ["model.input_format=L"]  # no conversion from grey to RGB
    with pytest.raises(ValueError, match="only RGB <-> BGR"):
        build_model(cfg)
    cfg.MODEL.TEACHER.OPTS = []
    py.write_text(TINY_LAZY.replace('input_format="RGB",', ""))  # unknown: it might want BGR
    with pytest.raises(ValueError, match="has no input_format.*model.input_format"):
        build_model(cfg)


def test_lazy_teacher_loads_strictly(tmp_path):
    py, weights, saved = _write_lazy_teacher(tmp_path)
    cfg = _student_cfg(py, weights)
    assert type(build_teacher(cfg)) is GeneralizedRCNN
    wrong = dict(saved)
    del wrong["backbone.fpn_lateral3.weight"]
    wrong["backbone.extra.weight"] = torch.zeros(1)
    wrong["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(9)
    bad = tmp_path / "wrong.pth"
    torch.save({"model": wrong}, bad)
    cfg.MODEL.TEACHER.WEIGHTS = str(bad)
    with pytest.raises(TeacherWeightsError) as err:
        build_teacher(cfg)
    msg = str(err.value)
    assert "missing keys (1): backbone.fpn_lateral3.weight" in msg
    assert "unexpected keys (1): backbone.extra.weight" in msg
    assert "roi_heads.box_predictor.cls_score.bias (9,) vs model (6,)" in msg
    # OPTS reach the model before loading: 3 classes do not fit the 5-class checkpoint
    cfg.MODEL.TEACHER.WEIGHTS = str(weights)
    cfg.MODEL.TEACHER.OPTS = ["model.roi_heads.num_classes=3"]
    with pytest.raises(TeacherWeightsError, match=r"cls_score.weight \(6, 64\) vs model \(4, 64\)"):
        build_teacher(cfg)


def test_lazy_teacher_mismatches_fail_at_build_time(tmp_path):
    py, weights, _ = _write_lazy_teacher(tmp_path, ["model.roi_heads.num_classes=3"])
    opts = ["MODEL.TEACHER.OPTS", "['model.roi_heads.num_classes=3']"]
    # no such teacher feature
    cfg = _student_cfg(py, weights, opts + ["MODEL.DISTILL.TEACHER_FEATURES", "['p2', 'p3', 'p4',"
                                            " 'p7']"])
    with pytest.raises(ValueError, match="p7"):
        build_model(cfg)
    # KD with a 3-class teacher for a 5-class student
    with pytest.raises(ValueError, match="KD needs the same classes: student 5, teacher 3|"
                                         "student NUM_CLASSES=5.*teacher 3"):
        build_model(_student_cfg(py, weights, opts, kd=1.0))
    # not a detector
    other = tmp_path / "not_a_detector.py"
    other.write_text("from detectron2.config import LazyCall as L\nfrom torch import nn\n"
                     "model = L(nn.Linear)(in_features=2, out_features=3)\n")
    with pytest.raises(ValueError, match="Linear is not a detectron2 detector"):
        build_teacher(_student_cfg(other, weights))


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_lazy_teacher_weights_by_detectron2_url(tmp_path, monkeypatch):
    """A detectron2:// .pkl (the zoo's format: numpy arrays) is downloaded once and loaded
    strictly, from a loopback server standing in for dl.fbaipublicfiles.com."""
    py, _, saved = _write_lazy_teacher(tmp_path)
    pkl = {"model": {k: v.numpy() for k, v in saved.items()}, "__author__": "test"}
    _Files.files = {"/detectron2/Misc/tiny/model_final_abc.pkl": pickle.dumps(pkl)}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
        monkeypatch.setattr(remote, "DETECTRON2_URL",
                            f"http://127.0.0.1:{httpd.server_address[1]}/detectron2/")
        url = "detectron2://Misc/tiny/model_final_abc.pkl"
        teacher = build_teacher(_student_cfg(py, url))
        assert os.path.isfile(tmp_path / "cache" / "detectron2" / "Misc" / "tiny"
                              / "model_final_abc.pkl")
    finally:
        httpd.shutdown()
        httpd.server_close()
    torch.testing.assert_close(teacher.backbone.fpn_output2.weight,
                               saved["backbone.fpn_output2.weight"])


YAML_ZOO = "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
PY_ZOO = "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"


def test_model_zoo_names(tmp_path):
    """Zoo names resolve where detectron2 ships its configs; elsewhere (the v0.6 sdist) the error
    says so and asks for a path. Both branches assert; which one runs depends on the install."""
    cfg = make_cfg(NST_TOY, ["MODEL.TEACHER.CONFIG_FILE", YAML_ZOO])
    if not zoo_ships_configs():
        for name in (YAML_ZOO, PY_ZOO):
            with pytest.raises(FileNotFoundError,
                               match="ships no model-zoo configs.*give the config file's path"):
                resolve_teacher_config(name)
        with pytest.raises(FileNotFoundError, match="ships no model-zoo configs"):
            build_teacher(cfg)
        return
    # upstream: the zoo's yaml and py configs, and a clear error for a name it lacks
    assert resolve_teacher_config(YAML_ZOO).endswith(YAML_ZOO)
    with pytest.raises(FileNotFoundError, match="neither a file nor a config of detectron2's"):
        resolve_teacher_config("COCO-Detection/no_such_model.yaml")
    from nst_det.modeling.teacher import build_teacher_cfg

    cfg.MODEL.TEACHER.OPTS = ["MODEL.ROI_HEADS.NUM_CLASSES", "5"]
    tcfg = build_teacher_cfg(cfg)
    assert tcfg.MODEL.RESNETS.DEPTH == 101 and tcfg.INPUT.FORMAT == "BGR"
    assert tcfg.MODEL.ROI_HEADS.NUM_CLASSES == 5
    # the LSJ Mask R-CNN, shrunk by overrides: SyncBN frozen, BGR teacher for an RGB student
    small = ["model.roi_heads.box_head.conv_dims=[]", "model.roi_heads.box_head.fc_dims=[64]",
             "model.roi_heads.box_predictor.input_shape.channels=64",
             "model.roi_heads.mask_head.conv_dims=[16]", "model.roi_heads.num_classes=5"]
    cfg.MODEL.TEACHER.CONFIG_FILE, cfg.MODEL.TEACHER.OPTS = PY_ZOO, small
    lcfg = build_lazy_teacher_cfg(cfg)
    torch.manual_seed(0)
    weights = tmp_path / "lsj.pth"
    torch.save({"model": instantiate(lcfg.model).state_dict()}, weights)
    cfg.MODEL.TEACHER.WEIGHTS = str(weights)
    cfg.merge_from_list(["MODEL.DISTILL.STUDENT_FEATURES", P2_P5,
                         "MODEL.DISTILL.TEACHER_FEATURES", P2_P5,
                         "MODEL.DISTILL.FEATURE_WEIGHTS", "[0.25, 0.25, 0.25, 0.25]"])
    model = build_model(cfg)
    teacher = model.teacher
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    assert teacher.input_format == "BGR" and model.flip_teacher_channels
    model.train()
    losses = _losses(model, _batch())
    assert torch.isfinite(losses["loss_nst"]) and losses["loss_nst"] > 0


@pytest.mark.slow
def test_train_net_distils_from_lazy_teacher(tmp_path, tiny_voc):
    """tools/train_net.py: a yacs student config naming the .py teacher trains two iterations,
    evaluates the teacher first and saves a student-only checkpoint."""
    import json

    from _detection_common import load_train_net

    py, weights, _ = _write_lazy_teacher(tmp_path)
    out = tmp_path / "run"
    cfg = make_cfg(NST_TOY, distill_opts(py, weights, P2_P5, P2_P5, 4) + [
        "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0", "MODEL.WEIGHTS", "",
        "MODEL.TEACHER.OPTS", "['model.roi_heads.box_predictor.test_score_thresh=0.01']",
    ], data=tiny_voc[:2], output_dir=out)
    config_file = tmp_path / "nst_lazy_teacher.yaml"
    config_file.write_text(cfg.dump())
    train_net = load_train_net()
    args = train_net.default_argument_parser().parse_args(["--config-file", str(config_file)])
    train_net.main(args)
    assert "bbox/AP50" in json.loads((out / "teacher_metrics.json").read_text())
    with open(out / "metrics.json") as f:
        nst = [m["loss_nst"] for m in map(json.loads, f) if "loss_nst" in m]
    assert nst and all(v > 0 for v in nst)
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    plain = make_cfg(NST_TOY, ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN"])
    assert state.keys() == build_model(plain).state_dict().keys()  # the student's, no teacher


def test_tiny_vitdet_teacher_from_the_zoo(tmp_path):
    """Upstream's common/models/mask_rcnn_vitdet.py, shrunk by overrides (tiny ViT, 128 px square
    padding): SimpleFeaturePyramid p2..p6 pair with the yacs R-18 FPN student's."""
    import detectron2.modeling

    if not hasattr(detectron2.modeling, "ViT"):
        pytest.skip("this detectron2 (v0.6) has no ViT backbone: ViTDet teachers need upstream")
    if importlib.util.find_spec("timm") is None:
        pytest.skip("detectron2's ViT blocks import timm (optional dependency): pip install timm")
    assert zoo_ships_configs()  # every detectron2 with ViTDet is a source build with its configs
    tiny = ["model.backbone.net.img_size=128", "model.backbone.net.embed_dim=32",
            "model.backbone.net.depth=2", "model.backbone.net.num_heads=2",
            "model.backbone.net.window_size=4", "model.backbone.net.window_block_indexes=[0]",
            "model.backbone.out_channels=32", "model.backbone.square_pad=128",
            "model.proposal_generator.head.in_channels=32",
            "model.roi_heads.box_head.input_shape.channels=32",
            "model.roi_heads.mask_head.input_shape.channels=32",
            "model.roi_heads.box_head.conv_dims=[]", "model.roi_heads.box_head.fc_dims=[64]",
            "model.roi_heads.box_predictor.input_shape.channels=64",
            "model.roi_heads.mask_head.conv_dims=[16]", "model.roi_heads.num_classes=5"]
    cfg = make_cfg(NST_TOY, distill_opts("common/models/mask_rcnn_vitdet.py", "", LEVELS, LEVELS,
                                         5) + ["MODEL.TEACHER.OPTS", str(tiny)])
    torch.manual_seed(0)
    weights = tmp_path / "vitdet.pth"
    torch.save({"model": instantiate(build_lazy_teacher_cfg(cfg).model).state_dict()}, weights)
    cfg.MODEL.TEACHER.WEIGHTS = str(weights)
    model = build_model(cfg)
    teacher = model.teacher
    assert type(teacher.backbone).__name__ == "SimpleFeaturePyramid"
    assert sorted(teacher.backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    assert not model._share_input and not model.flip_teacher_channels  # its own 128 px square input
    model.train()
    losses = _losses(model, _batch())
    assert torch.isfinite(losses["loss_nst"]) and losses["loss_nst"] > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_evaluated_before_training_sees_its_own_channel_order(tmp_path, tiny_voc):
    """The TeacherEvalHook runs the teacher on the student's (RGB) test loader: a BGR teacher is
    wrapped so that it receives BGR images, as during distillation."""
    from nst_det.engine import DetectionTrainer
    from nst_det.engine.teacher_eval import ChannelFlipped, TeacherEvalHook

    bgr = ["model.input_format=BGR", "model.pixel_mean=[103.53,116.28,123.675]",
           "model.pixel_std=[57.375,57.12,58.395]"]
    py, weights, _ = _write_lazy_teacher(tmp_path)
    cfg = _student_cfg(py, weights, ["MODEL.TEACHER.OPTS", str(bgr), "OUTPUT_DIR",
                                     str(tmp_path / "out")])
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (tiny_voc[0],), (tiny_voc[1],)
    hook = next(h for h in DetectionTrainer(cfg)._hooks if isinstance(h, TeacherEvalHook))
    wrapped = hook._teacher
    assert isinstance(wrapped, ChannelFlipped) and not wrapped.training
    seen = []
    wrapped.model.register_forward_pre_hook(lambda m, args: seen.append(args[0][0]["image"]))
    image = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5)
    with torch.no_grad():
        wrapped([{"image": image, "height": 4, "width": 5}])
    torch.testing.assert_close(seen[0], image.flip(0))
    # an RGB teacher is evaluated as it is
    rgb = _student_cfg(py, weights, ["OUTPUT_DIR", str(tmp_path / "out2")])
    rgb.DATASETS.TRAIN, rgb.DATASETS.TEST = (tiny_voc[0],), (tiny_voc[1],)
    hook = next(h for h in DetectionTrainer(rgb)._hooks if isinstance(h, TeacherEvalHook))
    assert not isinstance(hook._teacher, ChannelFlipped)
