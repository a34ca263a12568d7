"""The tensor quantizer: symmetric, zero point 0, learned step size (LSQ).

Forward is exactly QuantizeLinear -> DequantizeLinear of ONNX: q = saturate(round_half_even(x / s)),
y = q * s, computed in float32 with the same division, so exported graphs reproduce the codes.
FP8 (E4M3FN) is the same with the rounding to the FP8 grid: saturate to +-448, then a float8 cast (round half
to even, as ONNX QuantizeLinear with saturate=1 does).
Backward is LSQ (Esser et al. 2020): straight-through inside the range, and the step size
gradient scaled by 1 / sqrt(numel * qmax).
"""
import math

import torch
from torch import nn

# Learned step sizes are kept >= this share of their calibrated value (a projection after each
# optimizer step). LSQ's steps are large next to small scales: the 9-weight channels of a 1-channel
# 3x3 stem conv crossed zero in a W8A8 fine-tuning run, which no engine can run.
SCALE_FLOOR = 0.1


FP8_MAX = 448  # the largest finite E4M3FN value: FP8 codes saturate there


def qrange(bits: int, narrow: bool, unsigned: bool = False, fp8: bool = False) -> tuple[int, int]:
    """Signed integer range: narrow (+-(2^(b-1)-1)) for weights, full for activations;
    unsigned: [0, 2^b - 1] (a non-negative tensor, e.g. attention probabilities); fp8: +-448 (E4M3FN)."""
    if fp8:
        return -FP8_MAX, FP8_MAX
    if unsigned:
        return 0, 2 ** bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def to_grid(v: torch.Tensor, qmin: int, qmax: int, fp8: bool = False) -> torch.Tensor:
    """x / scale -> its code (as a float): round half to even then saturate; fp8: saturate, then the float8
    cast (round half to even to the E4M3FN grid; the cast alone would turn values past 448 into NaN)."""
    if fp8:
        return torch.clamp(v, qmin, qmax).to(torch.float8_e4m3fn).to(v.dtype)
    return torch.clamp(torch.round(v), qmin, qmax)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, fp8: bool = False) -> torch.Tensor:
    """QuantizeLinear -> DequantizeLinear with zero point 0 (no gradient)."""
    return to_grid(x / scale, qmin, qmax, fp8) * scale


CALIBRATION_METHODS = ("mse", "minmax", "p99.99", "p99.9", "p99")


def activation_step(x: torch.Tensor, qmin: int, qmax: int, method: str = "mse", fp8: bool = False) -> torch.Tensor:
    """Step size of a per-tensor activation quantizer from samples x.

    mse: the clipping (10 %..100 % of max |x|) that minimizes the tensor's quantization MSE;
    minmax: no clipping; pNN: clip at that percentile of |x|."""
    amax = x.abs().max().clamp_min(1e-8)
    if method == "minmax":
        return amax / qmax
    if method.startswith("p"):
        return torch.quantile(x.abs().double(), float(method[1:]) / 100).float().clamp_min(1e-8) / qmax
    if method != "mse":
        raise ValueError(f"unknown calibration method {method!r} (one of {', '.join(CALIBRATION_METHODS)})")
    candidates = [amax * r / qmax for r in torch.linspace(0.1, 1.0, 46)]
    errors = [(fake_quant(x, s, qmin, qmax, fp8) - x).pow(2).mean() for s in candidates]
    return candidates[int(torch.stack(errors).argmin())]


class _LsqFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_scale, fp8=False):
        v = x / scale
        q = to_grid(v, qmin, qmax, fp8)
        ctx.save_for_backward(v, q)
        ctx.grad_scale, ctx.qmin, ctx.qmax, ctx.scale_shape = grad_scale, qmin, qmax, scale.shape
        return q * scale

    @staticmethod
    def backward(ctx, grad):
        v, q = ctx.saved_tensors
        inside = (v >= ctx.qmin) & (v <= ctx.qmax)
        grad_x = grad * inside
        # d(q*s)/ds = round(v) - v inside the range, the clipping bound outside it.
        grad_s = grad * torch.where(inside, q - v, q) * ctx.grad_scale
        dims = [d for d in range(grad.dim()) if d >= len(ctx.scale_shape) or ctx.scale_shape[d] == 1] \
            if len(ctx.scale_shape) else list(range(grad.dim()))
        grad_s = grad_s.sum(dim=dims, keepdim=True) if dims else grad_s
        return grad_x, grad_s.reshape(ctx.scale_shape), None, None, None, None


