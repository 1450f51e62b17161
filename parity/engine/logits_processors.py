"""vLLM's logits processors that read a row's token history, applied to the raw logits before temperature.

Order (vLLM v1's sampler): allowed_token_ids (every other token to -inf) -> min_tokens (EOS and the
row's stop token ids to -inf while fewer than min_tokens tokens have been generated) -> logit_bias
(added) -> repetition penalty (over prompt + output: positive logits divided by it, negative ones
multiplied) -> frequency penalty (minus penalty x count in the output) -> presence penalty (minus
penalty once per token present in the output). Temperature and the top-k/top-p/min-p filters come
after (`parity.engine.sampler.process_logits`).

The engine keeps each penalised sequence's counts on the device (`TokenCounts`: a row filled once
from the prompt, then +1 per sampled token, so no token list crosses to the device after the first
step, and a batch's rows are one gather); `TokenHistory.of_sequences` builds the same from token
lists; the trainer builds one row for every output position of its rollouts (`of_positions`: a
running count, so O(tokens x vocab), not O(tokens^2)). All hold the same integer counts, and the
float arithmetic here is elementwise, so engine and trainer shape a position's logits bit for bit
alike. A row whose parameters use none of these is left exactly as it was (a penalty of 1 or 0 is an
exact identity), and a batch in which no row uses any costs nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from parity.engine.sampling_params import SamplingParams


def uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


@dataclass
class TokenHistory:
    """What the history-dependent processors read for each row of a [B, V] logits tensor."""

    num_generated: list[int]  # tokens the row had generated before the one these logits predict
    output_counts: torch.Tensor | None  # [B, V] int32 occurrences in those tokens (None: no row has a penalty)
    prompt_mask: torch.Tensor | None  # [B, V] bool, token in the prompt (None: no row has a repetition penalty)
    eos_token_ids: tuple[int, ...] = ()  # masked by min_tokens, with each row's stop_token_ids

    @classmethod
    def of_sequences(
        cls,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
        eos_token_ids: Sequence[int] = (),
    ) -> TokenHistory:
        """One row per sequence, predicting its next token, from token lists (what the engine's TokenCounts
        keeps on the device instead)."""
        pen = [i for i, p in enumerate(params) if uses_penalties(p)]
        rep = [i for i in pen if params[i].repetition_penalty != 1.0]
        counts = mask = None
        if pen:
            counts = _scatter_ids(len(params), vocab_size, device, pen, outputs, accumulate=True)
        if rep:
            mask = _scatter_ids(len(params), vocab_size, device, rep, prompts, accumulate=False).bool()
        return cls([len(o) for o in outputs], counts, mask, tuple(eos_token_ids))

    @classmethod
    def of_positions(
        cls,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
        eos_token_ids: Sequence[int] = (),
    ) -> TokenHistory:
        """One row per output position t of each sequence, in order (sequence 0's t = 0..T-1, then
        sequence 1's...): row t sees the prompt and output[:t], as the engine did when it sampled output[t]."""
        any_pen = any(uses_penalties(p) for p in params)
        any_rep = any(p.repetition_penalty != 1.0 for p in params)
        counts, masks = [], []
        for p, prompt, output in zip(params, prompts, outputs):
            n = len(output)
            if any_pen:
                step = torch.zeros(n, vocab_size, dtype=torch.int32, device=device)
                if uses_penalties(p) and n > 1:
                    prev = torch.tensor(list(output[:-1]), dtype=torch.int64, device=device)
                    step[torch.arange(1, n, device=device), prev] = 1
                counts.append(step.cumsum(0, dtype=torch.int32))
            if any_rep:
                row = torch.zeros(vocab_size, dtype=torch.bool, device=device)
                if p.repetition_penalty != 1.0:
                    row[torch.tensor(list(prompt), dtype=torch.int64, device=device)] = True
                masks.append(row.expand(n, vocab_size))
        return cls(
            [t for output in outputs for t in range(len(output))],
            torch.cat(counts) if any_pen else None,
            torch.cat(masks) if any_rep else None,
            tuple(eos_token_ids),
        )


class TokenCounts:
    """The engine's per-sequence penalty state on the device: row r of `counts` [capacity, V] int32 holds
    sequence seq_id's output token counts and row r of `in_prompt` its prompt tokens; row 0 stays zero for
    batch rows without a penalty. Rows are taken when a penalised sequence first samples and given back
    when it finishes (`release`, from the scheduler); the buffers are dropped when no row is in use."""

    def __init__(self):
        self._rows: dict[int, int] = {}  # seq_id -> row
        self._free: list[int] = []
        self.counts: torch.Tensor | None = None
        self.in_prompt: torch.Tensor | None = None

    def history(self, seqs: Sequence, vocab_size: int, device: torch.device, eos_token_ids: Sequence[int]) -> TokenHistory:
        """The TokenHistory of a batch of engine sequences (objects with seq_id, params, prompt_ids, output_ids)."""
        pen = [s for s in seqs if uses_penalties(s.params)]
        new = [s for s in pen if s.seq_id not in self._rows]
        if new:
            self._take_rows(new, vocab_size, device)
        counts = mask = None
        if pen:
            index = torch.tensor([self._rows.get(s.seq_id, 0) for s in seqs], dtype=torch.int64).to(device)
            counts = self.counts.index_select(0, index)
            if any(s.params.repetition_penalty != 1.0 for s in seqs):
                mask = self.in_prompt.index_select(0, index)
        return TokenHistory([len(s.output_ids) for s in seqs], counts, mask, tuple(eos_token_ids))

    def add_sampled(self, seqs: Sequence, token_ids: Sequence[int]) -> None:
        """Count each penalised sequence's newly sampled token (one scatter)."""
        pairs = [(self._rows[s.seq_id], t) for s, t in zip(seqs, token_ids) if s.seq_id in self._rows]
        if pairs:
            rows, ids = zip(*pairs)
            index = (torch.tensor(rows).to(self.counts.device), torch.tensor(ids).to(self.counts.device))
            self.counts.index_put_(index, torch.ones((), dtype=torch.int32, device=self.counts.device), accumulate=True)

    def release(self, seq) -> None:
        row = self._rows.pop(seq.seq_id, None)
        if row is None:
            return
        self._free.append(row)
        if not self._rows:
            self._free, self.counts, self.in_prompt = [], None, None

    def _take_rows(self, seqs: list, vocab_size: int, device: torch.device) -> None:
        capacity = 0 if self.counts is None else self.counts.shape[0]
        need = len(seqs) - len(self._free)
        if need > 0:  # grow (at least double), keeping the rows in use
            grown = max(capacity * 2, capacity + need, 1 + need)
            counts = torch.zeros(grown, vocab_size, dtype=torch.int32, device=device)
            in_prompt = torch.zeros(grown, vocab_size, dtype=torch.bool, device=device)
            if self.counts is not None:
                counts[:capacity], in_prompt[:capacity] = self.counts, self.in_prompt
            self.counts, self.in_prompt = counts, in_prompt
            self._free += range(max(capacity, 1), grown)
        rows = [self._free.pop() for _ in seqs]
        for s, r in zip(seqs, rows):
            self._rows[s.seq_id] = r
        rows_t = torch.tensor(rows, dtype=torch.int64).to(device)
        self.counts[rows_t] = _scatter_ids(len(seqs), vocab_size, device, list(range(len(seqs))),
                                           [s.output_ids for s in seqs], accumulate=True)
        self.in_prompt[rows_t] = _scatter_ids(len(seqs), vocab_size, device, list(range(len(seqs))),
                                              [s.prompt_ids for s in seqs], accumulate=False).bool()


def _scatter_ids(
    num_rows: int, vocab_size: int, device: torch.device, rows: list[int], ids: Sequence[Sequence[int]], accumulate: bool
) -> torch.Tensor:
    """[num_rows, V] int32: for each row r in `rows`, the count (or presence) of each token of ids[r]."""
    flat = torch.tensor(list(itertools.chain.from_iterable(ids[r] for r in rows)), dtype=torch.int64)
    lens = torch.tensor([len(ids[r]) for r in rows], dtype=torch.int64)
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lens)
    out = torch.zeros(num_rows, vocab_size, dtype=torch.int32, device=device)
    index = (row_of.to(device, non_blocking=True), flat.to(device, non_blocking=True))
    return out.index_put_(index, torch.ones((), dtype=torch.int32, device=device).expand(len(flat)), accumulate=accumulate)


