"""FastGen-style serving: paged KV cache, Dynamic SplitFuse scheduler, continuous batching."""

from .config import ServingConfig
from .llm_engine import LLMEngine, QueueFullError, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLMEngine", "QueueFullError", "RequestOutput", "SamplingParams", "ServingConfig"]
