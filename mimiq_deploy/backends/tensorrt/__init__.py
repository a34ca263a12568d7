"""TensorRT back end: its FP16 QDQ export, conformance rules, engine build and runner (GPU only)."""
from .backend import TRT_FLOAT_ONNX, TRT_ONNX, EngineRunner, TensorRTBackend, TensorRTConfig

__all__ = ["EngineRunner", "TensorRTBackend", "TensorRTConfig", "TRT_FLOAT_ONNX", "TRT_ONNX"]
