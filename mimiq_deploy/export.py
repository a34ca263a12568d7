"""`mimiq-deploy export`: the student's learned scales folded into ONNX QDQ graphs.

Three small steps, each testable on its own:
1. torch -> ONNX (TorchScript exporter, opset 21, dynamic batch): every quantizer leaves a
   `mimiq::FakeQuant` placeholder holding its scale, bits and axis;
2. `lower_fake_quant`: a placeholder on a weight becomes integer codes (INT8, or packed INT4)
   feeding DequantizeLinear; one on an activation becomes QuantizeLinear -> DequantizeLinear;
3. the TensorRT variant goes to FP16 with onnxconverter-common (LayerNorm / softmax kept in FP32).
Each graph passes `check` (check.py) before it is written.
"""
import dataclasses
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxconverter_common import float16

from .check import check_graph
from .config import dataclass_from, read_toml, with_defaults
from .errors import MimiqError
from .io import atomic_write
from .onnx_graph import constant_reshape_shapes, consumers, copy_model, initializers, raise_opset, replace_nodes
from .quant.convert import set_quant_enabled
from .quant.quantizer import qrange
from .run_dir import (EXPORT_DIR, FLOAT_ONNX, QDQ_ONNX, TRT_FLOAT_ONNX, TRT_ONNX, W4A16_ONNX,  # noqa: F401
                      ExportRecord, RunDir)


@dataclasses.dataclass
class ExportConfig:
    opset: int = 21
    int4_block_size: int = 32      # TensorRT INT4 weights: block size along the input dimension
    min_batch: int = 1             # dynamic batch range (TensorRT optimization profile)
    opt_batch: int = 32
    max_batch: int = 64
    fp16_io: bool = True           # TensorRT graph takes and returns FP16
    workspace_mib: int = 2048
    ort_int8: str = "auto"         # 8-bit encoding of the built ORT graph: "auto" (build picks for its host),
                                   # "uint8" (zero point 128) or "int8" (zero point 0)
    min_agreement: float = 99.5    # verify: top-1 agreement with the fake-quant student, percent
    min_cosine: float = 0.999      # verify: mean logit cosine similarity
    batch_sizes: list = dataclasses.field(default_factory=lambda: [1, 32])  # bench
    bench_seconds: float = 2.0     # bench: least measured time per artifact and batch


def export_config(values: dict, where: str) -> ExportConfig:
    """An ExportConfig from a TOML table or a stored record, validated."""
    cfg = dataclass_from(ExportConfig, values, where)
    if cfg.ort_int8 not in ("auto", "uint8", "int8"):
        raise MimiqError(f"ort_int8 = {cfg.ort_int8!r} in {where}: choose \"auto\", \"uint8\" or \"int8\"")
    return cfg


def load_export_config(path: str | Path | None) -> ExportConfig:
    return export_config(read_toml(path), str(path)) if path else ExportConfig()


def stored_export_config(stored: dict, where: str) -> ExportConfig:
    """The config an export recorded, completed with the defaults of keys added since (older runs)."""
    return export_config(with_defaults(ExportConfig, stored), where)


def torch_to_onnx(model: torch.nn.Module, input_size, opset: int) -> onnx.ModelProto:
    """The model as ONNX with `mimiq::FakeQuant` placeholders; batch axis dynamic."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *input_size),), buffer, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return inline_shared_initializers(onnx.load_from_string(buffer.getvalue()))


def inline_shared_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter shares equal initializers through Identity nodes; give each its own copy,
    so later passes (FP16 conversion, weight lowering) see plain constants."""
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _int_tensor(name: str, codes: np.ndarray, bits: int, uint8: bool = False, unsigned: bool = False) -> TensorProto:
    """Signed codes as INT8 / INT4; with uint8, 8-bit codes shifted by 128 (zero point 128): the same values.
    unsigned: codes of an unsigned grid as UINT4 (only 4-bit activations have one)."""
    if unsigned:
        return helper.make_tensor(name, TensorProto.UINT4, codes.shape, codes.astype(np.uint8).flatten().tolist())
    if bits == 8 and uint8:
        return numpy_helper.from_array((codes.astype(np.int16) + 128).astype(np.uint8), name)
    if bits == 8:
        return numpy_helper.from_array(codes.astype(np.int8), name)
    return helper.make_tensor(name, TensorProto.INT4, codes.shape, codes.astype(np.int8).flatten().tolist())


def _zero_point(name: str, bits: int, shape=(), uint8: bool = False, unsigned: bool = False) -> TensorProto:
    return _int_tensor(name, np.zeros(shape, dtype=np.int8), bits, uint8, unsigned)


