"""The fake-quant student turned into a module that runs real integer kernels (core PyTorch ops only).

Every quantized module of the student (quant/convert.py) is replaced in place:
- QuantLinear (qkv, proj, fc1, fc2, head, Swin's patch-merging reduction) -> IntLinear: activation codes
  int8 = clamp(round(x / s_x)) with the static per-tensor step size, weight codes int8 (INT4 codes of a W4
  student held in int8: the values of the ONNX Runtime graph), `torch._int_mm` (int8 x int8 -> int32, exact),
  then one fused rescale `addcmul(bias, acc, s_x * s_w)`;
- for fp8: Fp8Linear, E4M3FN activation and weight codes (the student's saturating float8 cast), `torch._scaled_mm`
  (FP8 x FP8 -> float32; CPU, and CUDA from sm_89: Ada / Hopper), then the same fused rescale;
- for weight-only W4A16: Int4WeightOnlyLinear, float activations times INT4 weights through
  `aten._weight_int4pack_mm_for_cpu` (CPU) / `aten._weight_int4pack_mm` (CUDA, BF16), the per-channel
  scales written as group-wise ones (each row's scale repeated over its groups: the same values);
- QuantMatMul (q @ k^T, attn @ v) -> FakeQuantMatMul: float matmul of the fake-quantized operands, the
  values of the student (core PyTorch has no batched int8 matmul: torch._int_mm is 2-D);
- QuantConv2d (patch embedding) -> FakeQuantConv2d: float conv on the fake-quantized weight.
A layer whose shapes a kernel does not take falls back per layer (padding where padding is exact, else the float
matmul of the dequantized weight); `describe` lists the kernel of every layer.
"""
import collections

import torch
import torch.nn.functional as F
from torch import nn

from ...quant.convert import QuantConv2d, QuantLinear, QuantMatMul
from ...quant.quantizer import TensorQuantizer, to_grid

INT4_GROUPS = (256, 128, 64, 32)   # the group sizes the int4pack kernels take, largest first


def _codes(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, fp8: bool = False) -> torch.Tensor:
    """QuantizeLinear with zero point 0, as the student computes it (the same division, round half to even;
    fp8: saturate, then the float8 cast)."""
    return to_grid(x / scale, qmin, qmax, fp8)


def weight_codes(weight: torch.Tensor, quant: TensorQuantizer) -> torch.Tensor:
    """The student's integer (or E4M3FN) weight codes (per output channel), as float."""
    scale = quant.scale.detach().reshape(-1, *[1] * (weight.dim() - 1))
    return _codes(weight.detach().float(), scale, quant.qmin, quant.qmax, quant.fp8)


def _fq(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, fp8: bool = False) -> torch.Tensor:
    return _codes(x, scale, qmin, qmax, fp8) * scale


class IntMMRules:
    """What torch._int_mm takes on a device: CPU any shape; CUDA (cuBLASLt) rows > 16, K and N multiples of 8."""

    def __init__(self, min_rows: int = 0, multiple: int = 1):
        self.min_rows, self.multiple = min_rows, multiple

    @classmethod
    def of(cls, device) -> "IntMMRules":
        return cls(17, 8) if torch.device(device).type == "cuda" else cls()


