"""`mimiq-deploy serve` on a real Triton Inference Server (the `tritonserver` binary PyTriton ships), and the model
repository `build` writes, loaded by that binary.

One tiny run directory (fmnist-vit, TINY_FMNIST_RECIPE, W8A8; torch.compile off) and one server on it for the
module, on free localhost ports: concurrent HTTP and gRPC clients get, to the bit, what the same ONNX Runtime
artifact computes in this process; Triton's statistics show the batches its dynamic batcher formed; every bad
request gets its own error and the server answers the next one. Two more servers: one killed with SIGKILL, then
one started on its ports, which serves, and on SIGTERM answers the request in flight and exits 0.
Every wait is bounded; servers listen on 127.0.0.1 only and are stopped in finalizers.
"""
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton.triton", reason="needs the serve extra: pip install 'mimiq-deploy[serve]'")
import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.http as thttp  # noqa: E402
from PIL import Image  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import TINY_FMNIST_RECIPE  # noqa: E402
from mimiq_deploy.backends import BACKENDS  # noqa: E402
from mimiq_deploy.build import LABELS_FILE, ModelSignature, build  # noqa: E402
from mimiq_deploy.data import load_fmnist, normalize_uint8  # noqa: E402
from mimiq_deploy.export import export_config, export_student  # noqa: E402
from mimiq_deploy.finetune import finetune, load_finetune_recipe  # noqa: E402
from mimiq_deploy.preprocess import MAX_ENCODED_BYTES, Preprocessor  # noqa: E402
from mimiq_deploy.quant import parse_bits  # noqa: E402
from mimiq_deploy.quant.student import load_student  # noqa: E402
from mimiq_deploy.run_dir import (Artifact, BenchRecord, BenchRow, BuildRecord, RunDir)  # noqa: E402
from mimiq_deploy.serve import (EXTRA_HINT, WORKSPACE_PREFIX, choose_artifact, load_runner,  # noqa: E402
                                python_library_path)
from mimiq_deploy.synthesize import load_synthesis_recipe, synthesize  # noqa: E402

ARTIFACT = "ort-cpu-w8a8"
START_TIMEOUT_S = 180      # a cold start on two busy cores: imports, the artifact, Triton, the Python backend
CALL_TIMEOUT_S = 60


