"""OpenVINO: the CPU plugin, from the portable QDQ graph; imported lazily (`pip install 'mimiq-deploy[openvino]'`).

Export writes nothing for it: `build` rewrites model_qdq.onnx, values unchanged, into the form OpenVINO's
low-precision transformations run in int8 (graph.py) and writes it as model_qdq.openvino.onnx, compiles it and
the float twin on the CPU with the compiled models cached in export/openvino_cache, and records from each compiled
model's runtime model which layers ran at which precision. Both artifacts run their float ops at the
`inference_precision` of the [openvino] table (f32 by default: OpenVINO would otherwise pick bf16 on CPUs with
bf16 units, for the FP32 twin too).
"""
import collections
import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import MimiqError
from ...onnx_graph import constants, read_onnx, save_onnx
from ...qdq_rules import QDQ, is_weight_dq
from ...quant import parse_bits
from ...run_dir import FLOAT_ONNX, QDQ_ONNX, Artifact
from ..base import Backend, BuildContext, BuildResult, ExportContext, ExportedGraphs, RepositoryEntry, Runner
from ..onnxruntime.encoding import exact_dot_products
from .graph import INT4, INT8_MODES, has_int4_activations, openvino_graph, runtime_precisions

OV_ONNX = "model_qdq.openvino.onnx"   # the QDQ graph OpenVINO compiles (run_dir/export)
CACHE_DIR = "openvino_cache"          # OpenVINO's compiled-model cache (run_dir/export)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86: int8 products summed in 32 bits, no saturation
PRECISIONS = ("f32", "bf16", "f16")
INSTALL = "pip install 'mimiq-deploy[openvino]'"

# The model-repository entry: Triton's OpenVINO backend reads ONNX itself (default_model_filename), so the served
# file is the graph compiled here and OpenVINO applies the same transformations at load.
TRITON_TEMPLATE = """name: "$name"
backend: "openvino"
default_model_filename: "model.onnx"
max_batch_size: $max_batch
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ $dims ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ $num_classes ]$label_filename
  }
]
instance_group [ { kind: KIND_CPU } ]
dynamic_batching { }
parameters: { key: "PERFORMANCE_HINT" value: { string_value: "LATENCY" } }$parameters
# $precision
# preprocessing expected by this model: preprocessing.json beside this file (from timm's pretrained_cfg)
"""


@dataclasses.dataclass
class OpenVINOConfig:
    """[openvino] of the export config."""
    int8: str = "auto"   # quantized layers OpenVINO runs in int8: "all" (every projection, both attention matmuls,
                         # patch embedding, head: exact on CPUs with VNNI / AMX), "exact" (only those whose int8
                         # sums cannot saturate on a CPU without VNNI: weights of at most 7 bits, e.g. INT4; the
                         # others in float), "auto": "all" where the CPU has avx512_vnni / avx_vnni / amx_int8
    threads: int = 0     # INFERENCE_NUM_THREADS (0: OpenVINO's default, one per core)
    inference_precision: str = "f32"  # INFERENCE_PRECISION_HINT of the float ops ("f32", "bf16", "f16")
    LEGACY = {}

    def __post_init__(self):
        if self.int8 not in ("auto", *INT8_MODES):
            raise MimiqError(f"[openvino] int8 = {self.int8!r}: choose \"auto\", \"all\" or \"exact\"")
        if self.inference_precision not in PRECISIONS:
            raise MimiqError(f"[openvino] inference_precision = {self.inference_precision!r}: choose one of "
                             f"{', '.join(PRECISIONS)}")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise MimiqError(f"[openvino] threads = {self.threads!r}: a number >= 0 (0: OpenVINO's default)")


def _import_openvino():
    try:
        import openvino
        return openvino
    except ImportError:
        return None


