"""Request bodies of the OpenAI-compatible API, as strict pydantic models.

Field names and meanings are OpenAI's, plus vLLM's extras that RL clients send (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, prompt_logprobs, return_token_ids, ...).
Strict: a wrong type (a digit string for an int, a float for max_tokens) or an unknown field is refused
with HTTP 400 naming the field, never coerced or ignored, so a typo cannot silently change a rollout.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from parity.engine.sampling_params import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """What both endpoints share: the model name, sampling, streaming, and vLLM's RL extras."""

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=-1)
    return_token_ids: bool = False  # prompt_token_ids, token_ids and weight_versions in the response
    request_id: str | None = None  # the id /abort takes; default: a fresh one

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams; SamplingParams checks the combination (e.g. min_tokens <= max_tokens)."""
        optional = {
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "top_k": self.top_k,
            "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "stop_token_ids": self.stop_token_ids, "allowed_token_ids": self.allowed_token_ids,
            "prompt_logprobs": self.prompt_logprobs, "logprobs": logprobs,
        }
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias={_token_id("logit_bias", k): v for k, v in (self.logit_bias or {}).items()},
            **{k: v for k, v in optional.items() if v is not None},
        )


def _token_id(field: str, key: str) -> int:
    """OpenAI sends logit_bias keys as JSON strings of token ids."""
    if not key.isdigit():
        raise ValueError(f"{field}: keys must be token ids (digit strings), got {key!r}")
    return int(key)


class CompletionRequest(_SamplingRequest):
    """/v1/completions: `prompt` is text, token ids, or a list of either (one request per prompt)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)  # the N most likely tokens at each step (0: the sampled one only)
    echo: Literal[False] = False
    best_of: int | None = Field(None, ge=1)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ValueError("prompt: must not be empty")
        return list(p)


class ChatMessage(BaseModel):
    """One message, passed to the chat template as it came (tool calls, tool results, names included)."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    """/v1/chat/completions: `messages` (and `tools`) are rendered by the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: the ids a prompt or a conversation becomes (for building multi-turn token ids)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class UpdateWeightsRequest(_Strict):
    """Load a checkpoint directory's safetensors into the running engine (HF names)."""

    path: str
    partial: bool = False  # a subset of the tensors (e.g. the layers that changed)
    in_flight: Literal["keep", "recompute"] | None = None  # requests running: go on from their K/V, or recompute it


class SleepRequest(_Strict):
    level: int = Field(1, ge=1, le=2)


class WakeUpRequest(_Strict):
    tags: list[str] | None = None


class AbortRequest(_Strict):
    request_id: str | None = None  # None: every request in flight
