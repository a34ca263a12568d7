"""ONNX Runtime: CPU, and the CUDA execution provider where onnxruntime-gpu and a GPU are present.

Export: the portable QDQ graph (8-bit tensors uint8 / zero point 128 unless int8 is asked: exact on every CPU)
and, for INT4 weights, the weight-only graph ORT fuses into MatMulNBits. Build: that graph re-encoded for the
host (encoding.py), each projection with its bias in MatMulIntegerToFloat on the CPU, the float twin, and the
unfused reference.
"""
import collections
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ...errors import MimiqError
from ...onnx_graph import copy_model, read_onnx, save_onnx
from ...qdq import lower_fake_quant
from ...quant import parse_bits
from ...run_dir import FLOAT_ONNX, QDQ_ONNX, Artifact, RunDir
from ..base import Backend, BuildContext, BuildResult, ExportContext, ExportedGraphs, RepositoryEntry, Runner, template
from .encoding import ENCODINGS, choose_encoding, encoding_of, fuse_integer_matmuls, host_graph

W4A16_ONNX = "model_w4a16.onnx"       # INT4 students: weight-only FP32 graph (ORT fuses it into MatMulNBits)


@dataclasses.dataclass
class OnnxRuntimeConfig:
    """[onnxruntime] of the export config."""
    int8: str = "auto"   # 8-bit encoding of the built graph: "auto" (build picks for its host), "uint8" (zero
                         # point 128) or "int8" (zero point 0); "int8" also stores the exported graph that way
    LEGACY = {"ort_int8": "int8"}  # its flat key in earlier configs

    def __post_init__(self):
        if self.int8 not in ("auto", *ENCODINGS):
            raise MimiqError(f"[onnxruntime] int8 = {self.int8!r}: choose \"auto\", \"uint8\" or \"int8\"")

INTEGER_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "QLinearConv", "DynamicQuantizeMatMul",
                   "MatMulInteger", "MatMulNBits")


def _session(onnx_path: Path, so, provider: str):
    """An ORT session; a missing, corrupt or truncated graph is one line naming the file."""
    if not Path(onnx_path).is_file():
        raise MimiqError(f"ONNX file not found: {onnx_path} (run `mimiq-deploy export` and `build` again)")
    try:
        return ort.InferenceSession(str(onnx_path), so, providers=[provider])
    except Exception as e:  # ORT raises its own pybind types (InvalidProtobuf, Fail, InvalidGraph)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MimiqError(f"ONNX Runtime cannot load {onnx_path} (corrupt or truncated?): {detail}") from None


