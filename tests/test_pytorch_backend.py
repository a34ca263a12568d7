"""The PyTorch back end: integer kernels that compute what the fake-quant student computes, the torch.export program
loadable without this package, bench's speed-up row, and benchmarks/gpu.py's CPU smoke run.

One tiny run directory (fmnist-vit, TINY_FMNIST_RECIPE) fine-tuned at W8A8, and a W4A8 sibling calibrated on the
same synthetic set (PTQ, --epochs 0). torch.compile is off in their export config ([pytorch] compile = "off"):
compiling the integer model takes minutes on two busy cores; the W4A8 sibling exports no torch.export programs
either (the W8A8 one does): the INT4 kernel is slow on the CPU at verify's batch sizes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_FMNIST_RECIPE
from mimiq_deploy import bench as bench_module
from mimiq_deploy.backends import BACKENDS
from mimiq_deploy.backends.pytorch import kernels
from mimiq_deploy.bench import bench
from mimiq_deploy.build import build
from mimiq_deploy.errors import MimiqError
from mimiq_deploy.export import export_config, export_student
from mimiq_deploy.finetune import finetune, load_finetune_recipe
from mimiq_deploy.quant import parse_bits
from mimiq_deploy.quant.student import load_student
from mimiq_deploy.run_dir import RunDir
from mimiq_deploy.synthesize import load_synthesis_recipe, synthesize
from mimiq_deploy.verify import verify

REPO = Path(__file__).resolve().parent.parent


def _run(teacher, root: Path, bits: str, overrides: dict, table: dict, synth_from: Path | None = None) -> RunDir:
    rd = RunDir(root / bits)
    recipe = root / "recipe.toml"
    if synth_from is None:
        synthesize(teacher, "fmnist-vit", rd, load_synthesis_recipe(recipe, {}), progress=False)
    else:
        rd.link_synthetic(synth_from)
    finetune(teacher, "fmnist-vit", None, rd, parse_bits(bits), load_finetune_recipe(recipe, overrides))
    export_student(load_student(rd.student), rd, export_config({"pytorch": table}, "test"), progress=lambda m: None)
    # PyTorch alone: verify and bench then run its artifacts only (the other back ends' tests cover theirs)
    build(rd, progress=lambda m: None, backends=["pytorch"])
    return rd


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher):
    root = tmp_path_factory.mktemp("pytorch")
    (root / "recipe.toml").write_text(TINY_FMNIST_RECIPE)
    w8 = _run(teacher, root, "w8a8", {}, {"build": True, "compile": "off"})
    w4 = _run(teacher, root, "w4a8", {"epochs": 0}, {"build": True, "compile": "off", "export": False},
              synth_from=w8.root)
    return {"w8a8": w8, "w4a8": w4}


def test_build_names_its_artifacts_and_skips(runs):
    w8, w4 = runs["w8a8"].read_build(), runs["w4a8"].read_build()
    assert {a.backend for a in w8.artifacts.values()} == {"pytorch"}  # build(backends=["pytorch"]) built it alone
    with pytest.raises(MimiqError, match="unknown back end"):
        build(runs["w8a8"], progress=lambda m: None, backends=["pytorch", "tensorflow"])
    assert {"pt-cpu-fp32", "pt-cpu-w8a8", "pt-cpu-w8a8-export"} <= set(w8.artifacts)
    assert {"pt-cpu-fp32", "pt-cpu-w4a8", "pt-cpu-w4a16"} <= set(w4.artifacts)
    assert "compile" in w8.skipped["pt-cpu-w8a8-compiled"] and "export" in w4.skipped["pt-cpu-w4a16-export"]
    art = w8.artifacts["pt-cpu-w8a8"]
    assert art.backend == "pytorch" and art.quantized and not art.weight_only and art.float_twin == "pt-cpu-fp32"
    assert "attention matmuls in float" in art.precision and "_int_mm" in art.precision
    assert art.info["kernels"]["aten._int_mm"] == 6 * 4 + 1  # qkv, proj, fc1, fc2 of 6 blocks, and the head
    assert Path(w8.artifacts["pt-cpu-w8a8-export"].path).suffix == ".pt2"
    # each variant has the float twin's same variant (bench compares like with like)
    assert w8.artifacts["pt-cpu-w8a8-export"].float_twin == "pt-cpu-fp32-export"
    assert not w8.artifacts["pt-cpu-fp32-export"].quantized and "pt-cpu-fp32-compiled" in w8.skipped
    w4a16 = w4.artifacts["pt-cpu-w4a16"]
    assert w4a16.weight_only and "weight-only INT4" in w4a16.precision
    assert w4a16.info["kernels"].get("aten._weight_int4pack_mm_for_cpu") == 25


def test_integer_artifacts_pass_verify(runs):
    for bits, names in (("w8a8", ["pt-cpu-w8a8", "pt-cpu-w8a8-export"]), ("w4a8", ["pt-cpu-w4a8", "pt-cpu-w4a16"])):
        verify(runs[bits], limit=200, progress=False)
        record = runs[bits].read_verify()
        for name in names:
            row = record.artifacts[name]
            assert row.checked and name not in record.failed, (name, row)
            assert row.agreement >= 99.5 and row.cosine >= 0.999, (name, row)
        assert not record.artifacts["pt-cpu-fp32"].checked
    # W4A16 computes INT4 weights on float activations: verify holds it to the student with activation quantizers off
    record = runs["w4a8"].read_verify()
    assert record.artifacts["pt-cpu-w4a16"].reference == "weight-only student"
    assert record.artifacts["pt-cpu-w4a8"].reference == "student"


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def test_int8_artifact_runs_integer_gemms(runs):
    art = runs["w8a8"].read_build().artifacts["pt-cpu-w8a8"]
    run = BACKENDS[art.backend].runner(art)
    with _Ops() as ops:
        run(np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32))
    int_mm = [dtypes for func, dtypes in ops.calls if func is torch.ops.aten._int_mm.default]
    assert len(int_mm) == 25 and all(d == [torch.int8, torch.int8] for d in int_mm)
    float_gemms = [f for f, _ in ops.calls if f in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                                                    torch.ops.aten.linear.default)]
    assert not float_gemms  # no projection fell back to a float matmul


def test_fp8_module_runs_fp8_gemms_and_computes_the_student(teacher):
    """fp8: every projection reaches torch._scaled_mm with E4M3FN operands; logits are the student's up to float
    rounding (one flipped FP8 rounding moves a value by 1/16 of it, hence no bitwise equality)."""
    from mimiq_deploy.finetune import build_student
    from mimiq_deploy.quant import calibrate
    ok, why = kernels.fp8_gemm_available("cpu")
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    student = build_student(teacher, parse_bits("fp8")).eval()
    calibrate(student, torch.randn(32, 1, 28, 28))
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        ref = student(x)
        model = kernels.integer_model(student, "fp8", "cpu", torch.float32, [1, 28, 28])
        with _Ops() as ops:
            out = model(x)
    scaled = [d for f, d in ops.calls if f is torch.ops.aten._scaled_mm.default]
    assert len(scaled) == 25 and all(d[:2] == [torch.float8_e4m3fn] * 2 for d in scaled)
    assert not [f for f, _ in ops.calls if f in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
    assert cos.min() > 0.999 and (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


def test_cuda_padding_rules_give_the_same_logits(runs, monkeypatch):
    """The CUDA path's padding for torch._int_mm (rows > 16, K and N multiples of 8), exercised on the CPU."""
    student = runs["w8a8"].student
    plain = kernels.integer_model(load_student(student), "int", input_size=(1, 28, 28))
    monkeypatch.setattr(kernels.IntMMRules, "of", classmethod(lambda cls, device: cls(17, 8)))
    padded = kernels.integer_model(load_student(student), "int", input_size=(1, 28, 28))
    assert "17 zero rows" in kernels.describe(padded)["layer_notes"]["head"]  # batch 1: one row; N = 10 -> 16
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(padded(x), plain(x), rtol=1e-5, atol=1e-5)


