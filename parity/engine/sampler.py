"""Turn float32 logits into tokens and the logprobs RL needs.

Processing order (vLLM's): temperature -> min-p -> top-k -> top-p; the kept set is renormalised.
Random draws are counter-based: the noise for (seed, output position, vocab id) is a fixed hash,
so a sample depends only on its own seed and history, never on the batch it ran in, the device,
or preemption. Sampling is the Gumbel-max trick: argmax(logp + g) with g = -log(-log u)
(`parity.kernels.reference.gumbel_argmax`, through the kernel dispatch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from parity.engine.sampling_params import SamplingParams
from parity.kernels.dispatch import gumbel_argmax


def process_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply temperature (greedy rows: 1), min-p, top-k, top-p; removed tokens get -inf. [B, V] float32."""
    device = logits.device
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
    logits = logits / temps[:, None]
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        probs = torch.softmax(logits, dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    need_k = any(p.top_k > 0 for p in params)
    need_p = any(p.top_p < 1.0 for p in params)
    if need_k or need_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if need_k:
            k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
            remove |= torch.arange(vocab, device=device)[None, :] >= k[:, None]
        if need_p:
            top_p = torch.tensor([p.top_p for p in params], device=device)
            probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            remove |= mass_before >= top_p[:, None]
        remove[:, 0] = False  # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # under the processed (sampling) distribution
    raw_logprobs: list[float]  # log-softmax of the raw logits


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    steps: list[int],
    log_softmax: Callable[[torch.Tensor], torch.Tensor] = _log_softmax,
) -> SamplerOutput:
    """Sample one token per row of float32 `logits` [B, V]; `steps[i]` = tokens row i has generated.

    `log_softmax` is the model's (`Kernels.log_softmax`): batch-invariant in deterministic mode, and
    the same function the trainer-side parity forward scores tokens with.
    """
    raw_logprobs = log_softmax(logits)
    logprobs = raw_logprobs if _leaves_logits_unchanged(params) else log_softmax(process_logits(logits, params))
    tokens = logits.argmax(dim=-1)
    if not all(p.greedy for p in params):
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        seeds_t = torch.tensor(seeds, dtype=torch.int64, device=logits.device)
        steps_t = torch.tensor(steps, dtype=torch.int64, device=logits.device)
        tokens = torch.where(greedy, tokens, gumbel_argmax(logprobs, seeds_t, steps_t))
    rows = torch.arange(logits.shape[0], device=logits.device)
    # one device-to-host copy; float32 -> float64 is exact, so the values equal three .tolist() calls
    picked = torch.stack([tokens.double(), logprobs[rows, tokens].double(), raw_logprobs[rows, tokens].double()])
    token_ids, chosen, raw = picked.tolist()
    return SamplerOutput(token_ids=[int(t) for t in token_ids], logprobs=chosen, raw_logprobs=raw)


def _leaves_logits_unchanged(params: list[SamplingParams]) -> bool:
    """True when process_logits would return the logits as they are (temperature 1 or greedy, no filters)."""
    return all(p.temperature in (0, 1) and p.min_p <= 0 and p.top_k <= 0 and p.top_p >= 1.0 for p in params)
