"""Where ModelOpt and this project put Q/DQ in the same ViT -> RESULTS.md, "Q/DQ placement: ModelOpt and MimiQ".

For one quantize run (--run RUN: its float graph export/model_fp32.onnx, its TensorRT graph
export/model_qdq_fp16.onnx and its synthetic set), ModelOpt's ONNX PTQ quantizes the float graph with the run's
synthetic set as calibration data (`export-calib`, ModelOpt's CLI, --calibration_method max; INT8, and FP8 with
--fp8), and every graph is read the same way:
- each MatMul / Gemm / Conv: both inputs quantized, weights only, activations only, or float; the attention
  matmuls (q k^T, probabilities times v: two activations) counted apart from the projections;
- which other ops read a DequantizeLinear output (residual Add, LayerNorm, Softmax, GELU, ...);
- the number of QuantizeLinear / DequantizeLinear nodes;
- TensorRT's fused-attention verdict per attention block (backends/tensorrt/attention.py, the static check).
Prints a Markdown table (and writes it with --results).

    pip install -e '.[peers]'
    PYTHONPATH=. python benchmarks/qdq_placement.py --run runs/fmnist-w8a8 [--fp8] [--results FILE]
"""
import argparse
import collections
import sys
import tempfile
from pathlib import Path

import onnx
from accuracy import modelopt_ptq

from mimiq_deploy.backends.tensorrt import TRT_ONNX
from mimiq_deploy.backends.tensorrt.attention import attention_blocks
from mimiq_deploy.calib import export_calib
from mimiq_deploy.io import atomic_write_text
from mimiq_deploy.onnx_graph import constants, consumers, producers
from mimiq_deploy.run_dir import FLOAT_ONNX, RunDir

COMPUTE = ("MatMul", "Gemm", "Conv")
LAYOUT = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Split", "Slice", "Gather", "Concat")


def _dq_source(tensor: str, producer: dict) -> onnx.NodeProto | None:
    """The DequantizeLinear a tensor comes from through layout ops (TensorRT propagates Q/DQ across them)."""
    node = producer.get(tensor)
    while node is not None and node.op_type in LAYOUT:
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _is_constant(tensor: str, producer: dict, consts: dict) -> bool:
    node = producer.get(tensor)
    while node is not None and node.op_type in LAYOUT + ("DequantizeLinear", "QuantizeLinear"):
        tensor, node = node.input[0], producer.get(node.input[0])
    return tensor in consts


def placement(model: onnx.ModelProto) -> dict:
    """What a QDQ graph quantizes: compute ops by what is quantized, the other readers of Q/DQ, the counts."""
    consts, producer, users = constants(model), producers(model), consumers(model)
    compute, unquantized = collections.Counter(), []
    for node in (n for n in model.graph.node if n.op_type in COMPUTE):
        a, b = node.input[0], node.input[1]
        weights = _is_constant(b, producer, consts)
        qa, qb = _dq_source(a, producer) is not None, _dq_source(b, producer) is not None
        kind = "projection" if weights else "attention matmul"
        state = ("both quantized" if qa and qb else "weights only" if qb and weights
                 else "one input quantized" if qa or qb else "float")
        compute[f"{kind}: {state}"] += 1
        if state != "both quantized":
            unquantized.append(node.name or node.output[0])
    readers = collections.Counter()
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        if dq.input[0] in consts:
            continue  # weights
        for user in users.get(dq.output[0], []):
            if user.op_type not in COMPUTE + LAYOUT:
                readers[user.op_type] += 1
    ops = collections.Counter(n.op_type for n in model.graph.node)
    blocks = attention_blocks(model)
    types = collections.Counter(b.qdq_type for b in blocks)
    return {"compute": compute, "unquantized": unquantized, "readers": readers, "q": ops["QuantizeLinear"], "dq": ops["DequantizeLinear"],
            "blocks": len(blocks), "fusable": sum(b.fusable for b in blocks), "attention_qdq": types,
            "reasons": collections.Counter(r for b in blocks for r in b.reasons)}


def table(columns: dict) -> list[str]:
    infos = {name: placement(onnx.load(str(path))) for name, path in columns.items()}
    keys = sorted({k for i in infos.values() for k in i["compute"]})
    readers = sorted({k for i in infos.values() for k in i["readers"]})
    lines = ["| | " + " | ".join(infos) + " |", "|---|" + "---|" * len(infos)]
    row = lambda label, cells: lines.append(f"| {label} | " + " | ".join(str(c) for c in cells) + " |")
    for k in keys:
        row(k, [i["compute"].get(k, 0) for i in infos.values()])
    for k in readers:
        row(f"{k} reads a DequantizeLinear", [i["readers"].get(k, 0) for i in infos.values()])
    row("matmul / conv not fully quantized", [", ".join(f"`{n}`" for n in i["unquantized"]) or "-"
                                             for i in infos.values()])
    row("QuantizeLinear / DequantizeLinear nodes", [f"{i['q']} / {i['dq']}" for i in infos.values()])
    row("attention blocks: Q/DQ type", [", ".join(f"{t} {n}" for t, n in sorted(i["attention_qdq"].items()))
                                       or "-" for i in infos.values()])
    row("attention blocks TensorRT can fuse (static check)", [f"{i['fusable']} of {i['blocks']}"
                                                              for i in infos.values()])
    row("why not", ["; ".join(f"{r} ({n})" for r, n in sorted(i["reasons"].items())) or "-"
                    for i in infos.values()])
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a quantize run (its export and synthetic set)")
    ap.add_argument("--fp8", action="store_true", help="also ModelOpt's FP8 graph")
    ap.add_argument("--out", type=Path, default=None, help="where ModelOpt's graphs go (default: a temp folder)")
    ap.add_argument("--results", type=Path, default=None, help="also write the table to this Markdown file")
    args = ap.parse_args()
    rd = RunDir(args.run)
    if not rd.export_record.exists():
        sys.exit(f"{args.run} has no export (run `mimiq-deploy quantize` or `export` on it first)")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        calib = export_calib(args.run, "npz", out / "calib.npz")[0]
        bits = rd.read_export().bits
        columns = {f"MimiQ {bits} (TensorRT graph)": rd.graph(TRT_ONNX)}
        for mode in ("int8", "fp8") if args.fp8 else ("int8",):
            graph = out / f"modelopt_{mode}.onnx"
            failed = modelopt_ptq(rd.graph(FLOAT_ONNX), calib, mode, "max", graph, high_precision="fp32")[1]
            if failed:
                sys.exit(failed)
            columns[f"ModelOpt {mode.upper()} (max)"] = graph
        lines = [f"Q/DQ placement in {args.run.name}'s ViT: this project's TensorRT graph and ModelOpt's PTQ of the "
                 "same float graph (calibrated on the run's synthetic set)", "", *table(columns)]
    print("\n".join(lines))
    if args.results:
        atomic_write_text(args.results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
