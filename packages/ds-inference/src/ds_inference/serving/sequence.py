"""One request's state inside the serving engine."""

from __future__ import annotations

import enum
import time

import torch

from .sampling import SamplingParams

__all__ = ["Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens (prompt + generated), how many of them have K/V in the cache, and the block table.

    ``num_computed`` counts tokens whose K/V are in the cache; the tokens still to run are
    ``token_ids[num_computed:]``. A sequence samples when a forward pass reaches its last token.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        self.request_id = request_id
        self.prompt_len = len(prompt_ids)
        self.token_ids: list[int] = list(prompt_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
        self.num_cached_prompt_tokens = 0  # served by the prefix cache
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks already keyed for prefix caching
        self.last_block_key = 0  # chained hash of those blocks
        self.finish_reason: str | None = None
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.text = ""  # detokenized output so far (when the engine has a tokenizer)
        self.text_sent = 0  # characters of ``text`` already reported
        self.stopped_by_string = False  # ``text`` is final: cut before the stop string

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={len(self.token_ids)}, computed={self.num_computed}, "
            f"blocks={len(self.block_table)}, {self.status.value})"
        )