def host_int8() -> tuple[str, str]:
    """(int8 mode, reason) for OpenVINO on this CPU; MIMIQ_CPU_VNNI=1/0 pretends it has / lacks VNNI."""
    has, why = exact_dot_products(VNNI_FLAGS)
    if has:
        return "all", f"CPU has {', '.join(has)}: int8 products are summed in 32 bits, every int8 layer is exact"
    return "exact", (f"{why}: its int8 kernels sum u8 x s8 products in saturating 16-bit pairs, so only layers "
                     "with weights of at most 7 bits run in int8, the others in float")


def choose_int8(requested: str | None, config_value: str) -> tuple[str, str]:
    """A build option (openvino_int8=...), then an explicit int8 of the [openvino] table, then the host decide."""
    if requested and requested != "auto":
        if requested not in INT8_MODES:
            raise MimiqError(f"openvino_int8={requested!r}: choose \"auto\", \"all\" or \"exact\"")
        return requested, f"{requested} requested at build (openvino_int8)"
    if config_value in INT8_MODES:
        return config_value, f"int8 = \"{config_value}\" in the export config's [openvino] table"
    return host_int8()


def compile_config(table: OpenVINOConfig, cache: Path | None) -> dict:
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": table.inference_precision}
    if table.threads:
        config["INFERENCE_NUM_THREADS"] = table.threads
    if cache is not None:
        config["CACHE_DIR"] = str(cache)
    return config


def _compile(core, model, config: dict, source: Path):
    try:
        return core.compile_model(model, "CPU", config)
    except RuntimeError as e:  # OpenVINO raises its own Exception type, a RuntimeError
        detail = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise MimiqError(f"OpenVINO cannot compile {source}: {detail}") from None


def _read(core, path: Path):
    if not Path(path).is_file():
        raise MimiqError(f"ONNX file not found: {path} (run `mimiq-deploy export` and `build` again)")
    try:
        return core.read_model(str(path))
    except RuntimeError as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise MimiqError(f"OpenVINO cannot read {path} (corrupt or truncated?): {detail}") from None