class IntLinear(nn.Module):
    """y = addcmul(bias, _int_mm(codes(x), W_codes^T), s_x * s_w): W8A8 / W4A8 on integer GEMMs.

    pad_k / pad_n: zero columns / rows added to the codes where _int_mm wants multiples of 8 (exact: zeros add
    nothing); pad_rows: zero rows appended to the activation codes where _int_mm wants more than 16 rows (the head
    at small batches), decided once per layer so that no shape guard depends on the batch."""
    kernel = "aten._int_mm"

    def __init__(self, q: QuantLinear, rules: IntMMRules, pad_rows: bool = False):
        super().__init__()
        self.in_features, self.out_features = q.in_features, q.out_features
        self.qmin, self.qmax = q.input_quant.qmin, q.input_quant.qmax
        k, n = q.in_features, q.out_features
        self.pad_k = -k % rules.multiple
        self.pad_n = -n % rules.multiple
        self.pad_rows = rules.min_rows if pad_rows else 0
        codes = weight_codes(q.weight, q.weight_quant).to(torch.int8)          # (N, K)
        codes = F.pad(codes, (0, self.pad_k, 0, self.pad_n))
        # (N, K) row-major, used as its transpose: the column-major right operand both CPU and cuBLASLt prefer
        self.register_buffer("w_codes", codes.contiguous())
        self._keep_scales(q)

    def _keep_scales(self, q: QuantLinear) -> None:
        """The static activation step, the fused rescale s_x * s_w and the bias (zeros without one)."""
        self.register_buffer("x_scale", q.input_quant.scale.detach().float().clone())
        self.register_buffer("rescale", (q.input_quant.scale.detach().float() * q.weight_quant.scale.detach().float()))
        self.register_buffer("bias", q.bias.detach().float().clone() if q.bias is not None else
                             torch.zeros(q.out_features, device=q.weight.device))

    def notes(self) -> list[str]:
        out = []
        if self.pad_k or self.pad_n:
            out.append(f"K/N padded to multiples of 8 (+{self.pad_k}/+{self.pad_n})")
        if self.pad_rows:
            out.append(f"{self.pad_rows} zero rows appended (the kernel wants > 16 rows)")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        rows = x2.shape[0]
        codes = _codes(x2, self.x_scale, self.qmin, self.qmax).to(torch.int8)
        if self.pad_k or self.pad_rows:
            codes = F.pad(codes, (0, self.pad_k, 0, self.pad_rows))
        acc = torch._int_mm(codes, self.w_codes.t())
        if self.pad_rows or self.pad_n:
            acc = acc[:rows, :self.out_features]
        y = torch.addcmul(self.bias, acc, self.rescale)
        return y.reshape(*shape, self.out_features).to(x.dtype)


