"""Dataset mapper for ImageFolder dicts: read the image, apply the ImageNet transforms.

Train: RandomResizedCrop(crop, scale, ratio) + horizontal flip; test: Resize(shorter side) +
CenterCrop(crop). Paper-scale values are 224 / (0.08, 1) / (3/4, 4/3) / 256 -> 224; the toy
configs scale them to their image size (cfg.INPUT.CLS). Normalisation is the model's job
(MODEL.PIXEL_MEAN / PIXEL_STD), as in detectron2.
"""

from __future__ import annotations

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from torchvision import transforms as T

__all__ = ["ClassificationDatasetMapper"]


class ClassificationDatasetMapper:
    """dict {"file_name", "label", ...} -> {"image": uint8 [3, crop, crop], "label": int, ...}."""

    @configurable
    def __init__(self, is_train: bool, *, image_format: str, transform):
        """
        Args:
            is_train: only recorded (the transform already differs).
            image_format: detectron2 image format the model expects ("RGB", "BGR").
            transform: callable on a uint8 [3, H, W] tensor.
        """
        self.is_train = is_train
        self.image_format = image_format
        self.transform = transform

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        c = cfg.INPUT.CLS
        if is_train:
            steps = [T.RandomResizedCrop(c.TRAIN_CROP_SIZE, scale=tuple(c.TRAIN_SCALE),
                                         ratio=tuple(c.TRAIN_RATIO), antialias=True)]
            if c.HFLIP:
                steps.append(T.RandomHorizontalFlip())
        else:
            if c.TEST_RESIZE < c.TEST_CROP_SIZE:  # CenterCrop would pad the image with zeros
                raise ValueError(f"INPUT.CLS.TEST_RESIZE {c.TEST_RESIZE} is smaller than "
                                 f"INPUT.CLS.TEST_CROP_SIZE {c.TEST_CROP_SIZE}: the crop is "
                                 "taken from the resized image (e.g. 256 -> 224)")
            steps = [T.Resize(c.TEST_RESIZE, antialias=True), T.CenterCrop(c.TEST_CROP_SIZE)]
        return {"is_train": is_train, "image_format": cfg.INPUT.FORMAT,
                "transform": T.Compose(steps)}

    def __call__(self, dataset_dict: dict) -> dict:
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        out = dict(dataset_dict)
        out["image"] = self.transform(image)
        return out
