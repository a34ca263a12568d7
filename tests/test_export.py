"""QDQ export: graph structure, conformance checks, ORT agreement, build / verify / bench plumbing."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from onnx import TensorProto, numpy_helper

from mimiq_deploy.families import capture_attention
from mimiq_deploy.check import check_graph
from mimiq_deploy.backends.tensorrt import TRT_ONNX
from mimiq_deploy.export import ExportConfig, export_config, export_student
from mimiq_deploy.run_dir import QDQ_ONNX
from mimiq_deploy.finetune import build_student
from mimiq_deploy.models import load_model
from mimiq_deploy.onnx_graph import constants
from mimiq_deploy.quant import calibrate, parse_bits


def _student(teacher, bits, images):
    student = build_student(teacher, parse_bits(bits))
    calibrate(student, images)
    return student


@pytest.fixture(scope="module")
def teacher():
    return load_model("fmnist-vit")


@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a4"])
def test_ort_graph_matches_fake_quant(teacher, bits, tmp_path):
    torch.manual_seed(0)
    student = _student(teacher, bits, torch.randn(32, 1, 28, 28))
    manifest = export_student(student, tmp_path, ExportConfig(), progress=lambda m: None)
    model = onnx.load(str(tmp_path / "export" / QDQ_ONNX))
    assert check_graph(model, "onnxruntime") == []
    weight_types = {t.data_type for t in model.graph.initializer if t.name.endswith("_codes")}
    assert weight_types == ({TensorProto.UINT8} if bits == "w8a8" else {TensorProto.INT4})  # uint8: zero point 128
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        ref = student(x).numpy()
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,  # exact QDQ semantics, float sums
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):  # fused integer kernels
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(str(tmp_path / "export" / QDQ_ONNX), so, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"input": x.numpy()})[0]
        cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() > 0.995, (level, cos.min())
        if level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL:  # noise images: near-tie logits
            assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
    inits = {t.name: t for t in model.graph.initializer}
    # no block computes a reshape's shape at run time (constant_reshape_shapes); the patch embedding's flatten
    # (two dimensions unknown to shape inference) and the class token's expand to the batch still read Shape
    fixed = constants(model)
    assert [n.name for n in model.graph.node if n.op_type == "Reshape" and n.input[1] not in fixed] == [
        "/patch_embed/Reshape"]
    assert sum(n.op_type == "Shape" for n in model.graph.node) <= 3
    prob_zps = {inits[n.input[2]].data_type for n in model.graph.node
                if n.op_type == "QuantizeLinear" and "av_a_quant" in n.name}
    assert prob_zps == ({TensorProto.UINT4} if bits == "w4a4" else {TensorProto.UINT8})  # attention probabilities
    if bits == "w4a4":
        assert "tensorrt" in manifest["notes"] and "w4a8" in manifest["notes"]["tensorrt"]
        assert not (tmp_path / "export" / TRT_ONNX).exists()
    else:
        assert check_graph(onnx.load(str(tmp_path / "export" / TRT_ONNX)), "tensorrt") == []


def test_uint8_and_int8_ort_graphs_hold_the_same_values(teacher, tmp_path):
    torch.manual_seed(1)
    student = _student(teacher, "w8a8", torch.randn(16, 1, 28, 28))
    outs, weights = {}, {}
    for encoding in ("uint8", "int8"):
        export_student(student, tmp_path / encoding, export_config({"onnxruntime": {"int8": encoding}}, "test"), progress=lambda m: None)
        model = onnx.load(str(tmp_path / encoding / "export" / QDQ_ONNX))
        weights[encoding] = {k: numpy_helper.to_array(t).astype(np.int16) for t in model.graph.initializer
                             for k in [t.name] if k.endswith(("_codes", "_zp"))}
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(tmp_path / encoding / "export" / QDQ_ONNX), so, providers=["CPUExecutionProvider"])
        outs[encoding] = sess.run(None, {"input": np.random.default_rng(0).standard_normal((8, 1, 28, 28), np.float32)})[0]
    assert weights["uint8"].keys() == weights["int8"].keys()
    assert all(np.array_equal(weights["uint8"][k] - 128, weights["int8"][k]) for k in weights["int8"])  # codes and zps
    np.testing.assert_array_equal(outs["uint8"], outs["int8"])


def test_weight_codes_are_the_students_integers(teacher, tmp_path):
    student = _student(teacher, "w4a8", torch.randn(16, 1, 28, 28))
    export_student(student, tmp_path, ExportConfig(), progress=lambda m: None)
    model = onnx.load(str(tmp_path / "export" / QDQ_ONNX))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    fc1 = student.blocks[0].mlp.fc1
    ours = torch.clamp(torch.round(fc1.weight / fc1.weight_quant.scale.view(-1, 1)), -7, 7).detach().numpy()
    stored = [v for k, v in inits.items() if k.endswith("_codes") and v.shape == ours.T.shape and "blocks.0" in k
              and "fc1" in k]
    assert len(stored) == 1 and np.array_equal(stored[0].astype(np.float32), ours.T)


def test_fp8_graphs_hold_the_students_e4m3_codes(teacher, tmp_path):
    """fp8: FLOAT8E4M3FN weights and activations in both the ONNX Runtime graph (run here, dequantized to float)
    and TensorRT's FP16 graph; OpenVINO refuses it in one line."""
    torch.manual_seed(0)
    student = _student(teacher, "fp8", torch.randn(32, 1, 28, 28))
    manifest = export_student(student, tmp_path, ExportConfig(), progress=lambda m: None)
    assert "fp8" in manifest["notes"]["openvino"] and "tensorrt" not in manifest["notes"]
    for graph, target in ((QDQ_ONNX, "onnxruntime"), (TRT_ONNX, "tensorrt")):
        model = onnx.load(str(tmp_path / "export" / graph))
        assert check_graph(model, target) == [], graph
        inits = {t.name: t for t in model.graph.initializer}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq and {inits[n.input[2]].data_type for n in qdq} == {TensorProto.FLOAT8E4M3FN}, graph
        assert {inits[n.input[0]].data_type for n in qdq if n.input[0] in inits} == {TensorProto.FLOAT8E4M3FN}
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "export" / QDQ_ONNX)).graph.initializer}
    fc1 = student.blocks[0].mlp.fc1
    ours = (fc1.weight / fc1.weight_quant.scale.view(-1, 1)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    stored = [v for k, v in inits.items() if k.endswith("_codes") and "blocks.0" in k and "fc1" in k]
    assert len(stored) == 1 and np.array_equal(stored[0].astype(np.float32), ours.detach().numpy().T)
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        ref = student(x).numpy()
    out = ort.InferenceSession(str(tmp_path / "export" / QDQ_ONNX), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.999 and (out.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_fp8_check_rules(teacher, tmp_path):
    """Saturation, E4M3FN only for TensorRT, and no FP8 into softmax."""
    student = _student(teacher, "fp8", torch.randn(8, 1, 28, 28))
    export_student(student, tmp_path, ExportConfig(), progress=lambda m: None)
    model = onnx.load(str(tmp_path / "export" / TRT_ONNX))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    q.attribute.append(onnx.helper.make_attribute("saturate", 0))
    assert any("saturate=0" in v for v in check_graph(model, "tensorrt"))
    model = onnx.load(str(tmp_path / "export" / TRT_ONNX))
    zp = next(t for t in model.graph.initializer if t.name == next(
        n for n in model.graph.node if n.op_type == "QuantizeLinear").input[2])
    zp.data_type = TensorProto.FLOAT8E5M2
    assert any("FLOAT8E5M2" in v for v in check_graph(model, "tensorrt"))
    assert not any("FLOAT8E5M2" in v for v in check_graph(model, "onnxruntime"))  # ORT runs E5M2 too
    model = onnx.load(str(tmp_path / "export" / QDQ_ONNX))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in
              {t.name for t in model.graph.initializer})
    softmax.input[0] = dq.output[0]
    assert any("feeds Softmax" in v for v in check_graph(model, "onnxruntime"))


def test_deit_tiny_graph_passes_tensorrt_check(tmp_path):
    torch.manual_seed(0)
    teacher = capture_attention(timm.create_model("deit_tiny_patch16_224", pretrained=False)).eval()
    for bits in ("w8a8", "w4a8"):
        student = _student(teacher, bits, torch.randn(2, 3, 224, 224))
        export_student(student, tmp_path / bits, ExportConfig(), progress=lambda m: None)
        assert check_graph(onnx.load(str(tmp_path / bits / "export" / TRT_ONNX)), "tensorrt") == []


def test_check_reports_violations(teacher, tmp_path, cli):
    student = _student(teacher, "w8a8", torch.randn(8, 1, 28, 28))
    export_student(student, tmp_path, ExportConfig(), progress=lambda m: None)
    model = onnx.load(str(tmp_path / "export" / QDQ_ONNX))
    zp = next(t for t in model.graph.initializer if t.name.endswith("_zp") and not t.dims)
    zp.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zp.name))
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_q"))
    ln.input[0] = dq.output[0]  # a DQ feeding LayerNorm
    problems = check_graph(model, "tensorrt")
    assert any("zero point is not zero" in p for p in problems)
    assert any("uint8 quantization" in p for p in problems)  # the ORT graph's uint8 encoding is not TensorRT's
    assert any("LayerNormalization" in p and "float" in p for p in problems)
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    r = cli("check", bad, "--target", "tensorrt")
    assert r.returncode == 1 and "zero point is not zero" in r.stdout and "violation" in r.stderr


