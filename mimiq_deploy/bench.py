"""`mimiq-deploy bench`: latency percentiles and throughput of each artifact and its float twin,
and where the time goes (ONNX Runtime's profiler, time by op type).

All artifacts are timed in one process, in interleaved rounds, so that a shared or throttling host slows
them alike and their ratios hold. A round gives each artifact a turn of back-to-back runs, as a deployed
model runs: SETTLE_S seconds of uncounted runs, then TURN_S seconds of counted ones. ONNX Runtime is
timed with a wall clock around the call (Runner.sampler); TensorRT with CUDA events on its stream. Warm-up runs come
first and are not counted.
"""
import math

import numpy as np

from .backends import BACKENDS
from .export import BenchConfig
from .run_dir import BenchRecord, BenchRow, Preprocessing, Profile, RunDir, Speedup

OP_GROUPS = {  # profile shares are reported per op type and per group
    "integer matmul": ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearConv",
                       "DynamicQuantizeMatMul"),
    "INT4 weight-only matmul": ("MatMulNBits",),
    "float matmul / conv": ("MatMul", "FusedMatMul", "Gemm", "Conv", "NchwcConv"),
    "Q/DQ": ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
    "LayerNorm": ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"),
    "softmax": ("Softmax",),
    "GELU": ("Gelu", "BiasGelu", "FastGelu", "Erf"),
    "reshapes": ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Concat", "Gather", "Slice", "Expand",
                 "Flatten", "Shape", "ReorderInput", "ReorderOutput"),
}


# Right after another session's run, switching costs for some milliseconds (its spinning worker threads hold a
# core, caches refill): a turn counted in runs stays inside that for a 10 ms model (benchmarks/LATENCY.md).
SETTLE_S, TURN_S = 0.1, 0.3


def turn_sizes(samplers: dict) -> tuple[int, int]:
    """(settle, per_round) runs for time_interleaved: SETTLE_S and TURN_S seconds of the fastest sampler, timed
    once each (after the warm-up)."""
    fastest = max(min(sample() for sample in samplers.values()) / 1000, 1e-4)
    return max(1, math.ceil(SETTLE_S / fastest)), max(3, math.ceil(TURN_S / fastest))


def op_group(op_type: str) -> str:
    return next((g for g, ops in OP_GROUPS.items() if op_type in ops), "other (Add, Mul, ...)")


def time_interleaved(samplers: dict, warmup: int = 10, iters: int = 100, min_seconds: float = 0.0,
                     per_round: int | None = None, settle: int | None = None) -> dict:
    """{name: [ms, ...]}: every sampler `warmup` times, then rounds of `per_round` calls of each in turn,
    until each has `iters` samples and `min_seconds` of measured time (at most 20 x iters). The first
    `settle` calls of each turn are not counted: the threads of the engine that ran before may still spin.
    Both default to turns sized in time (turn_sizes)."""
    for sample in samplers.values():
        for _ in range(warmup):
            sample()
    if per_round is None or settle is None:
        sized_settle, sized_per_round = turn_sizes(samplers)
        settle = sized_settle if settle is None else settle
        per_round = sized_per_round if per_round is None else per_round
    times = {name: [] for name in samplers}
    while any(len(t) < iters or (sum(t) < min_seconds * 1000 and len(t) < 20 * iters) for t in times.values()):
        for name, sample in samplers.items():
            times[name] += [sample() for _ in range(settle + per_round)][settle:]
    return times


def profile_breakdown(by_op: dict) -> dict:
    """ms per run by op type -> total_ms, by_op {op: share}, by_group {group: share} (shares in %)."""
    total = sum(by_op.values()) or 1.0
    groups = {}
    for op, ms in by_op.items():
        groups[op_group(op)] = groups.get(op_group(op), 0.0) + ms
    pct = lambda d: {k: 100.0 * v / total for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    return {"total_ms": total, "by_op": pct(by_op), "by_group": pct(groups)}


def bench(run_dir, batch_sizes: list[int], warmup: int = 10, iters: int = 100,
          min_seconds: float = BenchConfig.seconds, profile_runs: int = 10, progress=print) -> dict:
    rd = RunDir.of(run_dir)
    built = rd.read_build()
    shape = tuple(Preprocessing.from_timm(rd.read_export().pretrained_cfg).input_size)
    arts = {name: art for name, art in built.artifacts.items()
            if not art.reference}  # references are for correctness, not deployment candidates
    runners = {name: BACKENDS[art.backend].runner(art) for name, art in arts.items()}
    record = BenchRecord(skipped=built.skipped)
    for b in batch_sizes:
        x = np.random.default_rng(0).standard_normal((b, *shape)).astype(np.float32)
        times = time_interleaved({name: run.sampler(x) for name, run in runners.items()}, warmup, iters, min_seconds)
        for name, t in times.items():
            t = np.array(t)
            row = BenchRow(name, arts[name].precision, b, len(t), float(np.percentile(t, 50)),
                           float(np.percentile(t, 90)), float(np.percentile(t, 99)), float(b * 1000 / t.mean()))
            record.rows.append(row)
            progress(f"{name} batch {b}: p50 {row.p50_ms:.3f} ms, {row.throughput_ips:.0f} img/s")
        for name, art in arts.items():
            by_op = BACKENDS[art.backend].profile(art, x, profile_runs) if profile_runs else None
            if by_op is not None:  # a kernel-time breakdown where the engine has a profiler
                record.profiles.append(Profile(name, b, **profile_breakdown(by_op)))
    record.speedups = _speedups(record.rows, {name: art.float_twin for name, art in arts.items()})
    rd.write_bench(record)
    return record.to_json()


def _speedups(rows: list[BenchRow], twins: dict) -> list[Speedup]:
    """p50 of each float twin over its quantized sibling, per batch (>1: the integer model is faster)."""
    by = {(r.artifact, r.batch): r for r in rows}
    out = []
    for r in rows:
        twin = by.get((twins.get(r.artifact), r.batch))
        if twin:
            out.append(Speedup(r.artifact, twin.artifact, r.batch, twin.p50_ms / r.p50_ms))
    return out


def format_bench(report: BenchRecord | dict) -> str:
    """bench's table; takes the record or bench()'s return value."""
    report = BenchRecord.from_json(report) if isinstance(report, dict) else report
    lines = [f"{'artifact':<22} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>9}"]
    for r in report.rows:
        lines.append(f"{r.artifact:<22} {r.batch:>5} {r.p50_ms:9.3f} {r.p90_ms:9.3f} {r.p99_ms:9.3f} "
                     f"{r.throughput_ips:9.0f}")
    for s in report.speedups:
        lines.append(f"speed-up of {s.quantized} over {s.float} at batch {s.batch} (p50 ratio): "
                     f"{s.float_over_quantized_p50:.2f}x")
    for p in report.profiles:
        groups = ", ".join(f"{g} {v:.0f}%" for g, v in p.by_group.items() if v >= 0.5)
        lines.append(f"time by op type, {p.artifact} batch {p.batch} ({p.total_ms:.2f} ms of kernels): {groups}")
    for reason in report.skipped.values():
        lines.append(reason)
    return "\n".join(lines)
