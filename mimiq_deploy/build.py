"""`mimiq-deploy build`: runnable artifacts from the exported graphs, and the model repository.

ONNX Runtime (CPU; CUDA EP where present) always; TensorRT engines where a GPU and the
`tensorrt` package are present; otherwise a message naming what is missing.
"""
import json
import shutil
from pathlib import Path
from string import Template

import onnx
from timm.data import ImageNetInfo

from .backends import BACKENDS
from .encoding import choose_encoding, encoding_of, host_graph
from .errors import MimiqError
from .io import atomic_write_json, read_json
from .export import (EXPORT_DIR, FLOAT_ONNX, QDQ_ONNX, TRT_FLOAT_ONNX, TRT_ONNX, W4A16_ONNX, read_onnx, save_onnx,
                     stored_export_config)
from .recipes import config_dir

BUILD_FILE = "build.json"


def read_export_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / EXPORT_DIR / "export.json"
    if not path.exists():
        raise MimiqError(f"no exported graphs in {run_dir} ({path} missing): run `mimiq-deploy export {run_dir}` first")
    return read_json(path)


def host_graphs(exp: Path, bits: str, encoding: str) -> dict:
    """The exported QDQ graph re-encoded for this host: {artifact suffix: (path, precision)}.

    Main graph: 8-bit tensors in `encoding`, INT4 weight codes in 8-bit containers (the same values), so
    that W4A8 runs on the integer kernels of W8A8. INT4 students also keep the packed-INT4 graph (smaller on
    disk) and the weight-only W4A16 graph (ORT's MatMulNBits, float activations)."""
    out = {}
    model = read_onnx(exp / QDQ_ONNX)
    packed = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    main = exp / f"model_qdq.{encoding}.onnx"
    save_onnx(host_graph(model, encoding, int4_weights_to_int8=True), main)
    out[""] = (main, f"{bits} QDQ, {encoding}" + (", INT4 codes in 8-bit containers" if packed else ""))
    if packed:
        small = exp / f"model_qdq_int4.{encoding}.onnx"
        save_onnx(host_graph(read_onnx(exp / QDQ_ONNX), encoding, int4_weights_to_int8=False), small)
        if small.stat().st_size < main.stat().st_size:
            out["-int4"] = (small, f"{bits} QDQ, {encoding}, packed INT4 weights (smallest on disk)")
        else:
            small.unlink()
    if (exp / W4A16_ONNX).exists():
        out["w4a16"] = (exp / W4A16_ONNX, "w4a16 weight-only INT4 (MatMulNBits), float activations")
    return out