def _lower_weight(node, scale, w, bits: int, narrow: bool, axis: int, follow: list, target: str, block_size: int,
                  uint8: bool) -> tuple[list, list, onnx.NodeProto | None]:
    """A placeholder on a weight: its integer codes feeding one DequantizeLinear.
    Returns (nodes, initializers, the Transpose it absorbed or None)."""
    out, tag = node.output[0], node.output[0].replace("/", "_").strip("_") or node.name
    qmin, qmax = qrange(bits, narrow)
    shape = [1] * w.ndim
    shape[axis] = -1
    codes = np.clip(np.rint(w / scale.reshape(shape)), qmin, qmax)  # float32 division, as torch
    full_scale = np.broadcast_to(scale.reshape(shape), w.shape)
    absorbed = None
    if (w.ndim == 2 and len(follow) == 1 and follow[0].op_type == "Transpose"
            and list(helper.get_attribute_value(follow[0].attribute[0])) == [1, 0]):
        codes, full_scale, axis = codes.T, full_scale.T, 1 - axis  # MatMul layout (in, out)
        absorbed = follow[0]
        out = follow[0].output[0]
    dq_attrs, store_bits, scale_arr = {"axis": axis}, bits, scale
    if bits == 4 and target == "tensorrt":
        if w.ndim == 2:
            in_axis = 1 - axis
            block = block_size if codes.shape[in_axis] % block_size == 0 else codes.shape[in_axis]
            scale_arr = np.ascontiguousarray(np.take(full_scale, np.arange(0, codes.shape[in_axis], block),
                                                     axis=in_axis))
            dq_attrs = {"axis": in_axis, "block_size": block}
        else:
            store_bits = 8  # INT4 codes in an INT8 container: same values, convs have no INT4 path
    inits = [_int_tensor(f"{tag}_codes", codes, store_bits, uint8),
             numpy_helper.from_array(scale_arr.astype(np.float32), f"{tag}_scale"),
             _zero_point(f"{tag}_zp", store_bits, scale_arr.shape, uint8)]
    nodes = [helper.make_node("DequantizeLinear", [f"{tag}_codes", f"{tag}_scale", f"{tag}_zp"], [out],
                              name=f"{tag}_DequantizeLinear", **dq_attrs)]
    return nodes, inits, absorbed


def _lower_activation(node, x: str, scale, bits: int, uint8: bool, unsigned: bool) -> tuple[list, list]:
    """A placeholder on an activation: per-tensor QuantizeLinear -> DequantizeLinear."""
    out, tag = node.output[0], node.output[0].replace("/", "_").strip("_") or node.name
    inits = [numpy_helper.from_array(scale.reshape(()).astype(np.float32), f"{tag}_scale"),
             _zero_point(f"{tag}_zp", bits, (), uint8, unsigned)]
    nodes = [helper.make_node("QuantizeLinear", [x, f"{tag}_scale", f"{tag}_zp"], [f"{tag}_q"],
                              name=f"{tag}_QuantizeLinear"),
             helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"], [out],
                              name=f"{tag}_DequantizeLinear")]
    return nodes, inits


def _placeholder(node, inits: dict) -> tuple[str, np.ndarray, int, bool, int, bool]:
    """(input, scale, bits, narrow, axis, unsigned) of a `mimiq::FakeQuant` node, refused where ONNX has no
    type for it."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, narrow, axis, unsigned = attrs["bits"], bool(attrs["narrow"]), attrs["axis"], bool(attrs.get("unsigned", 0))
    if bits not in (4, 8):
        raise MimiqError(f"{bits}-bit tensors have no ONNX integer type: export supports INT8 and INT4 "
                         "(w4a4, w4a8, w8a4, w8a8)")
    if unsigned and bits != 4:  # uint8 means zero point 128 in these graphs (encoding.py); never made by convert
        raise MimiqError(f"{node.name}: unsigned {bits}-bit quantization has no export (only UINT4 activations)")
    x, s = node.input
    if s not in inits:
        raise MimiqError(f"scale of {node.name} is not a constant")
    return x, numpy_helper.to_array(inits[s]).astype(np.float32), bits, narrow, axis, unsigned


def lower_fake_quant(model: onnx.ModelProto, target: str = "onnxruntime", block_size: int = 32,
                     weight_only: bool = False, uint8: bool = False) -> onnx.ModelProto:
    """Replace every `mimiq::FakeQuant` placeholder by integer weights + DQ or activation Q -> DQ.

    target "tensorrt": INT4 MatMul/Gemm weights block-wise along the input dimension, INT4 conv
    weights in an INT8 container (same values); weight_only drops activation quantization
    (TensorRT's INT4 path: INT4 weights, float activations). uint8: 8-bit tensors stored as
    uint8 with zero point 128 instead of int8 with zero point 0 (exactly the same values).
    """
    inits, users = initializers(model), consumers(model)
    dropped, nodes, new_inits, rename = set(), [], [], {}
    for node in model.graph.node:
        if id(node) in dropped:
            continue
        if node.domain != "mimiq":
            nodes.append(node)
            continue
        x, scale, bits, narrow, axis, unsigned = _placeholder(node, inits)
        if x in inits:  # a weight: store its integer codes
            w = numpy_helper.to_array(inits[x]).astype(np.float32)
            lowered, added, absorbed = _lower_weight(node, scale, w, bits, narrow, axis, users[node.output[0]],
                                                     target, block_size, uint8)
            if absorbed is not None:
                dropped.add(id(absorbed))
        elif weight_only:
            rename[node.output[0]] = x
            continue
        else:
            lowered, added = _lower_activation(node, x, scale, bits, uint8, unsigned)
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


def to_fp16(model: onnx.ModelProto, fp16_io: bool) -> onnx.ModelProto:
    """FP16 compute for TensorRT's strongly typed networks; LayerNorm and softmax stay FP32."""
    block = list(float16.DEFAULT_OP_BLOCK_LIST) + ["LayerNormalization", "Softmax"]
    del model.graph.value_info[:]  # stale FP32 types; the converter infers them afresh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(model, keep_io_types=not fp16_io, op_block_list=block,
                                                disable_shape_infer=False)


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


