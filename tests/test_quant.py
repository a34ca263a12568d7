"""Fake quantization must equal ONNX QuantizeLinear -> DequantizeLinear in ONNX Runtime, to the bit."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mimiq_deploy.errors import MimiqError
from mimiq_deploy.quant import QuantConfig, TensorQuantizer, parse_bits


def _ort_qdq(x: np.ndarray, scale: np.ndarray, bits: int, axis: int | None,
             unsigned: bool = False, fp8: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(codes, dequantized values) from ONNX Runtime: integer codes as int32, E4M3FN codes (fp8) as float32."""
    if fp8:
        zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, scale.shape, bytes(scale.size), raw=True)
    else:
        qtype = {(8, False): TensorProto.INT8, (4, False): TensorProto.INT4, (4, True): TensorProto.UINT4}[bits, unsigned]
        zp = helper.make_tensor("zp", qtype, scale.shape, np.zeros(scale.shape, dtype=np.int8).flatten().tolist())
    codes_type = TensorProto.FLOAT if fp8 else TensorProto.INT32
    attrs = {"axis": axis} if axis is not None else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attrs),
             helper.make_node("Cast", ["q"], ["codes"], to=codes_type)]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape),
         helper.make_tensor_value_info("codes", codes_type, x.shape)],
        [numpy_helper.from_array(scale.astype(np.float32), "scale"), zp])
    # IR 10 (ONNX 1.16): an onnx newer than onnxruntime would write an IR version the runtime cannot read
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, codes = sess.run(None, {"x": x})
    return codes, y


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["activation", "weight"])
def test_fake_quant_equals_onnx_qdq(bits, kind):
    torch.manual_seed(bits)
    if kind == "activation":
        x = torch.randn(4, 50, 64) * 3
        q = TensorQuantizer(bits, narrow=False)
        q.scale.data.fill_(0.37 if bits == 4 else 0.023)
        axis = None
    else:
        x = torch.randn(48, 64) * torch.rand(48, 1)
        q = TensorQuantizer(bits, narrow=True, axis=0, channels=48)
        q.init_from_weight(x)
        axis = 0
        module_codes = torch.round(q(x * 4) / q._broadcast_scale(x))  # far outside the range
        assert module_codes.min() == -(2 ** (bits - 1) - 1)  # narrow range: -2^(b-1) never used
        # Export stores these codes for DequantizeLinear; the QuantizeLinear twin agrees on them.
        x = torch.maximum(torch.minimum(x, q.qmax * q._broadcast_scale(x)), q.qmin * q._broadcast_scale(x)).detach()
    # Values exactly half-way between two codes exercise round-half-to-even. (Weights never reach
    # -2^(b-1): export stores their narrow-range codes, QuantizeLinear does not see them.)
    x.view(-1)[:14] = (torch.arange(14) - 7 + 0.5) * q.scale.detach().reshape(-1)[0]
    ours = q(x).detach().numpy()
    codes, theirs = _ort_qdq(x.numpy(), q.scale.detach().numpy(), bits, axis)
    assert np.array_equal(ours, theirs), np.abs(ours - theirs).max()
    ours_codes = np.rint(ours / q._broadcast_scale(x).detach().numpy())
    assert np.array_equal(ours_codes, codes)
    assert codes.min() >= q.qmin and codes.max() <= q.qmax


def test_unsigned_fake_quant_equals_onnx_uint4():
    """Attention probabilities below 8 bits: codes [0, 15] at 4 bits, exactly ONNX's UINT4 Q -> DQ."""
    torch.manual_seed(0)
    q = TensorQuantizer(4, narrow=False, unsigned=True)
    q.scale.data.fill_(0.02)
    x = torch.rand(4, 50, 50) * 0.4 - 0.02  # beyond both ends of the grid
    x.view(-1)[:15] = (torch.arange(15) + 0.5) * 0.02  # half-way values: round half to even
    ours = q(x).detach().numpy()
    codes, theirs = _ort_qdq(x.numpy(), q.scale.detach().numpy(), 4, None, unsigned=True)
    assert np.array_equal(ours, theirs)
    assert (q.qmin, q.qmax) == (0, 15) and codes.min() == 0 and codes.max() == 15


