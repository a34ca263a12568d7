"""OpenVINO back end on a tiny fmnist-vit run (w8a8 and w4a8): build, the runtime precision of each layer, verify,
bench, the model repository, `check --target openvino`, and a missing openvino package named in build.json."""
import shutil
import sys

import numpy as np
import pytest
import torch

ov = pytest.importorskip("openvino", reason="the openvino package is not installed (pip install "
                                            "'mimiq-deploy[openvino]'): the OpenVINO back end cannot run here")

from conftest import TINY_FMNIST_RECIPE  # noqa: E402

from mimiq_deploy.backends import BACKENDS, ExportContext  # noqa: E402
from mimiq_deploy.backends.openvino import CACHE_DIR, OV_ONNX, OpenVINOConfig  # noqa: E402
from mimiq_deploy.backends.openvino.backend import choose_int8, host_int8  # noqa: E402
from mimiq_deploy.backends.openvino.graph import openvino_graph, runtime_precisions  # noqa: E402
from mimiq_deploy.bench import bench  # noqa: E402
from mimiq_deploy.build import build  # noqa: E402
from mimiq_deploy.check import check_graph  # noqa: E402
from mimiq_deploy.errors import MimiqError  # noqa: E402
from mimiq_deploy.export import ExportConfig, export_config, export_student  # noqa: E402
from mimiq_deploy.finetune import finetune, load_finetune_recipe  # noqa: E402
from mimiq_deploy.models import load_model  # noqa: E402
from mimiq_deploy.onnx_graph import read_onnx, save_onnx  # noqa: E402
from mimiq_deploy.quant import parse_bits  # noqa: E402
from mimiq_deploy.quant.student import load_student  # noqa: E402
from mimiq_deploy.run_dir import QDQ_ONNX, RunDir  # noqa: E402
from mimiq_deploy.synthesize import load_synthesis_recipe, synthesize  # noqa: E402
from mimiq_deploy.verify import verify  # noqa: E402

BITS = ("w8a8", "w4a8")
BLOCKS = 6                 # fmnist-vit
PROJECTIONS = BLOCKS * 6   # q, k, v (the fused qkv split in three), proj, fc1, fc2
ATTENTION = BLOCKS * 2     # q k^T, probabilities times v


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One synthetic set (the tiny recipe), a PTQ student per bit setting on it (epochs 0: the graphs are the
    same as after fine-tuning), exported, and built by `build` with the OpenVINO back end."""
    root = tmp_path_factory.mktemp("openvino")
    recipe = root / "tiny.toml"
    recipe.write_text(TINY_FMNIST_RECIPE)
    teacher = load_model("fmnist-vit")
    synthesize(teacher, "fmnist-vit", root / "synth", load_synthesis_recipe(recipe, {}), progress=False)
    out = {}
    for bits in BITS:
        rd = RunDir(root / bits)
        rd.link_synthetic(root / "synth")
        torch.manual_seed(0)
        finetune(teacher, "fmnist-vit", None, rd, parse_bits(bits), load_finetune_recipe(recipe, {"epochs": 0}),
                 progress=False)
        export_student(load_student(rd.student), rd, ExportConfig(), progress=lambda m: None)
        # OpenVINO alone, so that verify and bench run only its artifacts (the other back ends' tests cover theirs)
        build(rd, progress=lambda m: None, backends=["openvino"])
        out[bits] = rd
    return out


def _compiled(path):
    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def test_build_makes_openvino_artifacts(runs):
    for bits, rd in runs.items():
        built = rd.read_build()
        q, fp = built.artifacts[f"ov-cpu-{bits}"], built.artifacts["ov-cpu-fp32"]
        assert q.backend == fp.backend == "openvino" and q.quantized and not fp.quantized
        assert q.float_twin == "ov-cpu-fp32" and q.path == str(rd.graph(OV_ONNX))
        assert any((rd.export_dir / CACHE_DIR).iterdir())           # the compiled models are cached
        info = built.backends["openvino"]
        assert info["int8"] in ("all", "exact") and info["reason"]
        fc = q.info["compute"]["FullyConnected"]   # the projections (qkv fused or split in three) and the head
        assert sum(fc.values()) in (4 * BLOCKS + 1, PROJECTIONS + 1)
        assert info["layers_by_artifact"][f"ov-cpu-{bits}"]["int8_layers"] == q.info["int8_layers"]
        assert any("OpenVINO" in line for line in BACKENDS["openvino"].report_lines(info))


def test_projections_run_in_int8(runs):
    """w4a8 runs every projection in int8 on any x86 CPU (7-bit weights cannot saturate); w8a8 too where the CPU
    has VNNI. The graph of int8 "all" runs every projection and both attention matmuls in int8, while the exported
    graph (uint8 / zero point 128) runs none: its FullyConnected layers decompress u8 weights to float."""
    w4 = runs["w4a8"].read_build().artifacts["ov-cpu-w4a8"].info["compute"]
    assert w4["FullyConnected"].get("int8", 0) >= PROJECTIONS
    w8 = runs["w8a8"].read_build()
    if w8.backends["openvino"]["int8"] == "all":
        assert w8.artifacts["ov-cpu-w8a8"].info["compute"]["FullyConnected"] == {"int8": PROJECTIONS + 1}
    else:
        assert "saturat" in w8.backends["openvino"]["reason"]
    graph, passes = openvino_graph(read_onnx(runs["w8a8"].graph(QDQ_ONNX)), "all")
    assert passes["qkv_split"] == BLOCKS and passes["quantizers_moved_before_layout"] >= BLOCKS
    save_onnx(graph, runs["w8a8"].root / "all.onnx")
    shaped = runtime_precisions(_compiled(runs["w8a8"].root / "all.onnx"))
    assert shaped["compute"]["FullyConnected"] == {"int8": PROJECTIONS + 1}
    attention = shaped["compute"].get("MatMul", {})   # where OpenVINO fuses attention, it is a Subgraph instead
    assert attention == {"int8": ATTENTION} or (set(attention) <= {"int8"} and "Subgraph" in shaped["layers"])
    exported = runtime_precisions(_compiled(runs["w8a8"].graph(QDQ_ONNX)))
    assert exported["int8_layers"] == 0 and exported["compute"]["FullyConnected"] == {"f32, u8 weights": 25}


def test_openvino_graph_holds_the_same_values(runs):
    """Every rewrite is value-preserving: ONNX Runtime with its fusions off (the QDQ semantics, float sums) gives
    the exported graph's logits, to the bit for int8 "all". For "exact", whose wide weights are float constants,
    ORT's packed float GEMM sums in another order, so a quantizer downstream may round one step apart."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = lambda model, x: ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]
                                                ).run(None, {"input": x})[0]
    x = np.random.default_rng(1).standard_normal((8, 1, 28, 28)).astype(np.float32)
    for rd in runs.values():
        ref = run(read_onnx(rd.graph(QDQ_ONNX)), x)
        np.testing.assert_array_equal(run(openvino_graph(read_onnx(rd.graph(QDQ_ONNX)), "all")[0], x), ref)
        out = run(openvino_graph(read_onnx(rd.graph(QDQ_ONNX)), "exact")[0], x)
        cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() > 0.9999 and np.abs(out - ref).max() < 0.1, rd.root.name


