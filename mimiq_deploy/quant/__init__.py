"""Fake quantization that equals ONNX QuantizeLinear -> DequantizeLinear bit for bit."""
from .config import QuantConfig, parse_bits
from .convert import calibrate, collect_activations, quant_modules, quantize_model
from .quantizer import TensorQuantizer, fake_quant

__all__ = ["QuantConfig", "parse_bits", "quantize_model", "calibrate", "collect_activations", "quant_modules",
           "TensorQuantizer", "fake_quant"]
