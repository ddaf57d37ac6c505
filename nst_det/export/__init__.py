"""Export of student detectors: student-only checkpoints, TorchScript, ONNX, verification."""

from .api import export_and_verify, file_sha256
from .runtime import eager_runner, onnx_runner, preprocess, rescale_boxes, torchscript_runner
from .student import save_student_checkpoint, student_config, student_state_dict
from .tracing import export_onnx, export_torchscript
from .verify import verify

__all__ = [
    "eager_runner", "export_and_verify", "export_onnx", "export_torchscript", "file_sha256",
    "onnx_runner", "preprocess", "rescale_boxes", "save_student_checkpoint", "student_config",
    "student_state_dict", "torchscript_runner", "verify",
]
