"""Sampling parameters, with vLLM's names and defaults so RL code ports over unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from parity.precision.checks import check_bool, check_float, check_int, check_int_list


@dataclass
class SamplingParams:
    """How to sample one prompt.

    temperature 0 means greedy. top_k 0 or -1 keeps the whole vocabulary; top_p 1 and min_p 0
    disable those filters. `seed` makes this request's samples reproducible whatever else is in
    the batch: sample k draws with a seed hashed from (seed, k) by blake2b (`parity.engine.engine.sample_seed`),
    so requests with neighbouring seeds share no noise. `ignore_eos` keeps generating past EOS (benchmarks).
    `raw_logprobs` also returns the log-softmax of the unprocessed logits for every sampled token. Every
    field is checked for type, range and NaN/inf on construction (ValueError naming the field); `seed` is an int in [0, 2**63).

    vLLM's stopping and shaping options, with its meanings: `stop` strings end a sample when its text
    contains one (the text is cut before it unless `include_stop_str_in_output`; the token ids keep every
    sampled token); the first `min_tokens` tokens can be neither EOS nor a stop token id, nor end on a
    stop string. `logit_bias` ({token id: bias}) is added to the logits, `allowed_token_ids` masks every
    other token; `repetition_penalty` divides positive (multiplies negative) logits of tokens seen in
    the prompt or the output, `frequency_penalty` subtracts per occurrence in the output and
    `presence_penalty` once per token present in the output. All of these act on the raw logits before
    temperature, so they are part of the distribution `output_logprobs` is taken from. `logprobs=N`
    returns the N most likely tokens of that distribution at each step, with ranks, plus the sampled one
    (-1: the whole vocabulary); `prompt_logprobs=N` the same for each prompt token, from the raw logits.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    raw_logprobs: bool = False
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_routed_experts: bool = False  # MoE models: Rollout.routed_experts, for routing replay in the trainer

    def __post_init__(self) -> None:
        """Refuse a bad field here, before the request is queued: the message names the field and the value."""
        self.n = check_int("n", self.n, 1)
        self.temperature = check_float("temperature", self.temperature, 0.0)
        self.top_p = check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.top_k = check_int("top_k", self.top_k, -1)
        self.min_p = check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            self.seed = check_int("seed", self.seed, 0, 2**63, high_open=True)
        self.max_tokens = check_int("max_tokens", self.max_tokens, 1)
        self.stop_token_ids = check_int_list("stop_token_ids", self.stop_token_ids, 0)
        self.ignore_eos = check_bool("ignore_eos", self.ignore_eos)
        self.raw_logprobs = check_bool("raw_logprobs", self.raw_logprobs)
        self.return_routed_experts = check_bool("return_routed_experts", self.return_routed_experts)
        self.stop = _check_stop(self.stop)
        self.include_stop_str_in_output = check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        self.min_tokens = check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        self.repetition_penalty = check_float("repetition_penalty", self.repetition_penalty, 0.0, low_open=True)
        self.presence_penalty = check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self.logit_bias = _check_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = check_int_list("allowed_token_ids", self.allowed_token_ids, 0)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must name at least one token, got []")
        if self.logprobs is not None:
            self.logprobs = check_int("logprobs", self.logprobs, -1)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = check_int("prompt_logprobs", self.prompt_logprobs, -1)

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse token ids outside [0, vocab_size) in the fields that name tokens (the model is known only
        when the request reaches an engine)."""
        named = {"stop_token_ids": self.stop_token_ids, "logit_bias": list(self.logit_bias),
                 "allowed_token_ids": self.allowed_token_ids or []}
        for name, ids in named.items():
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")

    @property
    def shapes_logits_with_history(self) -> bool:
        """True when the logits are changed by something other than temperature and the top-k/p, min-p filters:
        a bias, an allowed set, min_tokens or a penalty (these need the row's token history)."""
        return bool(
            self.logit_bias or self.allowed_token_ids is not None or self.min_tokens > 0
            or self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_stop(value) -> list[str]:
    """`stop` as a list of non-empty strings (a single string is one stop string, as in vLLM)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {value!r} ({type(value).__name__})")
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
    return list(value)


def _check_logit_bias(value) -> dict[int, float]:
    """`logit_bias` as {token id >= 0: finite float}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {value!r} ({type(value).__name__})")
    return {check_int("logit_bias key", k, 0): check_float(f"logit_bias[{k!r}]", v) for k, v in value.items()}