class Fp8Linear(IntLinear):
    """y = addcmul(bias, _scaled_mm(fp8(x / s_x), W_fp8^T), s_x * s_w): FP8 E4M3FN GEMMs, float32 accumulate.
    Unit scales go to the kernel and the per-channel rescale stays the fused addcmul, as IntLinear's. CUDA's
    kernel wants K and N multiples of 16 (zero padding is exact)."""
    kernel = "aten._scaled_mm (fp8 e4m3fn)"

    def __init__(self, q: QuantLinear, device):
        nn.Module.__init__(self)
        self.in_features, self.out_features = q.in_features, q.out_features
        self.qmin, self.qmax = q.input_quant.qmin, q.input_quant.qmax
        multiple = 16 if torch.device(device).type == "cuda" else 1
        self.pad_k, self.pad_n, self.pad_rows = -q.in_features % multiple, -q.out_features % multiple, 0
        codes = F.pad(weight_codes(q.weight, q.weight_quant), (0, self.pad_k, 0, self.pad_n))
        self.register_buffer("w_codes", codes.to(torch.float8_e4m3fn).contiguous())    # (N, K)
        self._keep_scales(q)
        self.register_buffer("one", torch.ones((), device=q.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        codes = _codes(x2, self.x_scale, self.qmin, self.qmax, fp8=True).to(torch.float8_e4m3fn)
        if self.pad_k:
            codes = F.pad(codes.float(), (0, self.pad_k)).to(torch.float8_e4m3fn)
        acc = torch._scaled_mm(codes, self.w_codes.t(), scale_a=self.one, scale_b=self.one, out_dtype=torch.float32)
        if self.pad_n:
            acc = acc[:, :self.out_features]
        y = torch.addcmul(self.bias, acc, self.rescale)
        return y.reshape(*shape, self.out_features).to(x.dtype)


def fp8_gemm_available(device) -> tuple[bool, str]:
    """Whether torch._scaled_mm runs FP8 here: one tiny call (the CPU kernel exists in recent torch only;
    CUDA needs sm_89+)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False, f"{torch.cuda.get_device_name(device)} is older than sm_89 (FP8 GEMMs: Ada / Hopper)"
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return True, ""
    except (RuntimeError, NotImplementedError, ValueError) as e:  # TORCH_CHECK_VALUE raises ValueError
        return False, f"torch {torch.__version__} has no FP8 GEMM on {device.type}: {str(e).splitlines()[0][:120]}"


class DequantLinear(nn.Module):
    """Float matmul of the dequantized (fake-quantized) weight; optional activation fake quant (the fallback)."""
    kernel = "float linear (dequantized weight)"

    def __init__(self, q: QuantLinear, quantize_input: bool, why: str):
        super().__init__()
        self.why = why
        self.quantize_input = quantize_input
        self.qmin, self.qmax, self.fp8 = q.input_quant.qmin, q.input_quant.qmax, q.input_quant.fp8
        w = weight_codes(q.weight, q.weight_quant) * q.weight_quant.scale.detach().float().reshape(-1, 1)
        self.register_buffer("weight", w)
        self.register_buffer("x_scale", q.input_quant.scale.detach().float().clone())
        self.register_buffer("bias", q.bias.detach().float().clone() if q.bias is not None else None)

    def notes(self) -> list[str]:
        return [self.why]

    def forward(self, x):
        if self.quantize_input:
            x = _fq(x.float(), self.x_scale, self.qmin, self.qmax, self.fp8).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Int4WeightOnlyLinear(nn.Module):
    """W4A16: float activations, INT4 weights packed for PyTorch's int4pack kernels (tinygemm layout: code + 8
    in 4 bits, w = (q - 8) * scale + zero with zero 0). Per-channel scales as `group`-wise ones, every group of a
    row holding that row's scale (the same values); N padded to a multiple of 16 (CPU) / 8 (CUDA) with zero rows."""

    def __init__(self, q: QuantLinear, device, group: int):
        super().__init__()
        self.in_features, self.out_features = q.in_features, q.out_features
        self.group = group
        self.on_cuda = torch.device(device).type == "cuda"
        codes = weight_codes(q.weight, q.weight_quant).to(torch.int32) + 8       # [1, 15]
        scale = q.weight_quant.scale.detach().float()
        self.pad_n = -self.out_features % (8 if self.on_cuda else 16)
        codes = F.pad(codes, (0, 0, 0, self.pad_n), value=8)                    # code 8: the value 0
        scale = F.pad(scale, (0, self.pad_n), value=1.0)
        n, k = codes.shape
        dtype = torch.bfloat16 if self.on_cuda else torch.float32
        sz = torch.stack([scale.expand(k // group, n), torch.zeros_like(scale).expand(k // group, n)], -1)
        sz = sz.contiguous().to(dtype)
        if self.on_cuda:
            packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).to(device)
            inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)  # k is a multiple of 32
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles))
        else:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.register_buffer("scales_zeros", sz.to(device))
        self.register_buffer("bias", q.bias.detach().float().clone().to(device) if q.bias is not None else None)
        self.dtype = dtype
        self.kernel = "aten._weight_int4pack_mm" if self.on_cuda else "aten._weight_int4pack_mm_for_cpu"

    def notes(self) -> list[str]:
        out = [f"per-channel scales as {self.in_features // self.group} group(s) of {self.group}"]
        if self.pad_n:
            out.append(f"N padded by {self.pad_n} zero rows")
        return out

    def forward(self, x):
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        if self.on_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)
        if self.pad_n:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features).to(x.dtype)


class FakeQuantMatMul(nn.Module):
    """An attention matmul in float on the fake-quantized operands (quantize=False: plain float, W4A16)."""
    kernel = "float matmul (fake-quantized operands)"

    def __init__(self, q: QuantMatMul, quantize: bool = True):
        super().__init__()
        self.quantize = quantize
        self.a_range, self.b_range = (q.a_quant.qmin, q.a_quant.qmax), (q.b_quant.qmin, q.b_quant.qmax)
        self.fp8 = q.a_quant.fp8
        self.register_buffer("a_scale", q.a_quant.scale.detach().float().clone())
        self.register_buffer("b_scale", q.b_quant.scale.detach().float().clone())
        if not quantize:
            self.kernel = "float matmul"

    def notes(self) -> list[str]:
        return []

    def forward(self, a, b):
        if self.quantize:
            a = _fq(a.float(), self.a_scale, *self.a_range, self.fp8).to(a.dtype)
            b = _fq(b.float(), self.b_scale, *self.b_range, self.fp8).to(b.dtype)
        return a @ b


