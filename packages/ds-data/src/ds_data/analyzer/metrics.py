"""Per-sample difficulty metrics for the data analyzer.

A metric maps one dataset sample to one number. Samples are token sequences: a list / numpy array /
1-D tensor of token ids, or a dict holding one under ``input_ids``.

- ``seqlen``: number of tokens.
- ``vocab_rarity``: mean over the sample's tokens of ``-log(count(token) / total_tokens)``, with
  token counts over the whole dataset (the analyzer counts them in a first pass). A mean, not
  DeepSpeed's sum, so that rarity does not simply repeat the sequence length.
- any function ``sample -> number`` (`Metric(name, fn, dtype)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BUILTIN_METRICS", "Metric", "resolve_metrics", "sample_tokens"]


def sample_tokens(sample: Any) -> np.ndarray:
    """The token ids of a sample as a 1-D int64 array."""
    if isinstance(sample, dict):
        if "input_ids" not in sample:
            raise TypeError(f"a dict sample needs 'input_ids' (keys: {sorted(sample)})")
        sample = sample["input_ids"]
    if hasattr(sample, "numpy") and callable(sample.numpy):  # torch tensor without importing torch here
        sample = sample.detach().cpu().numpy() if hasattr(sample, "detach") else sample.numpy()
    tokens = np.asarray(sample)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise TypeError(
            f"a sample must be a 1-D sequence of integer token ids, got dtype {tokens.dtype} shape {tokens.shape}"
        )
    return tokens.astype(np.int64, copy=False)


@dataclass(frozen=True)
class Metric:
    """A named per-sample metric. `fn` gets the raw sample (and, if `needs_token_counts`, the counts)."""

    name: str
    fn: Callable[..., float] | None
    dtype: Any = np.float64
    needs_token_counts: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith(("_", ".")):
            raise ValueError(
                f"metric name {self.name!r} must be a plain file name (no '/', not starting with '_' or '.')"
            )

    def compute(self, sample: Any, token_counts: np.ndarray | None = None, total: int = 0) -> float:
        if self.needs_token_counts:
            return _vocab_rarity(sample, token_counts, total)
        return self.fn(sample)


def _seqlen(sample: Any) -> int:
    return int(sample_tokens(sample).shape[0])


def _vocab_rarity(sample: Any, counts: np.ndarray, total: int) -> float:
    tokens = sample_tokens(sample)
    if tokens.shape[0] == 0:
        return 0.0
    return float(np.mean(np.log(total) - np.log(counts[tokens].astype(np.float64))))


BUILTIN_METRICS = {
    "seqlen": Metric("seqlen", _seqlen, np.int64),
    "vocab_rarity": Metric("vocab_rarity", None, np.float64, needs_token_counts=True),
}


def resolve_metrics(metrics: list[str | Metric]) -> list[Metric]:
    """Metric names (built-ins) or `Metric` objects -> `Metric` objects, checked for duplicates."""
    out = []
    for m in metrics:
        if isinstance(m, str):
            if m not in BUILTIN_METRICS:
                raise ValueError(
                    f"unknown metric '{m}': built-ins are {', '.join(BUILTIN_METRICS)}; pass Metric(name, fn) for others"
                )
            m = BUILTIN_METRICS[m]
        elif not isinstance(m, Metric):
            raise TypeError(f"metrics must be names or Metric objects, got {type(m).__name__}")
        out.append(m)
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate metric names: {names}")
    if not out:
        raise ValueError("give at least one metric")
    return out
