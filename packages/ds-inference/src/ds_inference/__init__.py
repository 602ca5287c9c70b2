"""ds_inference: inference and serving engine for transformers models.

- ``init_inference(model, ...)``: dtype, automatic tensor parallelism, kernel injection,
  weight-only quantization, ZeRO-Inference weight streaming; ``generate()``/``forward()`` unchanged.
- ``pipeline(model_or_path)``: the FastGen-style serving engine (paged KV cache, continuous
  batching, Dynamic SplitFuse) behind a one-call API; ``ds-serve`` exposes it over HTTP.
"""

from .config import InferenceConfig
from .engine import InferenceEngine, init_inference
from .pipeline_api import Pipeline, Response, pipeline
from .serving import LLMEngine, SamplingParams, ServingConfig

__version__ = "0.1.0"

__all__ = [
    "InferenceConfig",
    "InferenceEngine",
    "LLMEngine",
    "Pipeline",
    "Response",
    "SamplingParams",
    "ServingConfig",
    "init_inference",
    "pipeline",
    "__version__",
]
