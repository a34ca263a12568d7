"""Host-aware 8-bit encoding of the ONNX Runtime graph; W4A8 on integer kernels; its variants."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from mimiq_deploy.check import check_graph
from mimiq_deploy.data import fmnist_eval_dataset
from mimiq_deploy.backends.onnxruntime.encoding import (DOT_PRODUCT_FLAGS, ENV_VNNI, choose_encoding, cpu_flags,
                                                      fuse_integer_matmuls, host_encoding, host_graph, reencode)
from mimiq_deploy.errors import MimiqError
from mimiq_deploy.export import ExportConfig, export_student
from mimiq_deploy.run_dir import QDQ_ONNX
from mimiq_deploy.finetune import ptq_student, save_student
from mimiq_deploy.quant import parse_bits


def _signed(t: TensorProto) -> np.ndarray:
    a = numpy_helper.to_array(t).astype(np.int16)
    return a - 128 if t.data_type == TensorProto.UINT8 else a


def _run(path, x, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_host_detection_can_be_forced(monkeypatch):
    monkeypatch.setenv(ENV_VNNI, "1")
    assert host_encoding()[0] == "int8"
    monkeypatch.setenv(ENV_VNNI, "0")
    enc, why = host_encoding()
    assert enc == "uint8" and "saturat" in why
    assert choose_encoding(None, "int8")[0] == "int8"            # an explicit ort_int8 wins over the host
    assert choose_encoding("int8", "uint8")[0] == "int8"         # a build option wins over the config
    assert choose_encoding("auto", "auto")[0] == "uint8"
    monkeypatch.setenv(ENV_VNNI, "yes")
    with pytest.raises(MimiqError, match=ENV_VNNI):
        host_encoding()


@pytest.fixture(scope="module")
def calib_images(teacher):
    ds = fmnist_eval_dataset(teacher.pretrained_cfg, split="train")
    return torch.stack([ds[i][0] for i in range(64)])


@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a4"])
def test_reencoded_graphs_hold_the_same_values(teacher, calib_images, bits, tmp_path):
    torch.manual_seed(0)
    student = ptq_student(teacher, parse_bits(bits), calib_images)
    export_student(student, tmp_path, ExportConfig(), progress=lambda m: None)
    src = onnx.load(str(tmp_path / "export" / QDQ_ONNX))
    before = {t.name: _signed(t) for t in src.graph.initializer if t.name.endswith(("_codes", "_zp"))}
    x = calib_images[:16].numpy()
    exact = _run(tmp_path / "export" / QDQ_ONNX, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for encoding in ("int8", "uint8"):
        model = reencode(onnx.load(str(tmp_path / "export" / QDQ_ONNX)), encoding)
        assert check_graph(model, "onnxruntime") == []
        after = {t.name: t for t in model.graph.initializer if t.name in before}
        assert after.keys() == before.keys()
        assert all(np.array_equal(_signed(after[k]), before[k]) for k in before)   # the same integers
        weights = {t.data_type for k, t in after.items() if k.endswith("_codes")}
        assert weights == {TensorProto.INT8 if encoding == "int8" else TensorProto.UINT8}  # INT4 widened too
        if bits == "w4a4":  # 4-bit activations keep their INT4 type
            assert TensorProto.INT4 in {t.data_type for k, t in after.items() if k.endswith("_zp")}
        path = tmp_path / f"{encoding}.onnx"
        onnx.save(model, str(path))
        np.testing.assert_array_equal(_run(path, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), exact)
        # what build deploys: also Conv / Gemm weights folded to float, the qkv projection split in three
        host = host_graph(onnx.load(str(tmp_path / "export" / QDQ_ONNX)), encoding)
        assert check_graph(host, "onnxruntime") == []
        ops = [n.op_type for n in host.graph.node]
        assert "Split" not in ops and ops.count("MatMul") == len(teacher.blocks) * 8  # q, k, v, qk, av, proj, fc1, fc2
        assert not any(n.op_type == "DequantizeLinear" and n.input[0] in {t.name for t in host.graph.initializer}
                       and "patch_embed" in n.name for n in host.graph.node)  # stem weights folded
        path = tmp_path / f"{encoding}.host.onnx"
        onnx.save(host, str(path))
        np.testing.assert_array_equal(_run(path, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), exact)
        # without VNNI, ORT's u8s8 kernels sum in saturating 16-bit pairs: fused int8 is inexact there by design
        exact_kernels = encoding == "uint8" or host_encoding()[0] == "int8"
        fused = _run(path, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        cos = (fused * exact).sum(1) / (np.linalg.norm(fused, axis=1) * np.linalg.norm(exact, axis=1))
        assert not exact_kernels or ((fused.argmax(1) == exact.argmax(1)).all() and cos.min() > 0.999), cos.min()
        # the CPU graph: each projection with its bias in one MatMulIntegerToFloat, where activations are 8-bit
        cpu, count = fuse_integer_matmuls(host)
        assert count == (0 if bits == "w4a4" else len(teacher.blocks) * 6)  # q, k, v, proj, fc1, fc2
        assert [n.op_type for n in cpu.graph.node].count("MatMulIntegerToFloat") == count
        if count:
            path = tmp_path / f"{encoding}.cpu.onnx"
            onnx.save(cpu, str(path))
            # with ORT's fusions on, what its own QDQ fusions compute; the bias is only added in the kernel
            cpu_out = _run(path, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            if exact_kernels:
                np.testing.assert_allclose(cpu_out, fused, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a4"])
def test_build_and_verify_with_either_host_encoding(teacher, calib_images, bits, tmp_path, monkeypatch):
    from mimiq_deploy.build import build
    from mimiq_deploy.verify import verify

    torch.manual_seed(0)
    cfg = parse_bits(bits)
    student = ptq_student(teacher, cfg, calib_images)
    save_student(tmp_path / "student.pt", student, "fmnist-vit", None, cfg, {})
    export_student(student, tmp_path, ExportConfig(), progress=lambda m: None)
    for vnni, encoding in (("1", "int8"), ("0", "uint8")):  # this host as a VNNI one, and as a pre-VNNI one
        monkeypatch.setenv(ENV_VNNI, vnni)
        built = build(tmp_path, progress=lambda m: None)
        assert built["backends"]["onnxruntime"]["encoding"] == encoding and built["backends"]["onnxruntime"]["reason"]
        # int8 hosts: the one activation quantizer shared by q, k, v is stored as uint8 / 128 (ORT's u8s8 form)
        # A4: the attention probabilities are UINT4 (unsigned grid), the other activations INT4
        assert set(built["backends"]["onnxruntime"]["stored"]) <= {encoding, "int4", "uint8", "uint4"}
        assert ("uint4" in built["backends"]["onnxruntime"]["stored"]) == (bits == "w4a4")
        main = built["artifacts"][f"ort-cpu-{bits}"]
        # A8: the CPU graph with the bias in MatMulIntegerToFloat; A4 has no such kernel: the standard graph
        cpu_suffix = "" if bits == "w4a4" else ".cpu"
        assert main["path"].endswith(f"model_qdq.{encoding}{cpu_suffix}.onnx")
        assert built["artifacts"][f"ort-cpu-{bits}-unfused"]["path"].endswith(f"model_qdq.{encoding}.onnx")
        assert main.get("portable", main["path"]).endswith(f"model_qdq.{encoding}.onnx")
        if bits != "w4a4":  # W4A8 runs on the integer kernels of W8A8
            kernels = main["integer_kernels"]
            assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) == 6 * 8  # every matmul
            assert main["float_matmuls"] <= 1 and "Split" not in main["op_counts"]
        if bits.startswith("w4"):
            small = built["artifacts"][f"ort-cpu-{bits}-int4"]
            assert small["path"].endswith(f"model_qdq_int4.{encoding}.onnx")
            assert "MatMulNBits" in built["artifacts"]["ort-cpu-w4a16"]["integer_kernels"]
            assert built["artifacts"]["ort-cpu-w4a16"]["weight_only"]
        if encoding == "int8" and not set(DOT_PRODUCT_FLAGS) & cpu_flags():
            continue  # built as for a VNNI host on one without: u8s8 sums saturate here, verify would rightly fail
        report = verify(tmp_path, limit=500, progress=False)
        assert report["failed"] == []
        for name, row in report["artifacts"].items():
            if row["checked"]:
                assert row["agreement"] >= 99.5 and row["cosine"] >= 0.999, (encoding, name, row)
        checked = {n for n, r in report["artifacts"].items() if r["checked"]}
        assert {f"ort-cpu-{bits}", f"ort-cpu-{bits}-unfused"} <= checked


def test_bench_interleaves_and_profiles_by_op_type(teacher, calib_images, tmp_path, monkeypatch):
    from mimiq_deploy import build as build_module
    from mimiq_deploy.backends import BACKENDS
    from mimiq_deploy.bench import bench, format_bench
    from mimiq_deploy.build import build

    # ONNX Runtime's artifacts and profiler only (the other back ends have their own tests)
    monkeypatch.setattr(build_module, "BACKENDS", {"onnxruntime": BACKENDS["onnxruntime"]})

    student = ptq_student(teacher, parse_bits("w4a8"), calib_images[:16])
    export_student(student, tmp_path, ExportConfig(), progress=lambda m: None)
    build(tmp_path, progress=lambda m: None)
    report = bench(tmp_path, [2], warmup=1, iters=4, min_seconds=0, profile_runs=2, progress=lambda m: None)
    names = {r["artifact"] for r in report["rows"]}
    assert names == {"ort-cpu-w4a8", "ort-cpu-w4a8-int4", "ort-cpu-w4a16", "ort-cpu-fp32"}  # each its own artifact
    # turns of back-to-back runs sized in time (bench.turn_sizes): at least `iters`, the same count for each
    assert len({r["iters"] for r in report["rows"]}) == 1 and report["rows"][0]["iters"] >= 4 and report["interleaved"]
    profiles = {p["artifact"]: p for p in report["profiles"]}
    assert profiles.keys() == names
    for p in profiles.values():
        assert p["total_ms"] > 0 and abs(sum(p["by_group"].values()) - 100) < 1e-6
    assert profiles["ort-cpu-w4a8"]["by_group"]["integer matmul"] > 0
    assert "integer matmul" not in profiles["ort-cpu-fp32"]["by_group"]
    assert profiles["ort-cpu-w4a16"]["by_op"]["MatMulNBits"] > 0
    assert "time by op type, ort-cpu-w4a8 batch 2" in format_bench(report)


def test_power_of_two_attention_scale_folds_into_q_exactly(tmp_path):
    """Head width 16: q * 0.25 moves into q's weight step sizes and bias; the built graph gives the same bits."""
    import timm

    from mimiq_deploy.backends.onnxruntime.encoding import fold_attention_scale, fold_float_weights, split_qkv
    from mimiq_deploy.families import capture_attention
    from mimiq_deploy.onnx_graph import copy_model

    torch.manual_seed(0)
    model = capture_attention(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                                embed_dim=64, depth=2, num_heads=4, num_classes=10)).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias.normal_()  # timm starts them at zero, which a wrong fold would not show
    x = torch.randn(8, 3, 32, 32)
    export_student(ptq_student(model, parse_bits("w8a8"), x), tmp_path, ExportConfig(), progress=lambda m: None)
    unfolded = split_qkv(fold_float_weights(reencode(onnx.load(str(tmp_path / "export" / QDQ_ONNX)), "int8")))
    folded = fold_attention_scale(copy_model(unfolded))
    muls = [sum(n.op_type == "Mul" for n in g.graph.node) for g in (unfolded, folded)]
    assert muls[0] - muls[1] == 2  # one per block
    assert check_graph(folded, "onnxruntime") == []
    # the q projection's per-channel step sizes and bias, a quarter of what they were
    before = {t.name: numpy_helper.to_array(t) for t in unfolded.graph.initializer if "split0" in t.name}
    after = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer if "split0" in t.name}
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(changed) == 4 and all(np.array_equal(after[k], before[k] * np.float32(0.25)) for k in changed)
    for name, graph in (("unfolded", unfolded), ("folded", folded)):
        onnx.save(graph, str(tmp_path / f"{name}.onnx"))
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        np.testing.assert_array_equal(_run(tmp_path / "folded.onnx", x.numpy(), level),
                                      _run(tmp_path / "unfolded.onnx", x.numpy(), level))


def test_bench_turns_are_sized_in_time():
    """A turn gives the fastest candidate 0.1 s of uncounted and 0.3 s of counted runs: 10 and 30 runs of a 10 ms
    model, 1 and 3 (the least) of a 0.5 s one."""
    from mimiq_deploy.bench import turn_sizes

    assert turn_sizes({"fast": lambda: 10.0, "slow": lambda: 40.0}) == (10, 30)
    assert turn_sizes({"big": lambda: 500.0}) == (1, 3)
