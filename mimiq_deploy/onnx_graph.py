"""The one graph helper of the ONNX passes (export, check, the host re-encoding): who produces and who
reads a tensor, which tensors are constants, and replacing a graph's nodes without leaving dead initializers."""
from collections import defaultdict

import onnx
from onnx import TensorProto


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
