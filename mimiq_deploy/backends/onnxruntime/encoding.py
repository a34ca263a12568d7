"""The 8-bit encoding of the ONNX Runtime graph, chosen by `build` for the host it runs on.

Export writes a hardware-neutral graph. The symmetric int8 scheme (zero point 0) and uint8 with
zero point 128 hold exactly the same values; which one is exact *and* fast depends on the CPU:
- with VNNI (avx512_vnni, avx_vnni, AMX amx_int8) or ARM dot product (asimddp), ORT's u8s8 / s8s8
  kernels sum products exactly in 32 bits: int8 with zero point 0 is the fast path;
- x86 without VNNI sums u8s8 products in saturating 16-bit pairs (inexact on int8 activations);
  its u8u8 kernels do not saturate: uint8 with zero point 128.
`reencode` rewrites a graph into either encoding, optionally widening INT4 weight codes into 8-bit
containers (the same values) so that W4A8 runs on the same integer kernels as W8A8.
"""
import collections
import math
import os
import platform

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import MimiqError
from ...onnx_graph import constants, consumers, initializers, live_nodes, producers, raise_opset, replace_nodes

DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
ENV_VNNI = "MIMIQ_CPU_VNNI"   # "1" / "0": pretend the host has / lacks VNNI (tests, cross-building)
ENCODINGS = ("int8", "uint8")


def cpu_flags() -> set[str]:
    """Feature flags of this CPU from /proc/cpuinfo (x86 `flags`, ARM `Features`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def exact_dot_products(flags=DOT_PRODUCT_FLAGS) -> tuple[list[str], str]:
    """(the flags of this CPU among `flags` that sum int8 products exactly in 32 bits, why not where none);
    MIMIQ_CPU_VNNI=1/0 pretends the host has / lacks them. Shared by the back ends that pick an int8 path."""
    forced = os.environ.get(ENV_VNNI)
    if forced is not None:
        if forced not in ("0", "1"):
            raise MimiqError(f"{ENV_VNNI}={forced!r}: set it to 1 (host has VNNI) or 0 (host lacks it)")
        return ([f"{ENV_VNNI}={forced}"] if forced == "1" else []), f"{ENV_VNNI}=0"
    return sorted(set(flags) & cpu_flags()), f"no {'/'.join(flags)} on this {platform.machine()} CPU"


def host_encoding() -> tuple[str, str]:
    """(encoding, reason) for ONNX Runtime on this CPU."""
    has, why = exact_dot_products()
    if has:
        return "int8", f"CPU has {', '.join(has)}: int8 with zero point 0 runs ORT's exact, fastest u8s8 kernels"
    return "uint8", (f"{why}: uint8 with zero point 128, since without VNNI ORT's u8s8 kernels sum in saturating "
                     "16-bit pairs (inexact) and its u8u8 kernels do not")


def choose_encoding(requested: str | None, config_value: str | None) -> tuple[str, str]:
    """A build option, then an explicit `int8` of the export config's [onnxruntime] table, then the host decide."""
    if requested and requested != "auto":
        return requested, f"{requested} requested at build (--encoding)"
    if config_value in ENCODINGS:
        return config_value, f"int8 = \"{config_value}\" in the export config's [onnxruntime] table"
    return host_encoding()


def _codes(t: TensorProto) -> np.ndarray:
    """Signed integer values of an INT8 / UINT8 (zero point 128) / INT4 tensor."""
    a = numpy_helper.to_array(t).astype(np.int16)
    return a - 128 if t.data_type == TensorProto.UINT8 else a


def _encode(name: str, signed: np.ndarray, encoding: str) -> TensorProto:
    if encoding == "uint8":
        return numpy_helper.from_array((signed + 128).astype(np.uint8), name)
    return numpy_helper.from_array(signed.astype(np.int8), name)


