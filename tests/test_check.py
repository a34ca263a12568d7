"""Every rule of `check` (check.py) has a small graph that breaks it; the unbroken graph passes."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mimiq_deploy.check import check_graph


def _graph(opset=21, **change):
    """x -> Relu -> Q/DQ -> MatMul(DQ int8 per-channel weight) -> residual Add with the Relu output -> LayerNorm."""
    inits = {
        "s_x": np.array(0.1, np.float32), "zp_x": np.array(0, np.int8),
        "w_codes": np.ones((4, 4), np.int8), "w_scale": np.full(4, 0.05, np.float32), "w_zp": np.zeros(4, np.int8),
        "ln_s": np.ones(4, np.float32), "ln_b": np.zeros(4, np.float32),
    }
    inits.update({k: v for k, v in change.items() if isinstance(v, np.ndarray)})
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s_x", "zp_x"], ["r_q"], name="q_r"),
             helper.make_node("DequantizeLinear", ["r_q", "s_x", "zp_x"], ["r_dq"], name="dq_r"),
             helper.make_node("DequantizeLinear", ["w_codes", "w_scale", "w_zp"], ["w"], name="dq_w", axis=1),
             helper.make_node("MatMul", ["r_dq", "w"], ["h"], name="matmul"),
             helper.make_node("Add", ["r", "h"], ["res"], name="residual"),
             helper.make_node("LayerNormalization", ["res", "ln_s", "ln_b"], ["y"], name="ln", axis=-1)]
    for edit in change.get("edits", []):
        edit(nodes, tensors)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _node(nodes, name):
    return next(n for n in nodes if n.name == name)


def _int4_weights(nodes, tensors, block=False):
    for i, t in enumerate(tensors):
        if t.name in ("w_codes", "w_zp"):
            dims = list(t.dims)
            tensors[i] = helper.make_tensor(t.name, TensorProto.INT4, dims, [1 if t.name == "w_codes" else 0]
                                            * int(np.prod(dims)))
    if block:
        _node(nodes, "dq_w").attribute.append(helper.make_attribute("block_size", 2))


def _quantize_residual(nodes, tensors):
    nodes.insert(6, helper.make_node("QuantizeLinear", ["res", "s_x", "zp_x"], ["res_q"], name="q_res"))


def _dq_into_layernorm(nodes, tensors):
    _node(nodes, "ln").input[0] = "r_dq"


def _dq_into_residual(nodes, tensors):
    _node(nodes, "residual").input[0] = "r_dq"


def _custom_op(nodes, tensors):
    nodes.insert(1, helper.make_node("FakeQuant", ["r"], ["r_fq"], name="fq", domain="mimiq"))


def _scale_from_input(nodes, tensors):
    _node(nodes, "q_r").input[1] = "x"


def _int4_activation(nodes, tensors):
    for i, t in enumerate(tensors):
        if t.name == "zp_x":
            tensors[i] = helper.make_tensor("zp_x", TensorProto.INT4, [], [0])


def _uint8(zp):
    def edit(nodes, tensors):
        for i, t in enumerate(tensors):
            if t.name == "zp_x":
                tensors[i] = numpy_helper.from_array(np.array(zp, np.uint8), "zp_x")
    return edit


CASES = {  # rule: (target, graph, words of the violation)
    "zero point": ("tensorrt", dict(zp_x=np.array(3, np.int8)), "zero point is not zero"),
    "zero point (ORT)": ("onnxruntime", dict(zp_x=np.array(3, np.int8)), "zero point is not zero"),
    "weight zero point": ("tensorrt", dict(w_zp=np.array([0, 1, 0, 0], np.int8)), "dq_w: zero point is not zero"),
    "uint8 for TensorRT": ("tensorrt", dict(edits=[_uint8(128)]), "uint8 quantization"),
    "uint8 not 128": ("onnxruntime", dict(edits=[_uint8(100)]), "uint8 zero point is not 128"),
    "residual stream quantized": ("tensorrt", dict(edits=[_quantize_residual]), "quantizes the residual stream"),
    "DQ into residual add": ("onnxruntime", dict(edits=[_dq_into_residual]), "feeds Add residual"),
    "DQ into LayerNorm": ("tensorrt", dict(edits=[_dq_into_layernorm]), "feeds LayerNormalization ln"),
    "INT4 without block size": ("tensorrt", dict(edits=[_int4_weights]), "must be block-wise"),
    "INT4 activations": ("tensorrt", dict(edits=[_int4_activation]), "INT4 activation quantization"),
    "custom domain": ("onnxruntime", dict(edits=[_custom_op]), "custom-domain op mimiq::FakeQuant"),
    "opset": ("tensorrt", dict(opset=20), "opset 20"),
    "scale not positive": ("tensorrt", dict(s_x=np.array(0.0, np.float32)), "non-positive"),
    "scale not constant": ("onnxruntime", dict(edits=[_scale_from_input]), "scale x is not a constant"),
    "activation scale per channel": ("tensorrt", dict(s_x=np.full(4, 0.1, np.float32)), "not per-tensor"),
}


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_conforming_graph_passes(target):
    model = _graph()
    onnx.checker.check_model(model)
    assert check_graph(model, target) == []
    int4 = _graph(edits=[lambda n, t: _int4_weights(n, t, block=True)])
    assert check_graph(int4, target) == []  # block-wise INT4 weights are what TensorRT takes


@pytest.mark.parametrize("rule", sorted(CASES))
def test_each_rule_has_a_breaking_graph(rule):
    target, change, words = CASES[rule]
    problems = check_graph(_graph(**change), target)
    assert any(words in p for p in problems), problems
