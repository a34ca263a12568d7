"""PyTorch: the student's learned scales as a module of real integer kernels, in eager mode, under torch.compile
and as a torch.export program, beside the float twin (the student with quantization off).

It builds from student.pt, not from an exported graph. Per bit setting (kernels.py for the layers):
- `pt-<dev>-w8a8` / `-w4a8`: every projection (qkv, proj, fc1, fc2, head) on `torch._int_mm` (int8 x int8 -> int32)
  with the static per-tensor activation step and the per-channel weight steps, one fused rescale
  `addcmul(bias, acc, s_x * s_w)`; INT4 weight codes held in int8 (the values of the ONNX Runtime graph). The
  attention matmuls run in float on the fake-quantized operands (no batched int8 matmul in core PyTorch), the
  patch embedding in float on its fake-quantized weight: the values of the student, up to float rounding.
- `pt-<dev>-w4a16` (INT4-weight students): weight-only, float activations, PyTorch's int4pack kernels.
- `pt-<dev>-fp8` (fp8 students): every projection on `torch._scaled_mm` (E4M3FN x E4M3FN -> float32), the same
  scales and rescale as W8A8; where torch has no FP8 GEMM (CUDA before sm_89, older torch on the CPU) it is skipped.
- `-compiled` (torch.compile) and `-export` (torch.export, export/<name>.pt2, loadable without this package).
- `pt-cpu-fp32` (CUDA hosts: `pt-cuda-fp16`, `pt-cuda-bf16`): the float twins, with their own -compiled and
  -export variants: bench times each integer variant against the twin's same variant (compiled against compiled).
4-bit activations are skipped: PyTorch has no kernel for them.

Core ops rather than torchao: torchao is an optional install, its int8 dynamic-activation configs compute the
activation scale at run time (not the student's learned static scale) and its weight-only int4 configs choose
their own (asymmetric, group-wise) quantization parameters; reproducing the student needs its codes and scales
as they are, which core `aten._int_mm` and `aten._weight_int4pack_mm(_for_cpu)` take directly (the latter
are what torchao's int4 layouts call). So the back end needs torch only.

torch.compile mode: "default", by measurement (fmnist-vit W8A8 integer module, 2 busy AVX2 cores, torch 2.14.1,
interleaved p50): batch 1 eager 438 ms, "default" 276 ms, "max-autotune-no-cudagraphs" 318 ms; batch 32 eager 5561,
"default" 3804, "max-autotune-no-cudagraphs" 3933 ms. Max-autotune only autotunes the attention bmm (the int8 GEMM
stays an extern call to aten._int_mm in every mode) and took longer to compile (67 s against 43 s at batch 1);
"reduce-overhead" differs from default by CUDA graphs only. CUDA hosts use the same mode (not measured: no GPU
here). [pytorch] compile = "default" (or another mode) in the export config builds the -compiled artifacts; off by default.
"""
import dataclasses
import importlib.metadata
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ...errors import MimiqError
from ...io import atomic_write
from ...quant.convert import set_quant_enabled
from ...quant.student import load_student
from ...run_dir import Artifact, Preprocessing, RunDir
from ..base import Backend, BuildContext, BuildResult, RepositoryEntry, Runner
from .kernels import describe, fp8_gemm_available, integer_model

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass
class PyTorchConfig:
    """[pytorch] of the export config."""
    compile: str = "off"       # torch.compile mode of the -compiled artifacts ("default": the mode measured best,
                               # see above), or "off": none built. Off by default: compiling costs 40-70 s per
                               # artifact on a 2-core CPU, at build and again whenever verify / bench / serve load it
    export: bool = True        # the torch.export program of each quantized artifact (-export, export/<name>.pt2)
    build: bool = False        # opt in ([pytorch] build = true): its eager integer kernels and torch.export cost
                               # minutes per build, verify and bench on a 2-core CPU; the point of it is the GPU

    def __post_init__(self):
        if self.compile not in (*COMPILE_MODES, "off"):
            raise MimiqError(f"[pytorch] compile = {self.compile!r}: choose one of {', '.join(COMPILE_MODES)} "
                             "or \"off\"")


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_flags() -> list[str]:
    """The x86 dot-product features that decide whether integer GEMMs are fast (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return sorted({"avx2", "avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def float_twin_model(student_path: Path, device: str, dtype) -> torch.nn.Module:
    """The student with its quantizers off: the float model it was fine-tuned into."""
    model = load_student(student_path)
    set_quant_enabled(model, False)
    return model.to(device, dtype).eval()


def kernel_model(student_path: Path, mode: str, device: str, dtype, input_size) -> torch.nn.Module:
    return integer_model(load_student(student_path), mode, device, dtype, input_size)


def _precision(bits: str, mode: str, weight_bits: int, info: dict, dtype: str, device: str) -> str:
    kernels = info["kernels"]
    fallbacks = kernels.get("float linear (dequantized weight)", 0)
    if mode == "int":
        text = f"{bits} " + ("INT4 codes in int8, " if weight_bits < 8 else "") + \
            "int8 GEMMs (_int_mm), attention matmuls in float, patch-embedding conv in float"
    elif mode == "fp8":
        text = "fp8 E4M3FN GEMMs (_scaled_mm), attention matmuls in float, patch-embedding conv in float"
    else:
        kernel = "_weight_int4pack_mm" if device == "cuda" else "_weight_int4pack_mm_for_cpu"
        text = (f"{bits} weight-only INT4 ({kernel}), float activations and attention matmuls, "
                "patch-embedding conv in float")
    if fallbacks:
        text += f", {fallbacks} projection(s) in float (dequantized weight)"
    padded = sum("padded" in n or "rows appended" in n for n in info["layer_notes"].values())
    if padded and mode == "int":
        text += f", {padded} layer(s) padded for _int_mm"
    if dtype != "float32":
        text += f", float parts {SHORT[dtype].upper()}"
    return text


class PyTorchBackend(Backend):
    name = "pytorch"
    title = "PyTorch"
    config_class = PyTorchConfig
    packages = ("torch",)

    def wants(self, run_dir: RunDir) -> bool:
        """It builds from student.pt. Every bit setting export takes is a setting it answers for: the ones it has
        no kernel for (4-bit activations) are named in build.json's skipped with the reason, which returning False
        here would not record."""
        return run_dir.student.exists()

    def build_artifacts(self, ctx: BuildContext) -> BuildResult:
        rd, table = ctx.run_dir, ctx.config.backend(self.name)
        if not table.build:
            return BuildResult()
        student_path = rd.student
        qc = rd.read_student().quant
        input_size = list(Preprocessing.from_timm(ctx.export.pretrained_cfg).input_size)
        result = BuildResult(info={"torch": torch.__version__, "torchao": _version("torchao"),
                                   "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                   "cpu_flags": cpu_flags(), "compile_mode": table.compile,
                                   "devices": devices()})
        for device in devices():
            twins = {"float32": f"pt-{device}-fp32"} if device == "cpu" else \
                {"float16": f"pt-{device}-fp16", "bfloat16": f"pt-{device}-bf16"}
            for dtype, twin in twins.items():
                precision = f"{SHORT[dtype]} (the student, quantization off)"
                result.artifacts[twin] = Artifact(
                    self.name, str(student_path), f"{precision}, eager", False,
                    provider=device, info=self._info("float", "eager", device, dtype, input_size))
                ctx.progress(f"built {twin}")
                # the twin's own compiled / exported variants: each integer variant is timed against its like
                self._variants(ctx, result, table, twin, float_twin_model(student_path, device, DTYPES[dtype]),
                               precision, "float", device, dtype, input_size, {}, dict(quantized=False, provider=device))
            todo = []
            if qc.fp8:
                ok, why = fp8_gemm_available(device)
                if ok:
                    todo.append((qc.name, "fp8", "float16" if device == "cuda" else "float32"))
                else:
                    result.skipped[f"pt-{device}-fp8"] = f"PyTorch fp8 not built: {why}"
            elif qc.act_bits == 8:
                todo.append((qc.name, "int", "float16" if device == "cuda" else "float32"))
            else:
                result.skipped[f"pt-{device}-{qc.name}"] = (
                    f"PyTorch {qc.name} not built: PyTorch has no kernel for {qc.act_bits}-bit activations "
                    "(torch._int_mm takes int8; 4-bit codes in int8 would only simulate them, as the ONNX Runtime "
                    "artifacts already do)")
            if qc.weight_bits == 4:
                todo.append((f"w{qc.weight_bits}a16", "weight-only", "bfloat16" if device == "cuda" else "float32"))
            for bits, mode, dtype in todo:
                self._build_quantized(ctx, result, table, device, bits, mode, dtype, qc.weight_bits, input_size,
                                      twins[dtype])
        return result

    @staticmethod
    def _info(mode: str, variant: str, device: str, dtype: str, input_size, **extra) -> dict:
        return {"pt_mode": mode, "pt_variant": variant, "pt_device": device, "pt_dtype": dtype,
                "pt_input_size": list(input_size), **extra}

    def _build_quantized(self, ctx, result, table, device, bits, mode, dtype, weight_bits, input_size, twin):
        rd = ctx.run_dir
        name = f"pt-{device}-{bits}"
        model = kernel_model(rd.student, mode, device, DTYPES[dtype], input_size)
        layers = describe(model)
        precision = _precision(bits, mode, weight_bits, layers, dtype, device)
        common = dict(quantized=True, provider=device, weight_only=mode == "weight-only", float_twin=twin)
        result.artifacts[name] = Artifact(self.name, str(rd.student), f"{precision}, eager",
                                          info=self._info(mode, "eager", device, dtype, input_size, **layers),
                                          **common)
        ctx.progress(f"built {name}: {layers['kernels']}")
        self._variants(ctx, result, table, name, model, precision, mode, device, dtype, input_size, layers, common)

    def _variants(self, ctx, result, table, name, model, precision, mode, device, dtype, input_size, layers, common):
        """`name`-compiled (torch.compile) and `name`-export (torch.export, export/<name>-export.pt2) of the eager
        module `model`, each checked against it; a quantized variant's float twin is the twin's same variant where
        it was built."""
        rd = ctx.run_dir

        def twin_of(suffix: str) -> dict:
            twin = common.get("float_twin")
            return {**common, "float_twin": f"{twin}{suffix}"} if twin and f"{twin}{suffix}" in result.artifacts \
                else common
        example = torch.randn(2, *input_size, device=device).to(DTYPES[dtype])
        with torch.no_grad():
            reference = model(example)
        if table.compile == "off":
            result.skipped[f"{name}-compiled"] = "[pytorch] compile = \"off\" in the export config"
        elif device == "cpu" and not have_compiler():
            result.skipped[f"{name}-compiled"] = ("torch.compile not built: Inductor compiles C++ kernels on the CPU "
                                                  "and no C++ compiler (g++, c++, clang++) is on PATH")
        else:
            try:
                t0 = time.time()
                compiled = compile_module(model, table.compile)
                with torch.no_grad():
                    out = compiled(example)
                seconds = time.time() - t0
                _check_close(out, reference, "torch.compile", exact=False)
                result.artifacts[f"{name}-compiled"] = Artifact(
                    self.name, str(rd.student), f"{precision}, torch.compile ({table.compile})",
                    info=self._info(mode, "compiled", device, dtype, input_size, compile_mode=table.compile,
                                    compile_seconds=round(seconds, 1), **layers), **twin_of("-compiled"))
                ctx.progress(f"built {name}-compiled (torch.compile {table.compile}, {seconds:.0f} s)")
            except Exception as e:  # Inductor's own errors (no C++ compiler, an op it cannot lower, ...)
                result.skipped[f"{name}-compiled"] = f"torch.compile ({table.compile}) failed here: {_first_line(e)}"
        if not table.export:
            result.skipped[f"{name}-export"] = "[pytorch] export = false in the export config"
            return
        path = rd.export_dir / f"{name}-export.pt2"
        try:
            t0 = time.time()
            program = export_program(model, example)
            atomic_write(path, lambda tmp: _save_program(program, tmp))
            loaded = torch.export.load(str(path)).module()
            with torch.no_grad():
                _check_close(loaded(example), reference, "torch.export", exact=True)
            result.artifacts[f"{name}-export"] = Artifact(
                self.name, str(path), f"{precision}, torch.export",
                info=self._info(mode, "export", device, dtype, input_size, export_seconds=round(time.time() - t0, 1),
                                **layers), **twin_of("-export"))
            ctx.progress(f"built {name}-export: {path}")
        except Exception as e:  # torch.export's own errors (a graph break it cannot trace, ...)
            result.skipped[f"{name}-export"] = f"torch.export failed here: {_first_line(e)}"

    def runner(self, artifact: Artifact) -> "ModuleRunner":
        info = artifact.info
        device, dtype = info.get("pt_device", "cpu"), DTYPES[info.get("pt_dtype", "float32")]
        variant, mode = info.get("pt_variant", "eager"), info.get("pt_mode", "float")
        if device == "cuda" and not torch.cuda.is_available():
            raise MimiqError(f"{artifact.path} was built for CUDA and this host has no CUDA GPU")
        if variant == "export":
            if not Path(artifact.path).is_file():
                raise MimiqError(f"torch.export program not found: {artifact.path} (run `mimiq-deploy build` again)")
            module = torch.export.load(artifact.path).module()
        else:
            module = float_twin_model(Path(artifact.path), device, dtype) if mode == "float" else \
                kernel_model(Path(artifact.path), mode, device, dtype, info.get("pt_input_size"))
            if variant == "compiled":
                module = compile_module(module, info.get("compile_mode", "default"))
        return ModuleRunner(module, device, dtype)

    def repository_entry(self, artifacts: dict, export, config) -> RepositoryEntry | None:
        # None: Triton's PyTorch (libtorch) backend serves TorchScript, which a torch.export program is not (an
        # AOTInductor package is tied to the serving host's torch and CUDA build), and a Python-backend model would
        # need this package and a template of its own in export/templates/; ONNX Runtime's entry serves the same
        # integer model.
        return None

    def report_lines(self, info: dict) -> list[str]:
        if "torch" not in info:
            return []
        flags = ", ".join(info.get("cpu_flags") or []) or "none of avx2 / VNNI / AMX"
        return [f"PyTorch {info['torch']} back end: integer GEMMs on aten._int_mm (CPU capability "
                f"{info.get('cpu_capability')}, flags {flags}); torch.compile mode {info.get('compile_mode')}."]


def compile_module(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile with a dynamic batch (one graph for every batch size above 1)."""
    return torch.compile(module, mode=None if mode == "default" else mode, dynamic=True)


