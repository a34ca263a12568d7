"""The conformance rules every engine's QDQ graph meets (README: Support matrix); each back end adds its own
(backends/<name>/, `Backend.check`), and `mimiq-deploy check --target NAME` runs both."""
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .onnx_graph import constants, consumers as consumers_of, producers as producers_of

QDQ = ("QuantizeLinear", "DequantizeLinear")
FLOAT_ONLY = ("LayerNormalization", "Softmax")  # never fed by a DQ: they run in float
FP8 = (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ)


def is_residual_add(node, producers, consts) -> bool:
    """An Add of two computed tensors (not a bias add): the residual stream of a ViT block."""
    return node.op_type == "Add" and all(i not in consts for i in node.input) and \
        all(i in producers for i in node.input)


def common_violations(model: onnx.ModelProto, uint8_zero_point_128: bool) -> list[str]:
    """Violations as 'node name: what is wrong'. uint8_zero_point_128: the engine takes uint8 tensors with zero
    point 128 (the symmetric int8 scheme re-encoded); otherwise a uint8 zero point is a back end's own rule."""
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
                if uint8_zero_point_128 and np.any(numpy_helper.to_array(zp) != 128):
                    problems.append(f"{node.name}: uint8 zero point is not 128 (not symmetric)")
            elif np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{node.name}: zero point is not zero")
        if not is_weight_dq(node, consts):
            if scale_name in consts and numpy_helper.to_array(consts[scale_name]).size != 1:
                problems.append(f"{node.name}: activation scale is not per-tensor")
        if node.op_type == "QuantizeLinear" and zero_point_type(node, consts) in FP8 and any(
                a.name == "saturate" and a.i == 0 for a in node.attribute):
            problems.append(f"{node.name}: FP8 QuantizeLinear with saturate=0 (values past the FP8 range become "
                            "NaN / inf; the student saturates)")
        if node.op_type == "QuantizeLinear":
            src = producers.get(node.input[0])
            if src is not None and is_residual_add(src, producers, consts):
                problems.append(f"{node.name}: quantizes the residual stream (output of {src.name})")
        if node.op_type == "DequantizeLinear":
            for c in consumers[node.output[0]]:
                if c.op_type in FLOAT_ONLY or is_residual_add(c, producers, consts):
                    problems.append(f"{node.name}: feeds {c.op_type} {c.name}, which must stay in float")
    return problems


def is_weight_dq(node, consts) -> bool:
    return node.op_type == "DequantizeLinear" and node.input[0] in consts


def zero_point_type(node, consts) -> int | None:
    """The TensorProto data type of a Q/DQ node's constant zero point, None without one."""
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return zp.data_type if zp is not None else None