def shapes_logits(params: Sequence[SamplingParams]) -> bool:
    """True when some row needs `apply_history_processors` (a bias, an allowed set, min_tokens or a penalty)."""
    return any(p.shapes_logits_with_history for p in params)


def apply_history_processors(
    logits: torch.Tensor, params: Sequence[SamplingParams], history: TokenHistory | None
) -> torch.Tensor:
    """The processors above, in vLLM's order, on float32 logits [B, V]; returns a new tensor (the input,
    which may be a CUDA graph's output buffer, is not written)."""
    if not shapes_logits(params):
        return logits
    if history is None:
        raise ValueError("logit_bias, allowed_token_ids, min_tokens and penalties need the rows' TokenHistory")
    device = logits.device
    logits = logits.clone()
    groups = _groups(params)
    allowed = [(p, rows) for p, rows in groups if p.allowed_token_ids is not None]
    if allowed:
        blocked = torch.zeros_like(logits, dtype=torch.bool)
        for p, rows in allowed:
            blocked[rows] = True
            blocked[_grid(rows, p.allowed_token_ids, device)] = False
        logits.masked_fill_(blocked, float("-inf"))
    for p, rows in groups:
        early = [i for i in rows if history.num_generated[i] < p.min_tokens]
        if early:
            logits[_grid(early, [*p.stop_token_ids, *history.eos_token_ids], device)] = float("-inf")
        if p.logit_bias:
            values = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype).to(device).repeat(len(rows))
            logits.index_put_(_grid(rows, list(p.logit_bias), device), values, accumulate=True)
    return _apply_penalties(logits, params, history)


