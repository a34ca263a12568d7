"""Convert a (captured) timm ViT into its fake-quant student, and calibrate its step sizes.

Quantized (README: Support matrix): inputs and weights of every Linear and Conv2d (qkv, proj, fc1,
fc2, head, patch embedding), and both operands of both attention matmuls. LayerNorm,
softmax input, GELU, residual adds, embeddings and biases stay in float.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MatMul
from .config import QuantConfig
from .quantizer import TensorQuantizer


class QuantLinear(nn.Linear):
    def forward(self, x):
        return F.linear(self.input_quant(x), self.weight_quant(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.input_quant(x), self.weight_quant(self.weight), self.bias)


class QuantMatMul(MatMul):
    def forward(self, a, b):
        return self.a_quant(a) @ self.b_quant(b)


def _weighted(cls):
    """Converter of a Linear / Conv2d into `cls`: same parameters and settings, quantized input and weight."""
    def convert(module: nn.Module, cfg: QuantConfig, is_input_layer: bool = False) -> nn.Module:
        q = cls.__new__(cls)
        q.__dict__.update(module.__dict__)  # same parameters and settings, new forward
        q._modules = dict(module._modules)
        q.input_quant = TensorQuantizer(max(cfg.act_bits, cfg.input_bits) if is_input_layer else cfg.act_bits,
                                        narrow=False, fp8=cfg.fp8)
        q.weight_quant = TensorQuantizer(cfg.weight_bits, narrow=True, axis=0, channels=module.weight.shape[0],
                                         fp8=cfg.fp8)
        q.weight_quant.init_from_weight(module.weight)
        return q
    return convert


def _matmul(module: nn.Module, cfg: QuantConfig, is_input_layer: bool = False) -> nn.Module:
    q = QuantMatMul(module.a_nonnegative)
    q.a_quant = TensorQuantizer(cfg.act_bits, narrow=False, unsigned=module.a_nonnegative and cfg.probs_unsigned,
                                fp8=cfg.fp8)
    q.b_quant = TensorQuantizer(cfg.act_bits, narrow=False, fp8=cfg.fp8)
    return q


# Float module type -> converter(module, cfg, is_input_layer) into its fake-quant version (exact types: a
# subclass is not converted unless listed). A model family with other layers adds them here.
QUANT_MODULES = {nn.Linear: _weighted(QuantLinear), nn.Conv2d: _weighted(QuantConv2d), MatMul: _matmul}


def quantize_model(model: nn.Module, cfg: QuantConfig, names: list[str] | None = None) -> nn.Module:
    """Replace the registered module types of `model` (Linear, Conv2d, MatMul) in place by fake-quant twins.
    names: only these modules (a model family's choice, families/base.py `quantized`); default all."""
    targets = [(n, m) for n, m in model.named_modules() if type(m) in QUANT_MODULES and (names is None or n in names)]
    for i, (name, module) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # the first layer (the patch embedding's first conv) is the one that reads the image
        is_input_layer = i == 0 and isinstance(module, nn.Conv2d)
        setattr(parent, child, QUANT_MODULES[type(module)](module, cfg, is_input_layer))
    # new quantizers are created on the CPU: move them to where the model lives (a teacher on CUDA)
    device = next(model.parameters()).device
    for q in quant_modules(model).values():
        q.to(device)
    model.quant_config = cfg
    return model


def quant_modules(model: nn.Module) -> dict[str, TensorQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def set_quant_enabled(model: nn.Module, enabled: bool, activations_only: bool = False) -> None:
    """Quantization on or off; activations_only: only the activation quantizers (per-tensor, axis None), which
    turns the student into what a weight-only (W4A16) engine computes."""
    for q in quant_modules(model).values():
        if not activations_only or q.axis is None:
            q.enabled = enabled


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, batch_size: int = 64, method: str | None = None) -> None:
    """Initialize activation step sizes from one float pass over `images` (`method`: see activation_step; None:
    each quantizer's default, mse for integer grids, minmax for FP8)."""
    model.eval()
    activation_quants = [q for q in quant_modules(model).values() if q.axis is None]
    for q in activation_quants:
        q.calibrating = True
    for i in range(0, len(images), batch_size):
        model(images[i:i + batch_size])
    for q in activation_quants:
        q.finish_calibration(method)


@torch.no_grad()
def collect_activations(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Each activation quantizer's float inputs on `images` (the subsample calibration sees); scales untouched."""
    model.eval()
    quants = {n: q for n, q in quant_modules(model).items() if q.axis is None}
    for q in quants.values():
        q.calibrating = True
    try:
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])
        return {n: torch.cat(q._samples) for n, q in quants.items() if q._samples}
    finally:
        for q in quants.values():
            q._samples, q.calibrating = [], False
