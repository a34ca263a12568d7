"""TensorRT's fused-attention verdict (backends/tensorrt/attention.py): real exported graphs fuse where the shapes
allow, and each broken condition, made by editing an exported graph, names itself."""
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from mimiq_deploy.backends import BACKENDS
from mimiq_deploy.backends.tensorrt import TRT_FLOAT_ONNX, TRT_ONNX
from mimiq_deploy.backends.tensorrt.attention import (EngineAttention, EngineLayer, attention_blocks, engine_layers,
                                                      table_lines)
from mimiq_deploy.build import build
from mimiq_deploy.cli import main
from mimiq_deploy.export import ExportConfig, export_student
from mimiq_deploy.families import capture_attention
from mimiq_deploy.finetune import build_student
from mimiq_deploy.models import load_model
from mimiq_deploy.onnx_graph import consumers, producers
from mimiq_deploy.quant import calibrate, parse_bits
from mimiq_deploy.run_dir import BuildRecord, RunDir

TRT = BACKENDS["tensorrt"]
TRT_OK, TRT_WHY = TRT.available()


def _export(model, run_dir, bits="w8a8") -> onnx.ModelProto:
    torch.manual_seed(0)
    student = build_student(model, parse_bits(bits))
    calibrate(student, torch.randn(2, *model.pretrained_cfg["input_size"]))
    export_student(student, run_dir, ExportConfig(), progress=lambda m: None)
    return onnx.load(str(RunDir(run_dir).graph(TRT_ONNX)))


def _tiny(cls, size, **kw):
    torch.manual_seed(0)
    model = cls(img_size=size, in_chans=1, num_classes=10, **kw)
    model.pretrained_cfg = {"input_size": (1, size, size), "mean": (0.5,), "std": (0.5,), "num_classes": 10}
    return capture_attention(model).eval()


