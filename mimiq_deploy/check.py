"""`mimiq-deploy check`: static conformance of a QDQ graph with what the engines run (README: Support matrix)."""
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .onnx_graph import constants, consumers as consumers_of, producers as producers_of

TARGETS = ("tensorrt", "onnxruntime")  # the back ends' conformance targets (backends/*.py `conformance`)
QDQ = ("QuantizeLinear", "DequantizeLinear")
FLOAT_ONLY = ("LayerNormalization", "Softmax")  # never fed by a DQ: they run in float


def _is_residual_add(node, producers, consts) -> bool:
    """An Add of two computed tensors (not a bias add): the residual stream of a ViT block."""
    return node.op_type == "Add" and all(i not in consts for i in node.input) and \
        all(i in producers for i in node.input)


def check_graph(model: onnx.ModelProto, target: str) -> list[str]:
    """Violations as 'node name: what is wrong'; empty when the graph conforms."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 21:
        problems.append(f"(model): opset {opset}, INT4 QDQ needs opset 21")
    consts, producers, consumers = constants(model), producers_of(model), consumers_of(model)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.name}: custom-domain op {node.domain}::{node.op_type}")
            continue
        if node.op_type not in QDQ:
            continue
        scale_name = node.input[1]
        if scale_name not in consts:
            problems.append(f"{node.name}: scale {scale_name} is not a constant")
        else:
            scale = numpy_helper.to_array(consts[scale_name])
            if not np.all(scale > 0):
                problems.append(f"{node.name}: scale has non-positive values")
        if len(node.input) > 2 and node.input[2]:
            zp = consts.get(node.input[2])
            if zp is None:
                problems.append(f"{node.name}: zero point is not a constant")
            elif zp.data_type == TensorProto.UINT8:
                # uint8 with zero point 128 is the symmetric int8 scheme re-encoded (ORT only)
                if target == "tensorrt":
                    problems.append(f"{node.name}: uint8 quantization (TensorRT takes int8 with zero point 0)")
                elif np.any(numpy_helper.to_array(zp) != 128):
                    problems.append(f"{node.name}: uint8 zero point is not 128 (not symmetric)")
            elif np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{node.name}: zero point is not zero")
        on_weight = node.op_type == "DequantizeLinear" and node.input[0] in consts
        if not on_weight:
            if scale_name in consts and numpy_helper.to_array(consts[scale_name]).size != 1:
                problems.append(f"{node.name}: activation scale is not per-tensor")
        if node.op_type == "QuantizeLinear":
            src = producers.get(node.input[0])
            if src is not None and _is_residual_add(src, producers, consts):
                problems.append(f"{node.name}: quantizes the residual stream (output of {src.name})")
            zp = consts.get(node.input[2]) if len(node.input) > 2 else None
            if target == "tensorrt" and zp is not None and zp.data_type in (TensorProto.INT4, TensorProto.UINT4):
                problems.append(f"{node.name}: INT4 activation quantization (TensorRT has INT4 weights only)")
        if node.op_type == "DequantizeLinear":
            for c in consumers[node.output[0]]:
                if c.op_type in FLOAT_ONLY or _is_residual_add(c, producers, consts):
                    problems.append(f"{node.name}: feeds {c.op_type} {c.name}, which must stay in float")
            if target == "tensorrt" and on_weight and consts[node.input[0]].data_type == TensorProto.INT4:
                has_block = any(a.name == "block_size" and a.i > 0 for a in node.attribute)
                if not has_block:
                    problems.append(f"{node.name}: TensorRT INT4 weights must be block-wise (block_size)")
    return problems
