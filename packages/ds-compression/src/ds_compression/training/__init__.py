"""Compression during training: DeepSpeed's `compression_training` section."""
from .api import init_compression, redundancy_clean, section_from
from .config import CompressionTrainingConfig
from .layers import CompressedLinear
from .scheduler import CompressionScheduler, bits_at

__all__ = [
    "CompressedLinear",
    "CompressionScheduler",
    "CompressionTrainingConfig",
    "bits_at",
    "init_compression",
    "redundancy_clean",
    "section_from",
]
