"""Sampling parameters, with vLLM's names and defaults so RL code ports over unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

from parity.precision.checks import check_bool, check_float, check_int, check_int_list


@dataclass
class SamplingParams:
    """How to sample one prompt.

    temperature 0 means greedy. top_k 0 or -1 keeps the whole vocabulary; top_p 1 and min_p 0
    disable those filters. `seed` makes this request's samples reproducible whatever else is in
    the batch. `ignore_eos` keeps generating past EOS (benchmarks). `raw_logprobs` also returns
    the log-softmax of the unprocessed logits for every sampled token. Every field is checked for
    type, range and NaN/inf on construction (ValueError naming the field); `seed` is an int in [0, 2**63).
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
