"""A sequence (one sample of one request) as it moves through the scheduler, and its finished form."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from parity.engine.detokenizer import IncrementalDetokenizer
from parity.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Logprob:
    """One entry of a top-N logprobs dict (vLLM's `Logprob`): the log-probability and its 1-based rank."""

    logprob: float
    rank: int


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt_index: int  # position of its prompt in a generate() call, or the order of add_request
    sample_index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # per-sample sampling seed (hashed from the request seed and the sample index, or drawn by the engine)
    max_len: int  # prompt + output may not exceed this (min of max_model_len and prompt + max_tokens)
    group_leader: Sequence | None = None  # sample 0 of the request, whose prefill the others reuse
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_raw_logprobs: list[float] = field(default_factory=list)
    output_weight_versions: list[int] = field(default_factory=list)  # the weight version that produced each token
    top_logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # when params.logprobs is set
    prompt_logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # entry k: prompt token k + 1's
    detokenizer: IncrementalDetokenizer | None = None  # the output's text, when params.stop has strings
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache at the last admission
    num_hashed_blocks: int = 0  # leading full blocks already registered in the prefix cache
    cache_blocks: bool = True  # False while its K/V mix weight versions (kept across an update): never registered
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None  # why a step failed it (finish_reason "error")
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    routed_experts: dict[int, torch.Tensor] = field(default_factory=dict)  # first position -> a chunk's [n, L, k]

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_ids)


@dataclass
class Rollout:
    """One finished (or aborted) sample.

    `output_logprobs[t]` is the log-probability of `output_ids[t]` under the distribution it was
    actually sampled from (after temperature, top-k, top-p and min-p, renormalised; for greedy the
    temperature is taken as 1): what an RL importance ratio needs. `output_raw_logprobs` (if asked
    for) is the log-softmax of the model's unprocessed logits, vLLM's `raw_logprobs`.

    vLLM's extras: `stop_reason` is the stop string or stop token id that ended the sample (None for
    EOS or length); `text` is cut at the stop string (kept with include_stop_str_in_output) while
    `output_ids` keep every sampled token. `top_logprobs[t]` (SamplingParams.logprobs=N) maps the N
    most likely tokens at step t, and the sampled one, to a Logprob under the same distribution as
    `output_logprobs`; `prompt_logprobs[i]` (prompt_logprobs=N) does the same for prompt token i from
    the raw logits, with None for the first token, which nothing predicts.

    `output_weight_versions[t]` is the engine's weight version when `output_ids[t]` was sampled (updates
    while requests run make it vary within a sample); `weight_version` is the version at the end. An
    aborted sample (finish_reason "abort") can be carried on with `Engine.add_request(continue_from=...)`,
    which uses its `seed` again.

    `routed_experts` (SamplingParams.return_routed_experts, MoE models): the experts each MoE layer chose for
    every input position, int16 [len(prompt_ids) + len(output_ids) - 1, MoE layers, k] (the last output token
    is never an input); the trainer's `token_logprobs(..., routed_experts=)` replays them.
    """

    request_id: str
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop token, kept in output_ids), "length", "abort" or "error"
    output_raw_logprobs: list[float] | None = None
    text: str | None = None
    stop_reason: int | str | None = None
    top_logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    weight_version: int = 0
    output_weight_versions: list[int] = field(default_factory=list)
    seed: int | None = None  # the sample's own sampling seed
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    error: str | None = None  # finish_reason "error": the exception that failed its step, with its notes
    routed_experts: torch.Tensor | None = None

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.output_logprobs))