def reencode(model: onnx.ModelProto, encoding: str, int4_weights_to_int8: bool = True) -> onnx.ModelProto:
    """The same graph with every 8-bit tensor in `encoding` (int8 / zero point 0 or uint8 / 128), and INT4
    weight codes moved into 8-bit containers when asked. Values are unchanged; INT4 activations stay INT4."""
    if encoding not in ENCODINGS:
        raise MimiqError(f"unknown 8-bit encoding {encoding!r}: choose {' or '.join(ENCODINGS)}")
    inits = initializers(model)
    eight = (TensorProto.INT8, TensorProto.UINT8)
    todo = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is None:
            raise MimiqError(f"{node.name}: zero point is not a constant, cannot re-encode")
        weight = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        blockwise = any(a.name == "block_size" and a.i > 0 for a in node.attribute)  # stays INT4
        widen = (int4_weights_to_int8 and weight is not None and weight.data_type == TensorProto.INT4
                 and not blockwise)
        if zp.data_type in eight or widen:
            todo[zp.name] = zp
            if weight is not None:
                todo[weight.name] = weight
    for name, t in todo.items():
        t.CopyFrom(_encode(name, _codes(t), encoding))
    raise_opset(model, 21)
    return model


FLOAT_CONSUMERS = ("Conv", "Gemm")  # ORT fuses their QDQ only with a quantized output, which ours never have


