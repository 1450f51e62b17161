"""parity as the in-process rollout engine of TRL's `GRPOTrainer` (trl >= 1.16, < 2).

    trainer = ParityGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=data)
    trainer.train()

Why a thin subclass that swaps TRL's colocated vLLM object for a parity one. TRL gives three ways in:
- `rollout_func`: TRL then skips its importance-sampling correction and its `sampling/...` metrics
  (both run only when `use_vllm` is on; otherwise `old_per_token_logps = per_token_logps.detach()`),
  and it syncs no weights. Rebuilding those outside TRL would fork TRL's loss code.
- `use_vllm=True`: imports vLLM and starts `vllm.LLM` in `GRPOTrainer.__init__`.
- TRL's whole vLLM path talks to one object, `trainer.vllm_generation`, through two calls:
  `sync_weights()` (TRL calls it once per optimizer step, when `state.global_step` changed) and
  `generate(prompt_ids, images, num_generations, profiler)` returning completion ids and per-token
  logprobs. `ParityGeneration` is that object backed by a parity `Engine`.
So `ParityGRPOTrainer` builds `GRPOTrainer` as usual (`use_vllm=False`: nothing of vLLM is imported),
then installs `ParityGeneration` and turns TRL's `use_vllm` switch on. Every line of TRL's own step then
runs unchanged: its tokenisation and chat template (`chat_template`, `chat_template_kwargs`, tools), its
once-per-step sync, its importance-sampling correction with its parameter names and defaults
(`vllm_importance_sampling_correction`, `_mode`, `_clip_max`, `_clip_min`), its `sampling/...` metrics,
tool calling and `rollout_func` (which may use `trainer.vllm_generation.engine`). Only the engine differs.

What the engine takes from the trainer: one engine per process, on `accelerator.device`, seeded
`args.seed + process_index` (TRL seeds its colocated vLLM per process the same way); the trainer model's
architecture and weights (copied in at every sync; PEFT adapters merged for the copy and unmerged after,
TRL's renaming; DDP, accelerate and FSDP2/DTensor through `Engine.update_weights`); sampling from the args
(`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `max_completion_length`, and
`generation_kwargs` under vLLM's `SamplingParams` names, as TRL's colocate path passes them); TRL's EOS ids
(`trainer.eos_token_ids`) as the stop set; TRL's colocate settings with their vLLM meaning:
`vllm_gpu_memory_utilization` (the share of the device's memory the engine may hold: weights + KV
cache), `vllm_max_model_length` (default: the model's `max_position_embeddings`) and
`vllm_enable_sleep_mode` (the engine sleeps at level 2 while the trainer trains: weights and KV cache
released after each generation; the next sync writes the weights back). Prompts that are the same
consecutive rows (TRL repeats each prompt `num_generations` times) become one request with `n` samples,
so they share the prompt's KV blocks; completions come back in TRL's order.

Which logprob: the engine's `output_logprobs`, the log-probability under the distribution each token was
sampled from (after penalties, temperature and top-k/top-p/min-p): vLLM's `processed_logprobs`, which is
what TRL starts vLLM with. TRL scores tokens with a full-vocabulary softmax at the same temperature, so with
top-k/top-p/min-p filters or penalties its ratio carries the bias TRL's vLLM path has too (vLLM's processed
logprobs are renormalised over the kept set); exact mode below applies the same processing on both sides.

Exact on-policy mode: train parity's own model (`parity.trainer.causal_lm.ParityForCausalLM`, deterministic
policy). The engine then runs the model's precision policy, and the trainer's logprobs, both the no-grad
`old_per_token_logps` and the with-grad ones inside the loss, are computed by the wrapper's forward
(parity's batch-invariant kernels, the engine's LM head), the engine's own temperature/filter code and its
log-softmax kernel, in place of TRL's fused LM head. Bitwise equal then, at every step: the rollout
logprob of every completion token and the trainer's logprob of the same token under the same weights
(TRL's `sampling/sampling_logp_difference/max` reads exactly 0, its importance ratios exactly 1). The
entropy TRL logs is that of the engine's processed distribution.

Refused, before any work, naming the fix: a TRL version outside [1.16, 2), `use_vllm=True`, vision
inputs, a tokenizer whose vocabulary does not fit the model, FSDP1 and DeepSpeed ZeRO-3 (which shard
parameters without DTensors), generation options parity's `SamplingParams` does not have.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from parity.engine.config import EngineConfig
from parity.engine.engine import Engine
from parity.engine.logits_processors import TokenHistory, shapes_logits
from parity.engine.sampler import process_logits
from parity.engine.sampling_params import SamplingParams
from parity.engine.weight_sync import WeightSyncStats, unwrap_module
from parity.models.config import ModelConfig
from parity.models.decoder import DecoderModel
from parity.precision.policy import PrecisionPolicy

try:
    import trl
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("parity.integrations.trl needs TRL: pip install 'parity[trl]'") from e

SUPPORTED_TRL = ("1.16", "2")  # [low, high)
# vLLM SamplingParams keys that parity fills itself (one sample per call, the sampled token's logprob).
_MANAGED_KEYS = ("n", "logprobs")


class TRLIntegrationError(ValueError):
    """A TRL setup parity cannot run as asked; the message names the fix."""


def check_trl_version(version: str) -> None:
    """Refuse a TRL outside [1.16, 2): the integration relies on 1.x's `vllm_generation` contract."""
    from packaging.version import Version

    low, high = (Version(v) for v in SUPPORTED_TRL)
    if not low <= Version(version) < high:
        raise TRLIntegrationError(
            f"trl {version} is not supported: parity's TRL integration needs trl>={low},<{high}; "
            f"install it with: pip install 'parity[trl]'"
        )


