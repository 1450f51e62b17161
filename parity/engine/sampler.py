"""Turn float32 logits into tokens and the logprobs RL needs.

Processing order (vLLM's): the history-dependent processors (allowed_token_ids, min_tokens, logit_bias,
penalties; `parity.engine.logits_processors`) on the raw logits, then temperature -> min-p -> top-k ->
top-p; the kept set is renormalised. Greedy rows take the argmax after the history-dependent processors.
Random draws are counter-based: the noise for (seed, output position, vocab id) is a fixed hash,
so a sample depends only on its own seed and history, never on the batch it ran in, the device,
or preemption. Sampling is the Gumbel-max trick: argmax(logp + g) with g = -log(-log u)
(`parity.kernels.reference.gumbel_argmax`, through the kernel dispatch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from parity.engine.logits_processors import TokenCounts, TokenHistory, apply_history_processors, shapes_logits
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Logprob, Sequence
from parity.kernels.dispatch import gumbel_argmax


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or CPU tensor) on `device`, without waiting for the GPU: through pinned memory (an async
    copy from pageable memory may wait for the work already queued on the stream)."""
    t = torch.as_tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def process_logits(
    logits: torch.Tensor, params: list[SamplingParams], history: TokenHistory | None = None
) -> torch.Tensor:
    """The distribution a row samples from: the history-dependent processors (which need `history` when a
    row uses one), then temperature (greedy rows: 1), min-p, top-k, top-p; removed tokens get -inf. [B, V] float32."""
    return _temperature_and_filters(apply_history_processors(logits, params, history), params)