def fold_float_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weight DequantizeLinear nodes feeding only Conv / Gemm become float initializers: exactly the values DQ
    computes ((code - zero point) * scale in float32), once instead of at every call. ORT runs these ops in
    float either way (no quantized output to fuse with), and a constant weight lets it pick its fast
    layouts (NCHWc convolutions, pre-packed Gemm)."""
    inits, readers = initializers(model), consumers(model)
    keep, added = [], []
    for node in model.graph.node:
        users = [u.op_type for u in readers.get(node.output[0], [])] if node.output else []
        if (node.op_type == "DequantizeLinear" and node.input[0] in inits and users
                and all(u in FLOAT_CONSUMERS for u in users)
                and not any(a.name == "block_size" and a.i > 0 for a in node.attribute)):
            codes = _codes(inits[node.input[0]]).astype(np.float32)
            zp = _codes(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 and node.input[2] else 0
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * codes.ndim
            if scale.ndim:
                shape[axis] = -1
            added.append(numpy_helper.from_array((codes - np.reshape(zp, shape)) * scale.reshape(shape),
                                                 node.output[0]))
        else:
            keep.append(node)
    return replace_nodes(model, keep, added)


def _qkv_heads_dim(shape: str, consts: dict, producer: dict) -> tuple[int, int] | None:
    """(heads, head dim) of the qkv Reshape's target (B, N, 3, H, D): a constant (export's
    constant_reshape_shapes), or a Concat whose last three inputs are constants (torch.onnx's own form)."""
    if shape in consts:
        target = consts[shape].reshape(-1)
        return (int(target[3]), int(target[4])) if len(target) == 5 and target[2] == 3 else None
    concat = producer.get(shape)
    if (concat is None or concat.op_type != "Concat" or len(concat.input) != 5
            or not all(i in consts for i in concat.input[2:])):
        return None
    return int(consts[concat.input[3]].reshape(-1)[0]), int(consts[concat.input[4]].reshape(-1)[0])


def split_qkv(model: onnx.ModelProto) -> onnx.ModelProto:
    """timm's fused qkv projection, MatMul -> Add -> Reshape (B, N, 3, H, D) -> Transpose -> Split -> Squeeze x3,
    becomes three projections MatMul -> Add -> Reshape (B, N, H, D) -> Transpose: the split is folded into the
    weights (their columns, scales and biases sliced), so no float Split / 5-D Transpose of the qkv tensor runs.
    Each output element is the same dot product with the same scales: the integer kernels give the same values."""
    inits, consts = initializers(model), {k: numpy_helper.to_array(v) for k, v in constants(model).items()}
    producer, users = producers(model), consumers(model)
    drop, replace, added = set(), {}, []
    for split in (n for n in model.graph.node if n.op_type == "Split" and len(n.output) == 3):
        tr = producer.get(split.input[0])
        rs = producer.get(tr.input[0]) if tr is not None and tr.op_type == "Transpose" else None
        add = producer.get(rs.input[0]) if rs is not None and rs.op_type == "Reshape" else None
        if add is None or add.op_type != "Add":
            continue
        heads_dim = _qkv_heads_dim(rs.input[1], consts, producer)  # (heads, head dim), or None
        bias_name = next((i for i in add.input if i in inits), None)
        mm = next((producer.get(i) for i in add.input if i not in inits), None)
        dq = producer.get(mm.input[1]) if mm is not None and mm.op_type == "MatMul" else None
        squeezes = [users.get(o, []) for o in split.output]
        if (heads_dim is None or dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits
                or bias_name is None or list(helper.get_attribute_value(tr.attribute[0])) != [2, 0, 3, 1, 4]
                or next((a.i for a in split.attribute if a.name == "axis"), 0) != 0
                or any(len(u) != 1 or u[0].op_type != "Squeeze" for u in squeezes)
                or len(users[dq.output[0]]) != 1 or len(users[mm.output[0]]) != 1 or len(users[add.output[0]]) != 1
                or next((a.i for a in dq.attribute if a.name == "axis"), 1) != 1):
            continue
        heads, dim = heads_dim
        codes, scale, zp = inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]
        width = heads * dim
        if codes.dims[1] != 3 * width or len(scale.dims) != 1:
            continue
        chain, shared_q = [], None
        x_dq = producer.get(mm.input[0])
        x_q = producer.get(x_dq.input[0]) if x_dq is not None and x_dq.op_type == "DequantizeLinear" else None
        if (x_q is not None and x_q.op_type == "QuantizeLinear" and len(users[mm.input[0]]) == 1
                and len(users[x_dq.input[0]]) == 1):
            shared_q = x_q
            drop.add(id(x_dq))
            if inits[x_q.input[2]].data_type == TensorProto.INT8:
                # ORT moves int8 activations to its u8s8 kernels (as uint8 / zero point 128) only for a Q with a
                # single DQ; this Q has three, so it is stored that way here: the same values.
                added.append(numpy_helper.from_array(np.array(128, np.uint8), f"{mm.name}_x_zp_u8"))
                x_q.input[2] = f"{mm.name}_x_zp_u8"
        shape = numpy_helper.from_array(np.array([0, 0, heads, dim], np.int64), f"{mm.name}_split_shape")
        added.append(shape)
        for i, (sq,) in enumerate(squeezes):
            cut = slice(i * width, (i + 1) * width)
            tag = f"{mm.name}_split{i}"
            for src, arr in ((codes, numpy_helper.to_array(codes)[:, cut]), (scale, numpy_helper.to_array(scale)[cut]),
                             (zp, numpy_helper.to_array(zp)[cut]), (inits[bias_name],
                                                                    numpy_helper.to_array(inits[bias_name])[cut])):
                added.append(numpy_helper.from_array(np.ascontiguousarray(arr), f"{tag}_{src.name}"))
            pre = f"{tag}_"
            if shared_q is not None:  # one DQ per MatMul, all reading the one QuantizeLinear of x
                x = pre + "x"
                chain.append(helper.make_node("DequantizeLinear", [shared_q.output[0], *shared_q.input[1:]], [x],
                                              name=pre + "x_DequantizeLinear"))
            else:
                x = mm.input[0]
            chain += [helper.make_node("DequantizeLinear", [pre + codes.name, pre + scale.name, pre + zp.name],
                                       [pre + "w"], name=pre + "DequantizeLinear", axis=1),
                      helper.make_node("MatMul", [x, pre + "w"], [pre + "mm"], name=pre + "MatMul"),
                      helper.make_node("Add", [pre + "mm", pre + bias_name], [pre + "add"], name=pre + "Add"),
                      helper.make_node("Reshape", [pre + "add", shape.name], [pre + "heads"], name=pre + "Reshape"),
                      helper.make_node("Transpose", [pre + "heads"], [sq.output[0]], name=pre + "Transpose",
                                       perm=[0, 2, 1, 3])]
            drop.add(id(sq))
        replace[id(mm)] = chain
        drop.update({id(dq), id(add), id(rs), id(tr), id(split)})
    if not replace:
        return model
    nodes = []
    for node in model.graph.node:
        if id(node) in replace:
            nodes += replace[id(node)]
        elif id(node) not in drop:
            nodes.append(node)
    return replace_nodes(model, live_nodes(nodes, model), added)  # the split sizes, squeeze axes, shape chains go


