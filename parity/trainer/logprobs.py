"""Trainer-side logprobs of rollout tokens, aligned with what the engine returned.

The trainer recomputes log π(y_t | prefix) for every response token with its own model and
precision. For the importance ratio to mean anything the distribution must be the one the engine
sampled from: the same temperature (and, when the rollout used them, the same top-k / top-p / min-p
filters, renormalised; the engine's `output_logprobs`), or the plain full-vocabulary softmax of the
raw logits (`mode="raw"`, the engine's `output_raw_logprobs`, vLLM's `raw_logprobs`).

Layout for HF models: prompts left-padded to a common length and responses right-padded, so that
every response starts at the same column and only its T+1 positions go through the LM head
(`logits_to_keep`). The forward goes through the outermost module, so DDP / FSDP / accelerate
wrappers see it. With `logits_fp32` the LM head runs in float32 even under autocast (the engine's
`logits_fp32` default, MiniMax-M1's fix).

For parity's own trainer model (a `DecoderModel`, or `ParityForCausalLM` around one), sequences are packed and
scored by `parity_model.token_logprobs`, the engine's own code; its LM-head precision is the model's policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parity.engine.logits_processors import TokenHistory, shapes_logits
from parity.engine.sampler import process_logits
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Rollout
from parity.engine.weight_sync import unwrap_module
from parity.models.decoder import DecoderModel
from parity.trainer.parity_model import check_routed_experts, token_logprobs

LOGPROB_MODES = ("processed", "raw")


@dataclass
class TrainerLogprobs:
    """Per-token tensors [B, T], T = the longest response; padding has mask False and value 0."""

    logprobs: torch.Tensor  # float32, the trainer's (with grad if asked)
    rollout_logprobs: torch.Tensor  # float32, the engine's for the same tokens and the same mode
    mask: torch.Tensor  # bool, True on response tokens

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def _padded_batch(rollouts: Sequence[Rollout], pad_id: int, device: torch.device):
    """Left-padded prompts + right-padded responses: ids, attention mask, position ids [B, P+T]."""
    prompt_len = max(len(r.prompt_ids) for r in rollouts)
    resp_len = max(len(r.output_ids) for r in rollouts)
    rows, masks, positions = [], [], []
    for r in rollouts:
        left = prompt_len - len(r.prompt_ids)
        right = resp_len - len(r.output_ids)
        n = len(r.prompt_ids) + len(r.output_ids)
        rows.append([pad_id] * left + list(r.prompt_ids) + list(r.output_ids) + [pad_id] * right)
        masks.append([0] * left + [1] * n + [0] * right)
        positions.append([0] * left + list(range(n)) + [max(n - 1, 0)] * right)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)
    return as_tensor(rows), as_tensor(masks), as_tensor(positions), prompt_len, resp_len


@contextlib.contextmanager
def _fp32_lm_head(model: nn.Module):
    """Run the model's output projection in float32 (autocast off) for the duration."""
    head = unwrap_module(model).get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no nn.Linear output embedding; pass logits_fp32=False")

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return F.linear(x.float(), head.weight.float(), bias)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # back to the class's forward


