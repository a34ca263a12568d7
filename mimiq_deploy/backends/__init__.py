"""Engine back ends behind one interface, and their registry: a new back end (e.g. OpenVINO) is one
more file here and one more entry in BACKENDS; build, verify, bench and the model repository loop over it.

A back end (see base.Backend) says whether it can run here and why not (`available`), which exported
graph it builds from (`graphs`) and which conformance target of check.py that graph meets
(`conformance`), turns the graphs into run-directory Artifacts (`build_artifacts`; `build` is the
single-graph step), runs an artifact (`load`: numpy batch -> numpy logits), times it (`sampler`),
and writes its model-repository entry (`repository_entry`).
"""
from .base import Backend, BuildContext, RepositoryEntry
from .onnxruntime import OnnxRuntimeBackend
from .tensorrt import TensorRTBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (OnnxRuntimeBackend(), TensorRTBackend())}

__all__ = ["BACKENDS", "Backend", "BuildContext", "RepositoryEntry", "OnnxRuntimeBackend", "TensorRTBackend"]
