"""QDQ lowering: the `mimiq::FakeQuant` placeholders of a traced student become ONNX QuantizeLinear /
DequantizeLinear. A placeholder on a weight becomes integer codes (INT8, or packed INT4) feeding
DequantizeLinear; one on an activation becomes QuantizeLinear -> DequantizeLinear. Every back end's graph
variants start here (export.py traces, the back ends lower with the options their engine wants)."""
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .errors import MimiqError
from .onnx_graph import consumers, initializers, raise_opset, replace_nodes
from .quant.quantizer import qrange, to_grid


def _fp8_tensor(name: str, codes: np.ndarray) -> TensorProto:
    """Values on the E4M3FN grid as a FLOAT8E4M3FN tensor, cast by torch (the bytes the student rounds to)."""
    raw = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.float32)).to(torch.float8_e4m3fn).view(torch.uint8)
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, codes.shape, raw.numpy().tobytes(), raw=True)


def _int_tensor(name: str, codes: np.ndarray, bits: int, uint8: bool = False, unsigned: bool = False,
                fp8: bool = False) -> TensorProto:
    """Signed codes as INT8 / INT4; with uint8, 8-bit codes shifted by 128 (zero point 128): the same values.
    unsigned: codes of an unsigned grid as UINT4 (only 4-bit activations have one). fp8: E4M3FN codes."""
    if fp8:
        return _fp8_tensor(name, codes)
    if unsigned:
        return helper.make_tensor(name, TensorProto.UINT4, codes.shape, codes.astype(np.uint8).flatten().tolist())
    if bits == 8 and uint8:
        return numpy_helper.from_array((codes.astype(np.int16) + 128).astype(np.uint8), name)
    if bits == 8:
        return numpy_helper.from_array(codes.astype(np.int8), name)
    return helper.make_tensor(name, TensorProto.INT4, codes.shape, codes.astype(np.int8).flatten().tolist())


def _zero_point(name: str, bits: int, shape=(), uint8: bool = False, unsigned: bool = False,
                fp8: bool = False) -> TensorProto:
    """Zero point 0 of the codes' type (its type is what QuantizeLinear's output type follows)."""
    return _int_tensor(name, np.zeros(shape, dtype=np.int8), bits, uint8, unsigned, fp8)


def _lower_weight(node, scale, w, bits: int, narrow: bool, axis: int, follow: list, block_size: int | None,
                  uint8: bool, fp8: bool = False) -> tuple[list, list, onnx.NodeProto | None]:
    """A placeholder on a weight: its integer (or FP8) codes feeding one DequantizeLinear.
    Returns (nodes, initializers, the Transpose it absorbed or None)."""
    out, tag = node.output[0], node.output[0].replace("/", "_").strip("_") or node.name
    qmin, qmax = qrange(bits, narrow, fp8=fp8)
    shape = [1] * w.ndim
    shape[axis] = -1
    # float32 division, as torch; then the student's own rounding
    codes = to_grid(torch.from_numpy(w / scale.reshape(shape)), qmin, qmax, fp8).numpy()
    full_scale = np.broadcast_to(scale.reshape(shape), w.shape)
    absorbed = None
    if (w.ndim == 2 and len(follow) == 1 and follow[0].op_type == "Transpose"
            and list(helper.get_attribute_value(follow[0].attribute[0])) == [1, 0]):
        codes, full_scale, axis = codes.T, full_scale.T, 1 - axis  # MatMul layout (in, out)
        absorbed = follow[0]
        out = follow[0].output[0]
    dq_attrs, store_bits, scale_arr = {"axis": axis}, bits, scale
    if bits == 4 and block_size:
        if w.ndim == 2:
            in_axis = 1 - axis
            block = block_size if codes.shape[in_axis] % block_size == 0 else codes.shape[in_axis]
            scale_arr = np.ascontiguousarray(np.take(full_scale, np.arange(0, codes.shape[in_axis], block),
                                                     axis=in_axis))
            dq_attrs = {"axis": in_axis, "block_size": block}
        else:
            store_bits = 8  # INT4 codes in an INT8 container: same values, convs have no INT4 path
    inits = [_int_tensor(f"{tag}_codes", codes, store_bits, uint8, fp8=fp8),
             numpy_helper.from_array(scale_arr.astype(np.float32), f"{tag}_scale"),
             _zero_point(f"{tag}_zp", store_bits, scale_arr.shape, uint8, fp8=fp8)]
    nodes = [helper.make_node("DequantizeLinear", [f"{tag}_codes", f"{tag}_scale", f"{tag}_zp"], [out],
                              name=f"{tag}_DequantizeLinear", **dq_attrs)]
    return nodes, inits, absorbed


