"""TensorRT: a strongly typed engine (`.plan`) from the FP16 QDQ graph; GPU only, imported lazily."""
import time
from pathlib import Path

import numpy as np

import torch

from ..errors import MimiqError
from ..io import atomic_write_bytes
from ..run_dir import TRT_FLOAT_ONNX, TRT_ONNX, Artifact
from .base import Backend, BuildContext, RepositoryEntry


def _import_tensorrt():
    try:
        import tensorrt as trt
        return trt
    except ImportError:
        return None


class TensorRTBackend(Backend):
    name = "tensorrt"
    title = "TensorRT"
    conformance = "tensorrt"
    graphs = (TRT_ONNX, TRT_FLOAT_ONNX)

    def build_artifacts(self, ctx: BuildContext) -> tuple[dict, dict, dict]:
        """Engines of the FP16 QDQ graph and of its float twin; one that fails is skipped with its reason."""
        exp, bits, cfg = ctx.run_dir.export_dir, ctx.export.bits, ctx.config
        artifacts, skipped = {}, {}
        cache = exp / "trt_timing.cache"
        precision = ctx.export.notes.get("tensorrt", f"{bits} QDQ, FP16 elsewhere")
        for name, onnx_file, precision in ((f"trt-{bits}", TRT_ONNX, precision), ("trt-fp16", TRT_FLOAT_ONNX, "fp16")):
            plan = exp / f"{Path(onnx_file).stem}.plan"
            try:
                info = self.build(exp / onnx_file, plan, cfg.min_batch, cfg.opt_batch, cfg.max_batch,
                                  cfg.workspace_mib, cache)
            except MimiqError as e:  # the ONNX Runtime artifacts stand on their own
                skipped[name] = str(e)
                continue
            quantized = precision != "fp16"
            artifacts[name] = Artifact(self.name, str(plan), precision, quantized,
                                       weight_only="weight-only" in precision, info=info,
                                       float_twin="trt-fp16" if quantized else None)
            ctx.progress(f"built {name} in {info['build_seconds']:.0f} s")
        return artifacts, skipped, {}

    def repository_entry(self, artifacts: dict, bits: str, config) -> RepositoryEntry | None:
        engine = next((a for a in artifacts.values() if a.backend == self.name and a.quantized), None)
        if engine is None:
            return None
        return RepositoryEntry("trt", "tensorrt_plan.pbtxt", Path(engine.path), "model.plan",
                               {"io_type": "TYPE_FP16" if config.fp16_io else "TYPE_FP32", "precision": engine.precision})

    def sampler(self, run, x: np.ndarray):
        """CUDA events on the engine's stream around the device call (input already on the GPU)."""
        xd = torch.from_numpy(x).cuda()

        def sample():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(run.stream)
            run.device_call(xd)
            end.record(run.stream)
            end.synchronize()
            return start.elapsed_time(end)
        return sample

    def available(self) -> tuple[bool, str]:
        if _import_tensorrt() is None:
            return False, "the tensorrt Python package is not installed (pip install tensorrt, from NVIDIA's index)"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU: TensorRT engines are built and run on NVIDIA GPUs only"
        return True, ""

    def build(self, onnx_path: Path, out_path: Path, min_batch=1, opt_batch=32, max_batch=64, workspace_mib=2048,
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
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise MimiqError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
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
            raise MimiqError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
        atomic_write_bytes(out_path, bytes(plan))
        if timing_cache:
            timing_cache.write_bytes(bytes(cache.serialize()))
        return {"engine": str(out_path), "build_seconds": time.time() - t0, "tensorrt": trt.__version__}

    def load(self, plan_path: Path, **_):
        """A callable running the engine on torch CUDA tensors (TensorRT's tensor-address API)."""
        trt = _import_tensorrt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        to_torch = {trt.float16: torch.float16, trt.float32: torch.float32}
        in_dtype, out_dtype = to_torch[engine.get_tensor_dtype(inp)], to_torch[engine.get_tensor_dtype(out)]
        stream = torch.cuda.Stream()

        def run_device(x: "torch.Tensor") -> "torch.Tensor":
            x = x.to("cuda", in_dtype).contiguous()
            context.set_input_shape(inp, tuple(x.shape))
            y = torch.empty(tuple(context.get_tensor_shape(out)), dtype=out_dtype, device="cuda")
            context.set_tensor_address(inp, x.data_ptr())
            context.set_tensor_address(out, y.data_ptr())
            context.execute_async_v3(stream.cuda_stream)
            return y

        def run(x: np.ndarray) -> np.ndarray:
            with torch.cuda.stream(stream):
                y = run_device(torch.from_numpy(x))
            stream.synchronize()
            return y.float().cpu().numpy()
        run.device_call = run_device
        run.stream = stream
        return run
