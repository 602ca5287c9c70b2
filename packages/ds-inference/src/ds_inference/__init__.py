"""ds_inference: Inference and serving engine for transformers models."""

__version__ = "0.1.0"
