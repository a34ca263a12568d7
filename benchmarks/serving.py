"""Serving throughput and latency of `mimiq-deploy serve` (a real Triton server) -> SERVING.md.

For a quantized artifact (default: the one `serve` picks) and its float twin, each behind its own
`mimiq-deploy serve` process on localhost: closed-loop clients (tritonclient, one client per thread) at
concurrency 1, 4, 16 and 64, sending batch-1 and batch-8 requests of preprocessed Fashion-MNIST test images, over
HTTP and over gRPC. Per level: throughput (images/s), p50 / p99 request latency, the batches Triton's dynamic
batcher formed (its statistics, read before and after the level), and the same Runner called in this process,
back to back, one caller, at the request's batch size: the serving overhead ratio is its images/s over the served
images/s (1.0: serving costs nothing; the client threads share the CPU with the server, as they would on one host).

Every request is accounted for: sent = answered + refused (with Triton's reason) + lost (a client still waiting
when the level's time was up); an answer is compared with the in-process logits of the same input, to the bit.
Each level is bounded by --seconds and --max-requests; the whole run by the number of levels.

    pip install -e '.[serve]'
    python benchmarks/serving.py RUN_DIR --out benchmarks/SERVING.md [--seconds 3] [--max-requests 2000]
"""
import argparse
import collections
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

CONCURRENCY = (1, 4, 16, 64)
BATCHES = (1, 8)
PROTOCOLS = ("http", "grpc")
POOL = 16                 # distinct request inputs per batch size
EXEC_BATCHES = (1, 8, 16, 32, 64)  # the Runner in-process at the batch sizes Triton may form
CPU_FLAGS = ("avx2", "avx512_vnni", "amx_int8")


def cpu_flags() -> list[str]:
    """What `grep -oE 'avx2|avx512_vnni|amx_int8' /proc/cpuinfo | sort -u` prints."""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        return sorted({f for f in CPU_FLAGS if f" {f}" in text or f"\t{f}" in text})
    return []


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Served:
    """`mimiq-deploy serve RUN --artifact NAME` in a child process."""

    def __init__(self, run_dir, artifact: str, model: str, log: Path, delay_us: int, instances: int,
                 timeout: float = 240):
        import tritonclient.http as thttp
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mimiq_deploy", "serve", str(run_dir), "--artifact", artifact,
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
             "--max-queue-delay-us", str(delay_us), "--instances", str(instances)],
            stdout=self.log, stderr=subprocess.STDOUT)
        client, deadline = thttp.InferenceServerClient(f"127.0.0.1:{self.http}"), time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"serve of {artifact} did not come up: see {log}")
                with contextlib.suppress(Exception):
                    if client.is_model_ready(model):
                        break
                time.sleep(0.5)
        finally:
            client.close()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def triton_stats(port: int, model: str) -> dict:
    import tritonclient.http as thttp
    client = thttp.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        s = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    return {"inferences": s["inference_count"], "executions": s["execution_count"],
            "batches": {b["batch_size"]: b["compute_infer"]["count"] for b in s["batch_stats"]}}


