"""TensorRT engines: built from the FP16 QDQ graph and checked against the fake-quant student.

Runs where the `tensorrt` package and a CUDA GPU are present; elsewhere it skips and says which is missing."""
import numpy as np
import pytest
import torch

from mimiq_deploy.backends import BACKENDS
from mimiq_deploy.backends.tensorrt import TRT_ONNX
from mimiq_deploy.export import ExportConfig, export_student
from mimiq_deploy.finetune import build_student
from mimiq_deploy.models import load_model
from mimiq_deploy.quant import calibrate, parse_bits

TRT_OK, TRT_WHY = BACKENDS["tensorrt"].available()


def test_unavailable_tensorrt_is_named():
    if TRT_OK:
        pytest.skip("tensorrt and a CUDA GPU are present")
    assert "tensorrt" in TRT_WHY or "CUDA" in TRT_WHY


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT cannot run here: {TRT_WHY}")
@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_engine_matches_fake_quant(bits, tmp_path):
    torch.manual_seed(0)
    student = build_student(load_model("fmnist-vit"), parse_bits(bits))
    calibrate(student, torch.randn(32, 1, 28, 28))
    export_student(student, tmp_path, ExportConfig(), progress=lambda m: None)
    trt = BACKENDS["tensorrt"]
    plan = tmp_path / "model.plan"
    trt.build(tmp_path / "export" / TRT_ONNX, plan, 1, 8, 16, 1024)
    run = trt.load(plan)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        ref = student(x).numpy()
    out = run(x.numpy())
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.99  # FP16 elsewhere; w4a8 runs weight-only in TensorRT
