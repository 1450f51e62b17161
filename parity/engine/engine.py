"""The rollout engine: request -> scheduler -> model runner -> sampler -> Rollout.

`generate` is the batch API; `add_request` / `step` let an RL loop drive it incrementally.
"""

from __future__ import annotations

import hashlib
import itertools
import numbers
import time
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import fields
from pathlib import Path

import torch

from parity.engine import weight_sync
from parity.engine.config import EngineConfig
from parity.engine.detokenizer import IncrementalDetokenizer
from parity.engine.model_runner import ModelRunner
from parity.engine.sampler import prompt_logprobs, sample_sequences
from parity.engine.sampling_params import SamplingParams
from parity.engine.scheduler import Scheduler, SchedulerConfig, StepOutput
from parity.engine.sequence import Rollout, Sequence
from parity.engine.sleep import SleepState, SleepStats, WakeStats
from parity.models.decoder import DecoderModel
from parity.models.loader import Checkpoint, load
from parity.models.weights import WeightMap
from parity.precision.policy import NonFiniteActivationError

# Text, token ids, or a chat: a list of {"role": ..., "content": ...} messages (the tokenizer's template is applied).
Prompt = str | Seq[int] | Seq[Mapping[str, str]]


class PromptTooLongError(ValueError):
    """A request that can never run: longer than the context, or than the whole KV cache."""


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers by blake2b (stable across processes, unlike Python's salted `hash`).

    Sample k of a request with seed s draws with sample_seed(s, k), so the samples of (n=3, seed=100)
    share no noise with those of (n=1, seed=101): seeding prompt i with i is safe."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _error_text(exc: BaseException) -> str:
    return "\n".join([f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", [])])


def _pick_device(name: str | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Engine:
    runner_class: type[ModelRunner] = ModelRunner  # tensor parallelism brings its own (KV budget agreed by all ranks)

    def __init__(self, model: DecoderModel, tokenizer, config: EngineConfig, max_model_len: int):
        self.model = model
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.config = config
        self.device = next(model.parameters()).device
        self.max_model_len = max_model_len
        self.weights = WeightMap(model, model.config)
        self.weight_version = 0
        self.runner = self.runner_class(model, config, max_model_len)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=self.runner.num_blocks,
            block_size=config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            eos_token_ids=tuple(model.config.eos_token_ids),
        ))
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, gguf_file: str | None = None, **kwargs) -> Engine:
        """Load an HF-format model directory, a .gguf file (or a directory plus `gguf_file`), or a model
        alias such as "smollm2-135m-instruct". Keyword arguments are EngineConfig fields."""
        names = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        config = EngineConfig(**kwargs)
        checkpoint = Checkpoint.resolve(path, gguf_file)
        device = _pick_device(config.device)
        policy = config.precision_policy(device, checkpoint.config)
        loaded = load(checkpoint, policy, device, config.max_model_len)
        return cls(loaded.model, loaded.tokenizer, config, loaded.max_positions)

    # ------------------------------------------------------------------------------------ requests
    def encode(self, prompt: Prompt, label: str = "prompt") -> list[int]:
        """Token ids of text, of token ids, or of a chat (a list of {"role", "content"} messages).

        Token ids must be ints (numpy ints too); floats, bools, digit strings, None and tensors are refused
        with a ValueError naming `label`, so a prompt is never silently rounded or misread."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor) or not isinstance(prompt, Seq):
            raise ValueError(
                f"{label}: expected text, a list of token ids or a list of chat messages, got {type(prompt).__name__}"
                + (" (pass tensor.tolist())" if isinstance(prompt, torch.Tensor) else "")
            )
        if prompt and isinstance(prompt[0], Mapping):
            return self.apply_chat_template(prompt)
        if prompt and isinstance(prompt[0], str):
            raise ValueError(
                f"{label}: a list of strings is not one prompt; pass one string, token ids, or a chat as "
                "{'role': ..., 'content': ...} dicts"
            )
        bad = next(((i, t) for i, t in enumerate(prompt) if isinstance(t, bool) or not isinstance(t, numbers.Integral)),
                   None)
        if bad is not None:
            raise ValueError(f"{label}: token id {bad[0]} must be an int, got {bad[1]!r} ({type(bad[1]).__name__})")
        return [int(t) for t in prompt]

    def apply_chat_template(self, messages: Seq[Mapping[str, str]]) -> list[int]:
        """A conversation rendered by the tokenizer's chat template, ending with the assistant's turn opened."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass plain text or token ids, not messages")
        bad = next((m for m in messages if not (isinstance(m, Mapping) and {"role", "content"} <= m.keys())), None)
        if bad is not None:
            raise ValueError(f"a chat message must be a dict with 'role' and 'content'; got {bad!r}")
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template already has its special tokens

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_index: int | None = None,
    ) -> str:
        """Queue one prompt (text or token ids) for `params.n` samples. Raises for a prompt that can never
        run or a `request_id` already in flight, leaving the engine and other requests untouched."""
        self.runner.check_awake()
        label = "prompt" if request_id is None else f"request {request_id!r}"
        params = self._check_params(label, params)
        prompt_ids = self.encode(prompt, label)
        if request_id is not None and self.scheduler.has_request(request_id):
            raise ValueError(f"request_id {request_id!r} is already in flight; use a new id or abort() it first")
        self._validate_prompt(label, prompt_ids, params)
        index = next(self._request_ids)
        request_id = request_id if request_id is not None else str(index)
        max_len = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        leader = None
        for k in range(params.n):
            seed = sample_seed(params.seed, k) if params.seed is not None else sample_seed(self.config.seed, index, k)
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                prompt_index=index if prompt_index is None else prompt_index,
                sample_index=k,
                prompt_ids=list(prompt_ids),
                params=params,
                seed=seed,
                max_len=max_len,
                group_leader=leader,
                detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output)
                if params.stop else None,
            )
            leader = leader or seq
            self.scheduler.add(seq)
        return request_id

    @staticmethod
    def _check_params(label: str, params: SamplingParams | None) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"{label}: params must be a SamplingParams, got {type(params).__name__}")
        return params

    def _validate_prompt(self, label: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError(f"{label}: empty prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{label}: token id {bad[0]} outside the vocabulary [0, {vocab})")
        try:
            params.check_vocab(vocab)
            if params.stop:
                IncrementalDetokenizer.backend_of(self.tokenizer)
        except ValueError as exc:
            raise ValueError(f"{label}: {exc}") from None
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"{label}: prompt of {len(prompt_ids)} tokens leaves no room to generate "
                f"within max_model_len={self.max_model_len}"
            )
        need = self.scheduler.blocks_needed(min(len(prompt_ids) + params.max_tokens, self.max_model_len))
        if need > self.scheduler.num_kv_blocks:
            raise PromptTooLongError(
                f"{label}: prompt + max_tokens needs {need} KV blocks but the cache has "
                f"{self.scheduler.num_kv_blocks}; lower max_tokens or give the KV cache more memory"
            )

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --------------------------------------------------------------------------------------- steps
    def step(self) -> list[Rollout]:
        """Run one scheduler step; return the samples that finished in it.

        An exception inside the step fails the requests that ran in it, and those alone: all their samples
        come back with finish_reason "error" and `error` saying why, their blocks are freed, and the engine
        stays usable."""
        return self._step()[0]

    def _step(self) -> tuple[list[Rollout], Exception | None]:
        """step(), also returning the exception that failed the step's requests (None if none did)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return [], None
        try:
            logits, sampled_idx, prompt_hidden = self.runner.execute(batch)
            sampled = None
            log_softmax = self.model.kernels.log_softmax
            if logits is not None:
                sampled = sample_sequences(logits, [batch.seqs[i] for i in sampled_idx],
                                           tuple(self.model_config.eos_token_ids), self.scheduler.token_counts, log_softmax)
            prompt = []
            for c in prompt_hidden:
                num = batch.seqs[c.seq_index].params.prompt_logprobs
                entries = prompt_logprobs(c.hidden, c.targets, num, self.model.compute_logits, log_softmax)
                prompt.append((c.seq_index, c.start, entries))
            finished = self.scheduler.update_from_output(batch, StepOutput(sampled_idx, sampled, prompt))
        except Exception as exc:
            if isinstance(exc, NonFiniteActivationError):
                exc.add_note(
                    "The weights are the likely cause (fp16 overflow, or inf/nan from an update): the requests of "
                    "this step failed, the engine is usable, and update_weights() with good weights restores it."
                )
            failed = self.scheduler.fail({seq.request_id for seq in batch.seqs}, _error_text(exc))
            return [self._to_rollout(seq) for seq in failed], exc
        return [self._to_rollout(seq) for seq in finished], None

    def _to_rollout(self, seq: Sequence) -> Rollout:
        return Rollout(
            request_id=seq.request_id,
            prompt_index=seq.prompt_index,
            sample_index=seq.sample_index,
            prompt_ids=seq.prompt_ids,
            output_ids=seq.output_ids,
            output_logprobs=seq.output_logprobs,
            output_raw_logprobs=seq.output_raw_logprobs if seq.params.raw_logprobs else None,
            finish_reason=seq.finish_reason,
            text=self._text(seq),
            stop_reason=seq.stop_reason,
            top_logprobs=seq.top_logprobs if seq.params.logprobs is not None else None,
            prompt_logprobs=[None, *seq.prompt_logprobs] if seq.params.prompt_logprobs is not None else None,
            weight_version=self.weight_version,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
            num_preemptions=seq.num_preemptions,
            error=seq.error,
        )

    def _text(self, seq: Sequence) -> str | None:
        """The output's text; cut as the stop string ruled when one ended the sample."""
        if isinstance(seq.stop_reason, str):
            return seq.detokenizer.text
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True) if self.tokenizer else None

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[Rollout]:
        """Generate for every prompt (text, token ids, or chat messages); return a flat list ordered by
        prompt, then sample index.

        All prompts and params are validated before any work starts, so a bad one raises without side
        effects. If a step fails (see `step`), the other requests are aborted and its exception is raised.
        """
        if self.scheduler.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; drain add_request()/step() first")
        one_prompt = isinstance(prompts, Seq) and prompts and isinstance(prompts[0], (numbers.Number, Mapping))
        if isinstance(prompts, str) or one_prompt:
            prompts = [prompts]
        if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Seq):
            raise ValueError(f"generate() needs a prompt or a list of prompts, got {type(prompts).__name__}")
        params_list = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        params_list = [self._check_params(f"prompt {i}", p) for i, p in enumerate(params_list)]
        encoded = [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
        for i, (ids, p) in enumerate(zip(encoded, params_list)):
            self._validate_prompt(f"prompt {i}", ids, p)
        self.runner.check_awake()
        for i, (ids, p) in enumerate(zip(encoded, params_list)):
            self.add_request(ids, p, prompt_index=i)
        total = sum(p.n for p in params_list)
        results: list[Rollout] = []
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="rollouts", unit="seq")
        try:
            while self.scheduler.has_unfinished():
                done, error = self._step()
                if error is not None:
                    self.scheduler.abort()  # the engine was idle: everything in flight is this call's
                    raise error
                results.extend(done)
                if bar is not None:
                    bar.update(len(done))
        finally:
            if bar is not None:
                bar.close()
        return sorted(results, key=lambda r: (r.prompt_index, r.sample_index))

    # ------------------------------------------------------------------------------ trainer bridge
    @property
    def sleep_state(self) -> SleepState | None:
        """What sleep() released and is not back yet; None when awake."""
        return self.runner.sleep_state

    def update_weights(self, source: weight_sync.WeightSource, partial: bool = False) -> weight_sync.WeightSyncStats:
        """Copy a trainer's weights (module, state dict, or (name, tensor) pairs) in place, after validating
        all of them (see weight_sync); bump the weight version and drop the prefix cache. Raises `WeightError`
        (names, shapes, dtypes) or `RuntimeError` (engine busy or asleep) with the engine untouched.

        `partial=True` accepts a subset of the tensors (e.g. only the layers that changed).
        """
        if self.has_unfinished():
            raise RuntimeError(
                "update_weights() with requests in flight would mix two weight versions inside one sample; "
                "finish or abort them first"
            )
        self.runner.check_weights_resident()
        start = time.perf_counter()
        pairs = weight_sync.named_tensors(source)
        weight_sync.validate_update(self.weights, pairs, partial)
        loaded = self.runner.load_weights(self.weights, pairs, complete=not partial)
        self.weight_version += 1
        self.scheduler.reset_prefix_cache()  # cached prefixes hold K/V of the old weights
        return weight_sync.WeightSyncStats(
            self.weight_version, loaded.num_tensors, loaded.bytes_copied, loaded.num_gathered,
            time.perf_counter() - start,
        )

    def sleep(self, level: int = 1) -> SleepStats:
        """Free the KV cache and offload (level 1) or discard (level 2) the weights; see parity.engine.sleep."""
        if self.has_unfinished():
            raise RuntimeError("cannot sleep with requests in flight; finish or abort them first")
        stats = self.runner.sleep(level)
        self.scheduler.reset_prefix_cache()  # cached blocks lost their contents
        return stats

    def wake_up(self, tags: Seq[str] | None = None) -> WakeStats:
        """Restore what sleep() released: tags "weights", "kv_cache" (default both)."""
        return self.runner.wake_up(tags)

    def chat(
        self,
        conversations: Seq[Mapping[str, str]] | Seq[Seq[Mapping[str, str]]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[Rollout]:
        """vLLM's `LLM.chat`: generate() for one conversation or a list of them, each a list of
        {"role", "content"} messages rendered with the tokenizer's chat template."""
        if conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]
        return self.generate([self.apply_chat_template(c) for c in conversations], params, use_tqdm)

    def abort(self, request_id: str) -> list[Rollout]:
        """Stop `request_id`'s samples now, wherever they are, and return them with what they generated so far
        (finish_reason "abort"). An unknown or already finished id returns [] (races are normal)."""
        return [self._to_rollout(seq) for seq in self.scheduler.abort(request_id)]

    def abort_all(self) -> list[Rollout]:
        """abort() every request in flight."""
        return [self._to_rollout(seq) for seq in self.scheduler.abort()]

    def kv_cache_usage(self) -> dict[str, int]:
        """Blocks in use and free, for tests and metrics."""
        return self.scheduler.kv_cache_usage()
