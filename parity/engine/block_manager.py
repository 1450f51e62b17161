"""Paged KV-cache bookkeeping: a free list of fixed-size blocks, reference counts, and a prefix cache.

A full block is identified by a chained hash of its tokens and every token before it, so equal
prefixes map to equal block ids and are computed once. Blocks whose count drops to zero go back
on the free list but keep their hash until reused, so a later request with the same prefix can
revive them (LRU order: the least recently freed block is handed out first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from parity.engine.sequence import Sequence


@dataclass(frozen=True)
class TakenBlock:
    """A free block handed to a sequence by `take_free_head`, with the prefix-cache entry taking it evicted, so
    that `untake` can put the block back as it was."""

    block: int
    old_hash: int | None
    old_tokens: tuple[int, ...] | None
    was_cached: bool  # the evicted hash pointed at this block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: dict[int, int] = {}  # block id -> hash of its full contents
        self.block_tokens: dict[int, tuple[int, ...]] = {}  # to verify a hash hit against real ids
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash.pop(block, None)
        if old is not None:  # evict: the block's old contents are about to be overwritten
            self.block_tokens.pop(block, None)
            if self.cached.get(old) == block:
                del self.cached[old]
        self.ref_counts[block] = 1
        return block

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached full blocks that hold `seq`'s leading tokens; return how many tokens they cover.

        Only blocks strictly before the last token count, so at least one token is always computed
        and produces logits. A request asking for prompt_logprobs reads nothing from the cache (vLLM's
        skip_reading_prefix_cache): every prompt position must produce logits.
        """
        if not self.enable_prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return 0
        tokens = seq.token_ids
        parent = None
        for start in range(0, seq.num_tokens - 1 - self.block_size + 1, self.block_size):
            chunk = tuple(tokens[start : start + self.block_size])
            h = self.chain_hash(parent, chunk)
            block = self.cached.get(h)
            if block is None or self.block_tokens.get(block) != chunk:
                break
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            parent = h
        seq.num_hashed_blocks = len(seq.block_table)
        return len(seq.block_table) * self.block_size

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens` tokens; all or nothing."""
        extra = self.blocks_needed(num_tokens) - len(seq.block_table)
        if extra > len(self.free):
            return False
        for _ in range(max(extra, 0)):
            seq.block_table.append(self._pop_free())
        return True

    def take_free_head(self, seq: Sequence) -> TakenBlock:
        """Append the free list's head to `seq`'s block table (one more block), recording what it evicted."""
        block = next(iter(self.free))
        old = self.block_hash.get(block)
        taken = TakenBlock(block, old, self.block_tokens.get(block), old is not None and self.cached.get(old) == block)
        seq.block_table.append(self._pop_free())
        return taken

    def untake(self, seq: Sequence, taken: TakenBlock, restore_cache: bool) -> bool:
        """Undo `take_free_head` for a sequence that never used the block: drop `seq`'s reference if it still holds
        it, and if nobody else does, put the block back at the free list's head and (`restore_cache`, and the block
        not re-hashed since) its evicted prefix-cache entry. True when the entry came back: the caller then restores
        the K/V that entry describes."""
        block = taken.block
        if block in seq.block_table:
            seq.block_table.remove(block)
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        if block not in self.free:
            return False
        self.free.move_to_end(block, last=False)
        if not restore_cache or taken.old_hash is None or block in self.block_hash:
            return False
        self.block_hash[block] = taken.old_hash
        self.block_tokens[block] = taken.old_tokens
        if taken.was_cached and taken.old_hash not in self.cached:
            self.cached[taken.old_hash] = block
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step, publish `seq`'s newly computed full blocks to the prefix cache."""
        if not self.enable_prefix_caching or not seq.cache_blocks:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_hashed_blocks:
            return
        tokens = seq.token_ids
        parent = None
        if seq.num_hashed_blocks:
            parent = self.block_hash.get(seq.block_table[seq.num_hashed_blocks - 1])
        for i in range(seq.num_hashed_blocks, num_full):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = self.chain_hash(parent, chunk)
            block = seq.block_table[i]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h
                self.block_tokens[block] = chunk
            parent = h
        seq.num_hashed_blocks = num_full

    def free_sequence(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody uses go back on the free list (tail first, so the
        prefix blocks, freed last, are evicted last)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after a weight update their K/V are stale)."""
        self.cached.clear()
        self.block_hash.clear()
        self.block_tokens.clear()
