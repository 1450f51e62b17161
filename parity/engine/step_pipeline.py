"""Async scheduling (vLLM's): a decode step is queued on the device before the host has booked the step before
it, so the scheduler, the input copies and the bookkeeping of one step run while the GPU computes the other.

A step runs in three parts: launch (forward and sampler queued; the sampled tokens stay on the device), look
ahead, book (wait for the results, then stop checks, logprobs, prefix cache). Looking ahead launches the next
decode step of the sequences that will still run, whatever this step samples, with this step's device tokens
as its inputs. Nothing of the host state moves for it except the KV blocks its slots need, which the next
scheduler step would allocate anyway. The next `run` uses it when the scheduler picks exactly its sequences
(or some of them: the others finished or were aborted, and their rows are dropped, one extra decode each)
under the same weights (no update_weights, and no parameter written in place, since it was launched).
Otherwise it is discarded and the step runs anew: its K/V writes went to slots that the new step writes
again or that belong to sequences that are gone (GPU work on one stream is ordered, so a freed block is only
reused after them). Between two calls every running sequence therefore stands where it does in a step-by-step
engine (the same tokens booked; its block ids can differ: below). While a look-ahead step is pending the scheduler
admits no waiting sequence (`schedule(admit=False)`): a seat freed by a sample that stopped (learned when
booking) is filled one step later, as in vLLM, instead of throwing the queued step away. Under the same
weights a sample's tokens do not depend on when it was admitted: deterministic mode gives the same bits; in
fast mode a dropped row or a later admission changes the batch a step ran in, so, as with any change of
batching there, logprobs agree to rounding.

A block the look-ahead step takes for a sequence that then never uses it (it stopped, was aborted or failed)
goes back to the head of the free list with its prefix-cache entry and the K/V the look-ahead overwrote.
Known differences from step by step: several sequences crossing a block boundary in one look-ahead step,
one of which stops, end up holding other block ids (the free list's later order, hence which cached prefix
is evicted next, can differ); a weight written through `Parameter.data` bumps no version counter, so the
step queued before it runs under the old weights (write weights with update_weights or in place on the
parameter); and a request added between steps is admitted a step later (under newer weights if an update
comes in between).

No look-ahead when: a sequence is still prefilling or a seat is free for a waiting one (the next step
differs), a sequence uses the token-history processors (penalties, logit_bias, allowed_token_ids,
min_tokens: their counts need this step's tokens on the host) or records routed experts, a slot cannot be
allocated without preemption, or `EngineConfig.async_scheduling` is off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parity.engine.block_manager import BlockManager, TakenBlock
from parity.engine.config import EngineConfig
from parity.engine.model_runner import ForwardOutput, ModelRunner
from parity.engine.sampler import PendingSample, prompt_logprobs, sample_sequences, to_device
from parity.engine.scheduler import ScheduledBatch, Scheduler, StepOutput
from parity.engine.sequence import Sequence, SequenceStatus
from parity.models.decoder import DecoderModel
from parity.precision.policy import NonFiniteActivationError


@dataclass
class Reserved:
    """A block a look-ahead step took from the free list's head for `seq`'s next slot and (for a block that held a
    cached prefix) the K/V its first slot held before the look-ahead wrote there, so that the block can go back
    exactly as it was if `seq` never uses it."""

    seq: Sequence
    taken: TakenBlock
    saved: torch.Tensor | None  # kv_cache[:, :, block, 0] before the look-ahead step
    returned: bool = False

    @classmethod
    def take(cls, bm: BlockManager, kv_cache: torch.Tensor, seq: Sequence) -> Reserved:
        """Allocate `seq` the block its next token needs (the free list's head), recording it."""
        taken = bm.take_free_head(seq)
        saved = kv_cache[:, :, taken.block, 0].clone() if taken.old_hash is not None else None  # queued before the step
        return cls(seq, taken, saved)

    def give_back(self, bm: BlockManager, kv_cache: torch.Tensor, restore_cache: bool) -> None:
        """Undo the reservation of a sequence that never used the block (it stopped, was aborted or failed, or the
        look-ahead step was not launched): free again at the head of the list and, unless the prefix cache was
        emptied since (`restore_cache` False: new weights), with its K/V and cached prefix back."""
        if self.returned:
            return
        self.returned = True
        if bm.untake(self.seq, self.taken, restore_cache):
            kv_cache[:, :, self.taken.block, 0].copy_(self.saved)


@dataclass
class LaunchedStep:
    """A step whose GPU work is queued. `positions`: each sequence's num_computed_tokens when it is booked;
    `sampled_seqs`: indices into `batch.seqs` of the sequences that sample; `rows`: their rows of `sample`
    (None: row j is sampled_seqs[j]'s)."""

    batch: ScheduledBatch
    forward: ForwardOutput
    sample: PendingSample | None
    weights: tuple[int, int]  # the engine's weight version and the parameters' in-place write count at launch
    positions: list[int]
    sampled_seqs: list[int]
    rows: list[int] | None = None
    reserved: list[Reserved] = field(default_factory=list)  # blocks a look-ahead step took for its slots

    def sample_rows(self) -> list[int]:
        return list(range(len(self.sampled_seqs))) if self.rows is None else self.rows

    def taken_for(self, batch: ScheduledBatch, weights: tuple[int, int]) -> LaunchedStep | None:
        """This look-ahead step as `batch`'s, if `batch` decodes some of its sequences from where it left them,
        in its order and under its weights; else None."""
        if weights != self.weights or len(batch.seqs) > len(self.batch.seqs):
            return None
        index = {seq.seq_id: i for i, seq in enumerate(self.batch.seqs)}
        rows = [index.get(seq.seq_id, -1) for seq in batch.seqs]
        if any(n != 1 for n in batch.num_new_tokens) or rows != sorted(rows) or rows[0] < 0:
            return None
        if any(seq.num_computed_tokens != self.positions[r] for seq, r in zip(batch.seqs, rows)):
            return None
        if len(rows) == len(self.batch.seqs):
            return self
        return LaunchedStep(batch, self.forward, self.sample, weights, [self.positions[r] for r in rows],
                            list(range(len(rows))), rows)


class StepPipeline:
    def __init__(self, model: DecoderModel, runner: ModelRunner, scheduler: Scheduler, config: EngineConfig):
        self.model = model
        self.runner = runner
        self.scheduler = scheduler
        self.enabled = config.async_scheduling
        self.eos_token_ids = tuple(model.config.eos_token_ids)
        self.ahead: LaunchedStep | None = None
        self._params = list(model.parameters())
        self.num_ahead_used = 0  # look-ahead steps a scheduled batch took (whole or some rows)
        self.num_ahead_discarded = 0  # look-ahead steps whose work was thrown away

    def discard(self) -> None:
        """Forget the look-ahead step (the engine failed a step, or nothing is scheduled)."""
        if self.ahead is not None:
            self.num_ahead_discarded += 1
            self._give_back(self.ahead.reserved)
        self.ahead = None

    def admits(self, weights: tuple[int, int]) -> bool:
        """Called before each schedule with this step's `weights()`: gives back the blocks reserved for sequences
        that left since (aborted, failed, dropped for recomputation), and says whether the schedule may admit
        waiting sequences: not while a look-ahead step that can still be taken is pending (same weights, some of
        its sequences running)."""
        ahead = self.ahead
        if ahead is None:
            return True
        self._give_back(ahead.reserved, restore_cache=ahead.weights[0] == weights[0])
        if ahead.weights != weights or not any(s.status == SequenceStatus.RUNNING for s in ahead.batch.seqs):
            self.discard()
            return True
        return False

    def weights(self, weight_version: int) -> tuple[int, int]:
        """What a step runs under: the engine's weight version and the parameters' in-place write counters (weights
        written outside update_weights, by a test or a hook, also void a look-ahead step). Once per step: a loop
        over every parameter."""
        return weight_version, sum(p._version for p in self._params)

    def _give_back(self, reserved: list[Reserved], all_of_them: bool = False, restore_cache: bool = True) -> None:
        """Give back the reserved blocks of sequences that no longer run (all of them: the step was not launched)."""
        for r in reversed(reserved):  # the last taken goes back first, so the list's order is restored
            if all_of_them or r.seq.status != SequenceStatus.RUNNING:
                r.give_back(self.scheduler.block_manager, self.runner.kv_cache, restore_cache)

    def run(self, batch: ScheduledBatch, weights: tuple[int, int]) -> list[Sequence]:
        """Run the scheduled `batch` (the look-ahead step when it is this batch's) under `weights` (as given to
        admits), queue the next decode step when it can be known now, book `batch`'s results and return the
        sequences that finished."""
        ahead, self.ahead = self.ahead, None
        step = ahead.taken_for(batch, weights) if ahead is not None else None
        self.num_ahead_used += step is not None
        self.num_ahead_discarded += ahead is not None and step is None
        if step is None:
            step = self._launch(batch, weights)
        if self.enabled:
            self.ahead = self._launch_next(step)
        finished = self._book(step)
        if self.ahead is not None:
            self._give_back(self.ahead.reserved)  # blocks of sequences that stopped at this step
        return finished

    def _launch(self, batch: ScheduledBatch, weights: tuple[int, int]) -> LaunchedStep:
        forward = self.runner.execute(batch)
        sample = None
        if forward.logits is not None:
            seqs = [batch.seqs[i] for i in forward.sampled_seqs]
            kernels = self.model.kernels
            sample = sample_sequences(forward.logits, seqs, self.eos_token_ids, self.scheduler.token_counts,
                                      kernels.log_softmax, argmax_logprob=kernels.argmax_logprob)
        return LaunchedStep(batch, forward, sample, weights, [s.num_computed_tokens for s in batch.seqs],
                            forward.sampled_seqs)

    def _launch_next(self, step: LaunchedStep) -> LaunchedStep | None:
        """Queue the decode step that follows `step` for the sequences that will still run after it, or None
        when that step cannot be known before `step` is booked (then no block stays reserved)."""
        reserved: list[Reserved] = []
        try:
            ahead = self._queue_next(step, reserved)
        except NonFiniteActivationError:  # inf/nan in an eager look-ahead forward: that step runs, and fails
            ahead = None                  # with this error, on its own when the scheduler picks it
        if ahead is None:
            self._give_back(reserved, all_of_them=True)
        return ahead

    def _queue_next(self, step: LaunchedStep, reserved: list[Reserved]) -> LaunchedStep | None:
        batch, sched = step.batch, self.scheduler
        if step.sample is None or len(step.sampled_seqs) != len(batch.seqs) or len(sched.running) != len(batch.seqs):
            return None
        ends = [seq.num_tokens + 1 >= seq.max_len for seq in batch.seqs]  # by length, at this step
        if sched.waiting and len(batch.seqs) - sum(ends) < sched.config.max_num_seqs:
            return None  # a seat is free for a waiting sequence: the next step admits it
        rows: list[int] = []
        positions: list[int] = []
        bm = self.scheduler.block_manager
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if ends[i]:  # this step's token ends it
                continue
            if seq.params.shapes_logits_with_history or seq.params.return_routed_experts:
                return None
            position = seq.num_computed_tokens + n
            if bm.blocks_needed(position + 1) > len(seq.block_table):
                if not bm.free:
                    return None
                reserved.append(Reserved.take(bm, self.runner.kv_cache, seq))
            rows.append(i)
            positions.append(position)
        if not rows:
            return None
        seqs = [batch.seqs[i] for i in rows]
        tokens = step.sample.token_ids
        sample_rows = step.sample_rows()
        rows = [sample_rows[i] for i in rows]
        if rows != list(range(tokens.shape[0])):
            tokens = tokens[to_device(rows, torch.int64, tokens.device)]
        forward = self.runner.execute_decode(seqs, positions, tokens)
        kernels = self.model.kernels
        sample = sample_sequences(forward.logits, seqs, self.eos_token_ids, self.scheduler.token_counts,
                                  kernels.log_softmax, steps=[len(s.output_ids) + 1 for s in seqs],
                                  argmax_logprob=kernels.argmax_logprob)
        return LaunchedStep(ScheduledBatch(seqs, [1] * len(seqs)), forward, sample, step.weights, positions,
                            forward.sampled_seqs, reserved=reserved)

    def _book(self, step: LaunchedStep) -> list[Sequence]:
        batch, forward = step.batch, step.forward
        if forward.finite is not None:  # the rows of this batch's sequences (a taken look-ahead step may have more)
            finite = forward.finite.wait()[0]
            if not bool((finite if step.rows is None else finite[step.rows]).all()):
                self.runner.raise_nonfinite(batch)
        sampled = None
        if step.sample is not None:
            sampled = step.sample.result(step.rows)
            seqs = [batch.seqs[i] for i in step.sampled_seqs]
            if any(s.params.shapes_logits_with_history for s in seqs):
                self.scheduler.token_counts.add_sampled(seqs, sampled.token_ids)
        log_softmax = self.model.kernels.log_softmax
        prompt = []
        for c in forward.prompt_hidden:
            num = batch.seqs[c.seq_index].params.prompt_logprobs
            entries = prompt_logprobs(c.hidden, c.targets, num, self.model.compute_logits, log_softmax)
            prompt.append((c.seq_index, c.start, entries))
        return self.scheduler.update_from_output(
            batch, StepOutput(step.sampled_seqs, sampled, step.weights[0], prompt))