# --- the run directory and the servers ---

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, teacher) -> RunDir:
    root = tmp_path_factory.mktemp("serve")
    (root / "recipe.toml").write_text(TINY_FMNIST_RECIPE)
    rd = RunDir(root / "run")
    synthesize(teacher, "fmnist-vit", rd, load_synthesis_recipe(root / "recipe.toml", {}), progress=False)
    finetune(teacher, "fmnist-vit", None, rd, parse_bits("w8a8"), load_finetune_recipe(root / "recipe.toml", {}),
             progress=False)
    tables = {}
    if "pytorch" in BACKENDS:  # its torch.compile / torch.export builds take minutes here and are not served
        known = {f.name for f in dataclasses.fields(BACKENDS["pytorch"].config_class)}
        tables["pytorch"] = {k: v for k, v in {"compile": "off", "export": False}.items() if k in known}
    export_student(load_student(rd.student), rd, export_config(tables, "test"), progress=lambda m: None)
    build(rd, progress=lambda m: None)
    assert ARTIFACT in rd.read_build().artifacts
    return rd


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    """`mimiq-deploy serve` in a child process, its output in a log file."""

    def __init__(self, run_dir, log: Path, ports=None, *args):
        self.http, self.grpc, self.metrics = ports or free_ports(3)
        self.log_path = log
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "mimiq_deploy", "serve", str(run_dir.root), "--artifact", ARTIFACT,
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
               *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return self.text()[-n:]

    def http_client(self):
        return thttp.InferenceServerClient(f"127.0.0.1:{self.http}", connection_timeout=CALL_TIMEOUT_S,
                                           network_timeout=CALL_TIMEOUT_S)

    def grpc_client(self):
        return tgrpc.InferenceServerClient(f"127.0.0.1:{self.grpc}")

    def wait_ready(self, model: str, timeout: float = START_TIMEOUT_S) -> "Server":
        deadline = time.monotonic() + timeout
        client = self.http_client()
        try:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.tail()}"
                with contextlib.suppress(Exception):
                    if client.is_server_ready() and client.is_model_ready(model):
                        return self
                time.sleep(0.3)
        finally:
            client.close()
        raise AssertionError(f"serve not ready after {timeout} s:\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL past `timeout`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def sig(run_dir) -> ModelSignature:
    return ModelSignature.of_run(run_dir)


@pytest.fixture(scope="module")
def server(run_dir, sig, tmp_path_factory):
    s = Server(run_dir, tmp_path_factory.mktemp("server") / "serve.log", None, "--max-queue-delay-us", 2000)
    try:
        yield s.wait_ready(sig.name)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def reference(run_dir):
    """The served artifact's Runner in this process: what the server must answer, to the bit."""
    return load_runner(run_dir.read_build().artifacts[ARTIFACT])


@pytest.fixture(scope="module")
def images():
    return load_fmnist("test")[0][:64].numpy()  # uint8 (64, 1, 28, 28)


def _infer(client, module, model, name, array, datatype, class_count=0, **kw):
    inp = module.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    out = module.InferRequestedOutput("logits", class_count=class_count)
    if module is tgrpc:
        kw.setdefault("client_timeout", CALL_TIMEOUT_S)
    return client.infer(model, [inp], outputs=[out], **kw).as_numpy("logits")


def _png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _stats(server, model) -> dict:
    client = server.http_client()
    try:
        return client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()


# --- the model repository, loaded by the bundled tritonserver ---

def _bundled_tritonserver(tmp: Path):
    """The binary, its environment, and a backend folder holding the Python backend with this Python's stub."""
    from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path
    dist = get_root_module_path() / "tritonserver"
    backends = tmp / "backends"
    if not backends.exists():
        shutil.copytree(dist / "backends", backends)
        shutil.copy(get_stub_path(f"{sys.version_info.major}.{sys.version_info.minor}"),
                    backends / "python" / "triton_python_backend_stub")
    libs = [python_library_path(), str(get_libs_path()), os.environ.get("LD_LIBRARY_PATH")]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, libs)),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return [str(dist / "bin" / "tritonserver"), "--backend-directory", str(backends)], env


def _load_repository(repo: Path, tmp: Path, timeout: float = 60) -> tuple[int, str]:
    """tritonserver loading every model of `repo`, no endpoint: it exits 1 once a model failed to load."""
    cmd, env = _bundled_tritonserver(tmp)
    r = subprocess.run([*cmd, "--model-repository", str(repo), "--allow-http", "false", "--allow-grpc", "false",
                        "--allow-metrics", "false", "--exit-on-error", "true", "--exit-timeout-secs", "2"],
                       capture_output=True, text=True, env=env, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def _load_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("E") and "CudaDriverHelper" not in line]


BROKEN_CONFIGS = {  # what is changed in config.pbtxt -> what Triton says, before it looks for any backend
    "typo": (("max_batch_size:", "max_batchsize:"), "failed to read text proto"),
    "non-integer dim": (("dims: [ 1, 28, 28 ]", "dims: [ 1, 28, 28.5 ]"), "failed to read text proto"),
    "bad batching field": (("dynamic_batching { }", "dynamic_batching { max_queue_delay: 100 }"),
                           "failed to read text proto"),
    "batch above max": (("dynamic_batching { }", "dynamic_batching { preferred_batch_size: [ 128 ] }"),
                        "preferred size must be <= max batch size"),
}


def _onnx_entry(run_dir, sig, tmp: Path) -> Path:
    """A copy of the repository holding its ONNX Runtime model only."""
    repo = tmp / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(run_dir.model_repository / f"{sig.name}_onnx", repo / f"{sig.name}_onnx")
    return repo


