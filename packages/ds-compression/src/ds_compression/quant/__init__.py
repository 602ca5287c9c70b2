"""Quantization: ZeroQuant weights/activations, XTC 1/2-bit weights, the QuantLinear module."""
from .functional import binary_weight, fake_quantize_weight, quantize_activation_tokenwise, ternary_weight
from .modules import QuantLinear

__all__ = [
    "QuantLinear",
    "binary_weight",
    "fake_quantize_weight",
    "quantize_activation_tokenwise",
    "ternary_weight",
]
