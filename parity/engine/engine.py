"""The rollout engine: request -> scheduler -> model runner -> sampler -> Rollout.

`generate` is the batch API; `add_request` / `step` let an RL loop drive it incrementally.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import fields
from pathlib import Path

import torch

from parity.engine import sleep as sleep_mode
from parity.engine import weight_sync
from parity.engine.block_manager import BlockManager
from parity.engine.config import EngineConfig
from parity.engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from parity.engine.sampler import sample
from parity.engine.sampling_params import SamplingParams
from parity.engine.scheduler import Scheduler, SchedulerConfig
from parity.engine.sequence import Rollout, Sequence
from parity.models.decoder import DecoderModel
from parity.models.loader import Checkpoint, load
from parity.models.weights import WeightMap

# Text, token ids, or a chat: a list of {"role": ..., "content": ...} messages (the tokenizer's template is applied).
Prompt = str | Seq[int] | Seq[Mapping[str, str]]


class PromptTooLongError(ValueError):
    """A request that can never run: longer than the context, or than the whole KV cache."""


def _pick_device(name: str | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _available_host_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Engine:
    def __init__(self, model: DecoderModel, tokenizer, config: EngineConfig, max_model_len: int):
        self.model = model
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.config = config
        self.device = next(model.parameters()).device
        self.max_model_len = max_model_len
        self.weights = WeightMap(model, model.config)
        self.weight_version = 0
        self.sleep_state: sleep_mode.SleepState | None = None
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.block_manager)
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.device)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.runner.enable_cuda_graphs(config.max_num_seqs, max_model_len)
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

    def _num_kv_blocks(self) -> int:
        per_block = kv_cache_bytes_per_block(self.model, self.config.block_size)
        if self.config.kv_cache_memory is not None:
            budget = self.config.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = int(_available_host_memory() * self.config.memory_utilization)
        blocks_per_seq = -(-self.max_model_len // self.config.block_size)
        num_blocks = min(budget // per_block, self.config.max_num_seqs * blocks_per_seq)
        if num_blocks < 1:
            raise MemoryError(
                f"KV-cache budget of {budget} bytes is below one block ({per_block} bytes); "
                "raise kv_cache_memory or memory_utilization"
            )
        return int(num_blocks)

    def _cuda_kv_budget(self) -> int:
        """What is left under memory_utilization after weights and the activations of a full-size step."""
        from parity.kernels.metadata import AttentionMetadata

        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        lens = [min(self.max_model_len, num_tokens - i) for i in range(0, num_tokens, self.max_model_len)]
        with torch.inference_mode():
            ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
            hidden = self.model(ids, torch.cat([torch.arange(n, device=self.device) for n in lens]),
                                AttentionMetadata.for_packed_sequences(lens, self.device))
            self.model.compute_logits(hidden[-self.config.max_num_seqs:])
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()
        return int(free - (1 - self.config.memory_utilization) * total - activations)

    # ------------------------------------------------------------------------------------ requests
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of text, of token ids, or of a chat (a list of {"role", "content"} messages)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], Mapping):
            return self.apply_chat_template(prompt)
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
        """Queue one prompt (text or token ids) for `params.n` samples. Raises for a prompt that
        can never run, leaving the engine and other requests untouched."""
        sleep_mode.check_awake(self)
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt)
        index = next(self._request_ids)
        request_id = request_id if request_id is not None else str(index)
        self._validate_prompt(request_id, prompt_ids, params)
        max_len = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        leader = None
        for k in range(params.n):
            seed = params.seed + k if params.seed is not None else hash((self.config.seed, index, k)) & (2**62 - 1)
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
            )
            leader = leader or seq
            self.scheduler.add(seq)
        return request_id

    def _validate_prompt(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError(f"request {request_id}: empty prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id}: token id {bad[0]} outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"request {request_id}: prompt of {len(prompt_ids)} tokens leaves no room to generate "
                f"within max_model_len={self.max_model_len}"
            )
        need = self.block_manager.blocks_needed(min(len(prompt_ids) + params.max_tokens, self.max_model_len))
        if need > self.block_manager.num_blocks:
            raise PromptTooLongError(
                f"request {request_id}: prompt + max_tokens needs {need} KV blocks but the cache has "
                f"{self.block_manager.num_blocks}; lower max_tokens or give the KV cache more memory"
            )

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --------------------------------------------------------------------------------------- steps
    def step(self) -> list[Rollout]:
        """Run one scheduler step; return the samples that finished in it."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        logits, sampled_idx = self.runner.execute(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
        if logits is None:
            return []
        seqs = [batch.seqs[i] for i in sampled_idx]
        out = sample(logits, [s.params for s in seqs], [s.seed for s in seqs], [len(s.output_ids) for s in seqs],
                     log_softmax=self.model.kernels.log_softmax)
        finished = []
        for seq, token, logprob, raw in zip(seqs, out.token_ids, out.logprobs, out.raw_logprobs):
            seq.output_ids.append(token)
            seq.output_logprobs.append(logprob)
            seq.output_raw_logprobs.append(raw)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                finished.append(self._to_rollout(seq))
        return finished

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.model_config.eos_token_ids):
            return "stop"
        if seq.num_tokens >= seq.max_len:
            return "length"
        return None

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
            text=self.tokenizer.decode(seq.output_ids, skip_special_tokens=True) if self.tokenizer else None,
            weight_version=self.weight_version,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
            num_preemptions=seq.num_preemptions,
        )

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[Rollout]:
        """Generate for every prompt (text, token ids, or chat messages); return a flat list ordered by
        prompt, then sample index.

        All prompts are validated before any work starts, so a bad one raises without side effects.
        """
        if self.scheduler.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; drain add_request()/step() first")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, Mapping))):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, Seq) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        encoded = [self.encode(p) for p in prompts]
        for i, (ids, p) in enumerate(zip(encoded, params_list)):
            self._validate_prompt(f"prompt {i}", ids, p)
        for i, (ids, p) in enumerate(zip(encoded, params_list)):
            self.add_request(ids, p, prompt_index=i)
        total = sum(p.n for p in params_list)
        results: list[Rollout] = []
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="rollouts", unit="seq")
        while self.scheduler.has_unfinished():
            done = self.step()
            results.extend(done)
            if bar is not None:
                bar.update(len(done))
        if bar is not None:
            bar.close()
        return sorted(results, key=lambda r: (r.prompt_index, r.sample_index))

    # ------------------------------------------------------------------------------ trainer bridge
    def update_weights(self, source: weight_sync.WeightSource, partial: bool = False) -> weight_sync.WeightSyncStats:
        """Copy a trainer's weights (module, state dict, or (name, tensor) pairs) in place; see weight_sync."""
        return weight_sync.update_weights(self, source, partial=partial)

    def sleep(self, level: int = 1) -> sleep_mode.SleepStats:
        """Free the KV cache and offload (level 1) or discard (level 2) the weights; see trainer_bridge.sleep."""
        return sleep_mode.sleep(self, level)

    def wake_up(self, tags: Seq[str] | None = None) -> sleep_mode.WakeStats:
        """Restore what sleep() released: tags "weights", "kv_cache" (default both)."""
        return sleep_mode.wake_up(self, tags)

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

    def kv_cache_usage(self) -> dict[str, int]:
        """Blocks in use and free, for tests and metrics."""
        return {"num_blocks": self.block_manager.num_blocks, "used_blocks": self.block_manager.num_used_blocks}
