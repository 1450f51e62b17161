"""The rollout engine: request -> scheduler -> model runner -> sampler -> Rollout.

`generate` is the batch API; `add_request` / `step` let an RL loop drive it incrementally.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import numbers
import time
from collections import deque
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import fields, replace
from pathlib import Path

import torch

from parity.engine import weight_sync
from parity.engine.config import EngineConfig
from parity.engine.detokenizer import IncrementalDetokenizer
from parity.engine.model_runner import ModelRunner
from parity.engine.sampling_params import SamplingParams
from parity.engine.scheduler import Scheduler, SchedulerConfig
from parity.engine.sequence import Rollout, Sequence
from parity.engine.sleep import SleepState, SleepStats, WakeStats
from parity.engine.step_pipeline import StepPipeline
from parity.models.decoder import DecoderModel
from parity.models.loader import Checkpoint, load
from parity.models.weights import WeightMap
from parity.precision.checks import check_int
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
        self.pipeline = StepPipeline(model, self.runner, self.scheduler, config)
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._kept_groups: set[str] = set()  # request ids generate_groups(unfinished="keep") left in flight

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
        if all(type(t) is int for t in prompt):  # the common case, ~30x cheaper than the ABC check below
            return list(prompt)
        bad = next(((i, t) for i, t in enumerate(prompt) if isinstance(t, bool) or not isinstance(t, numbers.Integral)),
                   None)
        if bad is not None:
            raise ValueError(f"{label}: the token at position {bad[0]} must be an int id, got {bad[1]!r} "
                             f"({type(bad[1]).__name__})")
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
        prompt: Prompt | None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_index: int | None = None,
        continue_from: Rollout | None = None,
    ) -> str:
        """Queue one prompt (text or token ids) for `params.n` samples. Raises for a prompt that can never
        run or a `request_id` already in flight, leaving the engine and other requests untouched.

        `continue_from`: an aborted Rollout to carry on (prompt None: the rollout's). Its sample runs on from
        where it stopped, with its seed and request id (unless given) and the same noise positions, so the
        final Rollout's tokens, logprobs and weight versions run on from the rollout's; with no weight update
        in between, it equals an uninterrupted run in deterministic mode. `params.n` must be 1, and
        `max_tokens` counts the tokens the rollout already has."""
        self.runner.check_awake()
        if continue_from is not None and not isinstance(continue_from, Rollout):
            raise ValueError(f"continue_from must be a Rollout, got {type(continue_from).__name__}")
        if continue_from is not None and request_id is None:
            request_id = continue_from.request_id
        label = "prompt" if request_id is None else f"request {request_id!r}"
        params = self._check_params(label, params)
        if continue_from is not None and prompt is None:
            prompt = continue_from.prompt_ids
        prompt_ids = self.encode(prompt, label)
        sample = None if continue_from is None else continue_from.sample_index
        if request_id is not None and self.scheduler.has_request(request_id, sample):
            raise ValueError(f"request_id {request_id!r} is already in flight; use a new id or abort() it first")
        self._validate_prompt(label, prompt_ids, params)
        if continue_from is not None:
            self._check_continuation(label, continue_from, prompt_ids, params)
        index = next(self._request_ids)
        request_id = request_id if request_id is not None else str(index)
        max_len = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if continue_from is not None and prompt_index is None:
            prompt_index = continue_from.prompt_index
        samples = [continue_from.sample_index] if continue_from is not None else range(params.n)
        leader = None
        for k in samples:
            seed = sample_seed(params.seed, k) if params.seed is not None else sample_seed(self.config.seed, index, k)
            if continue_from is not None and continue_from.seed is not None:
                seed = continue_from.seed
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
            if continue_from is not None:
                self._resume_outputs(seq, continue_from)
            leader = leader or seq
            self.scheduler.add(seq)
        return request_id

    def _check_continuation(self, label: str, rollout: Rollout, prompt_ids: list[int], params: SamplingParams) -> None:
        if rollout.finish_reason != "abort":
            raise ValueError(f"{label}: only an aborted rollout can be continued; this one finished with "
                             f"{rollout.finish_reason!r}")
        if prompt_ids != list(rollout.prompt_ids):
            raise ValueError(f"{label}: the prompt differs from the prompt of the rollout it continues")
        if params.n != 1:
            raise ValueError(f"{label}: a continuation carries one sample on; params.n must be 1, got {params.n}")
        room = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        if len(rollout.output_ids) >= room:
            raise ValueError(f"{label}: the rollout already has {len(rollout.output_ids)} tokens, max_tokens "
                             f"(within max_model_len) allows {room}: nothing left to generate")
        if params.raw_logprobs and rollout.output_raw_logprobs is None:
            raise ValueError(f"{label}: raw_logprobs asked for, but the rollout it continues has none")
        if params.logprobs is not None and rollout.top_logprobs is None:
            raise ValueError(f"{label}: logprobs asked for, but the rollout it continues has no top_logprobs")

    @staticmethod
    def _resume_outputs(seq: Sequence, rollout: Rollout) -> None:
        """Give a new sequence the tokens an aborted rollout generated; they are recomputed as prompt-like K/V."""
        seq.output_ids = list(rollout.output_ids)
        seq.output_logprobs = list(rollout.output_logprobs)
        seq.output_raw_logprobs = list(rollout.output_raw_logprobs or [])
        seq.output_weight_versions = list(rollout.output_weight_versions)
        seq.top_logprobs = list(rollout.top_logprobs or [])
        if seq.detokenizer is not None:
            for token in seq.output_ids:
                seq.detokenizer.step(token, check_stop=False)

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
        if params.return_routed_experts and not self.model_config.moe_layers:
            raise ValueError(f"{label}: return_routed_experts=True needs a mixture-of-experts model; "
                             f"{self.model_config.architecture} has no MoE layers")
        vocab = self.model_config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:  # min/max loop in C; then find the first offender
            pos, bad = next((i, t) for i, t in enumerate(prompt_ids) if not 0 <= t < vocab)
            raise ValueError(f"{label}: token id {bad} at position {pos} is outside the vocabulary [0, {vocab})")
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
        weights = self.pipeline.weights(self.weight_version)
        batch = self.scheduler.schedule(admit=self.pipeline.admits(weights))
        if not batch.seqs:
            self.pipeline.discard()
            return [], None
        try:
            finished = self.pipeline.run(batch, weights)
        except Exception as exc:
            if isinstance(exc, NonFiniteActivationError):
                exc.add_note(
                    "The weights are the likely cause (fp16 overflow, or inf/nan from an update): the requests of "
                    "this step failed, the engine is usable, and update_weights() with good weights restores it."
                )
            self.pipeline.discard()
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
            output_weight_versions=seq.output_weight_versions,
            seed=seq.seed,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
            num_preemptions=seq.num_preemptions,
            error=seq.error,
            routed_experts=routed_experts(seq) if seq.params.return_routed_experts else None,
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
        params_list = self._add_batch("generate()", prompts, params)
        total = sum(p.n for p in params_list)
        results: list[Rollout] = []
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="rollouts", unit="seq")
        try:
            while self.scheduler.has_unfinished():
                done = self._step_or_raise()
                results.extend(done)
                if bar is not None:
                    bar.update(len(done))
        finally:
            if bar is not None:
                bar.close()
        return sorted(results, key=lambda r: (r.prompt_index, r.sample_index))

    def generate_groups(
        self,
        prompts: Seq[Prompt],
        params: SamplingParams,
        num_groups_wanted: int,
        carried: Seq[Rollout] = (),
        unfinished: str = "abort",
        admit_seats: int | None = None,
    ) -> tuple[list[list[Rollout]], list[Rollout]]:
        """Over-sampling for the tail (verl's `over_sample_rate`, slime's `--over-sampling-batch-size`): run
        every prompt as a group of `params.n` samples and stop as soon as `num_groups_wanted` groups are
        complete. Returns (complete, partial): those groups, in the order they completed, each by sample
        index; and the other samples, by prompt then sample.

        The prompts form a pool that may exceed `max_num_seqs`: groups join the batch as seats free, first
        the carried ones, then the prompts in order. While the batch is full, they join only once
        `admit_seats` seats are free (default max_num_seqs // 16): a step that admits prefills, which costs it
        the decode CUDA graph and async scheduling's look-ahead, so admitting one at a time would cost that
        at nearly every step of a long tail. Groups that never started come back in `partial`, aborted with
        no tokens.

        `unfinished` says what happens to the samples still running when the step ends:
          "abort": they are aborted and returned in `partial` with what they generated so far (slime's
            partial rollout; the engine is idle on return);
          "keep": they stay in flight (`partial` has the finished samples of incomplete groups and those
            never started), so the trainer's update can land beside them with
            `update_weights(in_flight="keep" | "recompute")`; the next call counts them toward their groups.
        `carried`: the `partial` of an earlier call (maybe under older weights), with the same `params.n`. Its
        groups run on first in line: aborted samples continue where they stopped (`continue_from`), finished
        ones count as done. Carried from call to call, nothing decoded is thrown away.
        Every prompt and carried rollout is checked before anything is queued.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Seq):
            raise ValueError(f"generate_groups() takes a list of prompts, got {type(prompts).__name__}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"generate_groups() takes one SamplingParams for every group, got {type(params).__name__}")
        if unfinished not in ("abort", "keep"):
            raise ValueError(f"unfinished must be 'abort' or 'keep', got {unfinished!r}")
        max_seqs = self.config.max_num_seqs
        seats_to_admit = check_int("admit_seats", max(1, max_seqs // 16) if admit_seats is None else admit_seats,
                                   1, max_seqs)
        running = [*self.scheduler.running, *self.scheduler.waiting]
        in_flight = {s.request_id for s in running}
        if in_flight - self._kept_groups:
            raise RuntimeError("generate_groups() needs an engine idle but for the groups an earlier "
                               "generate_groups(unfinished='keep') left in flight; drain add_request()/step() first")
        wanted = check_int("num_groups_wanted", num_groups_wanted, 1,
                           len(prompts) + len(in_flight | {r.request_id for r in carried}))
        one = replace(params, n=1)
        resumed = [r for r in carried if r.finish_reason == "abort"]
        running_samples = {(s.request_id, s.sample_index) for s in running}
        for r in resumed:
            label = f"carried rollout {r.request_id!r}/{r.sample_index}"
            if (r.request_id, r.sample_index) in running_samples:
                raise ValueError(f"{label} is in flight already; carry only what generate_groups() returned")
            self._validate_prompt(label, list(r.prompt_ids), one)
            self._check_continuation(label, r, list(r.prompt_ids), one)
        queued = self._check_batch("generate_groups()", list(prompts), params)

        # The pool, in arrival order: (seats, queue it) for each carried sample, then each prompt's group.
        pool: deque[tuple[int, Callable[[], tuple[str, int | None]]]] = deque()
        for r in resumed:
            pool.append((1, functools.partial(self._resume, one, r)))
        for i, (ids, p) in enumerate(queued):
            pool.append((p.n, functools.partial(self._queue_group, ids, p, i)))

        def admit() -> None:
            free = max_seqs - len(self.scheduler.running) - len(self.scheduler.waiting)
            if free < seats_to_admit and self.scheduler.has_unfinished():
                return
            while pool and (pool[0][0] <= free or not self.scheduler.has_unfinished()):
                seats, add = pool.popleft()
                add()
                free -= seats

        done: dict[str, list[Rollout]] = {}
        for r in carried:
            if r.finish_reason != "abort":
                done.setdefault(r.request_id, []).append(r)

        def by_sample(request_id: str) -> list[Rollout]:
            return sorted(done.pop(request_id), key=lambda r: r.sample_index)

        ready = [k for k, v in done.items() if len(v) == params.n][:wanted]  # groups carried whole
        complete = [by_sample(request_id) for request_id in ready]
        while len(complete) < wanted and (pool or self.scheduler.has_unfinished()):
            admit()
            for r in self._step_or_raise():
                group = done.setdefault(r.request_id, [])
                group.append(r)
                if len(group) == params.n and len(complete) < wanted:
                    complete.append(by_sample(r.request_id))
        partial = [r for group in done.values() for r in group]
        for _, add in pool:  # never started: queued and taken back at once, so each comes back as a Rollout
            partial += self.abort(*add())
        if unfinished == "abort":
            partial += self.abort_all()
        self._kept_groups = {s.request_id for s in [*self.scheduler.running, *self.scheduler.waiting]}
        return complete, sorted(partial, key=lambda r: (r.prompt_index, r.request_id, r.sample_index))

    def _resume(self, params: SamplingParams, rollout: Rollout) -> tuple[str, int]:
        """Queue an aborted rollout's continuation; return what abort() takes back: (request id, sample index)."""
        return self.add_request(None, params, continue_from=rollout), rollout.sample_index

    def _queue_group(self, prompt_ids: list[int], params: SamplingParams, prompt_index: int) -> tuple[str, None]:
        """Queue a checked prompt's group; return what abort() takes back: (request id, every sample)."""
        return self.add_request(prompt_ids, params, prompt_index=prompt_index), None

    def _step_or_raise(self) -> list[Rollout]:
        """A step for a batch call: if it fails, abort everything in flight (all the call's) and raise."""
        done, error = self._step()
        if error is not None:
            self.scheduler.abort()
            raise error
        return done

    def _add_batch(
        self, caller: str, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None
    ) -> list[SamplingParams]:
        """Validate every prompt and params, then queue them all (prompt_index = position); return the params."""
        checked = self._check_batch(caller, prompts, params)
        for i, (ids, p) in enumerate(checked):
            self.add_request(ids, p, prompt_index=i)
        return [p for _, p in checked]

    def _check_batch(
        self, caller: str, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None
    ) -> list[tuple[list[int], SamplingParams]]:
        """Every prompt's token ids and params, all validated (nothing is queued)."""
        one_prompt = isinstance(prompts, Seq) and prompts and isinstance(prompts[0], (numbers.Number, Mapping))
        if isinstance(prompts, str) or one_prompt:
            prompts = [prompts]
        if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Seq):
            raise ValueError(f"{caller} needs a prompt or a list of prompts, got {type(prompts).__name__}")
        params_list = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        params_list = [self._check_params(f"prompt {i}", p) for i, p in enumerate(params_list)]
        encoded = [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
        for i, (ids, p) in enumerate(zip(encoded, params_list)):
            self._validate_prompt(f"prompt {i}", ids, p)
        self.runner.check_awake()
        return list(zip(encoded, params_list))

    # ------------------------------------------------------------------------------ trainer bridge
    @property
    def sleep_state(self) -> SleepState | None:
        """What sleep() released and is not back yet; None when awake."""
        return self.runner.sleep_state

    def update_weights(
        self, source: weight_sync.WeightSource, partial: bool = False, in_flight: str | None = None
    ) -> weight_sync.WeightSyncStats:
        """Copy a trainer's weights (module, state dict, or (name, tensor) pairs) in place, after validating
        all of them (see weight_sync); bump the weight version and empty the prefix cache, so no request is
        ever served blocks computed under older weights. Raises `WeightError` (names, shapes, dtypes,
        inf/nan) or `RuntimeError` (engine asleep) with the weights, the version and every request untouched.

        `partial=True` accepts a subset of the tensors (e.g. only the layers that changed). With requests in
        flight, `in_flight` says what happens to them (None refuses the update):
          "keep": they go on from their KV cache, computed under the old weights (PipelineRL's choice);
          "recompute": their KV cache is dropped and recomputed under the new weights before they go on.
        Either way each token records the version that sampled it (`Rollout.output_weight_versions`).
        """
        if in_flight not in (None, "keep", "recompute"):
            raise ValueError(f"in_flight must be None, 'keep' or 'recompute', got {in_flight!r}")
        if self.has_unfinished() and in_flight is None:
            raise RuntimeError(
                "update_weights() with requests in flight: pass in_flight='keep' (they go on from their KV cache) "
                "or 'recompute' (their KV cache is recomputed under the new weights), or abort_all() first"
            )
        self.runner.check_weights_resident()
        start = time.perf_counter()
        pairs = weight_sync.named_tensors(source)
        weight_sync.validate_update(self.weights, pairs, partial, self.device)
        loaded = self.runner.load_weights(self.weights, pairs, complete=not partial)
        self.weight_version += 1
        self.scheduler.weights_updated(recompute=in_flight == "recompute")
        return weight_sync.WeightSyncStats(
            self.weight_version, loaded.num_tensors, loaded.bytes_copied, loaded.num_gathered,
            time.perf_counter() - start,
        )

    def sleep(self, level: int = 1) -> SleepStats:
        """Free the KV cache and offload (level 1) or discard (level 2) the weights; see parity.engine.sleep."""
        if self.has_unfinished():
            raise RuntimeError("cannot sleep with requests in flight; finish or abort them first")
        self.pipeline.discard()  # a look-ahead step's outputs would keep device memory (and old graphs') alive
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

    def abort(self, request_id: str, sample_index: int | None = None) -> list[Rollout]:
        """Stop `request_id`'s samples (one, with `sample_index`) now, waiting, prefilling or decoding, free
        their KV blocks and return them with what they generated so far (finish_reason "abort"), ready for
        `add_request(continue_from=...)`. An unknown or already finished id returns [] (races are normal)."""
        return [self._to_rollout(seq) for seq in self.scheduler.abort(request_id, sample_index)]

    def abort_all(self) -> list[Rollout]:
        """abort() every request in flight."""
        return [self._to_rollout(seq) for seq in self.scheduler.abort()]

    def kv_cache_usage(self) -> dict[str, int]:
        """Blocks in use and free, for tests and metrics."""
        return self.scheduler.kv_cache_usage()


def routed_experts(seq: Sequence) -> torch.Tensor | None:
    """The sequence's recorded experts for positions 0 .. num_tokens - 2, int16 [positions, MoE layers, k];
    None before its first step. Chunks recorded before a preemption are replaced by their recomputation."""
    rows: list[torch.Tensor] = []
    covered = 0
    for start in sorted(seq.routed_experts):
        chunk = seq.routed_experts[start]
        if start + chunk.shape[0] > covered:
            rows.append(chunk[covered - start :])
            covered = start + chunk.shape[0]
    if not rows:
        return None
    return torch.cat(rows)[: seq.num_tokens - 1]