def _power_of_two(v: float) -> bool:
    mantissa, _ = math.frexp(v)
    return v > 0 and mantissa == 0.5


def fold_attention_scale(model: onnx.ModelProto) -> onnx.ModelProto:
    """The attention scale q * d^-0.5, where it is a power of two (head width 4, 16, 64, 256: every ViT-S/B and
    DeiT), moves into the q projection: its weight step sizes and bias are scaled instead, which is exact (a power
    of two commutes with float rounding). Without the float Mul between the projection and q's QuantizeLinear, ORT
    moves that QuantizeLinear ahead of the head Reshape / Transpose, which then move bytes instead of floats.
    Runs after split_qkv: DQ(w) -> MatMul -> Add(bias) -> Reshape -> Transpose -> Mul(scale)."""
    inits, consts = initializers(model), constants(model)
    producer, users = producers(model), consumers(model)
    drop, rename = set(), {}
    for mul in (n for n in model.graph.node if n.op_type == "Mul"):
        scale_name = next((i for i in mul.input if i in consts), None)
        chain, ok = [producer.get(next((i for i in mul.input if i != scale_name), ""))], True
        for op in ("Transpose", "Reshape", "Add", "MatMul"):
            node = chain[-1]
            if node is None or node.op_type != op or len(users[node.output[0]]) != 1:
                ok = False
                break
            chain.append(producer.get(node.input[0]) if op != "Add" else
                         next((producer.get(i) for i in node.input if i not in inits), None))
        if not ok or scale_name is None:
            continue
        factor = numpy_helper.to_array(consts[scale_name])
        _, _, add, mm = chain[:4]
        dq = producer.get(mm.input[1])
        bias_name = next((i for i in add.input if i in inits), None)
        if (factor.size != 1 or not _power_of_two(float(factor.reshape(-1)[0])) or bias_name is None or dq is None
                or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits or len(users[dq.input[1]]) != 1
                or len(users[bias_name]) != 1 or len(users[dq.output[0]]) != 1):
            continue
        f = np.float32(factor.reshape(-1)[0])
        for name in (dq.input[1], bias_name):  # rewritten in place: each has this one reader (checked above)
            inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * f, name))
        drop.add(id(mul))
        rename[chain[0].output[0]] = mul.output[0]  # the Transpose now writes what the Mul wrote
    if not drop:
        return model
    nodes = [n for n in model.graph.node if id(n) not in drop]
    for node in nodes:
        for i, name in enumerate(node.output):
            node.output[i] = rename.get(name, name)
    return replace_nodes(model, live_nodes(nodes, model))  # the scale constants go


def host_graph(model: onnx.ModelProto, encoding: str, int4_weights_to_int8: bool = True) -> onnx.ModelProto:
    """What `build` deploys on this host: the exported graph re-encoded, float-op weights folded, the fused qkv
    projection split into q, k, v projections, a power-of-two attention scale folded into q's projection."""
    return fold_attention_scale(split_qkv(fold_float_weights(reencode(model, encoding, int4_weights_to_int8))))


def encoding_of(model: onnx.ModelProto) -> dict:
    """Counts of Q/DQ zero-point types: what a built graph stores (for reports and tests)."""
    inits = initializers(model)
    counts = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            name = TensorProto.DataType.Name(inits[node.input[2]].data_type).lower()
            counts[name] = counts.get(name, 0) + 1
    return counts