@dataclass
class ParityRolloutConfig:
    """Engine choices that TRL's arguments do not carry.

    dtype: the engine's compute dtype; None takes the trainer's (args.bf16 -> bf16, args.fp16 -> fp16, else
        the model's parameter dtype). deterministic: batch-invariant kernels. logits_fp32: the LM head in
        float32 (parity's default). With a `ParityForCausalLM` these three stay unset: the engine runs the
        model's own precision policy. enforce_eager: no CUDA graphs.
    """

    dtype: str | None = None
    deterministic: bool = False
    enforce_eager: bool = False
    logits_fp32: bool = True


def sampling_params_from_trainer(trainer) -> SamplingParams:
    """One sample's SamplingParams from TRL's generation settings; refuses what parity cannot sample."""
    wanted = {
        "temperature": trainer.temperature,
        "top_p": trainer.top_p,
        "top_k": trainer.top_k or 0,
        "min_p": trainer.min_p or 0.0,
        "repetition_penalty": trainer.repetition_penalty,
        "max_tokens": trainer.max_completion_length,
    }
    extra = dict(trainer.args.generation_kwargs or {})  # vLLM names; they override the above, as in TRL
    managed = sorted(set(extra) & set(_MANAGED_KEYS))
    if managed:
        raise TRLIntegrationError(f"generation_kwargs {managed}: parity sets these itself; remove them")
    wanted.update(extra)
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    unsupported = sorted(set(wanted) - known)
    if unsupported:
        raise TRLIntegrationError(
            f"parity's SamplingParams has no {', '.join(unsupported)} (asked for "
            f"{', '.join(f'{k}={wanted[k]!r}' for k in unsupported)}); drop them from generation_kwargs. "
            f"Supported: {', '.join(sorted(known - set(_MANAGED_KEYS)))}"
        )
    return SamplingParams(**{k: v for k, v in wanted.items() if k in known})


def _parity_decoder(model: nn.Module) -> DecoderModel | None:
    """The DecoderModel body of parity's own trainer model (`ParityForCausalLM.model`), else None."""
    body = getattr(unwrap_module(model), "model", None)
    return body if isinstance(body, DecoderModel) else None


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "merge_adapter") and hasattr(model, "peft_config")