def _temperature_and_filters(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    device = logits.device
    temps = to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32, device)
    logits = logits / temps[:, None]
    if any(p.min_p > 0 for p in params):
        min_p = to_device([p.min_p for p in params], torch.float32, device)
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
            k = to_device([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64, device)
            remove |= torch.arange(vocab, device=device)[None, :] >= k[:, None]
        if need_p:
            top_p = to_device([p.top_p for p in params], torch.float32, device)
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
    top_logprobs: list[dict[int, Logprob] | None] | None = None  # rows with params.logprobs set (else None)


class HostCopy:
    """Device tensors on their way to host memory: non_blocking copies into pinned buffers and one event, so
    the host can queue more GPU work before it needs them. `wait()` returns the host tensors (on CPU, the
    tensors themselves)."""

    def __init__(self, *tensors: torch.Tensor):
        self._event = None
        if not tensors[0].is_cuda:
            self._host = list(tensors)
            return
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for host, t in zip(self._host, tensors):
            host.copy_(t, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
        return self._host


@dataclass
class PendingSample:
    """A sample() whose results are still on the device: `token_ids` can feed the next step's inputs at once;
    `result()` waits for the one host copy and formats the SamplerOutput."""

    token_ids: torch.Tensor  # [B] int64, on the logits' device
    copy: HostCopy  # picked [3, B] float64 (token, logprob, raw logprob), then the top-logprobs rows if any
    top_num: list[int | None] | None  # params.logprobs per row, when some row asked for them
    top_k: int = 0

    def result(self, rows: list[int] | None = None) -> SamplerOutput:
        """The SamplerOutput of every row, or of `rows` only (in that order)."""
        host = self.copy.wait()
        picked = host[0] if rows is None else host[0][:, rows]
        token_ids, chosen, raw = picked.tolist()
        top = None
        if self.top_num is not None:
            num = self.top_num if rows is None else [self.top_num[i] for i in rows]
            top = _format_top_logprobs(host[1] if rows is None else host[1][rows], num, self.top_k)
        return SamplerOutput([int(t) for t in token_ids], chosen, raw, top)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    steps: list[int],
    log_softmax: Callable[[torch.Tensor], torch.Tensor] = _log_softmax,
    history: TokenHistory | None = None,
) -> SamplerOutput:
    """Sample one token per row of float32 `logits` [B, V]; `steps[i]` = tokens row i has generated.

    `log_softmax` is the model's (`Kernels.log_softmax`): batch-invariant in deterministic mode, and
    the same function the trainer-side parity forward scores tokens with. `history` is needed when a
    row uses logit_bias, allowed_token_ids, min_tokens or a penalty.
    """
    return sample_async(logits, params, seeds, steps, log_softmax, history).result()


def sample_async(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    steps: list[int],
    log_softmax: Callable[[torch.Tensor], torch.Tensor] = _log_softmax,
    history: TokenHistory | None = None,
    argmax_logprob: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PendingSample:
    """sample() without waiting for the device: the kernels are queued and their results copied to the host
    with non_blocking copies. `argmax_logprob` (`Kernels.argmax_logprob`, the model's) serves a batch that is all
    greedy on unchanged logits and asks for no top logprobs: the tokens and their logprobs in one pass."""
    num = [p.logprobs for p in params]
    greedy_rows = [p.greedy for p in params]
    unchanged = _leaves_logits_unchanged(params) and not shapes_logits(params)
    if argmax_logprob is not None and unchanged and all(n is None for n in num) and all(greedy_rows):
        tokens, chosen = argmax_logprob(logits)
        chosen = chosen.double()
        return PendingSample(tokens, HostCopy(torch.stack([tokens.double(), chosen, chosen])), None)
    raw_logprobs = log_softmax(logits)
    shaped = apply_history_processors(logits, params, history)
    logprobs = raw_logprobs if unchanged else log_softmax(_temperature_and_filters(shaped, params))
    if all(greedy_rows):
        tokens = shaped.argmax(dim=-1)
    else:
        seeds_t = to_device(seeds, torch.int64, logits.device)
        steps_t = to_device(steps, torch.int64, logits.device)
        tokens = gumbel_argmax(logprobs, seeds_t, steps_t)
        if any(greedy_rows):  # an all-sampled batch (an RL rollout's) skips the argmax pass over [B, V]
            greedy = to_device(greedy_rows, torch.bool, logits.device)
            tokens = torch.where(greedy, shaped.argmax(dim=-1), tokens)
    rows = torch.arange(logits.shape[0], device=logits.device)
    # float32 -> float64 is exact, so the values equal three .tolist() calls
    picked = torch.stack([tokens.double(), logprobs[rows, tokens].double(), raw_logprobs[rows, tokens].double()])
    if all(n is None for n in num):
        return PendingSample(tokens, HostCopy(picked), None)
    top, k = _top_logprobs_rows(logprobs, tokens, num)
    return PendingSample(tokens, HostCopy(picked, top), num, k)


def sample_sequences(
    logits: torch.Tensor,
    seqs: list[Sequence],
    eos_token_ids: tuple[int, ...],
    token_counts: TokenCounts,
    log_softmax: Callable[[torch.Tensor], torch.Tensor] = _log_softmax,
    steps: list[int] | None = None,
    argmax_logprob: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PendingSample:
    """sample_async() for the engine's sequences (one row each): their params, seeds and steps (default: the
    tokens each has generated), and their token history when some row needs it, from the device-resident
    `token_counts`. A caller that used the history calls `token_counts.add_sampled` with the result."""
    params = [s.params for s in seqs]
    history = None
    if shapes_logits(params):
        history = token_counts.history(seqs, logits.shape[-1], logits.device, eos_token_ids)
    steps = [len(s.output_ids) for s in seqs] if steps is None else steps
    return sample_async(logits, params, [s.seed for s in seqs], steps, log_softmax, history, argmax_logprob)


@torch.inference_mode()
def prompt_logprobs(
    hidden: torch.Tensor,
    targets: list[int],
    num: int,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    log_softmax: Callable[[torch.Tensor], torch.Tensor] = _log_softmax,
    rows_per_slice: int = 512,
) -> list[dict[int, Logprob]]:
    """prompt_logprobs=num entries for the prompt tokens `targets`, from the raw logits of the hidden states
    [len(targets), H] that predict them (vLLM applies no sampling processing to the prompt). The LM head runs
    on `rows_per_slice` rows at a time: a 8192-token chunk would otherwise need 8192 x V float32 logits."""
    out: list[dict[int, Logprob]] = []
    for lo in range(0, len(targets), rows_per_slice):
        ids = to_device(targets[lo : lo + rows_per_slice], torch.int64, hidden.device)
        logprobs = log_softmax(compute_logits(hidden[lo : lo + rows_per_slice]))
        out += top_logprobs(logprobs, ids, [num] * len(ids))
    return out


def top_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num: list[int | None]
) -> list[dict[int, Logprob] | None]:
    """Per row, vLLM's logprobs dict: the num[i] most likely tokens of logprobs[i] (-1: all) with ranks 1..N,
    plus token_ids[i] ranked by how many tokens are at least as likely. None where num[i] is None.
    One device-to-host copy."""
    rows, k = _top_logprobs_rows(logprobs, token_ids, num)
    return _format_top_logprobs(rows.cpu(), num, k)


def _top_logprobs_rows(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num: list[int | None]
) -> tuple[torch.Tensor, int]:
    """float64 rows [B, 3 + 2k] on the device: (token, its logprob, its rank, k top values, k top ids), and k."""
    vocab = logprobs.shape[-1]
    wanted = [vocab if n == -1 else n for n in num if n is not None]
    k = min(max(wanted), vocab)
    rows = torch.arange(logprobs.shape[0], device=logprobs.device)
    chosen = logprobs[rows, token_ids]
    ranks = (logprobs >= chosen[:, None]).sum(dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return torch.cat([torch.stack([token_ids.double(), chosen.double(), ranks.double()], dim=1),
                      values.double(), ids.double()], dim=1), k


def _format_top_logprobs(rows: torch.Tensor, num: list[int | None], k: int) -> list[dict[int, Logprob] | None]:
    """The logprobs dicts from `_top_logprobs_rows`'s host rows (a row asking for -1, the whole vocabulary,
    made k the vocabulary's size)."""
    out: list[dict[int, Logprob] | None] = []
    for n, row in zip(num, rows.tolist()):
        if n is None:
            out.append(None)
            continue
        n = k if n == -1 else n
        entry = {int(t): Logprob(v, j + 1) for j, (v, t) in enumerate(zip(row[3 : 3 + n], row[3 + k : 3 + k + n]))}
        entry.setdefault(int(row[0]), Logprob(row[1], int(row[2])))
        out.append(entry)
    return out


def _leaves_logits_unchanged(params: list[SamplingParams]) -> bool:
    """True when process_logits would return the logits as they are (temperature 1 or greedy, no filters)."""
    return all(p.temperature in (0, 1) and p.min_p <= 0 and p.top_k <= 0 and p.top_p >= 1.0 for p in params)
