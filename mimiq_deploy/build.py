"""`mimiq-deploy build`: runnable artifacts from the exported graphs, and the model repository.

ONNX Runtime (CPU; CUDA EP where present) always; TensorRT engines where a GPU and the
`tensorrt` package are present; otherwise a message naming what is missing.
"""
import json
import shutil
from pathlib import Path
from string import Template

from .backends import BACKENDS
from .errors import MimiqError, atomic_write_json
from .export import EXPORT_DIR, FLOAT_ONNX, QDQ_ONNX, TEMPLATES, TRT_FLOAT_ONNX, TRT_ONNX, load_export_config

BUILD_FILE = "build.json"


def read_export_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / EXPORT_DIR / "export.json"
    if not path.exists():
        raise MimiqError(f"no exported graphs in {run_dir} ({path} missing): run `mimiq-deploy export {run_dir}` first")
    return json.loads(path.read_text())


def build(run_dir: Path, progress=print) -> dict:
    """Build every artifact the exported graphs allow; returns and writes run_dir/build.json."""
    run_dir = Path(run_dir)
    manifest = read_export_manifest(run_dir)
    cfg = load_export_config(None)
    cfg.__dict__.update(manifest["config"])
    exp = run_dir / EXPORT_DIR
    bits = manifest["bits"]
    ort = BACKENDS["onnxruntime"]
    artifacts, skipped = {}, dict(manifest.get("notes", {}))
    for provider in ort.providers():
        tag = "cpu" if provider == "CPUExecutionProvider" else "cuda"
        for name, onnx_file, precision in ((f"ort-{tag}-{bits}", QDQ_ONNX, f"{bits} QDQ"),
                                           (f"ort-{tag}-fp32", FLOAT_ONNX, "fp32")):
            info = ort.build(exp / onnx_file, exp / f"{Path(onnx_file).stem}.{tag}.opt.onnx", provider)
            artifacts[name] = {"backend": "onnxruntime", "provider": provider, "path": str(exp / onnx_file),
                               "precision": precision, "quantized": precision != "fp32", **info}
            progress(f"built {name}: integer kernels {info['integer_kernels'] or 'none'}")
        # The same QDQ graph with ORT's fusions off: plain QuantizeLinear/DequantizeLinear + float ops.
        # It separates what the exporter wrote from what the integer kernels of this CPU compute.
        artifacts[f"ort-{tag}-{bits}-unfused"] = {"backend": "onnxruntime", "provider": provider,
                                                  "path": str(exp / QDQ_ONNX), "precision": f"{bits} QDQ unfused",
                                                  "quantized": True, "optimization": "disabled", "reference": True}
    trt = BACKENDS["tensorrt"]
    ok, why = trt.available()
    if (exp / TRT_ONNX).exists():
        if ok:
            cache = exp / "trt_timing.cache"
            for name, onnx_file, precision in ((f"trt-{bits}", TRT_ONNX, manifest.get("notes", {}).get(
                    "tensorrt", f"{bits} QDQ, FP16 elsewhere")), ("trt-fp16", TRT_FLOAT_ONNX, "fp16")):
                plan = exp / f"{Path(onnx_file).stem}.plan"
                try:
                    info = trt.build(exp / onnx_file, plan, cfg.min_batch, cfg.opt_batch, cfg.max_batch,
                                     cfg.workspace_mib, cache)
                except MimiqError as e:  # the ONNX Runtime artifacts stand on their own
                    skipped[name] = str(e)
                    continue
                artifacts[name] = {"backend": "tensorrt", "path": str(plan), "precision": precision,
                                   "quantized": precision != "fp16", "weight_only": "weight-only" in precision, **info}
                progress(f"built {name} in {info['build_seconds']:.0f} s")
        else:
            skipped["tensorrt"] = f"TensorRT engines not built: {why}"
    for reason in skipped.values():
        progress(reason)
    write_model_repository(run_dir, manifest, artifacts, cfg)
    result = {"bits": bits, "artifacts": artifacts, "skipped": skipped}
    atomic_write_json(run_dir / BUILD_FILE, result)
    return result


def read_build(run_dir: Path) -> dict:
    path = Path(run_dir) / BUILD_FILE
    if not path.exists():
        raise MimiqError(f"no built artifacts in {run_dir}: run `mimiq-deploy build {run_dir}` first")
    return json.loads(path.read_text())


def write_model_repository(run_dir: Path, manifest: dict, artifacts: dict, cfg) -> Path:
    """An Inference-Server style repository: <model>/config.pbtxt and <model>/1/model.{onnx,plan}."""
    pre = manifest["pretrained_cfg"]
    base = (manifest.get("model_name") or "model").replace("-", "_").replace("/", "_") + "_" + manifest["bits"]
    values = {"max_batch": cfg.max_batch, "dims": ", ".join(str(d) for d in pre["input_size"]),
              "num_classes": pre.get("num_classes", 1000), "mean": pre.get("mean"), "std": pre.get("std"),
              "input_size": pre.get("input_size")}
    repo = Path(run_dir) / "model_repository"
    tmp = repo.with_name("model_repository.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    entries = [(f"{base}_onnx", "onnxruntime.pbtxt", Path(run_dir) / EXPORT_DIR / QDQ_ONNX, "model.onnx",
                {"instance_kind": "KIND_AUTO"})]
    trt = artifacts.get(f"trt-{manifest['bits']}")
    if trt:
        entries.append((f"{base}_trt", "tensorrt_plan.pbtxt", Path(trt["path"]), "model.plan",
                        {"io_type": "TYPE_FP16" if cfg.fp16_io else "TYPE_FP32", "precision": trt["precision"]}))
    for name, template, src, dst, extra in entries:
        (tmp / name / "1").mkdir(parents=True)
        shutil.copy2(src, tmp / name / "1" / dst)
        text = Template((TEMPLATES / template).read_text()).substitute(name=name, **values, **extra)
        (tmp / name / "config.pbtxt").write_text(text)
    shutil.rmtree(repo, ignore_errors=True)
    tmp.rename(repo)
    return repo
