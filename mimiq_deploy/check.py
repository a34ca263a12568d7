"""`mimiq-deploy check`: static conformance of a QDQ graph with what a back end's engine runs (README: Support
matrix): the common rules (qdq_rules.py), then the back end's own (backends/<name>/, `Backend.check`)."""
import onnx

from .backends import BACKENDS
from .errors import MimiqError

TARGETS = tuple(BACKENDS)  # every back end is a conformance target


def _backend(target: str):
    if target not in BACKENDS:
        raise MimiqError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return BACKENDS[target]


def check_graph(model: onnx.ModelProto, target: str) -> list[str]:
    """Violations as 'node name: what is wrong'; empty when the graph conforms."""
    return _backend(target).check(model)


def graph_analysis(model: onnx.ModelProto, target: str) -> tuple[dict, list[str]]:
    """The target's performance verdict on the graph (e.g. TensorRT's fused attention per block), as JSON and as
    lines; not a violation: a graph that conforms may still run slower than it could."""
    backend = _backend(target)
    found = backend.analysis(model)
    return found, backend.analysis_lines(found) if found else []
