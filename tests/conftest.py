import os
import subprocess
import sys

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


def run_cli(*args, env=None, timeout=600):
    """Run `mimiq-deploy ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mimiq_deploy", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


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
