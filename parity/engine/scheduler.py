"""Continuous batching: which sequences run this step, and how many tokens each.

Every step mixes running sequences (a decode token each, or the next chunk of a long prompt)
with newly admitted ones, under a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`). When the KV cache runs out, the most recently admitted running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(prompt + tokens generated so far) later. Its sampled tokens are kept, so results are unchanged.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from parity.engine.block_manager import BlockManager
from parity.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens of seqs[i] computed this step (1 for decode)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _waits_for_leader(self, seq: Sequence) -> bool:
        """Samples 1..n-1 of a request wait until sample 0 has computed the prompt, then share its blocks."""
        leader = seq.group_leader
        return (
            self.blocks.enable_prefix_caching
            and leader is not None
            and leader.status != SequenceStatus.FINISHED
            and leader.in_prefill
        )

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[Sequence] = []
        counts: list[int] = []

        # 1. Running sequences, oldest first: decode tokens and continuing prompt chunks.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.allocate(seq, seq.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            scheduled.append(seq)
            counts.append(num_new)
            budget -= num_new

        # 2. Admit waiting sequences in arrival order while budget, seats and blocks last.
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._waits_for_leader(seq):
                skipped.append(self.waiting.popleft())
                continue
            if not seq.block_table:
                seq.num_computed_tokens = self.blocks.match_prefix(seq)
                seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, len(seq.prompt_ids))
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.allocate(seq, seq.num_computed_tokens + num_new):
                # Hold no blocks while waiting (the prefix match is redone next time). A request alone
                # always fits: add_request refused any whose full length exceeds the whole cache.
                self.blocks.free_sequence(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
            counts.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return ScheduledBatch(scheduled, counts)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.blocks.free_sequence(seq)

    def abort_all(self) -> None:
        for seq in list(self.running):
            self.blocks.free_sequence(seq)
        for seq in self.waiting:
            self.blocks.free_sequence(seq)
        self.running.clear()
        self.waiting.clear()
