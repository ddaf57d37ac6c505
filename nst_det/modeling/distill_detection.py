"""What every distilling detectron2 detector shares: its core, built from the config, and the
teacher's backbone features for the student's batch.

`DetectorDistillMixin` goes before the detectron2 meta-architecture in the bases
(`class DistillationRCNN(DetectorDistillMixin, GeneralizedRCNN)`); the detector keeps its own
forward and only records its backbone (and head) outputs.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch
from torch import nn

from ..distill import DistillationCore, distill_config
from ..distill.inherit import inherit_neck_head
from .teacher import build_teacher

__all__ = ["DetectorDistillMixin", "GT_SUPPLIES", "anchor_mismatch", "build_detection_core",
           "gt_boxes_of", "inherit_teacher_neck_head"]

logger = logging.getLogger(__name__)

# what every distilling detector passes to the GT-aware losses (DetectorDistillMixin.gt_extras)
GT_SUPPLIES = ("gt_boxes", "anchor_cells", "anchor_offset")


def build_detection_core(
    cfg, student_backbone: nn.Module, context: str, supplies=GT_SUPPLIES
) -> DistillationCore:
    """The strict frozen teacher of cfg.MODEL.TEACHER in a core, pairs checked on both backbones.

    `supplies`: what the detector passes to the losses (GT_SUPPLIES, see `gt_extras`; R-CNN
    also `target`, the gt classes of its sampled proposals).
    """
    # Built on a fork of the random stream: the teacher's throw-away initialisation and the
    # losses' own modules take no numbers from it, so the student draws (RPN / ROI sampling, ...)
    # as the plain run of its SEED does and a method's paired difference is the method's own.
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        teacher = build_teacher(cfg)
        return DistillationCore(
            teacher=teacher,
            student_shapes=student_backbone.output_shape(),
            teacher_shapes=teacher.backbone.output_shape(),
            supplies=supplies,
            context=context,
            **distill_config(cfg),
        )


def _anchor_generator(modules) -> nn.Module | None:
    """A detector's anchor generator: RetinaNet's own, R-CNN's RPN's; `modules`: a detector or
    its `from_config` arguments."""
    get = modules.get if isinstance(modules, dict) else lambda name: getattr(modules, name, None)
    return get("anchor_generator") or getattr(get("proposal_generator"), "anchor_generator",
                                              None)


def anchor_mismatch(student, teacher) -> str:
    """'' when both detectors (or `from_config` arguments) have the same anchors, else how they
    differ. A head's outputs are per anchor, so copying or matching them needs the anchors
    themselves equal, not just their number per cell: detectron2's anchor generators' public
    `strides`, `offset` and `cell_anchors` (per level: [A, 4] boxes around a cell's corner)."""
    mine, theirs = _anchor_generator(student), _anchor_generator(teacher)
    if mine is None or theirs is None:
        return "" if mine is theirs else "only one of them has an anchor generator"
    for what in ("strides", "offset"):  # a list and a float in detectron2's generators
        a, b = getattr(mine, what, None), getattr(theirs, what, None)
        if a != b:
            return f"anchor {what}: student {a} vs teacher {b}"
    if len(mine.cell_anchors) != len(theirs.cell_anchors):
        return (f"anchor levels: student {len(mine.cell_anchors)} vs teacher "
                f"{len(theirs.cell_anchors)}")
    for level, (a, b) in enumerate(zip(mine.cell_anchors, theirs.cell_anchors)):
        if a.shape != b.shape or not torch.allclose(a.cpu(), b.cpu()):
            return (f"anchor boxes of level {level} (MODEL.ANCHOR_GENERATOR.SIZES / "
                    f"ASPECT_RATIOS): student {_rounded(a)} vs teacher {_rounded(b)}")
    return ""


def _rounded(boxes: torch.Tensor) -> list:
    return [[round(v, 1) for v in box] for box in boxes.tolist()]


def inherit_teacher_neck_head(cfg, modules: dict, heads: Sequence[str]) -> None:
    """If MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD: the student starts from the teacher's neck/heads.

    Args:
        cfg: the student's config.
        modules: the detector's `from_config` arguments, with "backbone", `heads` and "distill"
            (the core, whose teacher is already built and strictly loaded).
        heads: the detector's head module names (see `nst_det.distill.inherit`).
    """
    if not cfg.MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD:
        return
    teacher = modules["distill"].teacher
    n = inherit_neck_head(modules, teacher, heads)  # raises first for other tensor shapes
    problem = anchor_mismatch(modules, teacher)
    if problem:  # the heads' per-anchor outputs were copied onto other anchors: not built
        raise ValueError("MODEL.DISTILL.INHERIT_TEACHER_NECK_HEAD copies the teacher's heads, "
                         f"whose outputs are per anchor, but the anchors differ: {problem}")
    logger.info("Student neck and heads %s initialised from the teacher (%d tensors); a loaded "
                "checkpoint still overrides them", list(heads), n)


def gt_boxes_of(batched_inputs: List[dict], device) -> List[torch.Tensor]:
    """The batch's GT boxes for GT-aware losses: B tensors [Ni, 4], xyxy, on `device`.

    detectron2's mappers resize each image and its `instances` together, and ImageList pads at
    the bottom/right only, so these resized-image pixels are the padded batch's pixels.
    """
    return [x["instances"].gt_boxes.tensor.to(device) for x in batched_inputs]


class DetectorDistillMixin:
    """Teacher access and teacher features for a detector with `backbone`, `pixel_mean/std` and
    `preprocess_image` (GeneralizedRCNN, RetinaNet). Call `_init_distill(core)` after the
    detectron2 __init__."""

    distill: DistillationCore

    def gt_extras(self, batched_inputs: List[dict]) -> dict:
        """What the enabled GT-aware feature losses take this step: `gt_boxes` (FGD, DeFeat,
        FGFI; `gt_boxes_of`) and the detector's own anchors (FGFI's imitation mask):
        `anchor_cells` {stride: [A, 4] cell anchors} and `anchor_offset`, from its anchor
        generator's public `strides`, `cell_anchors` and `offset`."""
        extras = {}
        if self.distill.needs("gt_boxes"):
            extras["gt_boxes"] = gt_boxes_of(batched_inputs, self.device)
        generator = _anchor_generator(self)  # (checked by _init_distill when needed)
        if self.distill.needs("anchor_cells"):
            extras["anchor_cells"] = dict(zip(generator.strides, generator.cell_anchors))
        if self.distill.needs("anchor_offset"):
            extras["anchor_offset"] = generator.offset
        return extras

    def _init_distill(self, distill: DistillationCore) -> None:
        self.distill = distill
        self.flip_teacher_channels = self._channel_flip(distill.teacher)
        self._share_input = self._same_preprocessing(distill.teacher)
        if distill.needs("anchor_cells") or distill.needs("anchor_offset"):
            generator = _anchor_generator(self)
            levels = sorted(set(distill.pair_strides))
            anchored = list(getattr(generator, "strides", []))
            if not set(levels) <= set(anchored):  # FGFI's mask is where the anchors are
                raise ValueError(
                    f"MODEL.TRANSFER.NAMES has a loss on the detector's anchors (fgfi), but the "
                    f"distilled levels' strides {levels} are not all anchor levels of the "
                    f"student ({anchored or 'it has no anchor generator'}): distil the "
                    "features its RPN / RetinaNet head uses (MODEL.DISTILL.STUDENT_FEATURES)")

    def _channel_flip(self, teacher: nn.Module) -> bool:
        """Whether the teacher's images are the student's with RGB <-> BGR swapped.

        Both formats are read from the built models (`input_format`, the INPUT.FORMAT of a yacs
        model, or a LazyConfig model's argument); any other difference is an error.
        """
        mine = getattr(self, "input_format", None)
        theirs = getattr(teacher, "input_format", None)
        if theirs is None and mine is not None:  # e.g. a LazyConfig that leaves it out
            raise ValueError(f"the teacher ({type(teacher).__name__}) has no input_format, so "
                             f"whether it reads the student's {mine!r} images is unknown: set "
                             "model.input_format ('RGB' or 'BGR') in its LazyConfig")
        if mine is None or mine == theirs:
            return False
        if {mine, theirs} == {"RGB", "BGR"}:
            return True
        raise ValueError(f"the student reads {mine!r} images and the teacher {theirs!r}: only "
                         "RGB <-> BGR is converted for the teacher")

    @staticmethod
    def _square_size(model: nn.Module) -> int:
        """The square size the model's backbone pads to (upstream `padding_constraints`), or 0."""
        return int(getattr(model.backbone, "padding_constraints", {}).get("square_size", 0) or 0)

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher detector (not a submodule)."""
        return self.distill.teacher

    @property
    def feature_pairs(self):
        """The validated feature pairs (empty when no feature loss is on)."""
        return self.distill.feature_pairs

    @property
    def distilling(self) -> bool:
        """Whether any transfer loss is on (otherwise training is the detectron2 class's)."""
        return self.distill.distilling

    def _same_preprocessing(self, teacher: nn.Module) -> bool:
        """Whether the student's normalised, padded batch is a valid teacher input as is.

        Mean, std, channel order and padding are the built models' own, so a LazyConfig teacher
        is compared exactly like a yacs one.
        """
        s_div = self.backbone.size_divisibility
        t_div = teacher.backbone.size_divisibility
        t_square = self._square_size(teacher)
        return (
            not self.flip_teacher_channels
            and (t_square == 0 or t_square == self._square_size(self))
            and torch.equal(self.pixel_mean.cpu(), teacher.pixel_mean.cpu())
            and torch.equal(self.pixel_std.cpu(), teacher.pixel_std.cpu())
            and (t_div <= 1 or (s_div > 0 and s_div % t_div == 0))
        )

    def teacher_features(
        self, batched_inputs: List[dict], student_input: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """The teacher backbone's features of the step's images, under no_grad.

        Args:
            batched_inputs: the step's inputs (used only if the teacher preprocesses differently:
                its own mean/std, padding and channel order, RGB <-> BGR flipped for it).
            student_input: [B, 3, H, W] the student's normalised, padded batch.
        Returns:
            {name: [B, C, h, w]} teacher backbone outputs.
        """
        teacher = self.teacher
        with torch.no_grad():
            if self._share_input:
                t_input = student_input
            else:
                if self.flip_teacher_channels:  # [C, H, W] images: RGB <-> BGR for the teacher
                    batched_inputs = [{**x, "image": x["image"].flip(0)} for x in batched_inputs]
                t_input = teacher.preprocess_image(batched_inputs).tensor
            return teacher.backbone(t_input)