def test_repository_configs_are_accepted_up_to_backend_loading(run_dir, sig, tmp_path):
    models = sorted(p.name for p in run_dir.model_repository.iterdir())
    assert f"{sig.name}_onnx" in models
    rc, log = _load_repository(run_dir.model_repository, tmp_path)
    errors = _load_errors(log)
    assert rc == 1 and errors, log[-3000:]
    for model in models:  # each model got as far as its backend, which only NVIDIA's containers have
        backend = {"onnx": "onnxruntime", "trt": "tensorrt"}.get(model.rsplit("_", 1)[1], model.rsplit("_", 1)[1])
        assert any(f"failed to load '{model}'" in e and f"unable to find backend library for backend '{backend}'"
                   in e for e in errors), (model, errors)
    assert all("unable to find backend library" in e for e in errors), errors


@pytest.mark.parametrize("broken", list(BROKEN_CONFIGS))
def test_a_broken_repository_config_fails_before_its_backend(run_dir, sig, tmp_path, broken):
    (old, new), message = BROKEN_CONFIGS[broken]
    repo = _onnx_entry(run_dir, sig, tmp_path)
    config = repo / f"{sig.name}_onnx" / "config.pbtxt"
    text = config.read_text()
    assert old in text, text
    config.write_text(text.replace(old, new, 1))
    rc, log = _load_repository(repo, tmp_path)
    errors = _load_errors(log)
    assert rc == 1 and any(message in e for e in errors), log[-3000:]
    assert not any("unable to find backend library" in e for e in errors), errors  # refused before that


STAND_IN = '''"""A Python stand-in for the ONNX Runtime backend: the model file run by onnxruntime, so that Triton
validates and serves the repository's config (names, dims, labels) as written."""
import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input, self.output = config["input"][0]["name"], config["output"][0]["name"]

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            logits = self.session.run([self.output], {self.input: x})[0]
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, logits)]))
        return out
'''


def _stand_in(repo: Path, sig) -> Path:
    model = repo / f"{sig.name}_onnx"
    config = model / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "onnxruntime"', 'backend: "python"'))
    (model / "1" / "model.py").write_text(STAND_IN)
    return config


def test_repository_config_serves_through_a_python_stand_in_backend(run_dir, sig, tmp_path, reference, images):
    """With the backend swapped for a Python one that runs the same ONNX file, Triton checks the rest of the
    config (dims, labels) and serves it: the config's tensor names are the graph's, its labels Triton's."""
    repo = _onnx_entry(run_dir, sig, tmp_path)
    _stand_in(repo, sig)
    cmd, env = _bundled_tritonserver(tmp_path)
    port = free_ports(1)[0]
    with open(tmp_path / "tritonserver.log", "w") as log:
        proc = subprocess.Popen([*cmd, "--model-repository", str(repo), "--http-address", "127.0.0.1",
                                 "--http-port", str(port), "--allow-grpc", "false", "--allow-metrics", "false",
                                 "--exit-timeout-secs", "5"], stdout=log, stderr=subprocess.STDOUT, env=env)
    client = thttp.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=CALL_TIMEOUT_S)
    model = f"{sig.name}_onnx"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(client, model):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "tritonserver.log").read_text()
            time.sleep(0.3)
        x = Preprocessor.of(sig).normalize(images[:3])
        top = _infer(client, thttp, model, sig.input_name, x, "FP32", class_count=1)
        labels = (run_dir.model_repository / model / LABELS_FILE).read_text().splitlines()
        assert [t[0].decode().split(":", 2)[2] for t in top] == [labels[i] for i in reference(x).argmax(1)]
    finally:
        client.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def _ready(client, model) -> bool:
    with contextlib.suppress(Exception):
        return client.is_model_ready(model)
    return False


def test_a_zero_dim_fails_triton_validation_with_the_stand_in(run_dir, sig, tmp_path):
    repo = _onnx_entry(run_dir, sig, tmp_path)
    config = _stand_in(repo, sig)
    config.write_text(config.read_text().replace("dims: [ 1, 28, 28 ]", "dims: [ 1, 0, 28 ]"))
    rc, log = _load_repository(repo, tmp_path)
    assert rc == 1 and any("dimension" in e and "must be integer >= 1" in e for e in _load_errors(log)), log[-3000:]


