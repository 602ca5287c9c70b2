"""Dynamic SplitFuse scheduling: every forward pass gets a fixed token budget.

Running sequences that are decoding take one token each first (they are latency-critical), then
partially prefilled prompts continue, then waiting requests are admitted; a prompt longer than the
remaining budget is split into chunks over several passes. Requests join and leave between passes.
When the cache runs out of blocks, the newest running sequence is preempted (its blocks freed, its
tokens recomputed later) and new requests simply wait; no sequence ever writes another's blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

__all__ = ["Scheduler", "ScheduledChunk"]


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this pass
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the last known token, so its last logits choose the next token."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.blocks = block_manager
        self.token_budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of the queues and return its blocks (finished or cancelled)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.token_budget
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        # decodes first, then unfinished prefills; oldest first within each group
        order = sorted(self.running, key=lambda s: (s.num_pending > 1, s.arrival_time))
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_pending, budget)
            while not self.blocks.allocate(seq, seq.num_computed + n):
                victim = next((s for s in reversed(self.running) if id(s) not in scheduled), None)
                if victim is None:
                    break
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING or self.blocks.blocks_needed(
                seq, seq.num_computed + n
            ):
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            scheduled.add(id(seq))
            budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.block_table:
                seq.num_computed = self.blocks.match_prefix(seq)
                seq.num_cached_prompt_tokens = seq.num_computed
            n = min(seq.num_pending, budget)
            if not self.blocks.allocate(seq, seq.num_computed + n):
                if not self.running and not chunks:
                    # nothing will ever free blocks: the request cannot fit the cache at all
                    need = self.blocks.blocks_needed(seq, seq.num_computed + n)
                    raise RuntimeError(
                        f"request {seq.request_id!r} needs {need} free KV blocks but the cache has only "
                        f"{self.blocks.num_free}; raise num_blocks or lower max_num_batched_tokens"
                    )
                break  # wait for running sequences to free blocks
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            scheduled.add(id(seq))
            budget -= n
        return chunks
