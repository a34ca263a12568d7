"""The one graph helper of the ONNX passes (export, check, the back ends' rewrites): reading and writing a graph,
who produces and who reads a tensor, which tensors are constants, and replacing a graph's nodes without leaving
dead initializers."""
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, shape_inference

from .errors import MimiqError
from .io import atomic_write


def initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def constants(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """Initializers and the values of Constant nodes, by tensor name."""
    values = initializers(model)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    return values


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes reading each tensor, in graph order (an empty list for a tensor nobody reads)."""
    users = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def replace_nodes(model: onnx.ModelProto, nodes: list, added: list = ()) -> onnx.ModelProto:
    """The graph's nodes become `nodes`, `added` initializers join, initializers nobody reads go."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(added)
    used = {name for node in nodes for name in node.input} | {o.name for o in model.graph.output}
    live = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    return model


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def raise_opset(model: onnx.ModelProto, version: int = 21) -> None:
    """The default domain at `version` at least (INT4 and block-wise DequantizeLinear need 21)."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, version)


def live_nodes(nodes, model: onnx.ModelProto) -> list:
    """Those of `nodes` (in graph order) that something downstream reads, up to `model`'s outputs."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(list(nodes)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]


def constant_reshape_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Reshapes whose target shape the graph computes at run time get it as a constant; returns (model, count).

    torch.onnx writes x.reshape(B, N, C) as Shape -> Gather -> Unsqueeze -> Concat -> Reshape. ONNX Runtime merges
    those chains in a float graph, but not across Q/DQ nodes: deit_tiny's QDQ graph kept 72 such nodes, each one a
    dispatch per run. Where ONNX's shape inference knows every dimension of the result but one (the batch), the
    shape becomes that constant with -1 there, and the chain, now read by nothing, goes. Values are unchanged."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        return model, 0  # a subgraph may read outer names; live_nodes does not follow them
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is an optimization here: a graph it cannot read stays as it is
        return model, 0
    dims = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                             for d in vi.type.tensor_type.shape.dim]
    fixed = constants(model)
    added = []
    for node in model.graph.node:
        out = dims.get(node.output[0]) if node.op_type == "Reshape" else None
        if out is None or node.input[1] in fixed or sum(d is None for d in out) > 1:
            continue
        name = f"{node.output[0]}_shape"
        added.append(numpy_helper.from_array(np.array([-1 if d is None else d for d in out], np.int64), name))
        node.input[1] = name
    if added:
        replace_nodes(model, live_nodes(model.graph.node, model), added)
    return model, len(added)


def read_onnx(path: Path) -> onnx.ModelProto:
    """An ONNX file of the run directory; a missing, corrupt or truncated one is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise MimiqError(f"ONNX file not found: {path} (run `mimiq-deploy export` again)")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError, onnx its own types
        raise MimiqError(f"cannot read {path} as ONNX (corrupt or truncated; run `mimiq-deploy export` again): "
                         f"{type(e).__name__}") from None


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Validate, then write atomically."""
    onnx.checker.check_model(model, full_check=True)
    atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))
