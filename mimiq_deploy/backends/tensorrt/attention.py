"""TensorRT's fused-attention verdict, per attention block: can its fused MHA kernel run the block quantized?

A performance verdict, not a conformance rule: an unfused block runs (as separate batched matmuls and softmax),
only slower; quantized, often slower than FP16 (TensorRT issues 3243, 4167; ModelOpt issue 167).

What it relies on:
- TensorRT developer guide, "MHA fusion" (quoted in TensorRT issues 2981 and 4167): INT8 fused MHA needs head size
  16, 32 or 64 and sequence lengths S_q, S_kv <= 512, and Q/DQ "before the first batched matrix multiplication,
  after softmax, and after the second batched matrix multiplication".
- TensorRT 10.6 release notes: FP8 MHA fusion (Ada; Hopper before) for sequence lengths up to 3072 and head sizes
  up to 64; we keep the INT8 head sizes for it.
- TensorRT "Fused Attention" guide: softmax(Q·Kᵀ + mask)·V, the mask an Add; the scale is wanted on Q or K before
  the first matmul (a scale Mul/Div after it is the older pattern: tolerated, noted).
- NVIDIA ModelOpt's FP8 ONNX exporter (PR 1289: `_move_transpose_before_qdq`, `_move_mul_before_qdq`) rewrites
  DQ -> Transpose/Mul -> MatMul into Transpose/Mul -> Q -> DQ -> MatMul "so TRT can fuse DQ into the attention
  MatMuls": so each matmul operand must come straight out of a DequantizeLinear; anything between breaks it.
  (TensorRT does move Q/DQ through Transpose / Reshape in general, e.g. a weight's, TensorRT issue 1604; the P·V
  output's Q/DQ sits after a Transpose + Reshape and counts.)
- Engine side: a fused MHA layer is named after its kernel, `_gemm_mha_v2` (`_gemv_mha` at sequence 1) (TensorRT
  issues 3243, 4167; pytorch/TensorRT PR 4204, whose tests read IEngineInspector's JSON: Name, LayerType,
  TacticName, Inputs[].Format/Datatype such as 'Int8 linear'). Fused does not mean quantized: the inputs' types say.
- Not documented either way: the Casts our FP16 graph keeps around the FP32 softmax, and the Reshapes around
  Swin's shifted-window mask. The fused kernel computes softmax in FP32 itself, so they are assumed tolerated and
  listed as notes; an engine's layer information (`engine_layers`) settles it on a host with TensorRT.
"""
import dataclasses
import json

import onnx
from onnx import TensorProto, shape_inference

from ...onnx_graph import constants, consumers as consumers_of, producers as producers_of
from ...run_dir import Record

QDQ_NAMES = {TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.FLOAT8E4M3FN: "FP8",
             TensorProto.INT4: "INT4", TensorProto.UINT4: "UINT4"}
NONE = "none"
LIMITS = {"INT8": ((16, 32, 64), 512), "FP8": ((16, 32, 64), 3072)}  # Q/DQ type -> (head sizes, max sequence)
SCORE_OPS = ("Mul", "Div", "Add")        # between Q·Kᵀ and softmax: the scale, the mask / relative position bias
ASSUMED_OPS = ("Cast", "Reshape")       # assumed tolerated there (see above), noted
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")  # Q/DQ moves through them (P·V output)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
PASS_OPS = LAYOUT_OPS + ("Mul", "Div", "Cast")  # what may sit between a DQ and an attention matmul (and breaks it)
MHA_KERNELS = ("_gemm_mha", "_gemv_mha", "fmha")  # fused attention kernels in engine layer names / tactics
DEPTH = 8                                # ops searched between the two matmuls and softmax


@dataclasses.dataclass
class AttentionBlock(Record):
    """One attention block's verdict. qdq: the Q/DQ type of each matmul operand (q, k, p = softmax output, v)."""
    block: str = ""
    heads: int | None = None
    head_size: int | None = None
    seq_len: int | None = None
    qdq: dict = dataclasses.field(default_factory=dict)
    fusable: bool = False
    reasons: list = dataclasses.field(default_factory=list)  # why not fusable
    notes: list = dataclasses.field(default_factory=list)    # what the verdict assumes tolerated

    @property
    def qdq_type(self) -> str:
        types = sorted(set(self.qdq.values()) - {NONE}) or [NONE]
        return "/".join(types)