U8_ZERO_POINT = "mimiq_u8_zero_point_128"
EIGHT_BIT = (TensorProto.INT8, TensorProto.UINT8)


def fuse_integer_matmuls(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """ONNX Runtime CPU only: Q(x) -> DQ -> MatMul(., DQ(w)) -> Add(bias) becomes one com.microsoft
    MatMulIntegerToFloat(q(x), w codes, scales, zero points, bias). ORT fuses the QDQ form into that kernel by
    itself, but without the bias: it adds the bias only in its dynamic-quantization pattern. Fused, the bias is
    added in the kernel's output stage instead of by a separate float Add over the whole output (the same float
    operations, in the same order). An int8 activation feeding such a node is stored as uint8 / zero point 128
    (the same values): ORT moves int8 activations to its fast u8s8 kernels only inside its own QDQ fusions.
    Returns the graph and the number of fused projections; the graph runs in ONNX Runtime only."""
    inits, producer, users = initializers(model), producers(model), consumers(model)
    fused, drop = {}, set()
    for add in (n for n in model.graph.node if n.op_type == "Add"):
        bias = next((i for i in add.input if i in inits and len(inits[i].dims) == 1), None)
        mm = next((producer.get(i) for i in add.input if i != bias), None)
        if bias is None or mm is None or mm.op_type != "MatMul" or len(users[mm.output[0]]) != 1:
            continue
        x_dq, w_dq = producer.get(mm.input[0]), producer.get(mm.input[1])
        if (x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear"
                or len(x_dq.input) < 3 or len(w_dq.input) < 3 or w_dq.input[0] not in inits
                or inits[w_dq.input[0]].data_type not in EIGHT_BIT or x_dq.input[2] not in inits
                or inits[x_dq.input[2]].data_type not in EIGHT_BIT or x_dq.input[1] not in inits
                or len(inits[x_dq.input[1]].dims) != 0   # the kernel takes one activation scale
                or next((a.i for a in w_dq.attribute if a.name == "axis"), 1) not in (1, -1)
                or inits[bias].dims[0] != inits[w_dq.input[0]].dims[-1]
                or len(users[x_dq.output[0]]) != 1 or len(users[w_dq.output[0]]) != 1):
            continue
        inputs = [x_dq.input[0], w_dq.input[0], x_dq.input[1], w_dq.input[1], x_dq.input[2], w_dq.input[2], bias]
        fused[id(add)] = helper.make_node("MatMulIntegerToFloat", inputs, [add.output[0]], name=f"{mm.name}_bias",
                                          domain="com.microsoft")
        drop.update({id(mm), id(x_dq), id(w_dq)})
    if not fused:
        return model, 0
    nodes = [fused.get(id(n), n) for n in model.graph.node if id(n) not in drop]
    readers = collections.defaultdict(list)
    for node in nodes:
        for name in node.input:
            readers[name].append(node)
    for q in (n for n in nodes if n.op_type == "QuantizeLinear" and len(n.input) > 2):
        kinds = {r.op_type for r in readers[q.output[0]]}
        if (q.input[2] not in inits or inits[q.input[2]].data_type != TensorProto.INT8
                or "MatMulIntegerToFloat" not in kinds or not kinds <= {"MatMulIntegerToFloat", "DequantizeLinear"}
                or any(len(r.input) < 3 for r in readers[q.output[0]])
                or numpy_helper.to_array(inits[q.input[2]]).any()):  # only zero point 0 has a uint8 twin at 128
            continue
        q.input[2] = U8_ZERO_POINT
        for r in readers[q.output[0]]:   # each reader's zero point: 2 in DequantizeLinear, 4 in the fused node
            r.input[4 if r.op_type == "MatMulIntegerToFloat" else 2] = U8_ZERO_POINT
    model = replace_nodes(model, nodes, [numpy_helper.from_array(np.array(128, np.uint8), U8_ZERO_POINT)])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, len(fused)
