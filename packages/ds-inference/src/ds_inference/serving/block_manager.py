"""The block allocator of the paged KV cache, with reference counts and prefix caching.

A block holds ``block_size`` consecutive token positions of one sequence. A *full* block whose
tokens (and all tokens before it) are known is keyed by a chained hash of its tokens; another
sequence with the same prefix reuses it instead of recomputing it. Freed blocks keep their key
and sit in an LRU free list, so a later request can still hit them until they are recycled.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence

__all__ = ["BlockManager"]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        # block -> (key, tokens) for full blocks; key -> block
        self._block_key: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._key_to_block: dict[int, int] = {}
        self.prefix_hits = 0  # tokens served from the prefix cache, for stats

    # --- capacity ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks ``seq`` needs so that positions ``[0, num_tokens)`` have a slot."""
        want = -(-num_tokens // self.block_size)
        return max(0, want - len(seq.block_table))

    # --- allocation -------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        old = self._block_key.pop(block, None)
        if old is not None and self._key_to_block.get(old[0]) == block:
            del self._key_to_block[old[0]]
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` slots for positions ``[0, num_tokens)``; False (and no change) if short of blocks."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        return True

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached full blocks of ``seq``'s known tokens; returns how many tokens they cover.

        At least the last token is always left to compute, because its logits pick the next token.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        bs = self.block_size
        parent = 0
        matched = 0
        for start in range(0, len(seq.token_ids) - 1 - bs + 1, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            key = hash((parent, tokens))
            block = self._key_to_block.get(key)
            if block is None or self._block_key[block][1] != tokens:
                break
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            parent = key
            matched += bs
        seq.num_hashed_blocks, seq.last_block_key = matched // bs, parent
        self.prefix_hits += matched
        return matched

    def register_full_blocks(self, seq: Sequence) -> None:
        """Key the blocks of ``seq`` that are full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = seq.last_block_key
        for i in range(seq.num_hashed_blocks, seq.num_computed // bs):
            block = seq.block_table[i]
            known = self._block_key.get(block)
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            key = hash((parent, tokens))
            if known is None:
                self._block_key[block] = (key, tokens)
                self._key_to_block.setdefault(key, block)
            parent = key
            seq.num_hashed_blocks, seq.last_block_key = i + 1, key

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody uses go to the back of the LRU free list."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed more times than allocated ({seq.request_id!r})")
            if self.ref_counts[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.num_hashed_blocks, seq.last_block_key = 0, 0

    # --- checks -----------------------------------------------------------------------------
    def check_invariants(self, live: list[Sequence] | None = None) -> None:
        """Raise if counts disagree: every block is either free (ref 0) or referenced by live sequences."""
        for b in range(self.num_blocks):
            in_free = b in self._free
            if in_free != (self.ref_counts[b] == 0):
                raise AssertionError(f"block {b}: ref_count {self.ref_counts[b]} but in_free={in_free}")
        if live is not None:
            counts = [0] * self.num_blocks
            for seq in live:
                for b in seq.block_table:
                    counts[b] += 1
            if counts != self.ref_counts:
                raise AssertionError("block reference counts do not match the live sequences' block tables")