def _shapes(model: onnx.ModelProto) -> dict:
    """Tensor name -> dims (None where unknown). Inferred afresh (the FP16 converter leaves symbolic dims behind) at
    batch 1: a Reshape to (-1 windows, ..., -1) has no static head size at a symbolic batch; attention shapes do
    not depend on it."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    del fresh.graph.value_info[:]
    for inp in fresh.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if not d.dim_value:
                d.dim_value = 1
    try:
        fresh = shape_inference.infer_shapes(fresh, data_prop=True)
    except Exception:  # noqa: BLE001 - any graph ONNX cannot infer: fall back to what it stores
        fresh = model
    out = {t.name: list(t.dims) for t in model.graph.initializer}
    for v in list(model.graph.value_info) + list(fresh.graph.value_info) + list(fresh.graph.input):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            out[v.name] = [d.dim_value or None for d in v.type.tensor_type.shape.dim]
    return out


def _block_name(node_name: str, fallback: str) -> str:
    """'/layers/layers.0/blocks/blocks.1/attn/Softmax' -> 'layers.0.blocks.1.attn' (the exporter's scopes)."""
    parts = [p for p in node_name.split("/")[:-1] if p]
    parts = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
    return ".".join(parts) or fallback


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.consts, self.producers, self.consumers = constants(model), producers_of(model), consumers_of(model)

    def computed(self, node) -> list[str]:
        return [i for i in node.input if i and i not in self.consts]

    def up_to_matmul(self, tensor: str, depth: int = DEPTH) -> list | None:
        """The nodes from `tensor` up to the nearest MatMul (that MatMul first), or None."""
        node = self.producers.get(tensor)
        if node is None or depth == 0:
            return None
        if node.op_type == "MatMul":
            return [node]
        for i in self.computed(node):
            path = self.up_to_matmul(i, depth - 1)
            if path:
                return path + [node]
        return None

    def down_to_matmul(self, tensor: str, depth: int = DEPTH) -> list | None:
        """The nodes from `tensor` down to a MatMul taking the path as its first operand (that MatMul last)."""
        for node in self.consumers.get(tensor, []):
            if node.op_type == "MatMul":
                if node.input[0] == tensor:
                    return [node]
                continue
            if depth > 1:
                path = self.down_to_matmul(node.output[0], depth - 1)
                if path:
                    return [node] + path
        return None

    def qdq_type(self, dq) -> str:
        """The integer / float8 type a DequantizeLinear reads: its zero point's, else its QuantizeLinear's."""
        src = dq.input[0]
        if src in self.consts:
            return QDQ_NAMES.get(self.consts[src].data_type, TensorProto.DataType.Name(self.consts[src].data_type))
        for node in (dq, self.producers.get(src)):
            if node is None or node.op_type not in QDQ_OPS:
                continue
            zp = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zp is not None:
                return QDQ_NAMES.get(zp.data_type, TensorProto.DataType.Name(zp.data_type))
            dtype = next((a.i for a in node.attribute if a.name == "output_dtype" and a.i), None)
            if dtype:
                return QDQ_NAMES.get(dtype, TensorProto.DataType.Name(dtype))
        return "UINT8"  # ONNX's default without a zero point

    def operand(self, tensor: str, what: str) -> tuple[str, str | None]:
        """(Q/DQ type, why it breaks the pattern or None) of one matmul operand."""
        between, node = [], self.producers.get(tensor)
        while node is not None and node.op_type in PASS_OPS and len(between) < 4 and self.computed(node):
            between.append(node.op_type)
            node = self.producers.get(self.computed(node)[0])
        if node is None or node.op_type != "DequantizeLinear":
            return NONE, f"{what} not quantized" if what == "softmax output" else \
                f"{what} operand not from a DequantizeLinear"
        if between:
            return self.qdq_type(node), f"{' / '.join(reversed(between))} between the {what} DequantizeLinear and " \
                                        "the matmul"
        return self.qdq_type(node), None

    def projection_width(self, tensor: str, shapes: dict, depth: int = 6) -> int | None:
        """The input width (heads x head size) of the MatMul the P·V output reaches through layout ops and Q/DQ:
        its weight's first dim."""
        for node in self.consumers.get(tensor, []):
            if node.op_type == "MatMul" and node.input[0] == tensor:
                weight = shapes.get(node.input[1])
                return weight[0] if weight and len(weight) == 2 else None
            if node.op_type in LAYOUT_OPS + QDQ_OPS and depth > 1:
                width = self.projection_width(node.output[0], shapes, depth - 1)
                if width:
                    return width
        return None

    def output_quantized(self, tensor: str, depth: int = 4) -> bool:
        """Whether the P·V output reaches a QuantizeLinear through layout ops only."""
        for node in self.consumers.get(tensor, []):
            if node.op_type == "QuantizeLinear":
                return True
            if node.op_type in LAYOUT_OPS and depth > 1 and self.output_quantized(node.output[0], depth - 1):
                return True
        return False


def _pattern(g: _Graph, up: list, down: list) -> tuple[dict, list, list]:
    """(Q/DQ type per operand, what breaks the pattern, what it assumes tolerated) of the nodes from Q·Kᵀ to
    softmax (`up`) and from softmax to P·V (`down`)."""
    scores, av = up[0], down[-1]
    reasons, notes = [], []
    for node in up[1:]:
        if node.op_type in ASSUMED_OPS:
            notes.append(f"{node.op_type} between Q·Kᵀ and softmax")
        elif node.op_type in ("Mul", "Div"):
            notes.append(f"scale {node.op_type} after Q·Kᵀ")
        elif node.op_type not in SCORE_OPS:
            reasons.append(f"{node.op_type} between Q·Kᵀ and softmax")
    q_at = next((i for i, n in enumerate(down) if n.op_type == "QuantizeLinear"), 0)
    for node in down[:q_at]:  # between softmax and its QuantizeLinear: nothing but the FP32 island's Cast
        (notes if node.op_type == "Cast" else reasons).append(f"{node.op_type} between softmax and its "
                                                              "QuantizeLinear")
    qdq = {}
    for key, tensor, what in (("q", scores.input[0], "q"), ("k", scores.input[1], "k"),
                              ("p", av.input[0], "softmax output"), ("v", av.input[1], "v")):
        qdq[key], why = g.operand(tensor, what)
        reasons += [why] if why else []
    kinds = set(qdq.values()) - {NONE}
    if len(kinds) > 1:
        reasons.append(f"mixed Q/DQ types ({', '.join(sorted(kinds))})")
    if len(kinds) == 1 and next(iter(kinds)) not in LIMITS:
        reasons.append(f"{next(iter(kinds))} Q/DQ (fused MHA takes INT8 or FP8)")
    if not g.output_quantized(av.output[0]):
        reasons.append("P·V output not quantized (no Q/DQ after the second matmul)")
    if not kinds:  # weight-only or float: no quantized pattern to name operand by operand
        reasons = ["attention not quantized (runs in float: TensorRT's FP16 MHA may fuse it)"]
    return qdq, reasons, notes


def _shape(g: _Graph, shapes: dict, scores, av, kind: str) -> tuple[int | None, int | None, int | None, list]:
    """(heads, head size, sequence length, what is out of the fused kernel's range)."""
    q_shape, s_shape = shapes.get(scores.input[0]), shapes.get(scores.output[0])
    head_size = q_shape[-1] if q_shape else None
    heads = q_shape[1] if q_shape and len(q_shape) == 4 else None
    if head_size is None and heads:  # a Reshape to (-1 windows, ..., -1) of Swin: from the output projection
        width = g.projection_width(av.output[0], shapes)
        head_size = width // heads if width and width % heads == 0 else None
    seq = max(s_shape[-2:]) if s_shape and len(s_shape) >= 2 and None not in s_shape[-2:] else None
    (sizes, max_seq), reasons = LIMITS.get(kind, LIMITS["INT8"]), []
    if head_size is None:
        reasons.append("head size unknown (no static shape)")
    elif head_size not in sizes:
        reasons.append(f"head size {head_size} (fused MHA needs {', '.join(map(str, sizes[:-1]))} or {sizes[-1]})")
    if seq is None:
        reasons.append("sequence length unknown (no static shape)")
    elif seq > max_seq:
        reasons.append(f"sequence length {seq} ({kind if kind in LIMITS else 'INT8'} fused MHA needs <= {max_seq})")
    return heads, head_size, seq, reasons


def attention_blocks(model: onnx.ModelProto) -> list[AttentionBlock]:
    """Every MatMul -> [scale] -> [Add mask / bias] -> Softmax -> MatMul of the graph, with its verdict."""
    g, shapes, blocks = _Graph(model), _shapes(model), []
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):
        up, down = g.up_to_matmul(softmax.input[0]), g.down_to_matmul(softmax.output[0])
        if not up or not down:
            continue  # a softmax that is not between two matmuls
        qdq, reasons, notes = _pattern(g, up, down)
        kinds = set(qdq.values()) - {NONE}
        heads, head_size, seq, out_of_range = _shape(g, shapes, up[0], down[-1],
                                                     kinds.pop() if len(kinds) == 1 else "INT8")
        reasons += out_of_range
        blocks.append(AttentionBlock(_block_name(softmax.name, f"attention {len(blocks)}"), heads, head_size, seq,
                                     qdq, not reasons, reasons, notes))
    return blocks


