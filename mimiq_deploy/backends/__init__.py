"""Engine back ends behind one small interface: a third (e.g. OpenVINO) is one more file.

A back end turns an exported ONNX graph into a runnable artifact (`build`) and runs it
(`load` returns a callable numpy batch -> numpy logits). `available()` says, in one line,
what is missing when it cannot run here.
"""
from .onnxruntime import OnnxRuntimeBackend
from .tensorrt import TensorRTBackend

BACKENDS = {b.name: b for b in (OnnxRuntimeBackend(), TensorRTBackend())}

__all__ = ["BACKENDS", "OnnxRuntimeBackend", "TensorRTBackend"]
