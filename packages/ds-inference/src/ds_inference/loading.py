"""Load a causal LM and its tokenizer offline from a local directory (safetensors or GGUF)."""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
from torch import nn

__all__ = ["load_model_and_tokenizer"]


def load_model_and_tokenizer(
    model: str | os.PathLike | nn.Module,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    gguf_file: str | None = None,
) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, name). A directory with a ``*.gguf`` file loads that file (one only, or ``gguf_file``)."""
    if isinstance(model, nn.Module):
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        return model.eval(), tokenizer, os.path.basename(str(name).rstrip("/")) or type(model).__name__
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(model)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model directory {path!r} does not exist (models load offline from a local directory)"
        )
    kwargs: dict[str, Any] = {}
    if gguf_file is None:
        ggufs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) > 1 and not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"{path} holds several GGUF files {ggufs}; choose one with gguf_file=")
        if ggufs and not os.path.exists(os.path.join(path, "config.json")):
            gguf_file = ggufs[0]
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    elif not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has neither config.json nor a .gguf file")
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    name = os.path.splitext(gguf_file)[0] if gguf_file else os.path.basename(os.path.abspath(path))
    return loaded, tokenizer, name