def table_lines(blocks: list[AttentionBlock]) -> list[str]:
    """The verdict as a Markdown table, then the assumptions it made (once)."""
    if not blocks:
        return ["TensorRT fused attention: no attention block (MatMul -> Softmax -> MatMul) found"]
    def show(v):
        return "?" if v is None else str(v)
    out = ["| block | heads | head size | seq len | Q/DQ | fusable | reason |", "|---|---|---|---|---|---|---|"]
    out += [f"| {b.block} | {show(b.heads)} | {show(b.head_size)} | {show(b.seq_len)} | {b.qdq_type} | "
            f"{'yes' if b.fusable else 'no'} | {'; '.join(b.reasons)} |" for b in blocks]
    fusable = sum(b.fusable for b in blocks)
    out += ["", f"{fusable} of {len(blocks)} attention blocks fusable by TensorRT's fused MHA (static check)"]
    notes = sorted({n for b in blocks for n in b.notes})
    if notes:
        out.append(f"assumed tolerated (confirm with an engine's layer information): {', '.join(notes)}")
    return out


@dataclasses.dataclass
class EngineLayer(Record):
    """One layer of a built engine (IEngineInspector, DETAILED): its input precisions, whether it is fused MHA."""
    name: str = ""
    type: str = ""
    precision: str = ""     # its inputs' data types, e.g. "Int8" or "Half"
    tactic: str = ""

    @property
    def fused_attention(self) -> bool:
        text = f"{self.name} {self.tactic}".lower()
        return any(k in text for k in MHA_KERNELS)

    @property
    def quantized(self) -> bool:
        return any(t in self.precision for t in ("Int8", "FP8"))


