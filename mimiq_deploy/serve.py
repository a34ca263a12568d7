"""`mimiq-deploy serve RUN`: one built artifact behind a real Triton Inference Server, through PyTriton.

How a request flows. The client speaks KServe v2 (HTTP or gRPC) to `tritonserver`, the binary PyTriton ships,
started by this process as a child. Triton checks the request against the model config (names, datatypes, dims,
batch size), queues it in its dynamic batcher, and hands the batch it forms to the model instance that is free:
one Python-backend stub process per instance, which passes the tensors over shared memory to this process.
Here, one thread per instance runs the back end's Runner (the same `Backend.runner(artifact)` that verify and
bench run) on the whole batch; the logits go back the same way, and Triton's classification extension turns them
into top-k labels when the client asks for them (`class_count`, from labels.txt).

The model takes one of three inputs per request, all with the batch dimension first:
    input        FP32  [N, C, H, W]  the preprocessed tensor (preprocessing.json), as the repository's config says
    image        UINT8 [N, A, B, C]  raw images, HWC or CHW (request parameter "layout", else told from the shape)
    image_bytes  BYTES [N, 1]        encoded PNG / JPEG images
raw images are preprocessed here (mimiq_deploy.preprocess, the one implementation). Output: logits FP32 [N, K].
A request the model cannot take (NaN / inf, an undecodable or oversized image, no input) gets its own error;
the requests batched with it are answered.
"""
import contextlib
import dataclasses
import errno
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .backends import BACKENDS
from .build import LABELS_FILE, ModelSignature
from .errors import MimiqError
from .preprocess import ImageError, Preprocessor
from .run_dir import RunDir

EXTRA_HINT = "pip install 'mimiq-deploy[serve]'"
IMAGE_INPUT = "image"
IMAGE_BYTES_INPUT = "image_bytes"
ERROR_KEY = "__mimiq_error__"   # a response holding it is sent as that request's error (see _PER_REQUEST_ERRORS)
RESTRICTED_ENDPOINTS = ["shared-memory", "model-repository", "trace", "logging"]  # statistics and metrics stay open
WORKSPACE_PREFIX = "mimiq-serve-"


@dataclasses.dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int | None = None        # default: the export config's max_batch (the model repository's)
    max_queue_delay_us: int = 1000      # how long Triton's batcher may hold a request to fill a batch
    instances: int = 1                  # model instances, each with its own Runner and thread
    exit_timeout_s: int = 10            # on SIGINT / SIGTERM: how long in-flight requests may take to finish

    def __post_init__(self):
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise MimiqError(f"--{name.replace('_', '-')} {port}: a port is 1 to 65535")
        if len({self.http_port, self.grpc_port, self.metrics_port}) < 3:
            raise MimiqError(f"the HTTP, gRPC and metrics ports must differ, got {self.http_port}, {self.grpc_port}, "
                             f"{self.metrics_port}")
        if self.max_batch is not None and self.max_batch < 1:
            raise MimiqError(f"--max-batch {self.max_batch}: at least 1")
        if self.max_queue_delay_us < 0:
            raise MimiqError(f"--max-queue-delay-us {self.max_queue_delay_us}: at least 0")
        if self.instances < 1:
            raise MimiqError(f"--instances {self.instances}: at least 1")


def require_serving():
    """PyTriton and tritonclient, or one line naming the extra that installs them."""
    try:
        import pytriton.triton  # noqa: F401
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError as e:
        raise MimiqError(f"serving needs PyTriton and tritonclient ({e.name or e} is missing): {EXTRA_HINT}") from None


# --- which artifact ---

def choose_artifact(run_dir, name: str | None = None) -> tuple[str, object, str]:
    """(name, Artifact, why): `name` if built; else the quantized deployment candidate bench measured fastest (the
    highest throughput at the largest batch size measured for all of them), else the first quantized one."""
    rd = RunDir.of(run_dir)
    built = rd.read_build().artifacts
    if name is not None:
        if name not in built:
            raise MimiqError(f"no artifact {name!r} in {rd.root}; built: {', '.join(built) or 'none'}")
        return name, built[name], "asked for with --artifact"
    candidates = [n for n, a in built.items() if a.quantized and not a.reference]
    if not candidates:
        raise MimiqError(f"no quantized artifact in {rd.root} to serve (built: {', '.join(built) or 'none'}); "
                         "pass --artifact NAME to serve another")
    bench = rd.read_bench()
    rows = [r for r in (bench.rows if bench else []) if r.artifact in candidates]
    if rows:
        measured = {r.artifact for r in rows}
        common = [b for b in sorted({r.batch for r in rows}) if all(
            any(r.artifact == n and r.batch == b for r in rows) for n in measured)]
        batch = common[-1] if common else max(r.batch for r in rows)
        best = max((r for r in rows if r.batch == batch), key=lambda r: r.throughput_ips)
        return best.artifact, built[best.artifact], (f"the fastest quantized artifact bench measured: "
                                                     f"{best.throughput_ips:.0f} images/s at batch {batch}")
    return candidates[0], built[candidates[0]], "the first quantized artifact built (no bench.json to rank by)"


