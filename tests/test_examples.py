"""Every script in examples/ runs, at tiny sizes, as a user would run it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from conftest import TINY_FMNIST_RECIPE as TINY_FMNIST
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TINY_DEIT = """
[synthesize]
num_images = 4
batch_size = 4
steps = 1
[finetune]
epochs = 1
batch_size = 4
milestones = [1]
calib_images = 4
augment = false
"""
FAST_EXPORT = "batch_sizes = [1]\nbench_seconds = 0.05\n"


def _env(**extra):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "2", "MIMIQ": f"{sys.executable} -m mimiq_deploy",
            "TORCHRUN": f"{sys.executable} -m torch.distributed.run", **extra}


def _run(cmd, cwd, env, timeout=600):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def test_examples_are_all_covered():
    assert {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh")} == {
        "default_end_to_end.sh", "serve_model_repository.py", "python_api.py", "timm_local_checkpoint.sh"}


@pytest.mark.slow
def test_default_end_to_end_then_serve(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_FMNIST)
    (tmp_path / "export.toml").write_text(FAST_EXPORT)
    env = _env(RECIPE=str(tmp_path / "tiny.toml"), EXPORT_CONFIG=str(tmp_path / "export.toml"), VERIFY_LIMIT="300",
               BATCHES="1")
    run = tmp_path / "run"
    _run(["bash", EXAMPLES / "default_end_to_end.sh", run], tmp_path, env)
    assert (tmp_path / "run-w8a8" / "bench.json").exists()

    model_dir = run / "model_repository" / "fmnist_vit_w4a8_onnx"
    pre = json.loads((model_dir / "preprocessing.json").read_text())
    assert pre["input_size"] == [1, 28, 28] and pre["layout"] == "NCHW" and pre["mean"] == [0.286]
    labels = (model_dir / pre["label_file"]).read_text().splitlines()
    assert len(labels) == 10 and labels[0] == "T-shirt/top"
    assert 'label_filename: "labels.txt"' in (model_dir / "config.pbtxt").read_text()

    # `mimiq-deploy serve` on the run (Triton on free localhost ports), and the example as its client
    thttp = pytest.importorskip("tritonclient.http", reason="the serve extra: pip install 'mimiq-deploy[serve]'")
    import socket
    import time
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    http, grpc, metrics = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mimiq_deploy", "serve", str(run), "--http-port", str(http),
                                   "--grpc-port", str(grpc), "--metrics-port", str(metrics)], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        client, deadline = thttp.InferenceServerClient(f"127.0.0.1:{http}"), time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if client.is_model_ready("fmnist_vit_w4a8"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.5)
        client.close()
        for extra in ([], ["--grpc", "--url", f"127.0.0.1:{grpc}"]):
            served = _run([sys.executable, EXAMPLES / "serve_model_repository.py", run, "--num", "200",
                           *(extra or ["--url", f"127.0.0.1:{http}"])], tmp_path, env, timeout=300)
            top1 = float(served.stdout.split("top-1 ")[1].split("%")[0])
            assert top1 > 70.0, served.stdout  # the tiny run's w4a8 student still classifies, served
    finally:
        server.terminate()
        assert server.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]


@pytest.mark.slow
def test_python_api(tmp_path):
    r = _run([sys.executable, EXAMPLES / "python_api.py", tmp_path / "run", "--num-images", "32", "--steps", "2",
              "--epochs", "1", "--verify-limit", "200"], tmp_path, _env())
    assert "fake-quant student" in r.stdout and "ort-cpu-w8a8" in r.stdout


@pytest.mark.slow
def test_timm_local_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    ckpt = tmp_path / "deit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    rng = np.random.default_rng(0)
    for synset in ("n01440764", "n01443537"):
        (tmp_path / "val" / synset).mkdir(parents=True)
        for i in range(2):
            image = Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8))
            image.save(tmp_path / "val" / synset / f"{i}.JPEG")
    (tmp_path / "tiny.toml").write_text(TINY_DEIT)
    # random weights: 1000 near-tied logits make top-1 agreement a coin toss; the cosine threshold stays real
    (tmp_path / "export.toml").write_text(FAST_EXPORT + "min_agreement = 50.0\nmin_cosine = 0.999\n")
    env = _env(RECIPE=str(tmp_path / "tiny.toml"), EXPORT_CONFIG=str(tmp_path / "export.toml"))
    r = _run(["bash", EXAMPLES / "timm_local_checkpoint.sh", ckpt, tmp_path / "val", tmp_path / "run"], tmp_path, env,
             timeout=900)
    assert (tmp_path / "run" / "report.json").exists(), r.stdout[-2000:]
    model_dir = tmp_path / "run" / "model_repository" / "deit_tiny_patch16_224_w4a8_onnx"
    assert len((model_dir / "labels.txt").read_text().splitlines()) == 1000  # timm's ImageNet class names