def check_exportable(qc) -> None:
    """ONNX has INT8 and INT4 only: refuse other widths before any work is spent on them."""
    if qc.weight_bits not in (4, 8) or qc.act_bits not in (4, 8):
        raise MimiqError(f"{qc.name} has no ONNX integer types: export supports INT8 and INT4 "
                         "(w4a4, w4a8, w8a4, w8a8); for a fake-quant student at any wXaY run `synthesize`, "
                         f"`finetune --bits {qc.name}` and `eval --model RUN/student.pt`")


def export_student(student, run_dir: Path, cfg: ExportConfig, progress=print) -> dict:
    """Write the ORT and TensorRT graphs (and their float twins) of `student` to run_dir/export."""
    qc = student.quant_config
    check_exportable(qc)
    input_size = tuple(student.pretrained_cfg["input_size"])
    rd = RunDir(run_dir)
    raw = torch_to_onnx(student, input_size, cfg.opset)
    set_quant_enabled(student, False)
    try:
        float_model = torch_to_onnx(student, input_size, cfg.opset)
    finally:
        set_quant_enabled(student, True)
    # The exported graph is hardware-neutral: uint8 with zero point 128 (unless ort_int8 = "int8") is exact on
    # every CPU. `build` re-encodes it for its host (encoding.py): int8 / zero point 0 where the CPU has VNNI.
    ort_graph = lower_fake_quant(copy_model(raw), "onnxruntime", uint8=cfg.ort_int8 != "int8")
    graphs = {QDQ_ONNX: ("onnxruntime", ort_graph), FLOAT_ONNX: (None, float_model)}
    notes = {}
    if qc.weight_bits == 4:  # INT4 storage with float activations: block-wise INT4 weights -> MatMulNBits
        w4a16 = lower_fake_quant(copy_model(raw), "tensorrt", cfg.int4_block_size, weight_only=True)
        graphs[W4A16_ONNX] = ("onnxruntime", w4a16)
    if qc.act_bits == 4:
        notes["tensorrt"] = (f"{qc.name} not built for TensorRT: it has no INT4 activation kernels; "
                             "deployable there are w4a8 (INT4 weight-only) and w8a8")
    else:
        weight_only = qc.weight_bits == 4
        trt = lower_fake_quant(copy_model(raw), "tensorrt", cfg.int4_block_size, weight_only=weight_only)
        graphs[TRT_ONNX] = ("tensorrt", to_fp16(trt, cfg.fp16_io))
        graphs[TRT_FLOAT_ONNX] = (None, to_fp16(copy_model(float_model), cfg.fp16_io))
        if weight_only:
            notes["tensorrt"] = f"{qc.name} runs in TensorRT as INT4 weight-only (w4a16): activations in FP16"
    for name, (target, graph) in graphs.items():
        graph, _ = constant_reshape_shapes(graph)  # fewer nodes per run in every runtime, values unchanged
        if target:
            violations = check_graph(graph, target)
            if violations:
                raise MimiqError(f"{name} fails the {target} check ({len(violations)} violations), first: {violations[0]}")
        save_onnx(graph, rd.graph(name))
        progress(f"wrote {rd.graph(name)}")
    record = ExportRecord(qc.name, dataclasses.asdict(cfg), sorted(graphs), notes, _jsonable(student.pretrained_cfg),
                          getattr(student, "model_name", None), student.num_classes)
    rd.write_export(record)
    return record.to_json()


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items()
            if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
