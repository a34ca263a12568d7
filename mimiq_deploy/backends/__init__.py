"""Engine back ends behind one interface (base.Backend), and their registry.

A back end is one folder here: the graph variants it wants from the export, its conformance rules, its table in
the export config, build, a Runner, profile and its model-repository entry (backends/base.py). A new one is a
folder and one line below; export, check, build, verify, bench, the model repository and the report loop over
BACKENDS and never name a back end.
"""
from .base import (Backend, BuildContext, BuildResult, ExportContext, ExportedGraphs, RepositoryEntry, Runner)
from .onnxruntime import OnnxRuntimeBackend
from .openvino import OpenVINOBackend
from .pytorch import PyTorchBackend
from .tensorrt import TensorRTBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (OnnxRuntimeBackend(), TensorRTBackend(), OpenVINOBackend(),
                                                            PyTorchBackend())}

__all__ = ["BACKENDS", "Backend", "BuildContext", "BuildResult", "ExportContext", "ExportedGraphs", "RepositoryEntry",
           "Runner"]
