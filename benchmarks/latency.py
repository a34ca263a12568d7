"""CPU latency of this project's artifacts against what a user would pick instead -> LATENCY.md.

Per model (fmnist-vit, the embedded default; random-init deit_tiny / deit_small) and batch size:
- the FP32 twin (model_fp32.onnx of the export);
- ONNX Runtime's own `quantize_static` QDQ output of the same float graph (QDQ format, per-channel
  weights, its default int8 types and MinMax calibration on the same images as our students);
- ONNX Runtime's weight-only INT4 of the same float graph (`MatMulNBitsQuantizer`, block 32, symmetric);
- with nvidia-modelopt installed (the `peers` extra), ModelOpt's ONNX PTQ of the same float graph on the same
  images: INT8 (max), FP8 (max, simulated in ONNX Runtime) and INT4 weight-only (rtn_dq);
- this project's artifacts of `build` on this host (W8A8; W4A8 in 8-bit containers, packed INT4, w4a16; the
  A8 graphs also as the standard-ONNX graph of the same build, without the bias fused into the integer matmul),
  from PTQ students (calibration only, finetune epochs 0): fmnist-vit on 64 training images,
  deit on 8 Gaussian-noise images;
each in ONNX Runtime and in OpenVINO (when `openvino` is installed), all timed in one process in
interleaved rounds of back-to-back runs (bench.time_interleaved), 2 threads. Ratios are FP32 twin (ONNX Runtime)
p50 / p50.

With OpenVINO installed, the OpenVINO back end's own artifacts of the same builds (`ov-cpu-<bits>`: the graph
build rewrites for OpenVINO's int8 kernels, and `ov-cpu-fp32`, both compiled with the back end's settings: float
ops at f32) are timed in the same rounds, and a first table per model sets the two back ends side by side: each
artifact against its own engine's FP32 and against ONNX Runtime's. `--engines-only` times just those (no ORT
quantizers, no standard-ONNX duplicates).

    pip install -e '.[bench]'      # onnx-ir, which ORT's MatMulNBits quantizer imports ('.[openvino]' too, optionally)
    PYTHONPATH=. python benchmarks/latency.py --out benchmarks/LATENCY.md
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from mimiq_deploy.backends import BACKENDS
from mimiq_deploy.bench import SETTLE_S, TURN_S, profile_breakdown, time_interleaved
from mimiq_deploy.build import INPUT_NAME, build
from mimiq_deploy.backends.onnxruntime.encoding import DOT_PRODUCT_FLAGS, cpu_flags, host_encoding
from mimiq_deploy.io import atomic_write_text
from mimiq_deploy.export import ExportConfig, export_student
from mimiq_deploy.run_dir import FLOAT_ONNX, RunDir
from mimiq_deploy.finetune import ptq_student
from mimiq_deploy.quant import parse_bits


def teacher_and_images(name: str):
    if name == "fmnist-vit":
        from mimiq_deploy.data import fmnist_eval_dataset
        from mimiq_deploy.models import load_model
        teacher = load_model(name)
        ds = fmnist_eval_dataset(teacher.pretrained_cfg, split="train")
        return teacher, torch.stack([ds[i][0] for i in range(64)]), "64 Fashion-MNIST training images"
    import timm
    from mimiq_deploy.families import capture_attention
    teacher = capture_attention(timm.create_model(name, pretrained=False)).eval()
    return teacher, torch.randn(8, *teacher.pretrained_cfg["input_size"]), "8 Gaussian-noise images"


def ort_peers(fp32: Path, images: np.ndarray, out: Path) -> dict:
    """ONNX Runtime's own quantizers on the same float graph."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.it, None)

    peers = {}
    qdq = out / "ort_quantize_static.onnx"
    if not qdq.exists():
        quantize_static(str(fp32), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    peers["ORT quantize_static (QDQ int8)"] = qdq
    nbits = out / "ort_matmulnbits.onnx"
    if not nbits.exists():
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(str(nbits))
    peers["ORT MatMulNBits (INT4 weight-only)"] = nbits
    return peers


MODELOPT_MODES = (("int8", "max"), ("fp8", "max"), ("int4", "rtn_dq"))


def modelopt_peers(fp32: Path, images: np.ndarray, out: Path) -> dict:
    """NVIDIA ModelOpt's ONNX PTQ of the same float graph, calibrated on the same images, FP32 outside its Q/DQ
    (its default, FP16, is for TensorRT; ONNX Runtime's CPU provider runs FP16 ops slowly); {} without the `peers`
    extra. INT4 awq_clip is left out: ONNX Runtime's CPU provider refuses its block scales (RESULTS.md)."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        return {}
    peers = {}
    for mode, method in MODELOPT_MODES:
        graph = out / f"modelopt_{mode}_{method}.onnx"
        if not graph.exists():
            quantize(str(fp32), quantize_mode=mode, calibration_method=method, calibration_data={INPUT_NAME: images},
                     calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(graph))
        peers[f"ModelOpt {mode.upper()} ({method})"] = graph
    return peers


def openvino_sampler(path: Path, x: np.ndarray, threads: int):
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.inputs[0]: list(x.shape)})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    request.infer({0: x})

    def sample():
        t0 = time.perf_counter()
        request.infer({0: x})
        return (time.perf_counter() - t0) * 1000
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return sample, getattr(hint, "type_name", None) or str(hint)


def candidates(model: str, work: Path, bits_list: list[str], peers: bool = True) -> tuple:
    """{label: onnx path}: FP32 twin, ORT's quantizers (peers), this project's built artifacts; the calibration set;
    {label: standard-ONNX path} where the ORT graph holds ORT-only ops (what OpenVINO reads instead);
    {label: Artifact} of the OpenVINO back end's builds (run by its own runner)."""
    teacher, images, calib = teacher_and_images(model)
    torch.manual_seed(0)
    cands, portable, ov_arts = {}, {}, {}
    for bits in bits_list:
        run = work / model / bits
        if not (run / "build.json").exists():
            student = ptq_student(teacher, parse_bits(bits), images)
            export_student(student, run, ExportConfig(), progress=lambda m: None)
            build(run, progress=lambda m: None, backends=["onnxruntime", "openvino"])
        built = RunDir.of(run).read_build()
        if "FP32 twin" not in cands:
            cands["FP32 twin"] = run / "export" / FLOAT_ONNX
            if peers:
                cands.update(ort_peers(run / "export" / FLOAT_ONNX, images.numpy(), run))
                cands.update(modelopt_peers(run / "export" / FLOAT_ONNX, images.numpy(), run))
        for name, art in built.artifacts.items():
            if art.backend == "openvino":
                label = OV_FP32 if not art.quantized else f"mimiq {bits} (OpenVINO back end: {art.precision})"
                ov_arts.setdefault(label, art)
            if art.backend == "onnxruntime" and not art.reference and not name.endswith("fp32") \
                    and art.provider == "CPUExecutionProvider":
                if name.endswith("w4a16") and (not peers or any(k.endswith("w4a16") for k in cands)):
                    continue  # w4a8 and w4a4 students share one weight-only graph
                label = f"mimiq {name.removeprefix('ort-cpu-')} ({art.precision})"
                cands[label] = Path(art.path)
                if art.info.get("portable") and peers:  # the standard graph of the same build: what the bias fusion buys
                    portable[label] = Path(art.info["portable"])
                    cands[f"mimiq {name.removeprefix('ort-cpu-')} standard ONNX (bias Add separate)"] = portable[label]
    return cands, calib, portable, ov_arts


OV_FP32 = "FP32 twin (OpenVINO back end: f32)"


def engines_table(results: dict, cands: dict, ov_arts: dict, batches: list[int]) -> list[str]:
    """ONNX Runtime against OpenVINO, each back end's own artifacts: p50, x its own FP32, x ONNX Runtime's FP32."""
    rows = [("FP32 twin", "ONNX Runtime", "FP32 twin", "ONNX Runtime")]
    rows += [(label, "ONNX Runtime", "FP32 twin", "ONNX Runtime") for label in cands
             if label.startswith("mimiq") and "standard ONNX" not in label]
    if ov_arts:
        rows.append(("FP32 twin", "OpenVINO", "FP32 twin", "OpenVINO"))  # OpenVINO's defaults (bf16 where it can)
        rows += [(label, "OpenVINO", OV_FP32, "OpenVINO") for label in ov_arts]
    out = ["| engine | artifact | " + " | ".join(f"b{b} p50 ms | b{b} x own FP32 | b{b} x ORT FP32" for b in batches)
           + " |", "|---|---|" + "---|---|---|" * len(batches)]
    for label, engine, twin, twin_engine in rows:
        cells = []
        for b in batches:
            v, own, ort = (results.get(k) for k in ((label, engine, b), (twin, twin_engine, b),
                                                    ("FP32 twin", "ONNX Runtime", b)))
            if not isinstance(v, float):
                cells += [v or "-", "", ""]
                continue
            cells += [f"{v:.2f}", f"{own / v:.2f}x" if isinstance(own, float) else "", f"{ort / v:.2f}x"]
        name = "FP32 twin, OpenVINO's default precision hint" if (label, engine) == ("FP32 twin", "OpenVINO") \
            else label
        out.append(f"| {engine} | {name} | " + " | ".join(cells) + " |")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="fmnist-vit,deit_tiny_patch16_224,deit_small_patch16_224")
    ap.add_argument("--bits", default="w8a8,w4a8")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20, help="least samples per candidate at batch 1")
    ap.add_argument("--big-iters", type=int, default=5, help="samples per candidate at batches > 1")
    ap.add_argument("--seconds", type=float, default=1.0, help="least measured seconds per candidate and batch")
    ap.add_argument("--work", type=Path, default=Path("runs/latency"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/LATENCY.md"))
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--engines-only", action="store_true",
                    help="time only the FP32 twin and this project's artifacts (no ORT quantizers, no standard-ONNX "
                         "duplicates): the ONNX Runtime vs OpenVINO table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ort_backend = BACKENDS["onnxruntime"]
    try:
        import openvino
        ov_note = f"OpenVINO {openvino.__version__}"
    except ImportError:
        openvino = None
        ov_note = "OpenVINO skipped: the `openvino` package is not installed (pip install mimiq-deploy[openvino])"
    if args.no_openvino:
        openvino, ov_note = None, "OpenVINO skipped: --no-openvino"
    import onnxruntime
    flags = cpu_flags()
    dot = sorted(set(DOT_PRODUCT_FLAGS) & flags)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    lines = ["# CPU latency: this project's artifacts against the usual alternatives", "",
             f"Generated by `PYTHONPATH=. python {' '.join(sys.argv)}`.", "",
             f"- CPU: {cpu}, {os.cpu_count()} logical cores; "
             f"VNNI / dot product: {', '.join(dot) if dot else 'none'}; "
             f"avx512f {'yes' if 'avx512f' in flags else 'no'}, avx2 {'yes' if 'avx2' in flags else 'no'}, "
             f"avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}.",
             f"- Host encoding chosen by `build`: {host_encoding()[0]} ({host_encoding()[1]}).",
             f"- ONNX Runtime {onnxruntime.__version__} (CPU EP, ORT_ENABLE_ALL); {ov_note}; {args.threads} threads each.",
             f"- Load average (1 min) when the run began: {os.getloadavg()[0]:.1f} on {os.cpu_count()} logical cores "
             "(other jobs make absolute times noisy); "
             "every candidate was timed in the same process in interleaved rounds, so the ratios are the figures "
             f"to read. Each turn runs one candidate back to back: {SETTLE_S} s of uncounted runs, then {TURN_S} s of "
             f"counted ones (in the fastest candidate's run time; at least 3 runs). p50 at batch 1 over at least "
             f"{args.iters} runs and {args.seconds} s per candidate; at larger batches over at least "
             f"{args.big_iters} runs and {args.seconds} s, after one warm-up run.",
             "- x: FP32 twin in ONNX Runtime p50 / candidate p50 (> 1: faster than FP32).", ""]
    profiles = []
    for model in args.models.split(","):
        cands, calib, portable, ov_arts = candidates(model, args.work, args.bits.split(","),
                                                     peers=not args.engines_only)
        ov_arts = ov_arts if openvino else {}
        shape = tuple(onnx.load(str(cands["FP32 twin"])).graph.input[0].type.tensor_type.shape.dim)[1:]
        shape = tuple(d.dim_value for d in shape)
        results, precisions = {}, {}
        for b in (int(v) for v in args.batches.split(",")):
            x = np.random.default_rng(0).standard_normal((b, *shape)).astype(np.float32)
            samplers = {}
            for label, path in cands.items():
                samplers[(label, "ONNX Runtime")] = ort_backend.load(path, threads=args.threads).sampler(x)
                already = label not in portable and path in portable.values()  # OpenVINO runs this graph already
                if openvino and not already and not (args.engines_only and label != "FP32 twin"):
                    try:
                        ov_path = portable.get(label, path)
                        samplers[(label, "OpenVINO")], precisions[label] = openvino_sampler(ov_path, x, args.threads)
                    except Exception as e:  # an op OpenVINO does not import: say so in the table
                        results[(label, "OpenVINO", b)] = f"fails: {str(e).splitlines()[0][:80]}"
            for label, art in ov_arts.items():
                samplers[(label, "OpenVINO")] = BACKENDS["openvino"].runner(art).sampler(x)
            print(f"{model} batch {b}: timing {len(samplers)} candidates", flush=True)
            big = b > 1  # long runs: fewer samples, unless they are short (--seconds)
            # Each turn runs one candidate back to back, as a deployed model runs (bench.turn_sizes). Alternating
            # every single run measured deit_tiny W8A8 at 1.88x FP32 (b32), and 2.10x alone (LATENCY.md).
            times = time_interleaved(samplers, warmup=1 if big else 2, iters=args.big_iters if big else args.iters,
                                     min_seconds=args.seconds)
            for (label, engine), t in times.items():
                results[(label, engine, b)] = float(np.percentile(t, 50))
            for label in cands:
                if label.startswith(("mimiq w8a8", "mimiq w4a8", "FP32", "ORT quantize_static", "ModelOpt INT8")) \
                        and not args.engines_only:
                    prof = ort_backend.profile_graph(cands[label], x, threads=args.threads, runs=5)
                    profiles.append((model, label, b, profile_breakdown(prof)))
        batches = [int(v) for v in args.batches.split(",")]
        lines += [f"## {model} (PTQ students calibrated on {calib})", "",
                  "ONNX Runtime against OpenVINO, each back end's own `build` artifacts (x own FP32: over the same "
                  "engine's FP32 twin, compiled with the same settings):", "",
                  *engines_table(results, cands, ov_arts, batches), "", "Every candidate:", "",
                  "| candidate | engine | " + " | ".join(f"b{b} p50 ms | b{b} x" for b in batches) + " |",
                  "|---|---|" + "---|---|" * len(batches)]
        for label in [*cands, *ov_arts]:
            for engine in ("ONNX Runtime", "OpenVINO") if openvino else ("ONNX Runtime",):
                if label in ov_arts and engine != "OpenVINO" or not any((label, engine, b) in results
                                                                        for b in batches):
                    continue  # the OpenVINO back end's artifacts run in OpenVINO; nothing timed: no row
                cells = []
                for b in batches:
                    v, ref = results.get((label, engine, b)), results[("FP32 twin", "ONNX Runtime", b)]
                    cells += [f"{v:.2f}", f"{ref / v:.2f}x"] if isinstance(v, float) else [v or "-", ""]
                eng = engine + (f" ({precisions[label]})" if engine == "OpenVINO" and label in precisions else "")
                lines.append(f"| {label} | {eng} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [] if args.engines_only else [
              "## Where the time goes (ONNX Runtime profiler, share of kernel time by op group)", "",
              "| model | candidate | batch | kernel ms | shares |", "|---|---|---|---|---|"]
    for model, label, b, p in profiles:
        shares = ", ".join(f"{g} {v:.0f}%" for g, v in p["by_group"].items() if v >= 1)
        lines.append(f"| {model} | {label} | {b} | {p['total_ms']:.1f} | {shares} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