def export_program(module: torch.nn.Module, example: torch.Tensor):
    """The module as a torch.export program with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def _save_program(program, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.export.save(program, f)


def _check_close(out: torch.Tensor, reference: torch.Tensor, what: str, exact: bool) -> None:
    """exact: the same kernels run (torch.export), up to float rounding. Otherwise (torch.compile, whose fused
    float code rounds differently, so that an activation code may land one step over) the logits' cosine."""
    out, reference = out.float(), reference.float()
    err = (out - reference).abs().max().item()
    if exact and not torch.allclose(out, reference, rtol=1e-4, atol=1e-4):
        raise MimiqError(f"{what} gives other logits than the eager module (max abs difference {err:.3g})")
    cosine = torch.nn.functional.cosine_similarity(out, reference).min().item()
    if cosine < 0.999:
        raise MimiqError(f"{what} gives other logits than the eager module (cosine {cosine:.5f}, max abs "
                         f"difference {err:.3g})")


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]


class ModuleRunner(Runner):
    """A PyTorch module (eager, compiled or a loaded torch.export program): float32 NCHW numpy in, logits out."""

    def __init__(self, module, device: str = "cpu", dtype=torch.float32):
        self.module, self.device, self.dtype = module, device, dtype

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            y = self.module(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device, self.dtype))
        return y.float().cpu().numpy()

    def sampler(self, x: np.ndarray):
        """CPU: the base class's wall clock; CUDA: CUDA events around the call (input already on the GPU)."""
        if self.device != "cuda":
            return super().sampler(x)
        xd = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device, self.dtype)

        def sample():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.no_grad():
                start.record()
                self.module(xd)
                end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return sample


def have_compiler() -> bool:
    """Inductor on the CPU compiles C++: a compiler must be on PATH."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