def test_unexportable_bits_are_refused(teacher, tmp_path):
    from mimiq_deploy.errors import MimiqError
    student = _student(teacher, "w6a6", torch.randn(4, 1, 28, 28))
    with pytest.raises(MimiqError, match="INT8 and INT4"):
        export_student(student, tmp_path, ExportConfig(), progress=lambda m: None)
    assert not (tmp_path / "export").exists()


def test_build_verify_bench_on_a_tiny_run(teacher, tmp_path, cli):
    from mimiq_deploy.build import build
    from mimiq_deploy.bench import bench
    from mimiq_deploy.finetune import FinetuneRecipe, finetune
    from mimiq_deploy.synthesize import SynthesisRecipe, synthesize
    from mimiq_deploy.verify import verify

    synthesize(teacher, "fmnist-vit", tmp_path, SynthesisRecipe(num_images=16, batch_size=8, steps=2, jitter=2),
               progress=False)
    finetune(teacher, "fmnist-vit", None, tmp_path, parse_bits("w8a8"), FinetuneRecipe(epochs=0, calib_images=16),
             progress=False)
    r = cli("export", tmp_path)
    assert r.returncode == 0, r.stderr
    built = build(tmp_path, progress=lambda m: None)
    assert built["artifacts"]["ort-cpu-w8a8"]["integer_kernels"]  # real integer MatMul kernels
    assert "tensorrt" in built["skipped"] or "trt-w8a8" in built["artifacts"]
    repo = tmp_path / "model_repository"
    assert (repo / "fmnist_vit_w8a8_onnx" / "1" / "model.onnx").exists()
    assert 'backend: "onnxruntime"' in (repo / "fmnist_vit_w8a8_onnx" / "config.pbtxt").read_text()
    report = verify(tmp_path, limit=200, progress=False)
    row = report["artifacts"]["ort-cpu-w8a8"]
    assert row["checked"] and report["n"] == 200 and report["failed"] == []
    assert row["agreement"] >= 99.5 and row["cosine"] >= 0.999, row  # the integer graph computes the student's maths
    assert json.loads((tmp_path / "verify.json").read_text())["n"] == 200
    result = bench(tmp_path, [1, 4], warmup=1, iters=3, min_seconds=0, progress=lambda m: None)
    assert {(r["artifact"], r["batch"]) for r in result["rows"]} >= {("ort-cpu-w8a8", 1), ("ort-cpu-fp32", 4)}
    assert all(r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in result["rows"])


