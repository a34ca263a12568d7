"""TensorRT: a strongly typed engine (`.plan`) from the FP16 QDQ graph; GPU only, imported lazily.

TensorRT 11 builds only strongly typed networks (no precision flags): precision comes from the graph, so export
writes an FP16 QDQ graph (LayerNorm and softmax kept FP32) and its FP16 float twin. INT4 is weight-only and
block-wise; there are no INT4 activation kernels, so w*a4 is not exported for it (the note says so).
"""
import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto
from onnxconverter_common import float16

from ...errors import MimiqError
from ...io import atomic_write_bytes
from ...onnx_graph import constants, copy_model, read_onnx
from ...qdq import lower_fake_quant
from ...qdq_rules import FP8, QDQ, is_weight_dq, zero_point_type
from ...run_dir import Artifact
from ..base import Backend, BuildContext, BuildResult, ExportContext, ExportedGraphs, RepositoryEntry, Runner, template
from .attention import AttentionBlock, EngineAttention, EngineLayer, attention_blocks, engine_layers, table_lines

TRT_ONNX = "model_qdq_fp16.onnx"      # FP16 QDQ graph for TensorRT (strongly typed)
TRT_FLOAT_ONNX = "model_fp16.onnx"    # its float twin


@dataclasses.dataclass
class TensorRTConfig:
    """[tensorrt] of the export config."""
    fp16_io: bool = True           # the TensorRT graph takes and returns FP16
    workspace_mib: int = 2048      # builder workspace
    LEGACY = {"fp16_io": "fp16_io", "workspace_mib": "workspace_mib"}  # flat keys of earlier configs


def to_fp16(model: onnx.ModelProto, fp16_io: bool) -> onnx.ModelProto:
    """FP16 compute for TensorRT's strongly typed networks; LayerNorm and softmax stay FP32."""
    block = list(float16.DEFAULT_OP_BLOCK_LIST) + ["LayerNormalization", "Softmax"]
    del model.graph.value_info[:]  # stale FP32 types; the converter infers them afresh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(model, keep_io_types=not fp16_io, op_block_list=block,
                                                disable_shape_infer=False)


def _import_tensorrt():
    try:
        import tensorrt as trt
        return trt
    except ImportError:
        return None