def build(run_dir: Path, progress=print, encoding: str | None = None) -> dict:
    """Build every artifact the exported graphs allow; returns and writes run_dir/build.json.

    encoding: "int8" / "uint8" forces the 8-bit encoding of the ONNX Runtime graph; None or "auto" lets
    an explicit `ort_int8` of the export config, then this host's CPU decide (encoding.py)."""
    run_dir = Path(run_dir)
    manifest = read_export_manifest(run_dir)
    cfg = stored_export_config(manifest["config"], f"{run_dir / EXPORT_DIR / 'export.json'} [config]")
    exp = run_dir / EXPORT_DIR
    bits = manifest["bits"]
    ort = BACKENDS["onnxruntime"]
    artifacts, skipped = {}, dict(manifest.get("notes", {}))
    chosen, enc_why = choose_encoding(encoding, cfg.ort_int8)
    progress(f"ONNX Runtime 8-bit encoding: {chosen} ({enc_why})")
    graphs = host_graphs(exp, bits, chosen)
    main_path = graphs[""][0]
    for provider in ort.providers():
        tag = "cpu" if provider == "CPUExecutionProvider" else "cuda"
        todo = [(f"ort-{tag}-{bits}{suffix}" if suffix != "w4a16" else f"ort-{tag}-w4a16", path, precision)
                for suffix, (path, precision) in graphs.items()]
        for name, onnx_file, precision in todo + [(f"ort-{tag}-fp32", exp / FLOAT_ONNX, "fp32")]:
            info = ort.build(onnx_file, exp / f"{onnx_file.stem}.{tag}.opt.onnx", provider)
            artifacts[name] = {"backend": "onnxruntime", "provider": provider, "path": str(onnx_file),
                               "precision": precision, "quantized": precision != "fp32",
                               "weight_only": name.endswith("w4a16"), **info}
            progress(f"built {name}: integer kernels {info['integer_kernels'] or 'none'}")
        # The same QDQ graph with ORT's fusions off: plain QuantizeLinear/DequantizeLinear + float ops.
        # It separates what the exporter wrote from what the integer kernels of this CPU compute.
        artifacts[f"ort-{tag}-{bits}-unfused"] = {"backend": "onnxruntime", "provider": provider,
                                                  "path": str(main_path), "precision": f"{bits} QDQ unfused",
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
    write_model_repository(run_dir, manifest, artifacts, cfg, main_path)
    result = {"bits": bits, "artifacts": artifacts, "skipped": skipped,
              "ort_encoding": {"encoding": chosen, "reason": enc_why, "stored": encoding_of(read_onnx(main_path))}}
    atomic_write_json(run_dir / BUILD_FILE, result)
    return result


def read_build(run_dir: Path) -> dict:
    path = Path(run_dir) / BUILD_FILE
    if not path.exists():
        raise MimiqError(f"no built artifacts in {run_dir}: run `mimiq-deploy build {run_dir}` first")
    return read_json(path)


PREPROCESSING_FILE = "preprocessing.json"
LABELS_FILE = "labels.txt"


def class_labels(pre: dict, num_classes: int) -> list[str] | None:
    """Class names for Triton's classification extension: the model's own, else timm's ImageNet names
    for an unchanged ImageNet head; None when unknown."""
    names = pre.get("label_names")
    if names and len(names) == num_classes:
        return list(names)
    if num_classes == pre.get("num_classes") == 1000:
        return ImageNetInfo().label_descriptions()
    return None


def preprocessing(pre: dict, num_classes: int, io_type: str, labels: bool) -> dict:
    """What a client must do to an image before sending it, in machine-readable form."""
    return {"input_name": "input", "input_dtype": io_type, "layout": "NCHW", "input_size": list(pre["input_size"]),
            "pixel_scale": 1 / 255, "mean": list(pre["mean"]), "std": list(pre["std"]),
            "normalize": "(pixel * pixel_scale - mean) / std, per channel",
            "interpolation": pre.get("interpolation"), "crop_pct": pre.get("crop_pct"),
            "crop_mode": pre.get("crop_mode"),
            "output_name": "logits", "num_classes": num_classes, "label_file": LABELS_FILE if labels else None}


def write_model_repository(run_dir: Path, manifest: dict, artifacts: dict, cfg, onnx_path: Path) -> Path:
    """An Inference-Server style repository: <model>/config.pbtxt and <model>/1/model.{onnx,plan}, with
    <model>/preprocessing.json (mean, std, input size, layout) and <model>/labels.txt where the classes are known."""
    pre = manifest["pretrained_cfg"]
    num_classes = manifest.get("num_classes") or pre.get("num_classes", 1000)
    labels = class_labels(pre, num_classes)
    base = (manifest.get("model_name") or "model").replace("-", "_").replace("/", "_") + "_" + manifest["bits"]
    values = {"max_batch": cfg.max_batch, "dims": ", ".join(str(d) for d in pre["input_size"]),
              "num_classes": num_classes,
              "label_filename": f'\n    label_filename: "{LABELS_FILE}"' if labels else ""}
    repo = Path(run_dir) / "model_repository"
    tmp = repo.with_name("model_repository.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    entries = [(f"{base}_onnx", "onnxruntime.pbtxt", onnx_path, "model.onnx",
                {"instance_kind": "KIND_AUTO", "io_type": "TYPE_FP32"})]
    trt = artifacts.get(f"trt-{manifest['bits']}")
    if trt:
        entries.append((f"{base}_trt", "tensorrt_plan.pbtxt", Path(trt["path"]), "model.plan",
                        {"io_type": "TYPE_FP16" if cfg.fp16_io else "TYPE_FP32", "precision": trt["precision"]}))
    templates = config_dir("export") / "templates"
    for name, template, src, dst, extra in entries:
        (tmp / name / "1").mkdir(parents=True)
        shutil.copy2(src, tmp / name / "1" / dst)
        text = Template((templates / template).read_text()).substitute(name=name, **values, **extra)
        (tmp / name / "config.pbtxt").write_text(text)
        io_type = "float16" if extra["io_type"] == "TYPE_FP16" else "float32"
        pre_json = preprocessing(pre, num_classes, io_type, bool(labels))
        (tmp / name / PREPROCESSING_FILE).write_text(json.dumps(pre_json, indent=2) + "\n")
        if labels:
            (tmp / name / LABELS_FILE).write_text("\n".join(labels) + "\n")
    shutil.rmtree(repo, ignore_errors=True)
    tmp.rename(repo)
    return repo