def engine_layers(information: str) -> list[EngineLayer]:
    """IEngineInspector.get_engine_information(LayerInformationFormat.JSON) as layers. With DETAILED profiling
    verbosity each layer is an object (Name, LayerType, TacticName, Inputs with 'Format/Datatype' such as
    'Int8 linear', 'FP8 linear', 'Half'); with LAYER_NAMES_ONLY a bare name."""
    layers = []
    for layer in json.loads(information).get("Layers", []):
        if isinstance(layer, str):
            layers.append(EngineLayer(layer))
            continue
        formats = [i.get("Format/Datatype", "") for i in layer.get("Inputs", [])]
        precision = "/".join(sorted({f.split()[0] for f in formats if f}))
        layers.append(EngineLayer(layer.get("Name", ""), layer.get("LayerType", ""), precision,
                                  str(layer.get("TacticName", ""))))
    return layers


@dataclasses.dataclass
class EngineAttention(Record):
    """The static verdict against what the engine built: fused MHA layers and how many run quantized."""
    blocks: int = 0
    fusable: int = 0
    fused_layers: int = 0
    quantized_layers: int = 0
    layers: list = dataclasses.field(default_factory=list)   # the fused MHA layers: name and precision

    @classmethod
    def compare(cls, blocks: list[AttentionBlock], layers: list[EngineLayer]) -> "EngineAttention":
        fused = [layer for layer in layers if layer.fused_attention]
        return cls(len(blocks), sum(b.fusable for b in blocks), len(fused), sum(x.quantized for x in fused),
                   [[x.name, x.precision] for x in fused])

    @property
    def agrees(self) -> bool:
        return self.quantized_layers == self.fusable

    def line(self, artifact: str) -> str:
        return (f"{artifact}: {self.fused_layers} fused MHA layer(s), {self.quantized_layers} with INT8/FP8 inputs; "
                f"the static check expected {self.fusable} of {self.blocks} blocks "
                f"({'agrees' if self.agrees else 'differs'})")