class TensorRTBackend(Backend):
    name = "tensorrt"
    title = "TensorRT"
    config_class = TensorRTConfig
    graphs = (TRT_ONNX, TRT_FLOAT_ONNX)
    packages = ("tensorrt",)

    def export_graphs(self, ctx: ExportContext) -> ExportedGraphs:
        qc, table = ctx.quant, ctx.config.backend(self.name)
        if qc.act_bits == 4:
            return ExportedGraphs(note=f"{qc.name} not built for TensorRT: it has no INT4 activation kernels; "
                                       "deployable there are w4a8 (INT4 weight-only) and w8a8")
        weight_only = qc.weight_bits == 4
        qdq = lower_fake_quant(copy_model(ctx.placeholders), ctx.config.int4_block_size, weight_only=weight_only)
        graphs = {TRT_ONNX: to_fp16(qdq, table.fp16_io), TRT_FLOAT_ONNX: to_fp16(copy_model(ctx.float_model),
                                                                                 table.fp16_io)}
        note = f"{qc.name} runs in TensorRT as INT4 weight-only (w4a16): activations in FP16" if weight_only else None
        return ExportedGraphs(graphs, checked=(TRT_ONNX,), note=note)

    def own_violations(self, model: onnx.ModelProto) -> list[str]:
        """int8 with zero point 0 only, FP8 as E4M3FN only, no INT4 activations, INT4 weights block-wise."""
        consts, problems = constants(model), []
        for node in (n for n in model.graph.node if n.op_type in QDQ and n.domain in ("", "ai.onnx")):
            zp_type = zero_point_type(node, consts)
            if zp_type == TensorProto.UINT8:
                problems.append(f"{node.name}: uint8 quantization (TensorRT takes int8 with zero point 0)")
            if zp_type in FP8 and zp_type != TensorProto.FLOAT8E4M3FN:
                problems.append(f"{node.name}: {TensorProto.DataType.Name(zp_type)} (TensorRT's FP8 is E4M3FN)")
            if node.op_type == "QuantizeLinear" and zp_type in (TensorProto.INT4, TensorProto.UINT4):
                problems.append(f"{node.name}: INT4 activation quantization (TensorRT has INT4 weights only)")
            if is_weight_dq(node, consts) and consts[node.input[0]].data_type == TensorProto.INT4:
                if not any(a.name == "block_size" and a.i > 0 for a in node.attribute):
                    problems.append(f"{node.name}: TensorRT INT4 weights must be block-wise (block_size)")
        return problems

    def analysis(self, model: onnx.ModelProto) -> dict:
        """Per attention block: whether TensorRT's fused MHA can run it quantized (attention.py)."""
        return {"attention": [b.to_json() for b in attention_blocks(model)]}

    def analysis_lines(self, analysis: dict) -> list[str]:
        if "attention" not in analysis:
            return []
        return ["TensorRT fused attention per block (a performance verdict, not a violation):",
                *table_lines([AttentionBlock.from_json(b) for b in analysis["attention"]])]

    def static_info(self, ctx: BuildContext) -> dict:
        """The fused-attention verdict of the graph the engine is built from (no GPU needed)."""
        return self.analysis(read_onnx(ctx.run_dir.graph(TRT_ONNX)))

    def report_lines(self, info: dict) -> list[str]:
        if "attention" not in info:  # build.json of earlier versions
            return []
        lines = table_lines([AttentionBlock.from_json(b) for b in info["attention"]])
        lines += [EngineAttention.from_json(v).line(k) for k, v in info.get("engine_attention", {}).items()]
        return [f"TensorRT fused attention per block ({TRT_ONNX}; static check, then the engines built):", "",
                *lines]

    def build_artifacts(self, ctx: BuildContext) -> BuildResult:
        """Engines of the FP16 QDQ graph and of its float twin; one that fails is skipped with its reason."""
        exp, bits, cfg = ctx.run_dir.export_dir, ctx.export.bits, ctx.config
        table = cfg.backend(self.name)
        result = BuildResult()
        cache = exp / "trt_timing.cache"
        precision = ctx.export.note(self.name) or f"{bits} QDQ, FP16 elsewhere"
        for name, onnx_file, precision in ((f"trt-{bits}", TRT_ONNX, precision), ("trt-fp16", TRT_FLOAT_ONNX, "fp16")):
            plan = exp / f"{Path(onnx_file).stem}.plan"
            try:
                info = self.build(exp / onnx_file, plan, min_batch=cfg.min_batch, opt_batch=cfg.opt_batch,
                                  max_batch=cfg.max_batch, workspace_mib=table.workspace_mib, timing_cache=cache)
            except MimiqError as e:  # the ONNX Runtime artifacts stand on their own
                result.skipped[name] = str(e)
                continue
            quantized = precision != "fp16"
            if quantized:  # what the engine fused, against the static verdict
                found = EngineAttention.compare(attention_blocks(read_onnx(exp / onnx_file)),
                                                [EngineLayer.from_json(x) for x in info.get("layers", [])])
                result.info.setdefault("engine_attention", {})[name] = found.to_json()
                ctx.progress(found.line(name))
            result.artifacts[name] = Artifact(self.name, str(plan), precision, quantized,
                                              weight_only="weight-only" in precision, info=info,
                                              float_twin="trt-fp16" if quantized else None)
            ctx.progress(f"built {name} in {info['build_seconds']:.0f} s")
        return result

    def repository_entry(self, artifacts: dict, export, config) -> RepositoryEntry | None:
        engine = next((a for a in artifacts.values() if a.backend == self.name and a.quantized), None)
        if engine is None:
            return None
        io_type = "TYPE_FP16" if config.backend(self.name).fp16_io else "TYPE_FP32"
        return RepositoryEntry("trt", template("tensorrt_plan.pbtxt"), Path(engine.path), "model.plan",
                               {"io_type": io_type, "precision": engine.precision}, io_type)

    def available(self) -> tuple[bool, str]:
        if _import_tensorrt() is None:
            return False, "the tensorrt Python package is not installed (pip install 'mimiq-deploy[tensorrt]')"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU: TensorRT engines are built and run on NVIDIA GPUs only"
        return True, ""

    def build(self, source: Path, out: Path, min_batch=1, opt_batch=32, max_batch=64, workspace_mib=2048,
              timing_cache: Path | None = None, **_) -> dict:
        ok, why = self.available()
        if not ok:
            raise MimiqError(f"cannot build a TensorRT engine: {why}")
        trt = _import_tensorrt()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise MimiqError(f"TensorRT cannot parse {source}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions and tactics (inspect)
        cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        inp = network.get_input(0)
        shape = tuple(inp.shape)[1:]
        profile.set_shape(inp.name, (min_batch, *shape), (opt_batch, *shape), (max_batch, *shape))
        config.add_optimization_profile(profile)
        t0 = time.time()
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise MimiqError(f"TensorRT failed to build an engine from {source} (see the log above)")
        atomic_write_bytes(out, bytes(plan))
        if timing_cache:
            timing_cache.write_bytes(bytes(cache.serialize()))
        return {"engine": str(out), "build_seconds": time.time() - t0, "tensorrt": trt.__version__,
                "layers": [layer.to_json() for layer in self.inspect(bytes(plan))]}

    def inspect(self, plan: bytes) -> list[EngineLayer]:
        """A built engine's layers from its IEngineInspector: name, type, input precisions, tactic (fused MHA
        kernels are named _gemm_mha_v2 / _gemv_mha: EngineLayer.fused_attention)."""
        trt = _import_tensorrt()
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        inspector = engine.create_engine_inspector()
        return engine_layers(inspector.get_engine_information(trt.LayerInformationFormat.JSON))

    def runner(self, artifact: Artifact) -> "EngineRunner":
        return EngineRunner(Path(artifact.path))


class EngineRunner(Runner):
    """A TensorRT engine run on torch CUDA tensors (TensorRT's tensor-address API) on its own stream."""

    def __init__(self, plan_path: Path):
        trt = _import_tensorrt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        to_torch = {trt.float16: torch.float16, trt.float32: torch.float32}
        self.in_dtype = to_torch[self.engine.get_tensor_dtype(self.input)]
        self.out_dtype = to_torch[self.engine.get_tensor_dtype(self.output)]
        self.stream = torch.cuda.Stream()

    def device_call(self, x: "torch.Tensor") -> "torch.Tensor":
        """One run on a CUDA tensor, enqueued on the engine's stream (not synchronized)."""
        x = x.to("cuda", self.in_dtype).contiguous()
        self.context.set_input_shape(self.input, tuple(x.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype, device="cuda")
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, y.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        return y

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.cuda.stream(self.stream):
            y = self.device_call(torch.from_numpy(x))
        self.stream.synchronize()
        return y.float().cpu().numpy()

    def sampler(self, x: np.ndarray):
        """CUDA events on the engine's stream around the device call (input already on the GPU)."""
        xd = torch.from_numpy(x).cuda()

        def sample():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.device_call(xd)
            end.record(self.stream)
            end.synchronize()
            return start.elapsed_time(end)
        return sample
