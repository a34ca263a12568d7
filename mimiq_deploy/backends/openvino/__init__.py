"""OpenVINO back end: the graph its low-precision transformations run in int8 (graph.py), build, runner, profile."""
from .backend import CACHE_DIR, OV_ONNX, OpenVINOBackend, OpenVINOConfig, OpenVINORunner

__all__ = ["CACHE_DIR", "OV_ONNX", "OpenVINOBackend", "OpenVINOConfig", "OpenVINORunner"]