@pytest.mark.parametrize("kind", ["activation", "weight"])
def test_fp8_fake_quant_equals_onnx_fp8_qdq(kind):
    """E4M3FN: the student's fake quant is ONNX Runtime's FP8 Q -> DQ to the bit, saturating at +-448 steps."""
    torch.manual_seed(0)
    if kind == "activation":
        x, q, axis = torch.randn(4, 50, 64) * 3, TensorQuantizer(8, narrow=False, fp8=True), None
        q.scale.data.fill_(0.004)  # |x| / s reaches ~3000: far past 448, saturated
    else:
        x, axis = torch.randn(48, 64) * torch.rand(48, 1), 0
        q = TensorQuantizer(8, narrow=True, axis=0, channels=48, fp8=True)
        q.init_from_weight(x)
        x = x * 4
    s = q._broadcast_scale(x).detach()
    # subnormals (below 2^-6) and values half-way between two FP8 neighbours (1 + 1/16: between 1 and 1.125)
    x.view(-1)[:6] = torch.tensor([2 ** -9, 3 * 2 ** -10, 1.0625, 1.1875, -1.0625, 500.0]) * s.reshape(-1)[0]
    ours = q(x).detach().numpy()
    codes, theirs = _ort_qdq(x.numpy(), q.scale.detach().numpy(), 8, axis, fp8=True)
    assert np.array_equal(ours, theirs), np.abs(ours - theirs).max()
    assert np.abs(codes).max() == 448 and q.qmax == 448
    assert codes.reshape(-1)[2:5].tolist() == [1.0, 1.25, -1.0]  # ties to the even mantissa
    assert len(np.unique(codes)) <= 253  # at most the finite E4M3FN values


def test_fp8_lsq_gradients_are_straight_through():
    q = TensorQuantizer(8, narrow=False, fp8=True)
    q.scale.data.fill_(0.01)
    x = torch.tensor([0.013, -1.0, 5.0, -7.0], requires_grad=True)  # /s: 1.3, -100 inside; 500, -700 saturate
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    v = x.detach() / 0.01
    grid = v[:2].to(torch.float8_e4m3fn).float()
    expected = ((grid - v[:2]).sum() + 448 - 448) / (4 * 448) ** 0.5
    assert torch.isclose(q.scale.grad, expected)


def test_fp8_activations_calibrate_to_their_amax():
    """FP8 takes no clipping by default (default_method); integer grids keep the MSE search."""
    x = torch.cat([torch.randn(4096), torch.tensor([40.0])])   # one outlier: MSE clips it on an integer grid
    fp8, int8 = TensorQuantizer(8, narrow=False, fp8=True), TensorQuantizer(8, narrow=False)
    for q in (fp8, int8):
        q.calibrating = True
        q(x)
        q.finish_calibration()
    assert torch.isclose(fp8.scale, torch.tensor(40.0 / 448)) and int8.scale < 40.0 / 127


def test_fp8_setting_makes_fp8_quantizers_everywhere(teacher):
    from mimiq_deploy.quant.student import build_student
    cfg = parse_bits("fp8")
    assert cfg.name == "fp8" and QuantConfig.from_json(cfg.to_json()) == cfg and not cfg.probs_unsigned
    quants = [m for m in build_student(teacher, cfg).modules() if isinstance(m, TensorQuantizer)]
    assert quants and all(q.fp8 and q.qmax == 448 and not q.unsigned for q in quants)


def test_attention_probabilities_take_an_unsigned_grid_below_8_bits(teacher, tmp_path):
    from mimiq_deploy.quant.student import build_student, load_student, save_student

    for bits, unsigned in (("w3a3", True), ("w4a4", True), ("w4a8", False), ("w8a8", False)):
        student = build_student(teacher, parse_bits(bits))
        probs = [m.a_quant for n, m in student.named_modules() if n.endswith("attn.av")]
        others = [q for n, q in student.named_modules() if isinstance(q, TensorQuantizer) and q not in probs]
        assert probs and all(q.unsigned == unsigned for q in probs), bits
        assert not any(q.unsigned for q in others)  # q, k, v and every layer input keep the signed grid
    save_student(tmp_path / "new.pt", student := build_student(teacher, parse_bits("w3a3")), "fmnist-vit", None,
                 student.quant_config, {})
    assert load_student(tmp_path / "new.pt").blocks[0].attn.av.a_quant.qmax == 7
    ckpt = torch.load(tmp_path / "new.pt", weights_only=True)
    del ckpt["unsigned_probs"]  # as written before the unsigned grid: its scales were calibrated for [-4, 3]
    torch.save(ckpt, tmp_path / "old.pt")
    assert load_student(tmp_path / "old.pt").blocks[0].attn.av.a_quant.qmax == 3