def peft_merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a PEFT model whose adapters are merged: TRL's renaming for vLLM (strip
    `base_model.model.` and `.base_layer`, drop adapter tensors and the originals of modules_to_save)."""
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if model.prefix in name or "original_module" in name:
            continue
        yield name.replace("modules_to_save.default.", ""), param.detach()


def _engine_policy(trainer, model: nn.Module, options: ParityRolloutConfig) -> PrecisionPolicy:
    decoder = _parity_decoder(model)
    if decoder is not None:
        if options.dtype is not None or options.deterministic or not options.logits_fp32:
            raise TRLIntegrationError(
                "with a ParityForCausalLM the engine runs the model's own precision policy; set dtype, deterministic "
                "and logits_fp32 in ParityForCausalLM.from_pretrained(policy=...), not in ParityRolloutConfig"
            )
        return PrecisionPolicy.of_model(decoder)
    dtype = options.dtype
    if dtype is None:
        args = trainer.args
        dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else next(model.parameters()).dtype
    return PrecisionPolicy(dtype, options.logits_fp32, options.deterministic)


def _check_tokenizer(tokenizer, cfg: ModelConfig) -> None:
    ids = {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id}
    out = {k: v for k, v in ids.items() if v is not None and not 0 <= v < cfg.vocab_size}
    if len(tokenizer) > cfg.vocab_size or out:
        raise TRLIntegrationError(
            f"the tokenizer ({len(tokenizer)} tokens{', ' if out else ''}"
            f"{', '.join(f'{k} id {v}' for k, v in out.items())}) does not match the model (vocab_size "
            f"{cfg.vocab_size}); pass processing_class=AutoTokenizer.from_pretrained(<the model's checkpoint>)"
        )


class ParityGeneration:
    """TRL's `VLLMGeneration` (colocate mode) backed by a parity Engine: `sync_weights()` and `generate()`."""

    def __init__(self, trainer, options: ParityRolloutConfig | None = None):
        options = options or ParityRolloutConfig()
        args, accelerator = trainer.args, trainer.accelerator
        self.model = trainer.model  # the unwrapped module; FSDP2 shards it in place, DDP wraps it elsewhere
        self.accelerator = accelerator
        self.sleep_enabled = bool(args.vllm_enable_sleep_mode)
        self.params = sampling_params_from_trainer(trainer)
        self.last_sync: WeightSyncStats | None = None

        source = unwrap_module(accelerator.unwrap_model(self.model))
        hf_model = source.get_base_model() if _is_peft(source) else source
        parity_body = _parity_decoder(hf_model)
        cfg = ModelConfig.from_hf_config(hf_model.config) if parity_body is None else dataclasses.replace(parity_body.config)
        _check_tokenizer(trainer._tokenizer, cfg)
        cfg.eos_token_ids = list(trainer.eos_token_ids)  # stop where TRL counts a completion as terminated
        policy = _engine_policy(trainer, hf_model, options)
        device = accelerator.device
        max_model_len = args.vllm_max_model_length or cfg.max_position_embeddings
        if parity_body is not None:
            max_model_len = parity_body.cos_table.shape[0]  # the trainer's RoPE table: bitwise the same angles
        decoder = DecoderModel(cfg, policy, device, max_model_len)
        with torch.no_grad():  # finite values for the engine's warm-up forward; the first sync brings the weights
            for p in decoder.parameters():
                p.zero_()
        kv_cache_memory = None
        if device.type == "cuda":
            weight_bytes = sum(p.numel() * p.element_size() for p in decoder.parameters())
            kv_cache_memory = int(args.vllm_gpu_memory_utilization * torch.cuda.get_device_properties(device).total_memory)
            kv_cache_memory -= weight_bytes
        config = EngineConfig(
            dtype=policy.dtype,
            device=str(device),
            kv_cache_memory=kv_cache_memory,
            memory_utilization=args.vllm_gpu_memory_utilization,
            max_num_seqs=args.per_device_train_batch_size * args.steps_per_generation,
            max_model_len=max_model_len,
            logits_fp32=policy.logits_fp32,
            deterministic=policy.deterministic,
            check_finite=policy.check_finite,
            enforce_eager=options.enforce_eager,
            seed=args.seed + accelerator.process_index,
        )
        self.engine = Engine(decoder, trainer._tokenizer, config, max_model_len)
        if self.sleep_enabled:
            self.engine.sleep(level=2)

    # ------------------------------------------------------------------------------- weights
    def _weight_source(self):
        model = unwrap_module(self.accelerator.unwrap_model(self.model))
        decoder = _parity_decoder(model)
        return model if decoder is None else decoder

    def sync_weights(self) -> WeightSyncStats:
        """Copy the trainer model's current weights into the engine (TRL calls it once per optimizer step)."""
        state = self.engine.sleep_state
        if state is not None and state.weights in ("offloaded", "discarded"):
            self.engine.wake_up(["weights"])
        model = self._weight_source()
        if _is_peft(model):
            model.merge_adapter()
            try:
                self.last_sync = self.engine.update_weights(peft_merged_weights(model))
            finally:
                model.unmerge_adapter()
        else:
            self.last_sync = self.engine.update_weights(model)
        return self.last_sync

    # ---------------------------------------------------------------------------- generation
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        images: Sequence | None,
        num_generations: int,
        profiler=None,
    ) -> tuple[list[list[int]], list[list[int]], list[list[list[float]]], None]:
        """One completion per prompt row, in order: (prompt_ids, completion_ids, logprobs [row][token][1], None).
        `num_generations` is unused: TRL hands each sample's prompt row separately in colocate mode."""
        if images is not None and any(img is not None for img in images):
            raise TRLIntegrationError("parity generates text only; image inputs need TRL's vLLM or transformers path")
        state = self.engine.sleep_state
        if self.engine.weight_version == 0 or (state is not None and state.weights != "resident"):
            self.sync_weights()
        if self.engine.sleep_state is not None:
            self.engine.wake_up(["kv_cache"])
        groups = [(list(ids), len(list(run))) for ids, run in itertools.groupby(tuple(p) for p in prompts)]
        params = [dataclasses.replace(self.params, n=count) for _, count in groups]
        with profiler or nullcontext():
            rollouts = self.engine.generate([ids for ids, _ in groups], params)
        if self.sleep_enabled:
            self.engine.sleep(level=2)
        prompt_ids = [list(r.prompt_ids) for r in rollouts]
        completion_ids = [list(r.output_ids) for r in rollouts]
        logprobs = [[[lp] for lp in r.output_logprobs] for r in rollouts]
        return prompt_ids, completion_ids, logprobs, None