class FakeQuantConv2d(nn.Module):
    """The patch embedding: float conv on the fake-quantized weight, input fake-quantized (quantize_input)."""
    kernel = "float conv (fake-quantized weight)"

    def __init__(self, q: QuantConv2d, quantize_input: bool = True):
        super().__init__()
        self.quantize_input = quantize_input
        self.stride, self.padding, self.dilation, self.groups = q.stride, q.padding, q.dilation, q.groups
        if q.padding_mode != "zeros":
            raise ValueError(f"padding mode {q.padding_mode!r}")
        self.x_range = (q.input_quant.qmin, q.input_quant.qmax)
        self.fp8 = q.input_quant.fp8
        w = weight_codes(q.weight, q.weight_quant) * q.weight_quant.scale.detach().float().reshape(-1, 1, 1, 1)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(q.bias.detach().float().clone(), requires_grad=False) if q.bias is not None else None
        self.register_buffer("x_scale", q.input_quant.scale.detach().float().clone())

    def notes(self) -> list[str]:
        return []

    def forward(self, x):
        if self.quantize_input:
            x = _fq(x.float(), self.x_scale, *self.x_range, self.fp8).to(x.dtype)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


KERNEL_MODULES = (IntLinear, Fp8Linear, DequantLinear, Int4WeightOnlyLinear, FakeQuantMatMul, FakeQuantConv2d)


def _rows_at_batch_1(student: nn.Module, input_size) -> dict:
    """Rows each QuantLinear sees at batch 1 (one probe forward on zeros)."""
    rows, hooks = {}, []
    for name, m in student.named_modules():
        if isinstance(m, QuantLinear):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: rows.__setitem__(
                n, inp[0].numel() // inp[0].shape[-1])))
    try:
        with torch.no_grad():
            student(torch.zeros(1, *input_size, device=next(student.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return rows


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def int4_group(k: int) -> int | None:
    return next((g for g in INT4_GROUPS if k % g == 0), None)


def integer_model(student: nn.Module, mode: str, device="cpu", dtype=torch.float32, input_size=None) -> nn.Module:
    """The student (modified in place and returned) with its quantized modules replaced by kernel modules.

    mode: "int" (W8A8 / W4A8 on torch._int_mm), "fp8" (torch._scaled_mm) or "weight-only" (W4A16 on the
    int4pack kernels).
    dtype: the float parts (LayerNorm, softmax, GELU, residuals, the patch embedding); the integer GEMMs
    quantize from float32 and rescale in float32 whatever it is."""
    weight_only = mode == "weight-only"
    rules = IntMMRules.of(device)
    rows = _rows_at_batch_1(student, input_size) if rules.min_rows and input_size is not None else {}
    for name, m in list(student.named_modules()):
        if isinstance(m, QuantLinear):
            if mode == "fp8":
                new = Fp8Linear(m, device)
            elif not weight_only:
                new = IntLinear(m, rules, pad_rows=rows.get(name, 0) < rules.min_rows if rules.min_rows else False)
            else:
                group = int4_group(m.in_features)
                if group is None or m.weight_quant.qmax > 7:
                    new = DequantLinear(m, False, f"K={m.in_features} is no multiple of 32 (int4pack kernels)")
                else:
                    new = Int4WeightOnlyLinear(m, device, group)
        elif isinstance(m, QuantMatMul):
            new = FakeQuantMatMul(m, quantize=not weight_only)
        elif isinstance(m, QuantConv2d):
            new = FakeQuantConv2d(m, quantize_input=not weight_only)
        else:
            continue
        _replace(student, name, new)
    student.to(device)
    cast_float_parts(student, dtype)
    return student.eval()


def cast_float_parts(model: nn.Module, dtype) -> nn.Module:
    """Floating parameters and buffers to `dtype`, except inside the kernel modules (codes, scales, rescale and
    bias stay as built)."""
    if dtype == torch.float32:
        return model
    for m in model.modules():
        if isinstance(m, KERNEL_MODULES) and not isinstance(m, FakeQuantConv2d):
            continue
        for key, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point():
                m._parameters[key] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for key, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and not (isinstance(m, FakeQuantConv2d) and key == "x_scale"):
                m._buffers[key] = b.to(dtype)
    return model


def describe(model: nn.Module) -> dict:
    """Kernel -> number of layers, and per-layer notes (padding, fallbacks): the artifact's build info."""
    kernels, notes = collections.Counter(), {}
    for name, m in model.named_modules():
        if isinstance(m, KERNEL_MODULES):
            kernels[m.kernel] += 1
            if m.notes():
                notes[name] = "; ".join(m.notes())
    return {"kernels": dict(kernels), "layer_notes": notes}