def test_lsq_gradients():
    q = TensorQuantizer(4, narrow=False)
    q.scale.data.fill_(0.5)
    x = torch.tensor([0.2, 1.3, -5.0, 10.0], requires_grad=True)
    q(x).sum().backward()
    # Straight-through inside [-8, 7] * 0.5, zero outside.
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    # d/ds: round(v) - v inside; qmin / qmax outside; times 1/sqrt(N * qmax).
    v = x.detach() / 0.5
    expected = ((torch.round(v[:2]) - v[:2]).sum() + (-8) + 7) / (4 * 7) ** 0.5
    assert torch.isclose(q.scale.grad, expected)


def test_parse_bits():
    assert parse_bits("w4a8") == QuantConfig(4, 8)
    assert parse_bits("W8A8").name == "w8a8"
    assert parse_bits("FP8") == QuantConfig(8, 8, fp8=True)
    for bad in ("w1a8", "w4a9", "int8", "w16a16", "fp4", "fp16"):
        with pytest.raises(MimiqError, match="unsupported bit setting"):
            parse_bits(bad)


def test_learned_step_sizes_stay_above_their_floor():
    from mimiq_deploy.quant.quantizer import SCALE_FLOOR
    q = TensorQuantizer(8, narrow=True, axis=0, channels=3)
    w = torch.randn(3, 9)
    q.init_from_weight(w)
    calibrated = q.scale.detach().clone()
    with torch.no_grad():
        q.scale.copy_(torch.tensor([-0.05, 0.0, 1.0]))  # what large LSQ steps did to a 9-weight channel
    q.project_scale()
    assert torch.equal(q.scale.detach(), torch.maximum(torch.tensor([-0.05, 0.0, 1.0]), calibrated * SCALE_FLOOR))
    assert (q.scale > 0).all()


def test_image_input_keeps_8_bits_and_older_students_keep_their_width(teacher, tmp_path):
    from mimiq_deploy.quant.student import build_student, load_student, save_student

    student = build_student(teacher, parse_bits("w3a3"))
    quants = [q for q in student.modules() if isinstance(q, TensorQuantizer) and q.axis is None]
    assert student.patch_embed.proj[0].input_quant.bits == 8  # the layer that reads the image
    assert all(q.bits == 3 for q in quants if q is not student.patch_embed.proj[0].input_quant)
    save_student(tmp_path / "new.pt", student, "fmnist-vit", None, student.quant_config, {})
    assert load_student(tmp_path / "new.pt").patch_embed.proj[0].input_quant.bits == 8
    ckpt = torch.load(tmp_path / "new.pt", weights_only=True)
    del ckpt["input_bits"]  # as written before the 8-bit image input
    torch.save(ckpt, tmp_path / "old.pt")
    assert load_student(tmp_path / "old.pt").patch_embed.proj[0].input_quant.bits == 3


def test_activation_step_estimators():
    from mimiq_deploy.quant.quantizer import activation_step

    x = torch.cat([torch.linspace(-1, 1, 10001), torch.tensor([40.0])])
    assert torch.isclose(activation_step(x, -4, 3, "minmax"), torch.tensor(40.0 / 3))
    assert torch.isclose(activation_step(x, -4, 3, "p99"), torch.quantile(x.abs(), 0.99) / 3, rtol=1e-4)
    mse = activation_step(x, -4, 3, "mse")
    assert mse < 40.0 / 3 / 4  # one outlier does not set the range
    with pytest.raises(ValueError):
        activation_step(x, -4, 3, "median")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_student_of_a_cuda_teacher_lives_on_cuda(teacher):
    """quantize_model creates its quantizers on the CPU; a teacher on CUDA must get them on CUDA
    (fine-tuning on a GPU failed with 'found at least two devices' before)."""
    import copy

    from mimiq_deploy.finetune import build_student

    student = build_student(copy.deepcopy(teacher).cuda(), parse_bits("w3a3"))
    assert {p.device.type for p in student.parameters()} == {"cuda"}
    assert student(torch.randn(2, 1, 28, 28, device="cuda")).device.type == "cuda"