def _lower_activation(node, x: str, scale, bits: int, uint8: bool, unsigned: bool,
                      fp8: bool = False) -> tuple[list, list]:
    """A placeholder on an activation: per-tensor QuantizeLinear -> DequantizeLinear (FP8: saturating, the
    default of QuantizeLinear, as the student)."""
    out, tag = node.output[0], node.output[0].replace("/", "_").strip("_") or node.name
    inits = [numpy_helper.from_array(scale.reshape(()).astype(np.float32), f"{tag}_scale"),
             _zero_point(f"{tag}_zp", bits, (), uint8, unsigned, fp8)]
    nodes = [helper.make_node("QuantizeLinear", [x, f"{tag}_scale", f"{tag}_zp"], [f"{tag}_q"],
                              name=f"{tag}_QuantizeLinear"),
             helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"], [out],
                              name=f"{tag}_DequantizeLinear")]
    return nodes, inits


def _placeholder(node, inits: dict) -> tuple[str, np.ndarray, int, bool, int, bool, bool]:
    """(input, scale, bits, narrow, axis, unsigned, fp8) of a `mimiq::FakeQuant` node, refused where ONNX has no
    type for it."""
    bits, narrow, axis = (helper.get_node_attr_value(node, a) for a in ("bits", "narrow", "axis"))
    unsigned = any(a.name == "unsigned" and a.i for a in node.attribute)
    fp8 = any(a.name == "fp8" and a.i for a in node.attribute)
    narrow = bool(narrow)
    if bits not in (4, 8):
        raise MimiqError(f"{bits}-bit tensors have no ONNX integer type: export supports INT8 and INT4 "
                         "(w4a4, w4a8, w8a4, w8a8)")
    if unsigned and bits != 4:  # uint8 means zero point 128 in these graphs; never made by convert
        raise MimiqError(f"{node.name}: unsigned {bits}-bit quantization has no export (only UINT4 activations)")
    x, s = node.input
    if s not in inits:
        raise MimiqError(f"scale of {node.name} is not a constant")
    return x, numpy_helper.to_array(inits[s]).astype(np.float32), bits, narrow, axis, unsigned, fp8


def lower_fake_quant(model: onnx.ModelProto, block_size: int | None = None, weight_only: bool = False,
                     uint8: bool = False) -> onnx.ModelProto:
    """Replace every `mimiq::FakeQuant` placeholder by integer weights + DQ or activation Q -> DQ.

    block_size: INT4 MatMul/Gemm weights block-wise along the input dimension (TensorRT's INT4 and ORT's
    MatMulNBits), INT4 conv weights in an INT8 container (same values); None: INT4 per output channel.
    weight_only drops activation quantization (INT4 weights, float activations). uint8: 8-bit tensors
    stored as uint8 with zero point 128 instead of int8 with zero point 0 (exactly the same values); FP8
    placeholders are always FLOAT8E4M3FN with zero point 0.
    """
    inits, users = initializers(model), consumers(model)
    dropped, nodes, new_inits, rename = set(), [], [], {}
    for node in model.graph.node:
        if id(node) in dropped:
            continue
        if node.domain != "mimiq":
            nodes.append(node)
            continue
        x, scale, bits, narrow, axis, unsigned, fp8 = _placeholder(node, inits)
        if x in inits:  # a weight: store its integer codes
            w = numpy_helper.to_array(inits[x]).astype(np.float32)
            lowered, added, absorbed = _lower_weight(node, scale, w, bits, narrow, axis, users[node.output[0]],
                                                     block_size, uint8 and not fp8, fp8)
            if absorbed is not None:
                dropped.add(id(absorbed))
        elif weight_only:
            rename[node.output[0]] = x
            continue
        else:
            lowered, added = _lower_activation(node, x, scale, bits, uint8 and not fp8, unsigned, fp8)
        nodes += lowered
        new_inits += added
    for node in nodes:  # weight-only: readers of a dropped activation placeholder read its input
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    replace_nodes(model, nodes, new_inits)
    keep = [o for o in model.opset_import if o.domain != "mimiq"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    raise_opset(model, 21)
    return model
