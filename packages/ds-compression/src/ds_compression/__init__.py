"""ds_compression: ZeroQuant, XTC, pruning, low-rank, QAT scheduling, and export.

Post-training (each returns a compressed copy; the input model is never modified):
    quantize(model, weight_bits=8, group_size=None, act_bits=None, lkd=False, ...)
    prune_magnitude / prune_n_m / prune_channels / prune_heads / low_rank
    save_compressed(model, dir) / load_compressed(dir) / export_onnx(model, path, ...)
During training (DeepSpeed's `compression_training` section):
    init_compression(model, config) / redundancy_clean(model, config) / CompressionScheduler
"""
from .export.checkpoint import load_compressed, save_compressed
from .lowrank import LowRankLinear, low_rank
from .model_utils import CompressionInputError, load_model_dir
from .prune.structured import prune_channels, prune_heads
from .prune.unstructured import prune_magnitude, prune_n_m, sparsity
from .quant.modules import QuantLinear
from .training import CompressionScheduler, init_compression, redundancy_clean
from .zeroquant import quantize

__version__ = "0.1.0"

__all__ = [
    "CompressionInputError",
    "CompressionScheduler",
    "LowRankLinear",
    "QuantLinear",
    "init_compression",
    "load_compressed",
    "load_model_dir",
    "low_rank",
    "prune_channels",
    "prune_heads",
    "prune_magnitude",
    "prune_n_m",
    "quantize",
    "redundancy_clean",
    "save_compressed",
    "sparsity",
]