def _vit(embed_dim=64, heads=2, size=28, depth=2):
    return _tiny(VisionTransformer, size, patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=heads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A timm ViT with head size 32 (embed_dim 64, 2 heads, 50 tokens), exported W8A8."""
    run = tmp_path_factory.mktemp("tiny")
    return run, _export(_vit(), run)


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _unquantize(model, matmul, index):
    """Drop the Q/DQ pair in front of input `index` of `matmul`: it takes the float tensor."""
    prod = producers(model)
    dq = prod[_node(model, matmul).input[index]]
    q = prod[dq.input[0]]
    for n in consumers(model)[dq.output[0]]:
        n.input[list(n.input).index(dq.output[0])] = q.input[0]
    for n in (q, dq):
        model.graph.node.remove(n)
    return model


QK, AV = "/blocks/blocks.0/attn/qk/MatMul", "/blocks/blocks.0/attn/av/MatMul"


def _mul_after_softmax(model):
    """Softmax -> (Cast) -> Mul -> QuantizeLinear: an op the pattern does not allow."""
    prod = producers(model)
    q = prod[prod[_node(model, AV).input[0]].input[0]]
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.float16), "one"))
    mul = helper.make_node("Mul", [q.input[0], "one"], ["scaled_p"], name="extra_mul")
    q.input[0] = "scaled_p"
    model.graph.node.insert(list(model.graph.node).index(q), mul)
    return model


def _transpose_after_dq(model):
    """k's Transpose moved from before its Q/DQ to between the DQ and the matmul."""
    prod = producers(model)
    dq = prod[_node(model, QK).input[1]]
    q = prod[dq.input[0]]
    tr = prod[q.input[0]]
    q.input[0], tr.input[0] = tr.input[0], dq.output[0]
    _node(model, QK).input[1] = tr.output[0]
    model.graph.node.remove(tr)
    model.graph.node.insert(list(model.graph.node).index(dq) + 1, tr)
    return model


def _zero_points(model, dtype, operands=(0, 1, 2, 3)):
    """The Q/DQ of block 0's attention operands (q, k, p, v) re-typed to `dtype` (zero point 0)."""
    prod = producers(model)
    tensors = [_node(model, QK).input[0], _node(model, QK).input[1], _node(model, AV).input[0],
               _node(model, AV).input[1]]
    names = {prod[tensors[i]].input[2] for i in operands}
    for i, t in enumerate(model.graph.initializer):
        if t.name in names:
            model.graph.initializer[i].CopyFrom(helper.make_tensor(t.name, dtype, list(t.dims), [0]))
    return model


def _block0(model):
    blocks = attention_blocks(model)
    assert len(blocks) == 2 and blocks[1].fusable  # the edit stays in block 0
    return blocks[0]


def test_embedded_vit_every_block_fusable(tmp_path):
    blocks = attention_blocks(_export(load_model("fmnist-vit"), tmp_path))
    assert [b.block for b in blocks] == [f"blocks.{i}.attn" for i in range(6)]
    for b in blocks:
        assert (b.heads, b.head_size, b.seq_len, b.qdq_type, b.fusable) == (4, 32, 50, "INT8", True), b


def test_tiny_vit_fusable_and_table(tiny_run):
    _, model = tiny_run
    blocks = attention_blocks(model)
    assert all(b.fusable and b.head_size == 32 and b.heads == 2 and b.seq_len == 50 for b in blocks)
    assert all(b.qdq == {"q": "INT8", "k": "INT8", "p": "INT8", "v": "INT8"} for b in blocks)
    lines = table_lines(blocks)
    assert lines[0].startswith("| block | heads | head size | seq len | Q/DQ | fusable | reason |")
    assert "| blocks.0.attn | 2 | 32 | 50 | INT8 | yes |  |" in lines
    assert "2 of 2 attention blocks fusable" in "\n".join(lines)


def test_float_graph_is_not_quantized_attention(tiny_run):
    run, _ = tiny_run
    blocks = attention_blocks(onnx.load(str(RunDir(run).graph(TRT_FLOAT_ONNX))))  # the float twin
    assert [b.reasons for b in blocks] == [["attention not quantized (runs in float: TensorRT's FP16 MHA may fuse "
                                            "it)"]] * 2 and blocks[0].qdq_type == "none"


@pytest.mark.parametrize("edit, reason", [
    (lambda m: _unquantize(m, QK, 0), "q operand not from a DequantizeLinear"),
    (lambda m: _unquantize(m, QK, 1), "k operand not from a DequantizeLinear"),
    (lambda m: _unquantize(m, AV, 0), "softmax output not quantized"),
    (lambda m: _unquantize(m, AV, 1), "v operand not from a DequantizeLinear"),
    (_mul_after_softmax, "Mul between softmax and its QuantizeLinear"),
    (_transpose_after_dq, "Transpose between the k DequantizeLinear and the matmul"),
    (lambda m: _zero_points(m, TensorProto.INT4), "INT4 Q/DQ (fused MHA takes INT8 or FP8)"),
    (lambda m: _zero_points(m, TensorProto.FLOAT8E4M3FN, (1,)), "mixed Q/DQ types (FP8, INT8)"),
    (lambda m: _unquantize(m, "/blocks/blocks.0/attn/proj/MatMul", 0), "P·V output not quantized"),
])
def test_each_broken_condition_is_named(tiny_run, edit, reason):
    block = _block0(edit(_copy(tiny_run[1])))
    assert not block.fusable
    assert any(r.startswith(reason) for r in block.reasons), block.reasons


def test_fp8_qdq_is_fusable(tiny_run):
    block = _block0(_zero_points(_copy(tiny_run[1]), TensorProto.FLOAT8E4M3FN))
    assert block.fusable and block.qdq_type == "FP8"


@pytest.mark.parametrize("embed_dim, heads, size, fusable, reason", [
    (64, 4, 28, True, None),                  # head size 16
    (96, 2, 28, False, "head size 48 (fused MHA needs 16, 32 or 64)"),
    (32, 2, 96, False, "sequence length 577 (INT8 fused MHA needs <= 512)"),
])
def test_shapes(tmp_path, embed_dim, heads, size, fusable, reason):
    (block,) = attention_blocks(_export(_vit(embed_dim, heads, size, depth=1), tmp_path))
    assert block.fusable == fusable and block.reasons == ([reason] if reason else []), block


def test_swin_window_attention(tmp_path):
    """Window attention: relative position bias Add, the shifted block's mask Add between Reshapes; the sequence is
    a window's 49 tokens."""
    model = _tiny(SwinTransformer, 56, patch_size=4, window_size=7, embed_dim=32, depths=(2,), num_heads=(2,))
    blocks = attention_blocks(_export(model, tmp_path))
    assert [b.block for b in blocks] == ["layers.0.blocks.0.attn", "layers.0.blocks.1.attn"]
    assert all(b.fusable and (b.heads, b.head_size, b.seq_len) == (2, 16, 49) for b in blocks), blocks
    assert "Reshape between Q·Kᵀ and softmax" in blocks[1].notes  # the shifted window's mask


def test_check_prints_the_table_after_conformance(tiny_run, tmp_path):
    run, model = tiny_run
    r = CliRunner().invoke(main, ["check", str(RunDir(run).graph(TRT_ONNX)), "--target", "tensorrt"])
    assert r.exit_code == 0, r.output
    out = r.output.splitlines()
    assert out[0].endswith("conforms to tensorrt") and "| blocks.1.attn | 2 | 32 | 50 | INT8 | yes |  |" in out
    bad = tmp_path / "unfused.onnx"
    onnx.save(_unquantize(_copy(model), AV, 0), str(bad))  # unfusable is not a violation
    r = CliRunner().invoke(main, ["check", str(bad), "--target", "tensorrt", "--json"])
    assert r.exit_code == 0, r.output
    found = json.loads(r.output)
    assert found["violations"] == [] and not found["analysis"]["attention"][0]["fusable"]
    r = CliRunner().invoke(main, ["check", str(bad), "--target", "onnxruntime"])  # no analysis of its own
    assert r.exit_code == 0 and "block" not in r.output


def test_build_stores_the_verdict_without_an_engine(tiny_run):
    run, _ = tiny_run
    build(run, progress=lambda m: None)
    record = RunDir(run).read_build()
    blocks = record.backends["tensorrt"]["attention"]
    assert [b["fusable"] for b in blocks] == [True, True]
    lines = TRT.report_lines(record.backends["tensorrt"])
    assert "| blocks.0.attn | 2 | 32 | 50 | INT8 | yes |  |" in lines
    old = BuildRecord.from_json({"bits": "w8a8", "artifacts": {}, "skipped": {}})  # build.json of earlier versions
    assert old.backends == {} and TRT.report_lines({}) == []


def test_engine_layer_information_is_read():
    """IEngineInspector's JSON (DETAILED verbosity) as layers; a fused MHA layer is named by its kernel."""
    info = json.dumps({"Layers": [
        {"Name": "_gemm_mha_v2_myl0_3", "LayerType": "kgen", "TacticName": "",
         "Inputs": [{"Name": "q", "Format/Datatype": "Int8 linear"}, {"Name": "k", "Format/Datatype": "Int8 linear"}]},
        {"Name": "__myl_MulCast_myl0_2", "LayerType": "kgen", "Inputs": [{"Format/Datatype": "Half"}]},
        "names_only_layer"], "Bindings": ["input", "logits"]})
    layers = engine_layers(info)
    assert [(x.name, x.precision, x.fused_attention, x.quantized) for x in layers] == [
        ("_gemm_mha_v2_myl0_3", "Int8", True, True), ("__myl_MulCast_myl0_2", "Half", False, False),
        ("names_only_layer", "", False, False)]
    found = EngineAttention.compare([], layers)  # no block fusable, one quantized MHA layer
    assert (found.fused_layers, found.quantized_layers, found.agrees) == (1, 1, False)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT cannot run here: {TRT_WHY}")
def test_engine_fuses_what_the_static_check_says(tiny_run):
    run, model = tiny_run
    info = TRT.build(RunDir(run).graph(TRT_ONNX), RunDir(run).export_dir / "attn.plan", 1, 8, 16, 1024)
    layers = [EngineLayer.from_json(x) for x in info["layers"]]
    assert any(x.precision for x in layers)  # DETAILED profiling verbosity: the layers' precisions are there
    found = EngineAttention.compare(attention_blocks(model), layers)
    assert found.agrees, found.line("trt-w8a8")