def test_int4pack_weight_only_layer_equals_the_dequantized_weight(runs):
    fc1 = load_student(runs["w4a8"].student).blocks[0].mlp.fc1
    x = torch.randn(7, 50, fc1.in_features)
    with torch.no_grad():
        torch.testing.assert_close(kernels.Int4WeightOnlyLinear(fc1, "cpu", 128)(x),
                                   kernels.DequantLinear(fc1, False, "")(x),
                                   rtol=1e-5, atol=1e-5)


def test_export_program_loads_without_the_package(runs, tmp_path):
    art = runs["w8a8"].read_build().artifacts["pt-cpu-w8a8-export"]
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys; sys.modules['mimiq_deploy'] = None\n"  # any import of the package fails
        "import numpy as np, torch\n"
        f"ep = torch.export.load({art.path!r})\n"
        "n = sum(node.target is torch.ops.aten._int_mm.default for node in ep.graph.nodes)\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        f"    np.save({str(tmp_path / 'y.npy')!r}, ep.module()(x).numpy())\n"
        "print(n)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == 25
    ours = BACKENDS[art.backend].runner(art)(x)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ours, rtol=1e-5, atol=1e-5)
    eager = runs["w8a8"].read_build().artifacts["pt-cpu-w8a8"]
    np.testing.assert_allclose(BACKENDS[eager.backend].runner(eager)(x), ours, rtol=1e-4, atol=1e-4)


def test_bench_reports_the_speedup_over_the_float_twin(runs, monkeypatch):
    monkeypatch.setattr(bench_module, "SETTLE_S", 0.0)  # turns of a few runs: the values are not the point here
    monkeypatch.setattr(bench_module, "TURN_S", 0.0)
    report = bench(runs["w8a8"], [1], warmup=1, iters=3, min_seconds=0.0, profile_runs=0, progress=lambda m: None)
    rows = [s for s in report["speedups"] if s["quantized"] == "pt-cpu-w8a8" and s["float"] == "pt-cpu-fp32"]
    assert len(rows) == 1 and rows[0]["float_over_quantized_p50"] > 0


def test_gpu_benchmark_script_runs_its_cpu_smoke(runs, tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--cpu-smoke", "--out-dir", str(tmp_path),
                        "--max-seconds", "45", "--seconds", "0.2", "--student", str(runs["w8a8"].student)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    measured = [row for row in result["rows"] if row.get("p50_ms") is not None]
    assert measured and all(row["model"] == "fmnist-vit" and row["batch"] == 1 for row in measured)
    # each variant's agreement with the model it implements, on real images (the student given for INT8)
    for row in measured:
        assert row["agreement"] >= 95 and row["cosine"] > 0.99 and "Fashion-MNIST" in row["agreement_on"], row
    assert any(row.get("skipped") for row in result["rows"])  # the CUDA rows, each with its reason
    assert (tmp_path / "gpu.md").read_text().startswith("#")
