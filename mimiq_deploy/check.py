"""`mimiq-deploy check`: static conformance of a QDQ graph with what a back end's engine runs (README: Support
matrix): the common rules (qdq_rules.py), then the back end's own (backends/<name>/, `Backend.check`)."""
import onnx

from .backends import BACKENDS
from .errors import MimiqError

TARGETS = tuple(BACKENDS)  # every back end is a conformance target


def check_graph(model: onnx.ModelProto, target: str) -> list[str]:
    """Violations as 'node name: what is wrong'; empty when the graph conforms."""
    if target not in BACKENDS:
        raise MimiqError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return BACKENDS[target].check(model)