def host_graphs(run_dir: RunDir, bits: str, encoding: str) -> dict:
    """The exported QDQ graph re-encoded for this host: {artifact suffix: (path, precision)}.

    Main graph: 8-bit tensors in `encoding`, INT4 weight codes in 8-bit containers (the same values), so
    that W4A8 runs on the integer kernels of W8A8; standard ONNX (the unfused reference, the CUDA provider,
    the model repository, other runtimes). "cpu": the same graph with each projection and its bias in one
    MatMulIntegerToFloat (ORT's CPU kernel), where any was fused. INT4 students also keep the packed-INT4
    graph (smaller on disk) and the weight-only W4A16 graph (ORT's MatMulNBits, float activations)."""
    out = {}
    if parse_bits(bits).fp8:  # nothing to re-encode: ORT has no FP8 kernels, it dequantizes to float
        return {"": (run_dir.graph(QDQ_ONNX), f"{bits} QDQ (E4M3FN), dequantized to float32 (no FP8 kernels)")}
    model = read_onnx(run_dir.graph(QDQ_ONNX))
    packed = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    main = run_dir.graph(f"model_qdq.{encoding}.onnx")
    host = host_graph(model, encoding, int4_weights_to_int8=True)
    save_onnx(host, main)
    precision = f"{bits} QDQ, {encoding}" + (", INT4 codes in 8-bit containers" if packed else "")
    out[""] = (main, precision)
    cpu_graph, fused = fuse_integer_matmuls(host)
    if fused:
        out["cpu"] = (run_dir.graph(f"model_qdq.{encoding}.cpu.onnx"), f"{precision}, {fused} projections with "
                      "their bias in MatMulIntegerToFloat")
        save_onnx(cpu_graph, out["cpu"][0])
    if packed:
        small = run_dir.graph(f"model_qdq_int4.{encoding}.onnx")
        save_onnx(host_graph(read_onnx(run_dir.graph(QDQ_ONNX)), encoding, int4_weights_to_int8=False), small)
        if small.stat().st_size < main.stat().st_size:
            out["-int4"] = (small, f"{bits} QDQ, {encoding}, packed INT4 weights (smallest on disk)")
        else:
            small.unlink()
    if run_dir.graph(W4A16_ONNX).exists():
        out["w4a16"] = (run_dir.graph(W4A16_ONNX), "w4a16 weight-only INT4 (MatMulNBits), float activations")
    return out


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    title = "ONNX Runtime"
    config_class = OnnxRuntimeConfig
    build_options = ("encoding",)
    graphs = (QDQ_ONNX, FLOAT_ONNX, W4A16_ONNX)
    uint8_zero_point_128 = True
    packages = ("onnxruntime", "onnxruntime-gpu")

    def export_graphs(self, ctx: ExportContext) -> ExportedGraphs:
        qc, table = ctx.quant, ctx.config.backend(self.name)
        # Hardware-neutral: uint8 with zero point 128 (unless int8 is asked) is exact on every CPU. `build`
        # re-encodes it for its host (encoding.py): int8 / zero point 0 where the CPU has VNNI.
        graphs = {QDQ_ONNX: lower_fake_quant(copy_model(ctx.placeholders), uint8=table.int8 != "int8")}
        if qc.weight_bits == 4:  # INT4 storage with float activations: block-wise INT4 weights -> MatMulNBits
            graphs[W4A16_ONNX] = lower_fake_quant(copy_model(ctx.placeholders), ctx.config.int4_block_size,
                                                  weight_only=True)
        return ExportedGraphs(graphs, checked=tuple(graphs))

    def build_artifacts(self, ctx: BuildContext) -> BuildResult:
        """Per execution provider: the host-encoded QDQ graph(s), the float twin, and the unfused reference."""
        exp, bits = ctx.run_dir.export_dir, ctx.export.bits
        chosen, enc_why = choose_encoding(ctx.options.get("encoding"), ctx.config.backend(self.name).int8)
        if parse_bits(bits).fp8:
            chosen, enc_why = "float8e4m3fn", "FP8 graphs keep their E4M3FN codes"
        ctx.progress(f"ONNX Runtime 8-bit encoding: {chosen} ({enc_why})")
        graphs = host_graphs(ctx.run_dir, bits, chosen)
        main_path = graphs[""][0]
        cpu_main = graphs.pop("cpu", None)
        artifacts = {}
        for provider in self.providers():
            tag = "cpu" if provider == "CPUExecutionProvider" else "cuda"
            twin = f"ort-{tag}-fp32"
            mine = {**graphs, "": cpu_main} if tag == "cpu" and cpu_main else graphs  # the contrib op is CPU-only
            todo = [(f"ort-{tag}-{bits}{suffix}" if suffix != "w4a16" else f"ort-{tag}-w4a16", path, precision,
                     suffix == "w4a16") for suffix, (path, precision) in mine.items()]
            for name, onnx_file, precision, weight_only in todo + [(twin, exp / FLOAT_ONNX, "fp32", False)]:
                info = self.build(onnx_file, exp / f"{onnx_file.stem}.{tag}.opt.onnx", provider=provider)
                if cpu_main and onnx_file == cpu_main[0]:
                    info["portable"] = str(main_path)  # the same model in standard ONNX, for other runtimes
                quantized = precision != "fp32"
                artifacts[name] = Artifact(self.name, str(onnx_file), precision, quantized, provider=provider,
                                           weight_only=weight_only, info=info,
                                           float_twin=twin if quantized else None)
                ctx.progress(f"built {name}: integer kernels {info['integer_kernels'] or 'none'}")
            # The same QDQ graph with ORT's fusions off: plain QuantizeLinear/DequantizeLinear + float ops.
            # It separates what the exporter wrote from what the integer kernels of this CPU compute.
            artifacts[f"ort-{tag}-{bits}-unfused"] = Artifact(self.name, str(main_path), f"{bits} QDQ unfused", True,
                                                              provider=provider, optimization="disabled",
                                                              reference=True, float_twin=twin)
        info = {"encoding": chosen, "reason": enc_why, "stored": encoding_of(read_onnx(main_path))}
        return BuildResult(artifacts, {}, info)

    def report_lines(self, info: dict) -> list[str]:
        if "encoding" not in info:
            return []
        return [f"ONNX Runtime 8-bit encoding chosen by build: **{info['encoding']}** ({info['reason']})."]

    def repository_entry(self, artifacts: dict, export, config) -> RepositoryEntry | None:
        """The host-encoded QDQ graph (the one the unfused reference runs)."""
        main = next((a for a in artifacts.values() if a.backend == self.name and a.reference), None)
        if main is None:
            return None
        return RepositoryEntry("onnx", template("onnxruntime.pbtxt"), Path(main.path), "model.onnx",
                               {"instance_kind": "KIND_AUTO", "io_type": "TYPE_FP32"})

    def providers(self) -> list[str]:
        have = ort.get_available_providers()
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]

    def build(self, source: Path, out: Path, provider: str = "CPUExecutionProvider", **_) -> dict:
        """Optimize once and keep the optimized graph: it tells which kernels run (integer or float)."""
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out)
        _session(source, so, provider)
        ops = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
        integer = {k: v for k, v in ops.items() if k in INTEGER_KERNELS}
        return {"optimized": str(out), "integer_kernels": integer, "float_matmuls": ops.get("MatMul", 0) +
                ops.get("Gemm", 0) + ops.get("FusedMatMul", 0), "op_counts": dict(ops)}

    def profile(self, artifact: Artifact, x: np.ndarray, runs: int = 10) -> dict:
        return self.profile_graph(Path(artifact.path), x, artifact.provider, runs)

    def profile_graph(self, onnx_path: Path, x: np.ndarray, provider: str | None = None, runs: int = 10,
                      threads: int = 0) -> dict:
        """Kernel time per run by op type (ms), from ONNX Runtime's profiler, after two warm-up runs."""
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        with tempfile.TemporaryDirectory() as tmp:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, "ort")
            sess = _session(onnx_path, so, provider or "CPUExecutionProvider")
            feed = {sess.get_inputs()[0].name: x.astype(np.float16 if sess.get_inputs()[0].type == "tensor(float16)"
                                                         else np.float32, copy=False)}
            for _ in range(2 + runs):  # two warm-up runs, told apart below by their model_run events
                sess.run(None, feed)
            with open(sess.end_profiling()) as f:
                events = json.load(f)
        first = sorted(e["ts"] for e in events if e.get("name") == "model_run")[2]
        by_op = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
                by_op[e["args"]["op_name"]] += e["dur"] / 1000 / runs
        return dict(by_op)

    def runner(self, artifact: Artifact, threads: int = 0) -> "SessionRunner":
        return self.load(Path(artifact.path), artifact.provider, threads, artifact.optimization or "all")

    def load(self, onnx_path: Path, provider: str | None = None, threads: int = 0,
             optimization: str = "all") -> "SessionRunner":
        """A runner of any ONNX file (benchmarks time graphs that are no artifact, too)."""
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimization == "disabled"
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        if threads:
            so.intra_op_num_threads = threads
        return SessionRunner(_session(onnx_path, so, provider or "CPUExecutionProvider"))


class SessionRunner(Runner):
    """An ONNX Runtime session: float32 in, float32 logits out (FP16 graphs are fed and read in FP16)."""

    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.astype(self.dtype, copy=False)})[0].astype(np.float32)
