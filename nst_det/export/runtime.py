"""One interface for running a detector as eager PyTorch, TorchScript or ONNX Runtime.

Every runner maps a preprocessed image (float32 [C, H, W], resized like at test time) to a dict of
numpy arrays: boxes [N, 4] (x0, y0, x1, y1 in that image's pixels), scores [N], classes [N].
`preprocess` / `rescale_boxes` do the resizing around it, as detectron2's DefaultPredictor does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from detectron2.data import transforms as T

from .tracing import _rcnn_inference

Detections = dict  # {"boxes": (N, 4), "scores": (N,), "classes": (N,)} numpy arrays
Runner = Callable[[torch.Tensor], Detections]


def preprocess(image: np.ndarray, min_size: int, max_size: int) -> torch.Tensor:
    """HWC uint8 image (model's channel order) -> resized float32 CHW tensor."""
    resized = T.ResizeShortestEdge(min_size, max_size).get_transform(image).apply_image(image)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))


def rescale_boxes(boxes: np.ndarray, resized_hw, original_hw) -> np.ndarray:
    """Map boxes from the resized image back to the original image's pixels."""
    scale_y = original_hw[0] / resized_hw[0]
    scale_x = original_hw[1] / resized_hw[1]
    return boxes * np.array([scale_x, scale_y, scale_x, scale_y], dtype=boxes.dtype)


def _as_detections(boxes, classes, scores) -> Detections:
    as_np = [x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
             for x in (boxes, classes, scores)]
    return {"boxes": as_np[0], "classes": as_np[1].astype(np.int64), "scores": as_np[2]}


def eager_runner(model: torch.nn.Module) -> Runner:
    """The PyTorch model itself (eval mode, no grad)."""
    model.eval()

    def run(image: torch.Tensor) -> Detections:
        with torch.no_grad():
            inst = _rcnn_inference(model, [{"image": image}])[0]["instances"]
        return _as_detections(inst.pred_boxes.tensor, inst.pred_classes, inst.scores)

    return run


def torchscript_runner(path: str) -> Runner:
    """A module saved by `export_torchscript`."""
    module = torch.jit.load(path, map_location="cpu")

    def run(image: torch.Tensor) -> Detections:
        with torch.no_grad():
            boxes, classes, scores, _ = module(image)
        return _as_detections(boxes, classes, scores)

    return run


def onnx_runner(path: str) -> Runner:
    """A model saved by `export_onnx`, run by onnxruntime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many as eager PyTorch uses
    # idle ORT threads otherwise spin for a while after each run, taking the cores from whatever
    # runs next (measured: the toy teacher's eager forward took 121 instead of 54 ms right after
    # an ORT run)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor) -> Detections:
        boxes, classes, scores, _ = session.run(None, {"image": image.numpy()})
        return _as_detections(boxes, classes, scores)

    return run