def _apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], history: TokenHistory) -> torch.Tensor:
    if history.output_counts is None:
        return logits
    counts = history.output_counts
    column = lambda values: torch.tensor(values, dtype=logits.dtype).to(logits.device)[:, None]
    if any(p.repetition_penalty != 1.0 for p in params):
        penalty = column([p.repetition_penalty for p in params])
        seen = (counts > 0) | history.prompt_mask
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if any(p.frequency_penalty != 0.0 for p in params):
        logits = logits - column([p.frequency_penalty for p in params]) * counts
    if any(p.presence_penalty != 0.0 for p in params):
        logits = logits - column([p.presence_penalty for p in params]) * (counts > 0)
    return logits


def _groups(params: Sequence[SamplingParams]) -> list[tuple[SamplingParams, list[int]]]:
    """The rows that share one SamplingParams object (a request's samples, a whole generate() call, every
    position of a rollout), so the host builds each option's indices once per group, not once per row."""
    by_object: dict[int, tuple[SamplingParams, list[int]]] = {}
    for i, p in enumerate(params):
        if p.shapes_logits_with_history:
            by_object.setdefault(id(p), (p, []))[1].append(i)
    return list(by_object.values())


def _grid(rows: list[int], ids: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) index tensors of every pair in rows x ids, row-major."""
    r = torch.tensor(rows, dtype=torch.int64).to(device)
    t = torch.tensor(list(ids), dtype=torch.int64).to(device)
    return r.repeat_interleave(len(t)), t.repeat(len(r))
