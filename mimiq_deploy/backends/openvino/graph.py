"""The QDQ graph OpenVINO compiles, and what its runtime model says ran at which precision.

OpenVINO's CPU plugin reads each QuantizeLinear -> DequantizeLinear pair as a FakeQuantize, and its low-precision
transformations (LPT) move the dequantization (zero point, scale) past the next MatMul / Convolution so that the
layer runs on 8-bit data, but only within their precision restrictions. The exported graph (8-bit tensors stored
uint8 with zero point 128) is outside them, as its runtime model shows:

- a weight DequantizeLinear with a zero point (uint8 / 128 per output channel) is no LPT weight (int8, zero point
  0): OpenVINO keeps it as a *compressed weight*. The FullyConnected then reports runtimePrecision u8 but reads
  float32 activations and decompresses its weights at every call (slower than FP32);
- activations with a zero point (uint8 / 128) give the MatMul of two activations (q k^T, probabilities times v) a
  zero point on its second input, which the CPU MatMul does not take: both attention matmuls stay float32;
- a float Reshape / Transpose between a projection and the QuantizeLinear of q, k, v (timm's fused qkv: 5-D
  Reshape, Transpose, Split, Squeeze) or of the proj input (the heads' Transpose / Reshape after the attention)
  leaves those QuantizeLinears as float FakeQuantize ops on float layout ops.

`openvino_graph` writes the same values in the form LPT takes (module functions below). On x86 CPUs without VNNI
(AVX2, AVX-512 without VNNI) oneDNN's int8 kernels sum u8 x s8 products in saturating 16-bit pairs (OpenVINO's
CPU documentation: the "saturation issue"); a layer is exact there only when 255 * (|w1| + |w2|) <= 32767 for
its weights, i.e. weights of 7 bits (INT4 weights always). int8 mode "exact" keeps every other quantized layer in
float (weights stored as the float values their DequantizeLinear computes, activations fake-quantized as
exported), "all" runs every quantized layer in int8 (exact with VNNI / AMX, which sum in 32 bits).
"""
import collections

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...onnx_graph import constants, consumers, initializers, producers, replace_nodes
from ..onnxruntime.encoding import _codes, _encode, fold_attention_scale, reencode, split_qkv

LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
COMPUTE_LAYERS = ("FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution")
EIGHT_BIT = ("u8", "i8")
SEVEN_BIT = 64          # |weight code| <= 64: no u8 x s8 pair sum can saturate 16 bits (255 * 128 <= 32767)
INT8_MODES = ("all", "exact")
INT4 = (TensorProto.INT4, TensorProto.UINT4)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _per_tensor(node, consts) -> bool:
    scale = consts.get(node.input[1])
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return (scale is not None and numpy_helper.to_array(scale).size == 1
            and (zp is None or numpy_helper.to_array(zp).size == 1))


def quantize_before_layout(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """An activation QuantizeLinear -> DequantizeLinear pair whose input a chain of layout ops (Transpose,
    Reshape, Squeeze, ...) computes, each read only by the next, moves ahead of the chain: DQ(Q(T(x))) = T(DQ(Q(x)))
    for a per-tensor scale and zero point, since T only moves elements. OpenVINO then fuses the quantization into
    the op that computes x (a projection, the attention-times-v MatMul) and moves bytes instead of floats.
    Returns the graph and the number of pairs moved."""
    consts, producer, users = constants(model), producers(model), consumers(model)
    moves, rewire, drop = {}, collections.defaultdict(dict), set()
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        readers = users.get(q.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "DequantizeLinear" or not _per_tensor(q, consts):
            continue
        dq, chain, tensor = readers[0], [], q.input[0]
        while True:
            node = producer.get(tensor)
            if node is None or node.op_type not in LAYOUT_OPS or len(users[node.output[0]]) != 1:
                break
            chain.append(node)
            tensor = node.input[0]
        if not chain or tensor in consts:
            continue
        first, last = chain[-1], chain[0]          # graph order: first -> ... -> last -> q
        moved = dq.output[0] + "_before_layout"
        moves[id(first)] = [helper.make_node("QuantizeLinear", [tensor, *q.input[1:]], [q.output[0]], name=q.name,
                                             **_attrs(q)),
                            helper.make_node("DequantizeLinear", [q.output[0], *dq.input[1:]], [moved],
                                             name=dq.name, **_attrs(dq))]
        rewire[id(first)]["in"] = (tensor, moved)
        rewire[id(last)]["out"] = dq.output[0]      # the chain now writes what the DequantizeLinear wrote
        drop.update({id(q), id(dq)})
    if not moves:
        return model, 0
    nodes = []
    for node in model.graph.node:
        if id(node) in drop:
            continue
        nodes += moves.get(id(node), [])
        change = rewire.get(id(node), {})
        if "in" in change:
            old, new = change["in"]
            node.input[list(node.input).index(old)] = new
        if "out" in change:
            node.output[0] = change["out"]
        nodes.append(node)
    return replace_nodes(model, nodes), len(moves)


def _weight_values(node, inits) -> np.ndarray:
    """What a weight DequantizeLinear computes, (code - zero point) * scale in float32."""
    codes = _codes(inits[node.input[0]]).astype(np.float32)
    zp = _codes(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 and node.input[2] else 0
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    shape = [1] * codes.ndim
    if scale.ndim:
        shape[_attrs(node).get("axis", 1)] = -1
    return (codes - np.reshape(zp, shape)) * scale.reshape(shape)


def fold_wide_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Weight DequantizeLinear nodes whose codes exceed 7 bits become the float initializers they compute, so
    that OpenVINO runs their layer in float (exact) instead of in int8 kernels that saturate without VNNI."""
    inits, keep, added = initializers(model), [], []
    for node in model.graph.node:
        if (node.op_type == "DequantizeLinear" and node.input[0] in inits
                and not _attrs(node).get("block_size") and inits[node.input[0]].data_type not in INT4
                and np.abs(_codes(inits[node.input[0]])).max() > SEVEN_BIT):
            added.append(numpy_helper.from_array(_weight_values(node, inits), node.output[0]))
        else:
            keep.append(node)
    return (replace_nodes(model, keep, added) if added else model), len(added)


def _activation_dq(tensor, producer, inits):
    """The activation DequantizeLinear a tensor comes from, through layout ops; None if it has none."""
    node = producer.get(tensor)
    while node is not None and node.op_type in LAYOUT_OPS:
        node = producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] in inits:
        return None
    return node


def float_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The quantizers feeding a MatMul of two activations (q k^T, probabilities times v) are stored as uint8 with
    zero point 128 (the same values), which OpenVINO's CPU MatMul does not take in int8: it runs them in float on
    the fake-quantized values (exact), since its int8 MatMul saturates without VNNI. Returns the graph and the
    number of matmuls."""
    inits, producer, users = initializers(model), producers(model), consumers(model)
    pairs, matmuls = set(), 0
    for mm in (n for n in model.graph.node if n.op_type == "MatMul"):
        dqs = [_activation_dq(i, producer, inits) for i in mm.input]
        if all(dqs):
            matmuls += 1
            pairs.update(dq.input[0] for dq in dqs)      # the quantized tensors: each Q and all its readers
    added, renamed = [], {}
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] in pairs):
        zp = inits.get(q.input[2]) if len(q.input) > 2 else None
        if zp is None or zp.data_type != TensorProto.INT8 or numpy_helper.to_array(zp).any():
            continue
        if zp.name not in renamed:
            renamed[zp.name] = f"{zp.name}_u8_128"
            added.append(_encode(renamed[zp.name], _codes(zp), "uint8"))
        name = renamed[zp.name]
        for node in [q, *users[q.output[0]]]:
            node.input[2] = name
    return (replace_nodes(model, list(model.graph.node), added) if added else model), matmuls


def has_int4_activations(model: onnx.ModelProto) -> bool:
    consts = constants(model)
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in consts
               and consts[n.input[2]].data_type in INT4 for n in model.graph.node)