def test_verify_passes_openvino_artifacts(runs):
    for bits, rd in runs.items():
        record = verify(rd, limit=500, progress=False)
        assert set(record["artifacts"]) == {f"ov-cpu-{bits}", "ov-cpu-fp32"}
        row = record["artifacts"][f"ov-cpu-{bits}"]
        assert row["checked"] and f"ov-cpu-{bits}" not in record["failed"]
        assert row["agreement"] >= 99.5 and row["cosine"] >= 0.999, row
        assert record["artifacts"]["ov-cpu-fp32"]["agreement"] > 90


def test_bench_reports_openvino_speedup_and_profile(runs):
    record = bench(runs["w8a8"], [1], warmup=1, iters=3, min_seconds=0.05, profile_runs=2, progress=lambda m: None)
    assert any(s["quantized"] == "ov-cpu-w8a8" and s["float"] == "ov-cpu-fp32" and s["float_over_quantized_p50"] > 0
               for s in record["speedups"])
    profiles = {p["artifact"]: p for p in record["profiles"]}
    assert profiles["ov-cpu-w8a8"]["total_ms"] > 0 and profiles["ov-cpu-w8a8"]["by_op"]


def test_model_repository_has_an_openvino_entry(runs):
    rd = runs["w4a8"]
    entry = next(p for p in rd.model_repository.iterdir() if p.name.endswith("_openvino"))
    text = (entry / "config.pbtxt").read_text()
    assert 'backend: "openvino"' in text and 'default_model_filename: "model.onnx"' in text
    assert 'name: "input"' in text and 'name: "logits"' in text and 'label_filename: "labels.txt"' in text
    assert "$" not in text
    model = ov.Core().read_model(str(entry / "1" / "model.onnx"))   # the graph build compiled
    assert model.inputs[0].partial_shape[0].is_dynamic
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    served = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]
    art = rd.read_build().artifacts["ov-cpu-w4a8"]
    np.testing.assert_allclose(served, BACKENDS["openvino"].runner(art)(x), rtol=1e-4, atol=1e-4)


def test_check_accepts_the_graph_openvino_compiles(runs, cli):
    for bits, rd in runs.items():
        assert check_graph(read_onnx(rd.graph(OV_ONNX)), "openvino") == [], bits
    r = cli("check", runs["w8a8"].graph(OV_ONNX), "--target", "openvino")
    assert r.returncode == 0 and "conforms to openvino" in r.stdout, r.stderr[-2000:]
    exported = check_graph(read_onnx(runs["w8a8"].graph(QDQ_ONNX)), "openvino")  # uint8 weights: float in OpenVINO
    assert exported and all("zero point" in p for p in exported)


def test_missing_openvino_is_named_in_build_json(runs, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(runs["w8a8"].root, copy, symlinks=True)
    monkeypatch.setitem(sys.modules, "openvino", None)   # `import openvino` raises ImportError
    record = build(copy, progress=lambda m: None, backends=["onnxruntime", "openvino"])  # ONNX Runtime builds as before
    assert record["artifacts"] and not any(a["backend"] == "openvino" for a in record["artifacts"].values())
    why = record["skipped"]["openvino"]
    assert "OpenVINO" in why and "pip install 'mimiq-deploy[openvino]'" in why


def test_config_and_int8_choice(monkeypatch):
    with pytest.raises(MimiqError, match=r"\[openvino\] int8"):
        export_config({"openvino": {"int8": "fast"}}, "test")
    with pytest.raises(MimiqError, match="inference_precision"):
        OpenVINOConfig(inference_precision="int8")
    assert export_config({"openvino": {"int8": "exact", "threads": 2}}, "test").backend("openvino").threads == 2
    monkeypatch.setenv("MIMIQ_CPU_VNNI", "1")
    assert host_int8()[0] == "all"
    monkeypatch.setenv("MIMIQ_CPU_VNNI", "0")
    assert host_int8()[0] == "exact" and choose_int8(None, "auto")[0] == "exact"
    assert choose_int8(None, "all")[0] == "all" and choose_int8("exact", "all")[0] == "exact"
    note = BACKENDS["openvino"].export_graphs(ExportContext(None, None, parse_bits("w4a4"), ExportConfig())).note
    assert "w4a4" in note and "w4a8" in note