# --- serve: answers ---

def test_concurrent_http_and_grpc_answers_equal_in_process_onnxruntime(server, sig, reference, images):
    pre = Preprocessor.of(sig)
    before = _stats(server, sig.name)
    sizes = [1, 2, 3, 5, 8, 1, 4, 1]
    work = [(t, k) for t in range(16) for k in range(len(sizes))]  # 16 clients, 8 requests each
    answers, failures = {}, []

    def client_loop(t):
        module = thttp if t % 2 == 0 else tgrpc
        client = server.http_client() if module is thttp else server.grpc_client()
        try:
            for k, n in enumerate(sizes):
                start = (t * 7 + k * 3) % (len(images) - n)
                x = pre.normalize(images[start:start + n])
                try:
                    answers[(t, k)] = (x, _infer(client, module, sig.name, sig.input_name, x, "FP32"))
                except Exception as e:  # noqa: BLE001 - counted, reported below
                    failures.append((t, k, repr(e)))
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT_S * 2)
    assert not any(t.is_alive() for t in threads)
    assert not failures and set(answers) == set(work), failures[:3]  # every request answered
    for x, logits in answers.values():
        assert logits.dtype == np.float32 and np.array_equal(logits, reference(x))  # to the bit

    after = _stats(server, sig.name)
    assert after["inference_count"] - before["inference_count"] == 16 * sum(sizes)
    executions = after["execution_count"] - before["execution_count"]
    counts = [{b["batch_size"]: b["compute_infer"]["count"] for b in s["batch_stats"]} for s in (before, after)]
    batched = {size: n - counts[0].get(size, 0) for size, n in counts[1].items() if n > counts[0].get(size, 0)}
    assert executions < 16 * len(sizes), (executions, batched)  # requests shared executions
    assert any(size > 8 for size in batched), batched  # batches beyond the largest single request


def test_top_k_labels_over_http_and_grpc(server, sig, reference, images):
    x = Preprocessor.of(sig).normalize(images[:4])
    order = np.argsort(-reference(x), axis=1)
    for module, client in ((thttp, server.http_client()), (tgrpc, server.grpc_client())):
        try:
            top = _infer(client, module, sig.name, sig.input_name, x, "FP32", class_count=3)
        finally:
            client.close()
        assert top.shape == (4, 3)
        for row, expected in zip(top, order[:, :3]):
            fields = [entry.decode().split(":", 2) for entry in row]
            assert [int(f[1]) for f in fields] == list(expected)
            assert [f[2] for f in fields] == [sig.labels[i] for i in expected]


def test_raw_images_are_preprocessed_in_the_server_as_verify_does(server, sig, reference, images):
    """uint8 HWC and CHW tensors and PNG bytes give the logits of the eval pipeline's float tensor, to the bit;
    JPEG (lossy) and a larger RGB image those of the same preprocessing run here."""
    pre = Preprocessor.of(sig)
    evaluated = normalize_uint8(torch.from_numpy(images[:4]), sig.pre.mean, sig.pre.std).numpy()
    expected = reference(evaluated)
    client = server.http_client()
    try:
        chw = _infer(client, thttp, sig.name, "image", images[:4], "UINT8")
        hwc = _infer(client, thttp, sig.name, "image", np.ascontiguousarray(images[:4].transpose(0, 2, 3, 1)),
                     "UINT8")
        pngs = np.array([[_png(im[0])] for im in images[:4]], dtype=np.object_)
        png = _infer(client, thttp, sig.name, "image_bytes", pngs, "BYTES")
        assert np.array_equal(chw, expected) and np.array_equal(hwc, expected) and np.array_equal(png, expected)

        jpeg = _png(images[5, 0], "JPEG")
        served = _infer(client, thttp, sig.name, "image_bytes", np.array([[jpeg]], dtype=np.object_), "BYTES")
        assert np.array_equal(served, reference(pre.from_bytes(jpeg)[None]))
        rgb = np.asarray(Image.fromarray(images[6, 0]).convert("RGB").resize((40, 56)))
        served = _infer(client, thttp, sig.name, "image", rgb[None], "UINT8")
        assert np.array_equal(served, reference(pre.from_array(rgb)[None]))
    finally:
        client.close()