class OpenVINOBackend(Backend):
    name = "openvino"
    title = "OpenVINO"
    config_class = OpenVINOConfig
    build_options = ("openvino_int8",)
    graphs = (QDQ_ONNX, FLOAT_ONNX)
    packages = ("openvino",)
    uint8_zero_point_128 = True   # read as the same symmetric values (as FakeQuantize); see own_violations

    def available(self) -> tuple[bool, str]:
        if _import_openvino() is None:
            return False, f"the openvino Python package is not installed ({INSTALL})"
        return True, ""

    def export_graphs(self, ctx: ExportContext) -> ExportedGraphs:
        """Nothing of its own (build rewrites model_qdq.onnx); a note where it builds nothing."""
        if ctx.quant.fp8:
            return ExportedGraphs(note="fp8 not built for OpenVINO: its CPU plug-in has no FP8 compute kernels; "
                                       "FP8 runs in TensorRT on Ada / Hopper GPUs (and simulated in ONNX Runtime)")
        if ctx.quant.act_bits == 4:
            return ExportedGraphs(note=f"{ctx.quant.name} not built for OpenVINO: it has no INT4 activation "
                                       "kernels (OpenVINO 2026.4 aborts compiling INT4 activations with int8 "
                                       "weights); deployable there are w4a8 and w8a8")
        return ExportedGraphs()

    def own_violations(self, model: onnx.ModelProto) -> list[str]:
        """What keeps a quantized layer out of OpenVINO's int8 kernels (or OpenVINO from compiling the graph)."""
        consts, problems = constants(model), []
        for node in (n for n in model.graph.node if n.op_type in QDQ and n.domain in ("", "ai.onnx")):
            zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if node.op_type == "QuantizeLinear" and zp is not None and zp.data_type in INT4:
                problems.append(f"{node.name}: INT4 activation quantization (OpenVINO has no INT4 activation "
                                "kernels and aborts compiling it beside int8 weights)")
            if not is_weight_dq(node, consts):
                continue
            codes = consts[node.input[0]]
            if codes.data_type in INT4 or any(a.name == "block_size" and a.i > 0 for a in node.attribute):
                problems.append(f"{node.name}: INT4 / block-wise weights, which OpenVINO runs as compressed float "
                                "weights (widen the codes into int8, as build does)")
            elif codes.data_type == onnx.TensorProto.UINT8 or (zp is not None and np.any(
                    numpy_helper.to_array(zp))):
                problems.append(f"{node.name}: weights with a zero point (uint8), which OpenVINO decompresses to "
                                "float at every call instead of running int8 (store them int8 with zero point 0, "
                                "as build does)")
        return problems

    def build_artifacts(self, ctx: BuildContext) -> BuildResult:
        """The graph OpenVINO compiles (graph.py) and the float twin, compiled and cached; the runtime precision
        of every layer of each."""
        exp, bits = ctx.run_dir.export_dir, ctx.export.bits
        table, result = ctx.config.backend(self.name), BuildResult()
        name, twin = f"ov-cpu-{bits}", "ov-cpu-fp32"
        model = read_onnx(ctx.run_dir.graph(QDQ_ONNX))
        # OpenVINO compiles FP8 Q/DQ but only emulates it: fmnist-vit fp8 measured 6.3x slower than its FP32 at
        # batch 1 and 99.38 % agreement with the student over 10,000 images (verify's bound: 99.5 %)
        if parse_bits(bits).fp8:
            result.skipped[name] = ctx.export.note(self.name) or f"{bits} not built for OpenVINO (no FP8 kernels)"
            return result
        if has_int4_activations(model):
            result.skipped[name] = ctx.export.note(self.name) or (
                f"{bits} not built for OpenVINO: it has no INT4 activation kernels (deploy w4a8 or w8a8)")
            return result
        mode, why = choose_int8(ctx.options.get("openvino_int8"), table.int8)
        ctx.progress(f"OpenVINO int8 layers: {mode} ({why})")
        graph, passes = openvino_graph(model, mode)
        save_onnx(graph, exp / OV_ONNX)
        cache = exp / CACHE_DIR
        precision = f"{bits} QDQ, int8 {mode}, float ops {table.inference_precision}"
        summary = {}
        for art, source, prec in ((name, exp / OV_ONNX, precision), (twin, exp / FLOAT_ONNX, "fp32")):
            try:
                info = self.build(source, cache, table=table)
            except MimiqError as e:  # the other back ends' artifacts stand on their own
                result.skipped[art] = str(e)
                continue
            quantized = prec != "fp32"
            if quantized:
                info["graph"] = passes
            result.artifacts[art] = Artifact(self.name, str(source), prec, quantized, provider="CPU", info=info,
                                             float_twin=twin if quantized else None)
            summary[art] = {"int8_layers": info["int8_layers"], "compute_layers": info["compute_layers"],
                            "compute": info["compute"]}
            ctx.progress(f"built {art}: {info['int8_layers']} of {info['compute_layers']} matmul / conv layers "
                         f"in int8")
        if name in result.artifacts and twin not in result.artifacts:
            result.artifacts[name].float_twin = None
        ov = _import_openvino()
        result.info = {"int8": mode, "reason": why, "openvino": ov.__version__,
                       "inference_precision": table.inference_precision, "graph": passes, "layers_by_artifact": summary}
        return result

    def build(self, source: Path, out: Path, table: OpenVINOConfig | None = None, **_) -> dict:
        """Compile one graph (dynamic batch, as the model repository serves it) with its cache in `out`; returns
        what its runtime model says ran at which precision, and the compile config the runner uses."""
        ok, why = self.available()
        if not ok:
            raise MimiqError(f"cannot build an OpenVINO model: {why}")
        ov = _import_openvino()
        config = compile_config(table or OpenVINOConfig(), Path(out).resolve())
        core = ov.Core()
        t0 = time.time()
        compiled = _compile(core, _read(core, source), config, source)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        return {"compile_config": config, "compile_seconds": round(time.time() - t0, 2),
                "executed_float_precision": getattr(hint, "type_name", None) or str(hint),
                **runtime_precisions(compiled)}

    def report_lines(self, info: dict) -> list[str]:
        if "int8" not in info:
            return []
        version = info.get("openvino", "").split("-")[0]
        lines = [f"OpenVINO {version} int8 layers: **{info['int8']}** ({info['reason']}); float ops at "
                 f"{info['inference_precision']}."]
        for name, s in info.get("layers_by_artifact", {}).items():
            kinds = "; ".join(f"{layer} " + ", ".join(f"{p} {n}" for p, n in sorted(by.items()))
                              for layer, by in sorted(s["compute"].items()))
            lines.append(f"- `{name}`: {s['int8_layers']} of {s['compute_layers']} matmul / conv layers executed "
                         f"in int8 ({kinds}).")
        return lines

    def repository_entry(self, artifacts: dict, export, config) -> RepositoryEntry | None:
        """The graph compiled here, as ONNX: Triton's OpenVINO backend reads it itself (one file, and the same
        transformations at load); an IR (model.xml + .bin) would be two files and, by ov.save_model's default,
        FP16-compressed float constants."""
        art = next((a for a in artifacts.values() if a.backend == self.name and a.quantized), None)
        if art is None:
            return None
        table = config.backend(self.name)
        params = (f'\nparameters: {{ key: "INFERENCE_NUM_THREADS" value: {{ string_value: "{table.threads}" }} }}'
                  if table.threads else "")
        return RepositoryEntry("openvino", TRITON_TEMPLATE, Path(art.path), "model.onnx",
                               {"parameters": params,
                                "precision": f"{art.precision}; OpenVINO picks bf16 for the float ops on CPUs "
                                             "with bf16 units unless told otherwise"})

    def runner(self, artifact: Artifact) -> "OpenVINORunner":
        ok, why = self.available()
        if not ok:
            raise MimiqError(f"cannot run {artifact.path} with OpenVINO: {why}")
        config = artifact.info.get("compile_config") or compile_config(OpenVINOConfig(), None)
        return OpenVINORunner(Path(artifact.path), config)

    def profile(self, artifact: Artifact, x: np.ndarray, runs: int = 10) -> dict:
        """ms per run by OpenVINO layer type (FullyConnected, FullyConnectedQuantizedLegacy, MatMul, Subgraph, ...)
        from its per-layer performance counters, after two warm-up runs."""
        config = {**(artifact.info.get("compile_config") or compile_config(OpenVINOConfig(), None)),
                  "PERF_COUNT": True}
        request = OpenVINORunner(Path(artifact.path), config).request(x.shape)
        feed = {0: np.ascontiguousarray(x, dtype=np.float32)}
        for _ in range(2):
            request.infer(feed)
        by_type = collections.Counter()
        for _ in range(runs):
            request.infer(feed)
            for p in request.profiling_info:
                if p.status == p.Status.EXECUTED:
                    by_type[p.node_type] += p.real_time.total_seconds() * 1000 / runs
        return dict(by_type)


class OpenVINORunner(Runner):
    """A graph compiled for the CPU once per input shape (static shapes run faster than a dynamic batch), with the
    compile config recorded at build (its cache directory makes a recompile a load)."""

    def __init__(self, onnx_path: Path, config: dict):
        ov = _import_openvino()
        self.core, self.path, self.config = ov.Core(), Path(onnx_path), dict(config)
        self.model = _read(self.core, self.path)
        self.requests = {}

    def request(self, shape: tuple):
        shape = tuple(shape)
        if shape not in self.requests:
            model = self.model.clone()
            model.reshape({model.inputs[0]: list(shape)})
            self.requests[shape] = _compile(self.core, model, self.config, self.path).create_infer_request()
        return self.requests[shape]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = self.request(x.shape).infer({0: x})[0]
        return np.array(out, dtype=np.float32)  # a copy: the request reuses its output tensor
