"""Saving/loading compressed model directories and ONNX export."""
from .checkpoint import load_compressed, save_compressed

__all__ = ["load_compressed", "save_compressed"]
