"""ONNX Runtime back end: its export variants, host encodings and fusions (encoding.py), build, runner, profile."""
from .backend import W4A16_ONNX, OnnxRuntimeBackend, OnnxRuntimeConfig, SessionRunner

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeConfig", "SessionRunner", "W4A16_ONNX"]
