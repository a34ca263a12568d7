import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The embedded default at test size: every stage runs, in seconds (tests write it as their --recipe).
TINY_FMNIST_RECIPE = """
[synthesize]
num_images = 32
batch_size = 16
steps = 3
jitter = 2
[finetune]
epochs = 1
batch_size = 16
milestones = [1]
calib_images = 32
"""


class _CliHost:
    """tests/cli_host.py, started on the first call: each call a fresh child process forked from it."""
    proc = None

    @classmethod
    def call(cls, args: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
        if cls.proc is None or cls.proc.poll() is not None:
            cls.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_host.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=Path(__file__).parent.parent)
            atexit.register(cls.proc.kill)
            assert json.loads(cls.proc.stdout.readline()).get("ready"), "tests/cli_host.py did not start"
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            cls.proc.stdin.write(json.dumps({"args": args, "env": env, "cwd": os.getcwd(), "out": str(out),
                                             "err": str(err)}) + "\n")
            cls.proc.stdin.flush()
            pid = json.loads(cls.proc.stdout.readline())["pid"]
            killed = []
            timer = threading.Timer(timeout, lambda: (killed.append(pid), os.kill(pid, signal.SIGKILL)))
            timer.start()
            try:
                code = json.loads(cls.proc.stdout.readline())["code"]
            finally:
                timer.cancel()
            if killed:
                raise subprocess.TimeoutExpired(["mimiq-deploy", *args], timeout)
            return subprocess.CompletedProcess(["mimiq-deploy", *args], code, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))


def run_cli(*args, env=None, timeout=600):
    """Run `mimiq-deploy ARGS` in a fresh process, as a user would: forked from a process that has imported the
    command line's libraries already (tests/cli_host.py), not a new interpreter (which costs ~5 s of imports)."""
    return _CliHost.call([str(a) for a in args], {**os.environ, **(env or {})}, timeout)


@pytest.fixture
def cli():
    return run_cli


# For torchrun subprocesses that test the gloo back end on CPU, on a GPU host too.
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture
def cpu_only(monkeypatch):
    """Synthesis and fine-tuning on the CPU, on a GPU host too: tests that compare two runs to the bit need it, as
    CUDA kernels do not promise bitwise repeatable sums (on an H100 a resumed run was not equal to a straight one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def teacher():
    """The embedded fmnist-vit teacher, loaded once per test module."""
    from mimiq_deploy.models import load_model
    return load_model("fmnist-vit")