def test_health_metadata_and_metrics(server, sig):
    client = server.http_client()
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(sig.name)
        meta = client.get_model_metadata(sig.name)
        assert {i["name"] for i in meta["inputs"]} == {sig.input_name, "image", "image_bytes"}
        assert [o["name"] for o in meta["outputs"]] == [sig.output_name]
        config = client.get_model_config(sig.name)
        assert config["max_batch_size"] == sig.max_batch and "dynamic_batching" in config
        assert config["output"][0]["label_filename"] == LABELS_FILE
    finally:
        client.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=CALL_TIMEOUT_S) as r:
        metrics = r.read().decode()
    assert f'nv_inference_request_success{{model="{sig.name}"' in metrics


# --- serve: bad requests ---

def _bomb() -> bytes:
    """A PNG whose header says 5000 x 5000 pixels (and whose data is one byte): refused before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 5000, 5000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _f32(shape, fill=0.0, dtype=np.float32):
    return np.full(shape, fill, dtype)


BAD_REQUESTS = {  # id -> (protocol, input, array, datatype, what the error says)
    "wrong shape": ("http", "input", _f32((1, 3, 28, 28)), "FP32", "unexpected shape for input 'input'"),
    "wrong dtype": ("grpc", "input", _f32((1, 1, 28, 28), dtype=np.float64), "FP64", "data-type is 'FP64'"),
    "batch above max": ("http", "input", _f32((65, 1, 28, 28)), "FP32", "batch-size must be <= 64"),
    "NaN": ("http", "input", _f32((2, 1, 28, 28), np.nan), "FP32", "1568 NaN or infinite value(s)"),
    "inf": ("grpc", "input", _f32((1, 1, 28, 28), np.inf), "FP32", "784 NaN or infinite value(s)"),
    "empty batch": ("http", "input", _f32((0, 1, 28, 28)), "FP32", "byte size mismatch"),
    "empty image": ("http", "image_bytes", np.array([[b""]], dtype=np.object_), "BYTES", "encoded image is empty"),
    "oversized image": ("grpc", "image", np.zeros((1, 9000, 2, 1), np.uint8), "UINT8", "at most 8192 per side"),
    "oversized bytes": ("http", "image_bytes", np.array([[b"\x89PNG" + bytes(MAX_ENCODED_BYTES)]], dtype=np.object_),
                        "BYTES", f"more than the {MAX_ENCODED_BYTES} taken"),
    "decompression bomb": ("http", "image_bytes", np.array([[_bomb()]], dtype=np.object_), "BYTES",
                           "5000x5000 pixels"),
    "undecodable image": ("grpc", "image_bytes", np.array([[b"not an image"]], dtype=np.object_), "BYTES",
                          "cannot decode the image"),
    "five channels": ("http", "image", np.zeros((1, 28, 28, 5), np.uint8), "UINT8", "cannot tell the layout"),
    "float image": ("http", "image", _f32((1, 28, 28, 1)), "FP32", "data-type is 'FP32'"),
}


def _good_request_still_answered(server, sig, reference, images, module=thttp):
    x = Preprocessor.of(sig).normalize(images[10:12])
    client = server.http_client() if module is thttp else server.grpc_client()
    try:
        assert np.array_equal(_infer(client, module, sig.name, sig.input_name, x, "FP32"), reference(x))
    finally:
        client.close()
    assert server.proc.poll() is None


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_its_own_error_and_the_next_is_answered(server, sig, reference, images, case):
    protocol, name, array, datatype, message = BAD_REQUESTS[case]
    module = thttp if protocol == "http" else tgrpc
    client = server.http_client() if module is thttp else server.grpc_client()
    try:
        with pytest.raises(InferenceServerException) as e:
            _infer(client, module, sig.name, name, array, datatype)
    finally:
        client.close()
    assert message in e.value.message(), e.value.message()
    assert str(e.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), e.value.status()
    _good_request_still_answered(server, sig, reference, images, module)


def test_a_request_without_input_is_refused(server, sig, reference, images):
    client = server.http_client()
    try:
        with pytest.raises(InferenceServerException) as e:
            client.infer(sig.name, [])
    finally:
        client.close()
    assert "input" in e.value.message(), e.value.message()
    _good_request_still_answered(server, sig, reference, images)


def test_a_bad_request_batched_with_good_ones_fails_alone(server, sig, reference, images):
    """Concurrent good requests and NaN requests, batched together by Triton: each NaN request gets its error,
    each good one its logits."""
    x = Preprocessor.of(sig).normalize(images[:1])
    results = {}

    def send(k):
        client = server.http_client()
        try:
            data = _f32((1, 1, 28, 28), np.nan) if k % 3 == 0 else x
            results[k] = _infer(client, thttp, sig.name, sig.input_name, data, "FP32")
        except InferenceServerException as e:
            results[k] = e
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(k,)) for k in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT_S)
    assert len(results) == 24
    for k, r in results.items():
        if k % 3 == 0:
            assert isinstance(r, InferenceServerException) and "NaN" in r.message(), (k, r)
        else:
            assert isinstance(r, np.ndarray) and np.array_equal(r, reference(x)), (k, r)


def test_a_client_disconnecting_mid_request(server, sig, reference, images):
    body = json.dumps({"inputs": [{"name": "input", "shape": [64, 1, 28, 28], "datatype": "FP32",
                                   "data": [0.0] * (64 * 784)}]}).encode()
    with socket.create_connection(("127.0.0.1", server.http), timeout=CALL_TIMEOUT_S) as s:
        s.sendall(f"POST /v2/models/{sig.name}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
    with socket.create_connection(("127.0.0.1", server.http), timeout=CALL_TIMEOUT_S) as s:  # whole, then gone
        s.sendall(f"POST /v2/models/{sig.name}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    client = server.grpc_client()
    try:  # a gRPC client giving up before the answer (which on a fast host may still come first)
        with contextlib.suppress(InferenceServerException):
            big = Preprocessor.of(sig).normalize(images)
            _infer(client, tgrpc, sig.name, sig.input_name, big, "FP32", client_timeout=0.005)
    finally:
        client.close()
    _good_request_still_answered(server, sig, reference, images)
    _good_request_still_answered(server, sig, reference, images, tgrpc)


# --- serve: the process ---

def test_a_second_serve_on_a_taken_port_is_one_line(server, run_dir, cli):
    http, grpc = free_ports(2)
    r = cli("serve", run_dir.root, "--http-port", http, "--grpc-port", grpc, "--metrics-port", server.metrics,
            timeout=CALL_TIMEOUT_S * 3)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, (r.stdout[-2000:], r.stderr[-2000:])
    assert r.stderr.startswith(f"error: metrics port {server.metrics} on 127.0.0.1 is already in use"), r.stderr
    assert server.proc.poll() is None


def _serve_in_process(*args):
    """`mimiq-deploy serve ARGS` in this process (the refusals come before any server starts)."""
    from click.testing import CliRunner

    from mimiq_deploy.cli import main
    return CliRunner().invoke(main, ["serve", *map(str, args)])


def test_an_unknown_artifact_is_one_line_naming_the_built_ones(run_dir):
    r = _serve_in_process(run_dir.root, "--artifact", "ort-cpu-w9a9")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, (r.output, r.exception)
    assert "no artifact 'ort-cpu-w9a9'" in r.stderr and ARTIFACT in r.stderr and "ort-cpu-fp32" in r.stderr


def test_a_missing_serve_extra_is_one_line_naming_the_install(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)  # what `import pytriton.triton` then raises
    r = _serve_in_process(run_dir.root)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, (r.output, r.exception)
    assert EXTRA_HINT in r.stderr and "pytriton" in r.stderr, r.stderr


def test_kill_9_then_serve_again_serves_and_sigterm_drains(run_dir, sig, reference, images, tmp_path):
    """SIGKILL leaves Triton orphaned (it drains for its exit timeout, holding the ports): the next serve on the
    same ports waits for it, removes what it left, and serves. On SIGTERM that server answers the request it
    holds (its batcher waits up to 3 s to fill a batch), then exits 0 within 30 s."""
    first = Server(run_dir, tmp_path / "first.log")
    try:
        first.wait_ready(sig.name)
        first.proc.kill()
        first.proc.wait(10)
    finally:
        first.stop()
    second = Server(run_dir, tmp_path / "second.log", (first.http, first.grpc, first.metrics),
                    "--max-queue-delay-us", 3_000_000)
    try:
        second.wait_ready(sig.name)
        assert f"{WORKSPACE_PREFIX}{first.proc.pid}-" in second.text()  # what the killed one left, removed
        assert not list(Path(tempfile.gettempdir()).glob(f"{WORKSPACE_PREFIX}{first.proc.pid}-*"))
        x = Preprocessor.of(sig).normalize(images[20:21])
        answer = {}

        def send():
            client = second.http_client()
            try:
                answer["logits"] = _infer(client, thttp, sig.name, sig.input_name, x, "FP32")
            except Exception as e:  # noqa: BLE001 - reported below
                answer["error"] = e
            finally:
                client.close()

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(1.0)
        assert sender.is_alive(), answer  # held by the batcher
        t0 = time.monotonic()
        second.proc.send_signal(signal.SIGTERM)
        sender.join(CALL_TIMEOUT_S)
        assert "logits" in answer and np.array_equal(answer["logits"], reference(x)), (answer, second.tail())
        assert second.proc.wait(30) == 0, second.tail()
        assert time.monotonic() - t0 < 30
        assert "SIGTERM received" in second.text() and "stopped" in second.text()
    finally:
        second.stop()


# --- which artifact serve picks ---

def test_serve_picks_the_fastest_quantized_artifact_bench_measured(tmp_path):
    rd = RunDir(tmp_path)
    arts = {"ort-cpu-w8a8": Artifact("onnxruntime", "a.onnx", "w8a8", True, float_twin="ort-cpu-fp32"),
            "ov-cpu-w8a8": Artifact("openvino", "b.onnx", "w8a8", True, float_twin="ov-cpu-fp32"),
            "ort-cpu-w8a8-unfused": Artifact("onnxruntime", "c.onnx", "w8a8 unfused", True, reference=True),
            "ort-cpu-fp32": Artifact("onnxruntime", "d.onnx", "fp32", False)}
    rd.write_build(BuildRecord("w8a8", arts, {}))
    assert choose_artifact(rd)[0] == "ort-cpu-w8a8"  # no bench.json: the first quantized one
    rows = [BenchRow("ort-cpu-w8a8", "w8a8", 1, 10, 1.0, 1.0, 1.0, 1000.0),
            BenchRow("ov-cpu-w8a8", "w8a8", 1, 10, 2.0, 2.0, 2.0, 500.0),
            BenchRow("ort-cpu-w8a8", "w8a8", 32, 10, 20.0, 20.0, 20.0, 1600.0),
            BenchRow("ov-cpu-w8a8", "w8a8", 32, 10, 10.0, 10.0, 10.0, 3200.0),
            BenchRow("ort-cpu-w8a8-unfused", "w8a8", 32, 10, 1.0, 1.0, 1.0, 99999.0),
            BenchRow("ort-cpu-fp32", "fp32", 32, 10, 1.0, 1.0, 1.0, 99999.0)]
    rd.write_bench(BenchRecord(rows=rows))
    name, art, why = choose_artifact(rd)
    assert name == "ov-cpu-w8a8" and art.backend == "openvino" and "batch 32" in why
    assert choose_artifact(rd, "ort-cpu-fp32")[0] == "ort-cpu-fp32"