def _parity_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, params: SamplingParams,
                                batch_size: int, entropy: bool = True, entropy_grad: bool = True):
    """Per-token logprobs and entropies [B, logits_to_keep] of a ParityForCausalLM on TRL's batch (prompts
    left-padded, completions right-padded), computed as the engine sampled: the wrapper's logits (the engine's
    LM head), the engine's processors from each position's own token history, its log-softmax kernel.

    Entropies (None unless `entropy`) carry gradients only with `entropy_grad` (TRL's entropy bonus): for
    logging and TRL's entropy mask they are values, and their [tokens, vocab] graph would double the memory."""
    decoder = _parity_decoder(model)
    vocab, eos = decoder.config.vocab_size, decoder.config.eos_token_ids
    logps, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size].bool()
        keep = mask[:, -logits_to_keep:]
        with torch.autocast(ids.device.type, enabled=False):  # the model's policy sets every dtype, as in the engine
            logits = model(input_ids=ids, attention_mask=mask.long(), logits_to_keep=logits_to_keep + 1).logits[:, :-1]
        rows = logits[keep]  # real completion positions, sequence by sequence
        history = None
        if shapes_logits([params]):
            prompts = [row[m].tolist() for row, m in zip(ids[:, :-logits_to_keep], mask[:, :-logits_to_keep])]
            outputs = [row[m].tolist() for row, m in zip(ids[:, -logits_to_keep:], keep)]
            history = TokenHistory.of_positions([params] * len(prompts), prompts, outputs, vocab, ids.device, eos)
        logprobs = decoder.kernels.log_softmax(process_logits(rows, [params] * rows.shape[0], history))
        picked = logprobs.gather(-1, ids[:, -logits_to_keep:][keep][:, None])[:, 0]
        logps.append(picked.new_zeros(keep.shape).masked_scatter(keep, picked))
        if entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                plogp = torch.where(torch.isfinite(logprobs), logprobs.exp() * logprobs, torch.zeros_like(logprobs))
                entropies.append(picked.new_zeros(keep.shape).masked_scatter(keep, -plogp.sum(-1)))
    return torch.cat(logps), torch.cat(entropies) if entropy else None


