"""Installed from a wheel (not -e), mimiq-deploy finds its recipes and templates as in the source tree."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", "build", "dist", "runs", ".venv", "__pycache__", "*.egg-info", ".pytest_cache")

BUILD_SCRIPT = """
import sys, torch, mimiq_deploy
from mimiq_deploy.build import build
from mimiq_deploy.export import ExportConfig, export_student
from mimiq_deploy.finetune import build_student
from mimiq_deploy.models import load_model
from mimiq_deploy.quant import calibrate, parse_bits
print(mimiq_deploy.__file__)
torch.manual_seed(0)
student = build_student(load_model("fmnist-vit"), parse_bits("w8a8"))
student.model_name = "fmnist-vit"
calibrate(student, torch.randn(8, 1, 28, 28))
export_student(student, sys.argv[1], ExportConfig(), progress=lambda m: None)
build(sys.argv[1], progress=lambda m: None, encoding="int8")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)  # build outside the checkout: leaves no build/ or egg-info there
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], check=True,
                   capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("mimiq_deploy-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp / "site", wheel], check=True,
                   capture_output=True, timeout=300)
    return wheel, tmp / "site"


def _run(site: Path, cwd: Path, *args):
    env = {**os.environ, "PYTHONPATH": str(site)}  # only the installed copy: the checkout is not importable
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_wheel_carries_recipes_and_templates(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("calib/fmnist-vit-fast.toml", "calib/fmnist-vit.toml", "export/default.toml",
              "export/templates/onnxruntime.pbtxt", "export/templates/tensorrt_plan.pbtxt"):
        assert f"mimiq_deploy/configs/{f}" in names, f
    assert "mimiq_deploy/weights/fmnist_vit.pt" in names


def test_installed_quantize_resolves_the_packaged_preset(installed, tmp_path):
    _, site = installed
    r = _run(site, tmp_path / "elsewhere", "-m", "mimiq_deploy", "quantize", "--preset", "fast", "--out", "run",
             "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    recipe = r.stdout.splitlines()[0].removeprefix("recipe: ")
    assert Path(recipe) == site / "mimiq_deploy" / "configs" / "calib" / "fmnist-vit-fast.toml"
    assert '"num_images": 512' in r.stdout  # the preset's values, not the built-in defaults


def test_installed_build_writes_a_model_repository(installed, tmp_path):
    _, site = installed
    r = _run(site, tmp_path / "elsewhere", "-c", BUILD_SCRIPT, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0].startswith(str(site))
    config = tmp_path / "run" / "model_repository" / "fmnist_vit_w8a8_onnx" / "config.pbtxt"
    assert 'backend: "onnxruntime"' in config.read_text()