class _OnnxFakeQuant(torch.autograd.Function):
    """Placeholder node `mimiq::FakeQuant` in exported graphs; export.py lowers it to Q/DQ."""

    @staticmethod
    def forward(ctx, x, scale, bits: int, narrow: int, axis: int, unsigned: int, fp8: int):
        return x.clone()  # a fresh tensor: the tracer cannot record an op that returns its input

    @staticmethod
    def symbolic(g, x, scale, bits, narrow, axis, unsigned, fp8):
        out = g.op("mimiq::FakeQuant", x, scale, bits_i=bits, narrow_i=narrow, axis_i=axis, unsigned_i=unsigned,
                   fp8_i=fp8)
        out.setType(x.type())  # shape and dtype pass through (convolution export needs them)
        return out


class TensorQuantizer(nn.Module):
    """Owns its state (bits, scale, axis, enabled) so export reads the module, not the training loop.

    axis None: one scale per tensor (activations); axis 0: one per output channel (weights).
    unsigned: codes [0, 2^b - 1] for a tensor known to be non-negative (zero point 0 all the same).
    fp8: E4M3FN codes (bits is 8; narrow and unsigned do not apply).
    """

    def __init__(self, bits: int, narrow: bool, axis: int | None = None, channels: int = 1, unsigned: bool = False,
                 fp8: bool = False):
        super().__init__()
        self.bits, self.narrow, self.axis, self.unsigned, self.fp8 = bits, narrow, axis, unsigned and not fp8, fp8
        self.qmin, self.qmax = qrange(bits, narrow, self.unsigned, fp8)
        self.scale = nn.Parameter(torch.ones(channels if axis is not None else ()))
        self.register_buffer("scale_floor", torch.zeros(channels if axis is not None else ()))
        self.enabled = True
        self.calibrating = False
        self._samples: list[torch.Tensor] = []

    def _broadcast_scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return self.scale
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return self.scale.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._collect(x.detach())
            return x
        if not self.enabled:
            return x
        if torch.onnx.is_in_onnx_export():
            return _OnnxFakeQuant.apply(x, self.scale, self.bits, int(self.narrow), -1 if self.axis is None else self.axis,
                                        int(self.unsigned), int(self.fp8))
        scale = self._broadcast_scale(x)
        per_scale = x.numel() / max(1, self.scale.numel())
        return _LsqFakeQuant.apply(x, scale, self.qmin, self.qmax, 1.0 / math.sqrt(per_scale * self.qmax), self.fp8)

    # --- calibration: step size from observed tensors before training ---
    def _collect(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1).float()
        if flat.numel() > 65536:  # a fixed-stride subsample keeps memory bounded and deterministic
            flat = flat[:: flat.numel() // 65536 + 1]
        self._samples.append(flat)

    @torch.no_grad()
    def init_from_weight(self, w: torch.Tensor) -> None:
        """Per-channel step size minimizing the MSE of the quantized weight (grid over clip ratios)."""
        w = w.detach().flatten(1) if self.axis is not None else w.detach().reshape(1, -1)
        amax = w.abs().amax(1).clamp_min(1e-8)
        best, best_err = amax / self.qmax, None
        for ratio in torch.linspace(0.5, 1.0, 26):
            s = (amax * ratio / self.qmax).unsqueeze(1)
            err = (fake_quant(w, s, self.qmin, self.qmax, self.fp8) - w).pow(2).mean(1)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best = torch.where(better, s.squeeze(1), best)
                best_err = torch.minimum(err, best_err)
        self.scale.copy_(best.reshape(self.scale.shape))
        self.scale_floor.copy_(self.scale * SCALE_FLOOR)

    @property
    def default_method(self) -> str:
        """The calibration method when none is asked. FP8: no clipping (minmax, amax / 448): its grid is
        relative, so an outlier costs the other values little, while clipping it costs it all. Measured on
        fmnist-vit, PTQ validation top-1 (teacher 89.74): 512 MimiQ images minmax 89.86 vs mse 89.68; 512 real
        images 89.72 vs 89.66 (benchmarks/diagnose_lowbit.py --bits fp8 --methods mse,minmax)."""
        return "minmax" if self.fp8 else "mse"

    @torch.no_grad()
    def finish_calibration(self, method: str | None = None) -> None:
        """Per-tensor step size from the collected activations (see CALIBRATION_METHODS; None: default_method)."""
        method = method or self.default_method
        self.calibrating = False
        if not self._samples:
            return
        x = torch.cat(self._samples)
        self._samples = []
        self.scale.copy_(activation_step(x, self.qmin, self.qmax, method, self.fp8).reshape(self.scale.shape))
        self.scale_floor.copy_(self.scale * SCALE_FLOOR)

    @torch.no_grad()
    def project_scale(self) -> None:
        """Keep the learned step size positive and sane (see SCALE_FLOOR); call after optimizer steps."""
        self.scale.copy_(torch.maximum(self.scale, self.scale_floor))

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, narrow={self.narrow}, axis={self.axis}, enabled={self.enabled}"
                + (", unsigned=True" if self.unsigned else "") + (", fp8=True" if self.fp8 else ""))