check_trl_version(trl.__version__)


class ParityGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with parity as its in-process rollout engine (see the module docstring).

    `parity` holds the engine choices TRL's arguments do not carry; everything else is TRL's."""

    def __init__(self, *args, parity: ParityRolloutConfig | None = None, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None and config.use_vllm:
            raise TRLIntegrationError("use_vllm=True starts vLLM; parity replaces it: leave use_vllm=False")
        model = kwargs.get("model", args[0] if args else None)
        decoder = _parity_decoder(model) if isinstance(model, nn.Module) else None
        if decoder is not None and getattr(model, "generation_config", None) is None:
            from transformers import GenerationConfig  # TRL reads the EOS ids and sets the pad id there

            model.generation_config = GenerationConfig(eos_token_id=decoder.config.eos_token_ids or None,
                                                       bos_token_id=decoder.config.bos_token_id)
        super().__init__(*args, **kwargs)
        from transformers import ProcessorMixin

        if isinstance(self.processing_class, ProcessorMixin) or getattr(self, "_is_vlm", False):
            raise TRLIntegrationError(
                "parity generates text only; for a vision-language model use TRL's vLLM or transformers path"
            )
        if self._dist.is_zero3 or self._dist.fsdp_version == 1:
            raise TRLIntegrationError(
                "parity syncs weights from single-process, DDP and FSDP2 (DTensor) models; DeepSpeed ZeRO-3 and "
                "FSDP1 are not supported: use FSDP2 (accelerate's fsdp_version: 2)"
            )
        if self.loss_type == "vespo" and self.vllm_importance_sampling_correction and (
            self.vllm_importance_sampling_mode not in ("token_truncate", "token_mask")
        ):  # TRL checks this only when use_vllm is set in the args
            raise TRLIntegrationError(
                "VESPO loss requires vllm_importance_sampling_mode 'token_truncate' or 'token_mask', got "
                f"{self.vllm_importance_sampling_mode!r}"
            )
        self.vllm_generation = ParityGeneration(self, parity)
        self._last_loaded_step = -1
        self.vllm_mode = "parity"  # not "colocate": TRL reads vLLM internals there (tool-call length limit)
        self.use_vllm = True  # TRL's sync, importance-sampling correction and sampling/ metrics now run

    @property
    def engine(self) -> Engine:
        return self.vllm_generation.engine

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **kwargs):
        if _parity_decoder(model) is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        bonus = self.args.entropy_coef != 0.0 or self.args.use_adaptive_entropy  # TRL's entropy term in the loss
        logps, entropies = _parity_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, self.vllm_generation.params,
            batch_size or input_ids.size(0), entropy=compute_entropy, entropy_grad=bonus)
        return logps, entropies, None
