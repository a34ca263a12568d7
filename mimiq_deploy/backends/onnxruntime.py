"""ONNX Runtime: CPU, and the CUDA execution provider where onnxruntime-gpu and a GPU are present."""
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import MimiqError


def _session(onnx_path: Path, so, provider: str):
    """An ORT session; a missing, corrupt or truncated graph is one line naming the file."""
    if not Path(onnx_path).is_file():
        raise MimiqError(f"ONNX file not found: {onnx_path} (run `mimiq-deploy export` and `build` again)")
    try:
        return ort.InferenceSession(str(onnx_path), so, providers=[provider])
    except Exception as e:  # ORT raises its own pybind types (InvalidProtobuf, Fail, InvalidGraph)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MimiqError(f"ONNX Runtime cannot load {onnx_path} (corrupt or truncated?): {detail}") from None


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def providers(self) -> list[str]:
        have = ort.get_available_providers()
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]

    def build(self, onnx_path: Path, out_path: Path, provider: str = "CPUExecutionProvider", **_) -> dict:
        """Optimize once and keep the optimized graph: it tells which kernels run (integer or float)."""
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out_path)
        _session(onnx_path, so, provider)
        ops = collections.Counter(n.op_type for n in onnx.load(str(out_path)).graph.node)
        integer = {k: v for k, v in ops.items() if k in ("MatMulIntegerToFloat", "QLinearMatMul", "QGemm",
                                                           "QLinearConv", "DynamicQuantizeMatMul", "MatMulInteger",
                                                           "MatMulNBits")}
        return {"optimized": str(out_path), "integer_kernels": integer, "float_matmuls": ops.get("MatMul", 0) +
                ops.get("Gemm", 0) + ops.get("FusedMatMul", 0), "op_counts": dict(ops)}

    def profile(self, onnx_path: Path, x: np.ndarray, provider: str | None = None, runs: int = 10,
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

    def load(self, onnx_path: Path, provider: str | None = None, threads: int = 0, optimization: str = "all"):
        provider = provider or "CPUExecutionProvider"
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimization == "disabled"
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        if threads:
            so.intra_op_num_threads = threads
        sess = _session(onnx_path, so, provider)
        name = sess.get_inputs()[0].name
        dtype = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32

        def run(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {name: x.astype(dtype, copy=False)})[0].astype(np.float32)
        return run