def load_runner(artifact, threads: int | None = None):
    """The back end's Runner of `artifact`; `threads` where the back end takes a thread count (ONNX Runtime)."""
    import inspect

    backend = BACKENDS.get(artifact.backend)
    if backend is None:
        raise MimiqError(f"artifact of back end {artifact.backend!r}, which this installation does not have "
                         f"(it has {', '.join(BACKENDS)})")
    ok, why = backend.available()
    if not ok:
        raise MimiqError(f"{backend.title} cannot run here: {why}")
    if threads and "threads" in inspect.signature(backend.runner).parameters:
        return backend.runner(artifact, threads=threads)
    return backend.runner(artifact)


# --- what runs the model ---

class RequestError(ValueError):
    """A request the model cannot take; the message goes back to its client."""


class Classifier:
    """One model instance: Triton's batch of requests (PyTriton Request objects, name -> numpy array) -> one
    response dict per request. The good requests' images run through the Runner as one batch."""

    def __init__(self, runner, signature, preprocessor):
        self.runner, self.sig, self.pre = runner, signature, preprocessor
        self.lock = threading.Lock()  # one batch at a time per instance (a Runner is not promised thread-safe)

    def __call__(self, requests) -> list[dict]:
        inputs, errors = [], {}
        for i, request in enumerate(requests):
            try:
                inputs.append((i, self.model_input(request)))
            except RequestError as e:
                errors[i] = str(e)
        responses = [{ERROR_KEY: np.array([m.encode("utf-8")], dtype=np.object_)} for m in errors.values()]
        responses = dict(zip(errors, responses))
        if inputs:
            with self.lock:
                logits = self.runner(np.concatenate([x for _, x in inputs]))
            start = 0
            for i, x in inputs:
                responses[i] = {self.sig.output_name: np.ascontiguousarray(logits[start:start + len(x)],
                                                                           dtype=np.float32)}
                start += len(x)
        return [responses[i] for i in range(len(requests))]

    def model_input(self, request) -> np.ndarray:
        """One request's images as the model's float32 (N, C, H, W), or a RequestError saying why not."""
        given = [k for k in (self.sig.input_name, IMAGE_INPUT, IMAGE_BYTES_INPUT) if k in request.data]
        if len(given) != 1:
            raise RequestError(f"send exactly one of the inputs {self.sig.input_name!r} (FP32 NCHW, preprocessed), "
                               f"{IMAGE_INPUT!r} (UINT8 images) or {IMAGE_BYTES_INPUT!r} (PNG / JPEG bytes); "
                               f"got {given or 'none'}")
        name, value = given[0], request.data[given[0]]
        if len(value) == 0:
            raise RequestError(f"input {name!r} holds no image (batch size 0)")
        if name == self.sig.input_name:
            x = np.asarray(value, dtype=np.float32)
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            if bad:
                raise RequestError(f"input {name!r} holds {bad} NaN or infinite value(s): send finite, "
                                   "preprocessed pixels")
            return x
        out = []
        for k, item in enumerate(value):
            try:
                if name == IMAGE_INPUT:
                    out.append(self.pre.from_array(item, (request.parameters or {}).get("layout")))
                else:
                    out.append(self.pre.from_bytes(bytes(np.asarray(item).reshape(-1)[0])))
            except ImageError as e:
                raise RequestError(f"{name}[{k}]: {e}") from None
        return np.stack(out)


# PyTriton answers an execute call (Triton's batch) as a whole: an exception fails every request in it. Its proxy
# model (model.py, run by the Triton Python backend's stub process) is extended so that a response holding
# ERROR_KEY becomes that request's error, with Triton's INVALID_ARG code (HTTP 400), and the others are answered.
_PER_REQUEST_ERRORS = f'''

# --- appended by mimiq_deploy/serve.py: a response holding {ERROR_KEY!r} is that request's error ---
_mimiq_wrap_response = _wrap_response


def _wrap_response(response, requested_outputs_names, model_outputs_dict):
    message = (response.data or {{}}).get({ERROR_KEY!r})
    if message is None:
        return _mimiq_wrap_response(response, requested_outputs_names, model_outputs_dict)
    text = message.reshape(-1)[0]
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    try:
        error = pb_utils.TritonError(text, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # a Python backend without error codes
        error = pb_utils.TritonError(text)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
'''