def test_missing_stages_give_one_line_errors(cli, tmp_path):
    for verb in ("export", "build", "verify", "bench"):
        r = cli(verb, tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("error:"), (verb, r.stderr)


def test_run_time_reshape_shapes_become_constants():
    """x.reshape(B, 24) as torch.onnx writes it: the shape computed from Shape(x). The pass makes it [-1, 24],
    drops the chain, and the graph gives the same values at any batch size."""
    from onnx import helper

    from mimiq_deploy.onnx_graph import constant_reshape_shapes

    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "zero_1d"], ["b1"]),
             helper.make_node("Concat", ["b1", "rest"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("Relu", ["flat"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "zero_1d"),
             numpy_helper.from_array(np.array([24], np.int64), "rest")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    before = model.SerializeToString()
    model, count = constant_reshape_shapes(model)
    assert count == 1 and [n.op_type for n in model.graph.node] == ["Reshape", "Relu"]
    shape = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[model.graph.node[0].input[1]]
    assert shape.tolist() == [-1, 24] and {t.name for t in model.graph.initializer} == {model.graph.node[0].input[1]}
    for b in (1, 5):
        x = np.random.default_rng(b).standard_normal((b, 4, 6)).astype(np.float32)
        ref = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert out.shape == (b, 24) and np.array_equal(out, ref)
