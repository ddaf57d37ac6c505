"""TorchScript and ONNX export of a detectron2 R-CNN through detectron2's TracingAdapter.

The traced graph takes one preprocessed image (float32, C x H x W, the model's INPUT.FORMAT, already
resized like at test time) and returns flat tensors (boxes [N, 4] in that image's coordinates,
classes [N], scores [N], image size [2]). Resizing and rescaling to the original image stay outside
the graph (see `nst_det.export.runtime`).
"""

from __future__ import annotations

import io

import torch
from detectron2.export import TracingAdapter

from ..utils.atomic import atomic_write

OUTPUT_NAMES = ("boxes", "classes", "scores", "image_size")


def _rcnn_inference(model, inputs):
    """Inference without postprocessing (boxes stay in the input's frame): GeneralizedRCNN's
    `inference`, or for detectron2's dense detectors (RetinaNet) backbone + head +
    `forward_inference`, their forward without its postprocessing."""
    if hasattr(model, "forward_inference"):
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        instances = model.forward_inference(images, features, model.head(features))[0]
    else:
        instances = model.inference(inputs, do_postprocess=False)[0]
    return [{"instances": instances}]


def tracing_adapter(model: torch.nn.Module, sample: torch.Tensor) -> TracingAdapter:
    """Wrap an eval-mode R-CNN so that `adapter(image) -> (boxes, classes, scores, image_size)`."""
    model.eval()
    adapter = TracingAdapter(model, [{"image": sample}], _rcnn_inference)
    adapter.eval()
    return adapter


def _check_output_order(adapter: TracingAdapter) -> None:
    """The flat outputs must be (boxes, classes, scores, image_size): check the traced schema."""
    instances_schema = adapter.outputs_schema.schemas[0].schemas[0]
    if list(instances_schema.keys) != ["pred_boxes", "pred_classes", "scores"]:
        raise RuntimeError(f"unexpected traced output fields: {instances_schema.keys}")


def export_torchscript(model: torch.nn.Module, sample: torch.Tensor, path: str) -> None:
    """Trace with `torch.jit.trace` and save to `path` atomically."""
    adapter = tracing_adapter(model, sample)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (sample,))
    _check_output_order(adapter)
    with atomic_write(path) as f:
        torch.jit.save(traced, f)


def export_onnx(model: torch.nn.Module, sample: torch.Tensor, path: str, opset: int = 16) -> None:
    """Export with the TorchScript-based ONNX exporter (dynamic H and W) to `path` atomically."""
    adapter = tracing_adapter(model, sample)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            adapter,
            (sample,),
            buffer,
            opset_version=opset,
            dynamo=False,  # the dynamo exporter cannot follow detectron2's data-dependent code
            input_names=["image"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={"image": {1: "height", 2: "width"}},
        )
    _check_output_order(adapter)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