def _token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, params: SamplingParams | None, mode: str, rollouts: Sequence[Rollout],
    eos_token_ids: Sequence[int],
) -> torch.Tensor:
    """log p(target) under the processed (history-dependent processors, temperature, filters) or raw
    distribution. logits [N, V], one row per response token of `rollouts` in order."""
    logits = logits.float()
    if mode == "processed" and params is not None:
        history = None
        if shapes_logits([params]):
            history = TokenHistory.of_positions([params] * len(rollouts), [r.prompt_ids for r in rollouts],
                                                [r.output_ids for r in rollouts], logits.shape[-1], logits.device,
                                                eos_token_ids)
        logits = process_logits(logits, [params] * logits.shape[0], history)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _hf_eos_token_ids(model: nn.Module) -> list[int]:
    """The EOS ids an engine loading this HF model stops on (generation config first, as ModelConfig reads them)."""
    inner = unwrap_module(model)
    generation = getattr(inner, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = getattr(inner.config, "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _hf_response_logits(model: nn.Module, rollouts: Sequence[Rollout], pad_id: int, device, logits_fp32: bool):
    """Logits [B, T, V] that predict each response token, through the model's own forward."""
    ids, attn, pos, prompt_len, resp_len = _padded_batch(rollouts, pad_id, device)
    ctx = _fp32_lm_head(model) if logits_fp32 else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=resp_len + 1, use_cache=False)
    return out.logits[:, :-1]  # column j predicts response token j


@contextlib.contextmanager
def _hf_routing_replay(model: nn.Module, rollouts: Sequence[Rollout], device):
    """Route an HF MoE model (transformers 5: each sparse block's `gate` router returns (logits, weights,
    experts)) through the rollouts' `routed_experts`: a forward hook on every router swaps its top-k for the
    given experts, with weights from the router's own softmax (renormalised as it does), laid out like
    `_padded_batch` (pad columns route to expert 0; their outputs are never scored)."""
    routers = [m.gate for m in unwrap_module(model).modules()
               if type(m).__name__.endswith("SparseMoeBlock") and hasattr(getattr(m, "gate", None), "top_k")]
    if not routers:
        raise TypeError(f"{type(unwrap_module(model)).__name__} has no MoE routers (SparseMoeBlock.gate) to replay")
    prompt_len = max(len(r.prompt_ids) for r in rollouts)
    resp_len = max(len(r.output_ids) for r in rollouts)
    top_k = routers[0].top_k
    chosen = torch.zeros(len(rollouts), prompt_len + resp_len, len(routers), top_k, dtype=torch.int64)
    for i, r in enumerate(rollouts):
        routed = check_routed_experts(f"rollout {i}", r.routed_experts, len(r.prompt_ids), len(r.output_ids),
                                      (len(routers), top_k))
        left = prompt_len - len(r.prompt_ids)
        chosen[i, left : left + routed.shape[0]] = routed.long()
    chosen = chosen.flatten(0, 1).to(device)

    def hook(layer: int):
        def replace(router, args, out):
            logits = out[0]
            ids = chosen[:, layer]
            weights = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, ids)
            if getattr(router, "norm_topk_prob", True):  # Mixtral's router has no switch: it always renormalises
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights.to(out[1].dtype), ids  # the router's own weight dtype (Mixtral: float32)
        return replace

    handles = [router.register_forward_hook(hook(i)) for i, router in enumerate(routers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _parity_response_logprobs(model: DecoderModel, rollouts: Sequence[Rollout], params: SamplingParams | None,
                              mode: str, mask: torch.Tensor, replay_routing: bool) -> torch.Tensor:
    processed = params if mode == "processed" else None
    routed = [r.routed_experts for r in rollouts] if replay_routing else None
    per_seq = token_logprobs(model, [r.prompt_ids for r in rollouts], [r.output_ids for r in rollouts], params=processed,
                             routed_experts=routed)
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, torch.cat(per_seq))


def trainer_logprobs(
    model: nn.Module,
    rollouts: Sequence[Rollout],
    params: SamplingParams | None = None,
    mode: str = "processed",
    with_grad: bool = False,
    logits_fp32: bool = True,
    pad_id: int = 0,
    eos_token_ids: Sequence[int] | None = None,
    replay_routing: bool = False,
) -> TrainerLogprobs:
    """Recompute the response tokens' logprobs of `rollouts` with the trainer's `model`.

    `params` are the rollouts' SamplingParams (temperature, top-k/p, min-p); None = temperature 1,
    no filters. Greedy rollouts are scored at temperature 1 (filters still apply), as the engine scores them. `mode`:
    "processed" (compare with Rollout.output_logprobs) or "raw" (output_raw_logprobs).
    Penalties, logit_bias, allowed_token_ids and min_tokens in `params` are applied from each position's
    token history, as the engine applied them; min_tokens masks `eos_token_ids` (HF models; default: the
    model's generation-config EOS, which the engine reads too; a DecoderModel uses its config's).
    `logits_fp32` and `pad_id` apply to HF models only. `replay_routing` (MoE models) routes every token
    through the experts the engine chose (`Rollout.routed_experts`) instead of the trainer's own top-k.
    """
    if mode not in LOGPROB_MODES:
        raise ValueError(f"unknown logprob mode {mode!r}; expected one of {LOGPROB_MODES}")
    if not rollouts:
        raise ValueError("trainer_logprobs needs at least one rollout")
    empty = next((i for i, r in enumerate(rollouts) if not r.output_ids), None)
    if empty is not None:
        raise ValueError(f"rollout {empty} has no response tokens")
    if mode == "raw" and any(r.output_raw_logprobs is None for r in rollouts):
        raise ValueError("mode='raw' needs rollouts generated with SamplingParams(raw_logprobs=True)")
    device = next(model.parameters()).device
    resp_len = max(len(r.output_ids) for r in rollouts)
    pad = lambda values, fill: list(values) + [fill] * (resp_len - len(values))
    mask = torch.tensor([pad([True] * len(r.output_ids), False) for r in rollouts]).to(device)
    targets = torch.tensor([pad(r.output_ids, 0) for r in rollouts]).to(device)
    engine_lp = [r.output_logprobs if mode == "processed" else r.output_raw_logprobs for r in rollouts]
    rollout_lp = torch.tensor([pad(lp, 0.0) for lp in engine_lp], dtype=torch.float32).to(device)

    inner = unwrap_module(model)
    decoder = inner.model if isinstance(getattr(inner, "model", None), DecoderModel) else inner  # ParityForCausalLM
    with torch.set_grad_enabled(with_grad):
        if isinstance(decoder, DecoderModel):
            logprobs = _parity_response_logprobs(decoder, rollouts, params, mode, mask, replay_routing)
        else:
            replay = _hf_routing_replay(model, rollouts, device) if replay_routing else contextlib.nullcontext()
            with replay:
                logits = _hf_response_logits(model, rollouts, pad_id, device, logits_fp32)
            eos = _hf_eos_token_ids(model) if eos_token_ids is None else eos_token_ids
            flat = _token_logprobs(logits[mask], targets[mask], params, mode, rollouts, eos)
            logprobs = torch.zeros(mask.shape, dtype=flat.dtype, device=device).masked_scatter(mask, flat)
    return TrainerLogprobs(logprobs, rollout_lp, mask)
