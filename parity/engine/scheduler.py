"""Continuous batching: which sequences run this step, how many tokens each, and what a step's output
does to them.

Every step mixes running sequences (a decode token each, or the next chunk of a long prompt)
with newly admitted ones, under a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`). When the KV cache runs out, the most recently admitted running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(prompt + tokens generated so far) later. Its sampled tokens are kept, so results are unchanged.

The scheduler owns the BlockManager: admission, preemption, finishing and the prefix cache all go
through it, so block accounting has one home.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from parity.engine.block_manager import BlockManager
from parity.engine.logits_processors import TokenCounts
from parity.engine.sampler import SamplerOutput
from parity.engine.sequence import Logprob, Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens of seqs[i] computed this step (1 for decode)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class StepOutput:
    """What a step produced for its ScheduledBatch (vLLM's ModelRunnerOutput)."""

    sampled_seqs: list[int]  # indices into batch.seqs of the sequences that sampled a token
    sampled: SamplerOutput | None  # their tokens and logprobs, in that order (None when nobody sampled)
    weight_version: int  # the weights the step ran with
    # (index into batch.seqs, first prompt position predicted, its prompt_logprobs entries) per prefill chunk
    prompt_logprobs: list[tuple[int, int, list[dict[int, Logprob]]]] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.token_counts = TokenCounts()  # penalised sequences' token counts on the device, freed with them
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_request(self, request_id: str, sample_index: int | None = None) -> bool:
        """Whether a sample of `request_id` (that sample, if given) is in flight."""
        return any(s.request_id == request_id and sample_index in (None, s.sample_index)
                   for s in [*self.running, *self.waiting])

    def _drop_kv(self, seq: Sequence) -> None:
        """Take a running sequence out with its K/V freed: it is recomputed (prompt + output) when admitted again."""
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.cache_blocks = True  # recomputed under the current weights
        seq.status = SequenceStatus.WAITING

    def _preempt(self, seq: Sequence) -> None:
        self._drop_kv(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def weights_updated(self, recompute: bool) -> None:
        """New weights are in: no cached prefix may serve a request again. Running sequences either keep their
        K/V (computed under older weights; never registered in the prefix cache from now on) or, with
        `recompute`, drop it and go back to the front of the queue to be recomputed under the new weights."""
        self.block_manager.reset_prefix_cache()
        running = list(self.running)
        for seq in running:
            if recompute:
                self._drop_kv(seq)
            else:
                seq.cache_blocks = False
        if recompute:
            self.waiting.extendleft(reversed(running))

    def _waits_for_leader(self, seq: Sequence) -> bool:
        """Samples 1..n-1 of a request wait until sample 0 has computed the prompt, then share its blocks."""
        leader = seq.group_leader
        return (
            self.block_manager.enable_prefix_caching
            and leader is not None
            and leader.status != SequenceStatus.FINISHED
            and leader.in_prefill
        )

    def schedule(self, admit: bool = True) -> ScheduledBatch:
        """The next step's batch; `admit=False` leaves waiting sequences waiting (async scheduling defers an
        admission by a step rather than throw away a decode step queued ahead)."""
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
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + num_new):
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
        while admit and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._waits_for_leader(seq):
                skipped.append(self.waiting.popleft())
                continue
            if not seq.block_table and not seq.params.return_routed_experts:  # a cached prefix has no routing
                seq.num_computed_tokens = self.block_manager.match_prefix(seq)
                seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, len(seq.prompt_ids))
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, seq.num_computed_tokens + num_new):
                # Hold no blocks while waiting (the prefix match is redone next time). A request alone
                # always fits: add_request refused any whose full length exceeds the whole cache.
                self.block_manager.free_sequence(seq)
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

    def update_from_output(self, batch: ScheduledBatch, output: StepOutput) -> list[Sequence]:
        """Book a step's results: computed tokens, newly full blocks into the prefix cache, sampled tokens
        and logprobs; finish the sequences that stopped and return them."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
        for i, start, entries in output.prompt_logprobs:
            seq = batch.seqs[i]
            seq.prompt_logprobs.extend(entries[len(seq.prompt_logprobs) - (start - 1) :])  # a recompute adds none
        if output.sampled is None:
            return []
        finished = []
        out = output.sampled
        for j, (i, token, logprob, raw) in enumerate(
            zip(output.sampled_seqs, out.token_ids, out.logprobs, out.raw_logprobs)
        ):
            seq = batch.seqs[i]
            seq.output_ids.append(token)
            seq.output_logprobs.append(logprob)
            seq.output_raw_logprobs.append(raw)
            seq.output_weight_versions.append(output.weight_version)
            if out.top_logprobs is not None and out.top_logprobs[j] is not None:
                seq.top_logprobs.append(out.top_logprobs[j])
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def fail(self, request_ids: set[str], error: str) -> list[Sequence]:
        """Finish every sample of these requests, wherever it is, with reason "error" (a step they ran in
        raised); return them."""
        failed = sorted((s for s in [*self.running, *self.waiting] if s.request_id in request_ids), key=lambda s: s.seq_id)
        for seq in failed:
            self._finish(seq, "error")
            seq.error = error
        return failed

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        """"stop" for EOS, a stop token id or a stop string (the last two set seq.stop_reason, as vLLM does),
        then "length". A stop string is looked for once more than min_tokens tokens exist (EOS and stop ids
        cannot be sampled before: the sampler masks them)."""
        p = seq.params
        if not p.ignore_eos and token in self.config.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        if seq.detokenizer is not None:
            seq.stop_reason = seq.detokenizer.step(token, check_stop=len(seq.output_ids) > p.min_tokens)
            if seq.stop_reason is not None:
                return "stop"
        if seq.num_tokens >= seq.max_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        (self.running if seq.status == SequenceStatus.RUNNING else self.waiting).remove(seq)
        self.block_manager.free_sequence(seq)
        self.token_counts.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str | None = None, sample_index: int | None = None) -> list[Sequence]:
        """Stop the samples of `request_id` (that sample only, if given; every request if None), waiting or
        running, free their blocks and return them, finished with reason "abort"."""
        aborted = [s for s in [*self.running, *self.waiting]
                   if request_id in (None, s.request_id) and sample_index in (None, s.sample_index)]
        for seq in aborted:
            self._finish(seq, "abort")
        return sorted(aborted, key=lambda s: s.seq_id)

    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return self.block_manager.blocks_needed(num_tokens)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after a weight update or sleep their K/V are stale or gone)."""
        self.block_manager.reset_prefix_cache()

    def kv_cache_usage(self) -> dict[str, int]:
        return {"num_blocks": self.block_manager.num_blocks, "used_blocks": self.block_manager.num_used_blocks}
