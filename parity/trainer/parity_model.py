"""The trainer-side "parity forward": the engine's own model code, with autograd, over packed sequences.

The trainer scores rollout tokens with a `DecoderModel` built from the same checkpoint (or copied from
a running engine) in the same precision policy. Sequences are packed end to end and run through
`AttentionMetadata.for_packed_sequences` (causal attention within each sequence, no KV cache); the
logits of the rows that predict response tokens go through the engine's own temperature/filter code
(`process_logits`) and the model's `Kernels.log_softmax`, exactly as the sampler does.

In deterministic mode every kernel is batch-invariant, so `token_logprobs` equals the engine's
`Rollout.output_logprobs` bit for bit (max |Δlogp| == 0), whatever batches, chunked prefill,
prefix caching or preemption the rollout went through. In fast mode they agree to rounding.

Which logprob: `temperature=T` (and top_k/top_p/min_p if the rollout used them) gives the engine's
processed logprobs `log_softmax(filter(logits / T))`; temperature 1 with no filters (or greedy,
temperature 0) gives the raw log-softmax, i.e. `output_raw_logprobs`. `params=` (the rollouts'
SamplingParams) also applies logit_bias, allowed_token_ids, min_tokens and the penalties from each
position's token history, so penalised rollouts stay bit for bit too.

Parameters are trainable in the checkpoint's dtype (a mixed-precision trainer keeps its own fp32
master copy and writes rounded weights back into this model). `parity.models.weights.hf_named_weights`
yields the weights under HF names, for `Engine.update_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from parity.engine.logits_processors import TokenHistory, shapes_logits
from parity.engine.sampler import process_logits
from parity.engine.sampling_params import SamplingParams
from parity.kernels.metadata import AttentionMetadata
from parity.models.decoder import DecoderModel
from parity.models.loader import load
from parity.precision.policy import PrecisionPolicy


def load_parity_model(
    path: str | Path,
    policy: PrecisionPolicy | None = None,
    device: str | torch.device | None = None,
    max_positions: int | None = None,
    trainable: bool = True,
) -> DecoderModel:
    """A DecoderModel with trainable parameters, loaded from an HF directory, a .gguf file or a model alias.

    `policy` defaults to PrecisionPolicy(dtype="fp32", deterministic=True). For bitwise parity with an
    engine use the engine's policy and `max_positions` equal to its `max_model_len` (both default to
    the checkpoint's max_position_embeddings), or build it with `parity_model_from_engine`.
    """
    policy = policy or PrecisionPolicy(dtype="fp32", deterministic=True)
    return load(path, policy, device, max_positions).model.requires_grad_(trainable)


def parity_model_from_engine(
    engine, deterministic: bool | None = None, trainable: bool = True, device: str | torch.device | None = None
) -> DecoderModel:
    """A trainable copy of an engine's model: same config, weights, RoPE tables and precision policy
    (`deterministic=None` keeps the engine's mode)."""
    src: DecoderModel = engine.model
    policy = PrecisionPolicy.of_model(src)
    if deterministic is not None:
        policy = replace(policy, deterministic=deterministic)
    device = torch.device(device) if device is not None else src.embed_tokens.device
    model = DecoderModel(src.config, policy, device, src.cos_table.shape[0])
    with torch.no_grad():
        model.load_state_dict(src.state_dict())
        model.cos_table.copy_(src.cos_table)
        model.sin_table.copy_(src.sin_table)
    return model.requires_grad_(trainable)


def _per_sequence(value, n: int, name: str) -> list:
    if isinstance(value, (int, float)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} sequences")
    return value


def token_logprobs(
    model: DecoderModel,
    prompt_ids_list: Sequence[Sequence[int]],
    output_ids_list: Sequence[Sequence[int]],
    temperature: float | Sequence[float] = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    routed_experts: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """log π(y_t | prompt, y_<t) of every output token, one float32 tensor [len(output)] per sequence.

    Runs with autograd when grad is enabled and the model is trainable. `temperature` may be one value
    or one per sequence; 0 (greedy) scores at temperature 1, as the engine does. `params` (the rollouts'
    SamplingParams, one or one per sequence) replaces temperature and the filters with everything the
    engine applied, including logit_bias, allowed_token_ids, min_tokens (masking the model's EOS) and the
    penalties, each from the position's own token history.

    `routed_experts` (MoE models: each rollout's `Rollout.routed_experts`, [len(prompt) + len(output) - 1,
    MoE layers, k]) routes every position through the experts the engine chose (routing replay) instead of
    this model's own top-k; the mixing weights still come from this model's router.
    """
    if len(prompt_ids_list) != len(output_ids_list):
        raise ValueError(f"{len(prompt_ids_list)} prompts but {len(output_ids_list)} outputs")
    if params is not None and (temperature, top_k, top_p, min_p) != (1.0, 0, 1.0, 0.0):
        raise ValueError("pass either params or temperature/top_k/top_p/min_p, not both")
    if params is None:
        temps = _per_sequence(temperature, len(prompt_ids_list), "temperature")
        seq_params = [SamplingParams(temperature=t, top_k=top_k, top_p=top_p, min_p=min_p) for t in temps]
    else:
        single = isinstance(params, SamplingParams)
        seq_params = [params] * len(prompt_ids_list) if single else _per_sequence(params, len(prompt_ids_list), "params")
    device = model.embed_tokens.device
    vocab, max_len = model.config.vocab_size, model.cos_table.shape[0]
    tokens: list[int] = []
    lens: list[int] = []
    rows: list[int] = []  # hidden-state rows that predict an output token
    targets: list[int] = []
    row_params: list[SamplingParams] = []
    counts: list[int] = []
    scored: list[tuple[SamplingParams, list[int], list[int]]] = []  # sequences with output tokens
    for i, (prompt, output, sp) in enumerate(zip(prompt_ids_list, output_ids_list, seq_params)):
        prompt, output = [int(t) for t in prompt], [int(t) for t in output]
        counts.append(len(output))
        if not output:
            continue
        if not prompt:
            raise ValueError(f"sequence {i}: empty prompt")
        seq = prompt + output[:-1]  # the last output token is never an input
        bad = next((t for t in seq + output[-1:] if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"sequence {i}: token id {bad} outside the vocabulary [0, {vocab})")
        if len(seq) > max_len:
            raise ValueError(f"sequence {i}: {len(seq)} positions exceed the model's max_positions={max_len}")
        start = len(tokens)
        tokens += seq
        lens.append(len(seq))
        rows += range(start + len(prompt) - 1, start + len(seq))
        targets += output
        row_params += [sp] * len(output)
        scored.append((sp, prompt, output))
    if not rows:
        return [torch.zeros(0, dtype=torch.float32, device=device) for _ in counts]
    ids = torch.tensor(tokens, dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    replay = _packed_routing(routed_experts, prompt_ids_list, output_ids_list, device)
    with model.routing.replaying(replay):
        hidden = model(ids, positions, AttentionMetadata.for_packed_sequences(lens, device))
    logits = model.compute_logits(hidden[torch.tensor(rows, device=device)])
    history = None
    if shapes_logits(row_params):
        history = TokenHistory.of_positions(*zip(*scored), vocab, device, model.config.eos_token_ids)
    logprobs = model.kernels.log_softmax(process_logits(logits, row_params, history))
    picked = logprobs.gather(-1, torch.tensor(targets, device=device)[:, None]).squeeze(-1)
    return list(picked.split(counts))


def check_routed_experts(label: str, routed: torch.Tensor | None, prompt_len: int, output_len: int,
                         tail: tuple[int, ...] | None = None) -> torch.Tensor:
    """`routed` if it holds the experts of every token the forward computes (prompt + output - 1 rows) and, when
    given, the trailing shape `tail` (layers, top-k); ValueError naming `label` otherwise."""
    rows = prompt_len + output_len - 1
    got = None if routed is None else tuple(routed.shape)
    if got is None or got[0] != rows or (tail is not None and got[1:] != tail):
        want = (rows, *tail) if tail is not None else f"{rows} rows"
        raise ValueError(f"{label}: routed_experts has shape {got}, expected {want} (prompt + output - 1 rows: "
                         "every token but the last); generate with SamplingParams(return_routed_experts=True)")
    return routed


def _packed_routing(routed_experts, prompt_ids_list, output_ids_list, device) -> torch.Tensor | None:
    """The rollouts' routed experts in the packed batch's row order (sequences with outputs only)."""
    if routed_experts is None:
        return None
    routed_experts = _per_sequence(routed_experts, len(prompt_ids_list), "routed_experts")
    parts = []
    for i, (prompt, output, routed) in enumerate(zip(prompt_ids_list, output_ids_list, routed_experts)):
        if not len(output):
            continue
        parts.append(check_routed_experts(f"sequence {i}", routed, len(prompt), len(output)).to(device))
    return torch.cat(parts)