def run_level(served: Served, model: str, input_name: str, protocol: str, pool: list, refs: list,
              concurrency: int, seconds: float, max_requests: int, timeout_s: float) -> dict:
    """Closed-loop load: `concurrency` threads, each with its own client, until `seconds` or `max_requests`."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    kserve = thttp if protocol == "http" else tgrpc
    lock = threading.Lock()
    budget = {"left": max_requests}
    latencies, refused = [], collections.Counter()
    counts = collections.Counter()
    warmed = threading.Barrier(concurrency + 1)  # every client connected (one uncounted request each)
    go = threading.Barrier(concurrency + 1)      # Triton's statistics read: the clock starts
    stop_at = [float("inf")]  # set once every client is connected

    def request(client, idx):
        x = pool[idx]
        inp = kserve.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = kserve.InferRequestedOutput("logits")
        kwargs = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        return client.infer(model, [inp], outputs=[out], **kwargs).as_numpy("logits")

    def worker(t):
        if protocol == "http":
            client = thttp.InferenceServerClient(f"127.0.0.1:{served.http}", network_timeout=timeout_s,
                                                 connection_timeout=timeout_s)
        else:
            client = tgrpc.InferenceServerClient(f"127.0.0.1:{served.grpc}")
        try:
            with contextlib.suppress(Exception):
                request(client, t % len(pool))  # the connection, before the clock starts (not counted)
            try:
                warmed.wait(timeout_s)
                go.wait(timeout_s)
            except threading.BrokenBarrierError:
                return
            k = 0
            while time.monotonic() < stop_at[0]:
                with lock:
                    if budget["left"] <= 0:
                        break
                    budget["left"] -= 1
                    counts["sent"] += 1
                idx = (t * 5 + k) % len(pool)
                k += 1
                t0 = time.perf_counter()
                try:
                    logits = request(client, idx)
                except Exception as e:  # noqa: BLE001 - every refusal is counted with its reason
                    text = e.message() if callable(getattr(e, "message", None)) else str(e)
                    reason = (text or type(e).__name__).splitlines()[0][:120]
                    with lock:
                        refused[reason] += 1
                    continue
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    counts["answered"] += 1
                    counts["wrong"] += int(not np.array_equal(logits, refs[idx]))
                    latencies.append(ms)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(concurrency)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        warmed.wait(timeout_s * 2)
    before = triton_stats(served.http, model)
    with contextlib.suppress(threading.BrokenBarrierError):
        go.wait(timeout_s)
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join(max(0.1, stop_at[0] + timeout_s - time.monotonic()))
    wall = time.monotonic() - t0
    after = triton_stats(served.http, model)
    batch = pool[0].shape[0]
    lost = counts["sent"] - counts["answered"] - sum(refused.values())
    executions = after["executions"] - before["executions"]
    formed = {b: n - before["batches"].get(b, 0) for b, n in after["batches"].items()
              if n > before["batches"].get(b, 0)}
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"protocol": protocol, "batch": batch, "concurrency": concurrency, "sent": counts["sent"],
            "answered": counts["answered"], "refused": dict(refused), "lost": lost, "wrong": counts["wrong"],
            "seconds": wall, "images_per_s": counts["answered"] * batch / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "executions": executions,
            "mean_batch": (after["inferences"] - before["inferences"]) / executions if executions else 0.0,
            "max_batch": max(formed) if formed else 0, "formed": formed}


def in_process(runner, pool: list, seconds: float) -> dict:
    """The Runner called back to back in this process, one caller: images/s and p50 per call."""
    for x in pool[:3]:
        runner(x)
    times, t_end, k = [], time.monotonic() + seconds, 0
    while time.monotonic() < t_end or len(times) < 5:
        x = pool[k % len(pool)]
        t0 = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - t0)
        k += 1
    return {"images_per_s": len(times) * pool[0].shape[0] / sum(times), "p50_ms": 1000 * float(np.median(times))}


def nearest(sizes, batch: float) -> int:
    """The measured batch size nearest to `batch` (in ratio)."""
    return min(sizes, key=lambda b: abs(np.log(b / max(batch, 1.0))))


def formed_text(formed: dict) -> str:
    top = sorted(formed.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{b}×{n}" for b, n in top)


def write_report(out: Path, header: list[str], results: dict, baselines: dict, names: dict) -> None:
    lines = ["# Serving: `mimiq-deploy serve` under load", "", *header, ""]
    lines += ["## Serving overhead at concurrency 16", "",
              "In-process: the artifact's Runner called back to back by one caller, measured right before its server "
              "started. Overhead ratio: in-process images/s / served images/s (1.0: serving costs nothing; > 1: it "
              "costs), taken twice: at the request's batch size (what a caller without a server gets: below 1 where "
              "Triton's batcher merged requests into larger batches) and at the batch size Triton formed (the "
              "in-process size nearest to its mean batch: the cost of the server itself, transport, queueing, "
              "shared memory, the client threads on the same cores).", "",
              "| artifact | protocol | request batch | served images/s | p50 ms | Triton's mean batch | in-process "
              "images/s at the request batch | **ratio** | in-process images/s at Triton's batch | **ratio** |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for role, rows in results.items():
        for r in rows:
            if r["concurrency"] != 16:
                continue
            same, formed = baselines[role][r["batch"]], baselines[role][nearest(baselines[role], r["mean_batch"])]
            served = r["images_per_s"] or float("nan")
            lines.append(f"| {names[role]} | {r['protocol']} | {r['batch']} | {r['images_per_s']:.0f} | "
                         f"{r['p50_ms']:.1f} | {r['mean_batch']:.1f} | {same['images_per_s']:.0f} | "
                         f"**{same['images_per_s'] / served:.2f}** | {formed['images_per_s']:.0f} (b"
                         f"{nearest(baselines[role], r['mean_batch'])}) | **{formed['images_per_s'] / served:.2f}** |")
    lines += ["", "In-process, back to back, one caller (images/s at batch " + ", ".join(map(str, EXEC_BATCHES)) + "): "
              + "; ".join(f"{names[role]} " + ", ".join(f"{v['images_per_s']:.0f}" for v in base.values())
                          for role, base in baselines.items()) + "."]
    for role, rows in results.items():
        lines += ["", f"## {names[role]}", "",
                  "| protocol | request batch | concurrency | sent | answered | refused | lost | wrong | images/s | "
                  "p50 ms | p99 ms | executions | Triton's mean / max batch | most formed batches (size×count) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            refused = sum(r["refused"].values())
            lines.append(f"| {r['protocol']} | {r['batch']} | {r['concurrency']} | {r['sent']} | {r['answered']} | "
                         f"{refused} | {r['lost']} | {r['wrong']} | {r['images_per_s']:.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['executions']} | {r['mean_batch']:.1f} / {r['max_batch']} | "
                         f"{formed_text(r['formed'])} |")
        reasons = collections.Counter()
        for r in rows:
            reasons.update(r["refused"])
        if reasons:
            lines += ["", "Refused, by reason: " + "; ".join(f"{n}× {why}" for why, n in reasons.most_common())]
    sent = sum(r["sent"] for rows in results.values() for r in rows)
    answered = sum(r["answered"] for rows in results.values() for r in rows)
    refused = sum(sum(r["refused"].values()) for rows in results.values() for r in rows)
    lost = sum(r["lost"] for rows in results.values() for r in rows)
    wrong = sum(r["wrong"] for rows in results.values() for r in rows)
    lines += ["", "## Accounting", "",
              f"{sent} requests sent = {answered} answered + {refused} refused + {lost} lost; {wrong} answers "
              "differed from the in-process logits of the same input.", ""]
    out.write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", default=Path("runs/fmnist-w4a8"),
                        help="a run directory with built artifacts (mimiq-deploy quantize / build)")
    parser.add_argument("--artifact", default=None, help="the quantized artifact (default: the one serve picks)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "SERVING.md")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per level")
    parser.add_argument("--max-requests", type=int, default=2000, help="requests per level, at most")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one request may take")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--max-queue-delay-us", type=int, default=1000, help="serve's batcher delay")
    parser.add_argument("--instances", type=int, default=1, help="serve's model instances")
    args = parser.parse_args()

    from mimiq_deploy.build import ModelSignature
    from mimiq_deploy.data import load_fmnist
    from mimiq_deploy.preprocess import Preprocessor
    from mimiq_deploy.run_dir import RunDir
    from mimiq_deploy.serve import choose_artifact, load_runner, require_serving

    require_serving()
    rd = RunDir(args.run_dir)
    name, art, why = choose_artifact(rd, args.artifact)
    if not art.float_twin:
        raise SystemExit(f"{name} names no float twin to compare with")
    names = {"quantized": name, "float twin": art.float_twin}
    sig = ModelSignature.of_run(rd)
    pre = Preprocessor.of(sig)
    images = load_fmnist("test")[0].numpy()
    batches = [int(b) for b in args.batches.split(",")]
    pools = {b: [pre.normalize(images[i * b:(i + 1) * b]) for i in range(POOL)] for b in batches}
    load_1m = os.getloadavg()[0]
    started = time.time()
    logs = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    print(f"serve logs in {logs}", flush=True)

    results, baselines = {}, {}
    for role, artifact in names.items():
        a = rd.read_build().artifacts[artifact]
        runner = load_runner(a, os.cpu_count())  # what serve's one instance runs, with the same threads
        refs = {b: [runner(x) for x in pool] for b, pool in pools.items()}
        sizes = sorted(set(EXEC_BATCHES) | set(batches))
        baselines[role] = {b: in_process(runner, pools.get(b) or [pre.normalize(images[i * b:(i + 1) * b])
                                                                   for i in range(4)], args.seconds)
                           for b in sizes}
        del runner
        print(f"{artifact}: in-process " + ", ".join(f"b{b} {v['images_per_s']:.0f} images/s"
                                                   for b, v in baselines[role].items()), flush=True)
        served = Served(rd.root, artifact, sig.name, logs / f"serve-{artifact}.log", args.max_queue_delay_us,
                        args.instances)
        rows = []
        try:
            for protocol in args.protocols.split(","):
                for b in batches:
                    for c in (int(c) for c in args.concurrency.split(",")):
                        r = run_level(served, sig.name, sig.input_name, protocol, pools[b], refs[b], c,
                                      args.seconds, args.max_requests, args.timeout)
                        rows.append(r)
                        print(f"  {artifact} {protocol} b{b} c{c}: {r['images_per_s']:.0f} images/s, p50 "
                              f"{r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, mean batch {r['mean_batch']:.1f}, "
                              f"sent {r['sent']} = {r['answered']} + {sum(r['refused'].values())} refused + "
                              f"{r['lost']} lost, {r['wrong']} wrong", flush=True)
        finally:
            rc = served.stop()
        if rc != 0:
            raise SystemExit(f"serve of {artifact} exited with {rc} on SIGTERM")
        results[role] = rows

    import onnxruntime
    from importlib.metadata import version
    header = [
        f"Generated by `python benchmarks/serving.py {args.run_dir} --seconds {args.seconds:g} --max-requests "
        f"{args.max_requests}` ({date.today().isoformat()}, {time.time() - started:.0f} s).", "",
        f"- CPU flags (`grep -oE 'avx2|avx512_vnni|amx_int8' /proc/cpuinfo | sort -u`): "
        f"**{', '.join(cpu_flags()) or 'none'}**; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical cores; load average (1 min) at the start: {load_1m:.1f}.",
        f"- Served: `{names['quantized']}` ({art.precision}; {why}) and its float twin `{names['float twin']}`, "
        f"model `{sig.name}` of {args.run_dir}; each by `mimiq-deploy serve --max-queue-delay-us "
        f"{args.max_queue_delay_us} --instances {args.instances}` (max batch {sig.max_batch}), on 127.0.0.1.",
        f"- Triton Inference Server from nvidia-pytriton {version('nvidia-pytriton')} (Python backend; the Runner "
        f"runs in the serve process), tritonclient {version('tritonclient')}, "
        f"ONNX Runtime {onnxruntime.__version__}.",
        f"- Load: closed loop, one tritonclient client per thread, on the same {os.cpu_count()} cores as the server; "
        f"each level {args.seconds:g} s or {args.max_requests} requests, after one uncounted request per client; "
        f"requests from {POOL} distinct batches of Fashion-MNIST test images (preprocessed by the client), every "
        "answer compared with the in-process logits of the same batch, to the bit.",
    ]
    if load_1m > 0.5 * (os.cpu_count() or 1):
        header.append(f"- **The host was shared**: load average {load_1m:.1f} on {os.cpu_count()} cores when the run "
                      "began (other jobs): absolute figures are low and noisy, and a row's in-process and served "
                      "figures were measured a minute or two apart.")
    write_report(args.out, header, results, baselines, names)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