def _served_model_class(labels, label_file: str, output_name: str):
    """PyTriton's Model, with the config and files it cannot express: label_filename on the logits (Triton's
    classification extension) with labels.txt beside the config, and per-request errors."""
    from pytriton.models.model import Model

    class ServedModel(Model):
        def get_model_config(self) -> dict:
            config = super().get_model_config()
            if labels:
                for output in config.get("output", []):
                    if output["name"] == output_name:
                        output["label_filename"] = label_file
            return config

        def get_proxy_model_files(self) -> dict:
            files = super().get_proxy_model_files()
            key = f"file:{self.model_version}/model.py"
            if b"def _wrap_response(" not in files.get(key, b""):
                raise MimiqError("this PyTriton's proxy model has no _wrap_response: per-request errors need "
                                 f"nvidia-pytriton 0.7 ({EXTRA_HINT})")
            files[key] += _PER_REQUEST_ERRORS.encode()
            if labels:
                files[f"file:{label_file}"] = ("\n".join(labels) + "\n").encode()
            return files

    return ServedModel


# --- the process ---

def check_ports(host: str, ports: dict) -> None:
    """Every port free on `host`, or one line naming the one that is taken."""
    for what, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise MimiqError(f"{what} port {port} on {host} is already in use (another server?): pass "
                                     f"--{what.lower()}-port with a free one") from None
                raise MimiqError(f"cannot listen on {host}:{port} for {what}: {e.strerror or e}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes_using(path: Path) -> list[int]:
    """Processes whose command line names `path` (the Triton server and stubs run from a serve workspace)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(path).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def clean_stale(tmp: Path | None = None, shm: Path = Path("/dev/shm"), wait_s: float = 30.0, echo=print) -> list:
    """What a serve process killed with SIGKILL left: its Triton server (which gets SIGTERM when its parent dies,
    then drains for its exit timeout, holding the ports), its workspace (a copy of the Triton binaries, the model
    store, sockets) and its shared-memory regions. Only those of serve processes that no longer run; their
    orphaned Triton processes are waited for (wait_s), then killed."""
    removed = []
    tmp = Path(tmp or tempfile.gettempdir())
    stale = [p for p in tmp.glob(f"{WORKSPACE_PREFIX}*") if p.is_dir() and _dead_owner(p)]
    for workspace in stale:
        orphans = _processes_using(workspace)
        if orphans:
            echo(f"waiting for the Triton server left by a killed serve process ({workspace.name}) to exit")
            deadline = time.monotonic() + wait_s
            while orphans and time.monotonic() < deadline:
                time.sleep(0.2)
                orphans = [pid for pid in orphans if _pid_alive(pid)]
            for pid in orphans:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workspace, ignore_errors=True)
        removed.append(workspace)
    for region in shm.glob(f"{WORKSPACE_PREFIX}*"):
        if _dead_owner(region):
            region.unlink(missing_ok=True)
            removed.append(region)
    return removed


def _dead_owner(path: Path) -> bool:
    pid = path.name[len(WORKSPACE_PREFIX):].split("-")[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def python_library_path() -> str | None:
    """The folder of this interpreter's libpython, for the Triton Python backend's stub process: the stub links
    libpython3.X.so.1.0, and one of another patch release under this interpreter's standard library fails
    (e.g. Debian's 3.11.2 library under a pyenv 3.11.7). None where the loader's default one is this interpreter's."""
    import sysconfig
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        return libdir
    import ctypes.util
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if ctypes.util.find_library(f"python{version}") is None:
        raise MimiqError(f"the Triton Python backend needs libpython{version}.so.1.0, which this Python "
                         f"({sys.executable}) does not ship (built without --enable-shared): install your "
                         f"distribution's libpython{version} (Debian: apt-get install libpython{version}) or use a "
                         "Python built with shared libraries")
    return None


class _Stop:
    """SIGINT / SIGTERM: note the first, ignore the rest (the shutdown under way answers what is in flight)."""

    def __init__(self):
        self.event = threading.Event()
        self.signal = None

    def __call__(self, signum, _frame):
        if not self.event.is_set():
            self.signal = signal.Signals(signum).name
            self.event.set()


@contextlib.contextmanager
def _patched(obj, name: str, value):
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def serve(run_dir, artifact: str | None = None, options: ServeOptions | None = None, echo=print,
          stop: threading.Event | None = None) -> int:
    """Serve one artifact until SIGINT / SIGTERM (or until `stop` is set); 0 after a graceful shutdown: Triton
    stops taking requests, answers those in flight (for up to options.exit_timeout_s), then exits."""
    require_serving()
    options = options or ServeOptions()
    rd = RunDir.of(run_dir)
    name, art, why = choose_artifact(rd, artifact)
    for path in clean_stale(echo=echo):
        echo(f"removed {path}, left by a serve process that was killed")
    check_ports(options.host, {"HTTP": options.http_port, "gRPC": options.grpc_port, "metrics": options.metrics_port})
    libdir = python_library_path()

    from pytriton import triton as pytriton_triton
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor


    sig = ModelSignature.of_run(rd)
    if options.max_batch is not None:
        sig = dataclasses.replace(sig, max_batch=options.max_batch)

    pre = Preprocessor.of(sig)
    threads = max(1, (os.cpu_count() or 1) // options.instances)
    classifiers = [Classifier(load_runner(art, threads), sig, pre) for _ in range(options.instances)]
    for c in classifiers:  # the first run's allocations before the first client waits for them
        c.runner(pre.normalize(np.zeros((1, *sig.dims), np.uint8)))

    workspace = Path(tempfile.gettempdir()) / f"{WORKSPACE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    config = pytriton_triton.TritonConfig(
        http_address=options.host, http_port=options.http_port, grpc_address=options.host,
        grpc_port=options.grpc_port, metrics_address=options.host, metrics_port=options.metrics_port,
        allow_metrics=True, allow_gpu_metrics=False, allow_cpu_metrics=True, allow_sagemaker=False,
        allow_vertex_ai=False, exit_timeout_secs=options.exit_timeout_s, strict_readiness=True, log_verbose=0)
    security = pytriton_triton.TritonSecurityConfig(restricted_endpoints=list(RESTRICTED_ENDPOINTS))
    inputs = [Tensor(name=sig.input_name, dtype=np.float32, shape=tuple(sig.dims), optional=True),
              Tensor(name=IMAGE_INPUT, dtype=np.uint8, shape=(-1, -1, -1), optional=True),
              Tensor(name=IMAGE_BYTES_INPUT, dtype=np.bytes_, shape=(1,), optional=True)]
    outputs = [Tensor(name=sig.output_name, dtype=np.float32, shape=(sig.num_classes,))]
    model_config = ModelConfig(batching=True, max_batch_size=sig.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us))

    stopper = _Stop()
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stopper) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    if stop is not None:
        threading.Thread(target=lambda: (stop.wait(), stopper.event.set()), daemon=True).start()
    saved_env = os.environ.get("LD_LIBRARY_PATH")
    if libdir:  # inherited by tritonserver, and by the stub processes it starts
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, saved_env]))
    triton = None
    try:
        # the Python backend's shared-memory regions carry the workspace's name, so that clean_stale finds them
        with _patched(pytriton_triton.Triton, "_shm_prefix", lambda self: workspace.name):
            triton = pytriton_triton.Triton(config=config, workspace=workspace, security_config=security)
        with _patched(pytriton_triton, "Model", _served_model_class(sig.labels, LABELS_FILE, sig.output_name)):
            triton.bind(model_name=sig.name, infer_func=classifiers, inputs=inputs, outputs=outputs,
                        config=model_config, strict=False)
        started = time.monotonic()
        try:
            triton.run()
        except Exception as e:  # PyTriton's own errors (a timeout, a model that failed to load)
            raise MimiqError(f"the Triton server did not start ({type(e).__name__}: {e}); its log is above") from None
        echo(f"serving {name} ({art.precision}; {why}) as model {sig.name!r}: "
             f"HTTP http://{options.host}:{options.http_port}, gRPC {options.host}:{options.grpc_port}, "
             f"metrics http://{options.host}:{options.metrics_port}/metrics; {options.instances} instance(s), "
             f"max batch {sig.max_batch}, queue delay {options.max_queue_delay_us} us; "
             f"ready in {time.monotonic() - started:.1f} s")
        sys.stdout.flush()
        while not stopper.event.wait(0.5):
            if not triton.is_alive():
                raise MimiqError("the Triton server stopped unexpectedly (its log is above)")
        echo(f"{stopper.signal or 'stop'} received: answering the requests in flight, then stopping")
        sys.stdout.flush()
    finally:
        if triton is not None:
            triton.stop()
        shutil.rmtree(workspace, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if libdir:
            if saved_env is None:
                os.environ.pop("LD_LIBRARY_PATH", None)
            else:
                os.environ["LD_LIBRARY_PATH"] = saved_env
    echo("stopped")
    return 0