def openvino_graph(model: onnx.ModelProto, int8: str = "all") -> tuple[onnx.ModelProto, dict]:
    """The exported QDQ graph rewritten, values unchanged, into the form OpenVINO runs in int8: every 8-bit tensor
    int8 with zero point 0 and INT4 weight codes in int8 containers (LPT weights), timm's fused qkv projection
    split into q, k, v projections (no float 5-D Reshape / Transpose / Split before their quantizers), a
    power-of-two attention scale folded into q's projection (no float Mul before q's quantizer), every activation
    quantizer moved ahead of the layout ops before it. int8 "exact" also stores weights wider than 7 bits as the
    floats they compute (before the split: a float qkv stays one matmul) and leaves the attention matmuls in float
    (module docstring). Returns the graph and what each pass did."""
    model = reencode(model, "int8", int4_weights_to_int8=True)
    record = {"int8": int8, "encoding": "int8, zero point 0"}
    if int8 == "exact":  # first: a projection run in float keeps its one fused qkv matmul (split_qkv skips it)
        model, record["wide_weights_in_float"] = fold_wide_weights(model)
    splits = sum(n.op_type == "Split" for n in model.graph.node)
    model = split_qkv(model)
    record["qkv_split"] = splits - sum(n.op_type == "Split" for n in model.graph.node)
    model = reencode(model, "int8", int4_weights_to_int8=True)  # split_qkv stores a shared int8 Q as uint8 / 128
    muls = sum(n.op_type == "Mul" for n in model.graph.node)
    model = fold_attention_scale(model)
    record["attention_scales_folded"] = muls - sum(n.op_type == "Mul" for n in model.graph.node)
    model, record["quantizers_moved_before_layout"] = quantize_before_layout(model)
    if int8 == "exact":
        model, record["attention_matmuls_in_float"] = float_attention(model)
    return model, record


def _type(port) -> str:
    return port.get_element_type().get_type_name()


def runtime_precisions(compiled) -> dict:
    """What a compiled model executes at which precision, from its runtime model (each op's rt_info layerType and
    runtimePrecision). A compute layer (FullyConnected, MatMul, Convolution) counts as int8 only where its data
    input is 8-bit: OpenVINO also reports u8 for a float FullyConnected that decompresses u8 weights at every call,
    listed here as "f32, u8 weights"."""
    by_type = collections.defaultdict(collections.Counter)
    float_layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer in ("Const", "Input", "Output"):
            continue
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        if layer in COMPUTE_LAYERS and op.get_input_size() > 1:
            data, weights = _type(op.input(0)), _type(op.input(1))
            if data in EIGHT_BIT:
                precision = "int8"
            else:
                precision = f"{data}, {weights} weights" if weights not in (data, "f32") else data
                names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
                float_layers.append((names or op.get_friendly_name()).split(",")[0])
        by_type[layer][precision] += 1
    compute = {k: dict(v) for k, v in by_type.items() if k in COMPUTE_LAYERS}
    return {"int8_layers": sum(v.get("int8", 0) for v in compute.values()),
            "compute_layers": sum(sum(v.values()) for v in compute.values()),
            "compute": compute,
            "float_compute_layers": float_layers[:12] + ([f"... {len(float_layers) - 12} more"]
                                                         if len(float_layers) > 12 else []),
            "layers": {k: dict(v) for k, v in sorted(by_type.items())}}
