"""`mimiq-deploy bench`: latency percentiles and throughput of each artifact and its float twin.

ONNX Runtime is timed with a wall clock around `run`; TensorRT with CUDA events on its stream.
Warm-up runs come first and are not counted.
"""
import json
import time
from pathlib import Path

import numpy as np

from .backends import BACKENDS
from .build import read_build
from .errors import atomic_write_json

BENCH_FILE = "bench.json"


def _time_ort(run, x, warmup, iters):
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _time_trt(run, x, warmup, iters):
    import torch
    xd = torch.from_numpy(x).cuda()
    for _ in range(warmup):
        run.device_call(xd)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(run.stream)
        run.device_call(xd)
        end.record(run.stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def bench(run_dir: Path, batch_sizes: list[int], warmup: int = 10, iters: int = 100, min_seconds: float = 2.0,
          progress=print) -> dict:
    run_dir = Path(run_dir)
    built = read_build(run_dir)
    rows = []
    for name, art in built["artifacts"].items():
        if art.get("reference"):  # a correctness reference, not a deployment candidate
            continue
        backend = BACKENDS[art["backend"]]
        run = backend.load(Path(art["path"]), provider=art.get("provider"))
        timer = _time_trt if art["backend"] == "tensorrt" else _time_ort
        shape = tuple(json.loads((run_dir / "export" / "export.json").read_text())["pretrained_cfg"]["input_size"])
        for b in batch_sizes:
            x = np.random.default_rng(0).standard_normal((b, *shape)).astype(np.float32)
            times = timer(run, x, warmup, iters)
            while sum(times) < min_seconds * 1000 and len(times) < 20 * iters:  # short runs: more samples
                times += timer(run, x, 0, iters)
            t = np.array(times)
            rows.append({"artifact": name, "precision": art["precision"], "batch": b, "iters": len(t),
                         "p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
                         "p99_ms": float(np.percentile(t, 99)), "throughput_ips": float(b * 1000 / t.mean())})
            progress(f"{name} batch {b}: p50 {rows[-1]['p50_ms']:.3f} ms, {rows[-1]['throughput_ips']:.0f} img/s")
    report = {"rows": rows, "speedups": _speedups(rows), "skipped": built.get("skipped", {})}
    atomic_write_json(run_dir / BENCH_FILE, report)
    return report


def _speedups(rows: list[dict]) -> list[dict]:
    """p50 of each float twin over its quantized sibling, per batch (>1: the integer model is faster)."""
    by = {(r["artifact"], r["batch"]): r for r in rows}
    out = []
    for r in rows:
        if not r["artifact"].endswith(("fp32", "fp16")):
            parts = r["artifact"].split("-")
            prefix = "-".join(parts[:2] if parts[0] == "ort" else parts[:1])  # ort-cpu, ort-cuda, trt
            twin = next((by[(a, r["batch"])] for a, b in by if b == r["batch"] and a.startswith(prefix)
                         and a.endswith(("fp32", "fp16"))), None)
            if twin:
                out.append({"quantized": r["artifact"], "float": twin["artifact"], "batch": r["batch"],
                            "float_over_quantized_p50": twin["p50_ms"] / r["p50_ms"]})
    return out


def format_bench(report: dict) -> str:
    lines = [f"{'artifact':<22} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>9}"]
    for r in report["rows"]:
        lines.append(f"{r['artifact']:<22} {r['batch']:>5} {r['p50_ms']:9.3f} {r['p90_ms']:9.3f} {r['p99_ms']:9.3f} "
                     f"{r['throughput_ips']:9.0f}")
    for s in report["speedups"]:
        lines.append(f"speed-up of {s['quantized']} over {s['float']} at batch {s['batch']} (p50 ratio): "
                     f"{s['float_over_quantized_p50']:.2f}x")
    for reason in report["skipped"].values():
        lines.append(reason)
    return "\n".join(lines)
