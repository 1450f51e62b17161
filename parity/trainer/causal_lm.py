"""parity's decoder as a trainable causal LM with the interface of an HF `PreTrainedModel`.

`ParityForCausalLM` wraps the engine's own `DecoderModel` (same code, same kernels, same precision
policy), so whatever trains it scores tokens exactly as the engine does: in deterministic mode its
forward values equal the engine's bit for bit, with or without grad, alone or in any batch.

What it offers a trainer written for HF models:
- `from_pretrained(path_or_gguf, policy=...)`, `forward(input_ids, attention_mask, position_ids, labels)`
  returning `CausalLMOutput(loss, logits)`. Padding is never computed on: the unpadded tokens of each
  row are packed end to end and attend causally within their own row (`AttentionMetadata.for_packed_sequences`),
  then the logits are scattered back to [B, L, V] (zeros at padding). The loss is transformers' own
  causal-LM loss (shifted cross-entropy, -100 ignored; padded positions are ignored too).
- `save_pretrained(dir)`: HF format (config.json, generation_config.json, safetensors under HF names),
  read back by transformers' AutoModelForCausalLM and by `Engine.from_pretrained`.
- `gradient_checkpointing_enable()`: each decoder layer's activations are recomputed in backward.
- `fully_shard()`: FSDP2 on every decoder layer, then on the decoder. With a half-precision policy the
  sharded parameters are kept in float32 and gathered in the policy dtype (FSDP2's mixed precision): the
  computed-on weights are the float32 master weights rounded once, exactly what a sync hands the engine.
- Weight sync without renaming: `engine.update_weights(model.model)` reads the decoder's fused
  parameters through HF-named views (`parity.models.weights.hf_named_weights`), no copy on the trainer side.

`model.model` is the `DecoderModel`; `parity.trainer.logprobs.trainer_logprobs(model.model, ...)` scores
rollouts with the engine's own packing, temperature/filter code and log-softmax kernel.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from parity.kernels.metadata import AttentionMetadata
from parity.models.decoder import DecoderModel
from parity.models.weights import build_weight_map
from parity.precision.policy import PrecisionPolicy
from parity.trainer.parity_model import load_parity_model, parity_model_from_engine


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter; a collective for a DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _checkpointed(forward, checkpoint_fn, layer: nn.Module):
    """`forward` whose activations are recomputed in backward while the layer trains with grad."""

    @functools.wraps(forward)
    def run(*args):
        if layer.training and torch.is_grad_enabled():
            return checkpoint_fn(forward, *args)
        return forward(*args)

    return run


class ParityForCausalLM(PreTrainedModel):
    """A `PreTrainedModel` whose body is parity's `DecoderModel` (`self.model`)."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, decoder: DecoderModel):
        hf_config = copy.deepcopy(decoder.config.hf_config)
        hf_config.architectures = [decoder.config.architecture]
        super().__init__(hf_config)
        self.model = decoder

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        policy: PrecisionPolicy | None = None,
        device: str | torch.device | None = None,
        max_positions: int | None = None,
        trainable: bool = True,
    ) -> ParityForCausalLM:
        """An HF directory, a .gguf file or a model alias, in `policy` (default fp32, deterministic).

        For bitwise parity with an engine use the engine's policy and `max_positions` = its
        `max_model_len` (the RoPE table length), or `from_engine`."""
        return cls(load_parity_model(path, policy, device, max_positions, trainable))

    @classmethod
    def from_engine(cls, engine, deterministic: bool | None = None, trainable: bool = True) -> ParityForCausalLM:
        """A trainable copy of an engine's model: same config, weights, RoPE tables and policy."""
        return cls(parity_model_from_engine(engine, deterministic=deterministic, trainable=trainable))

    @property
    def policy(self) -> PrecisionPolicy:
        return PrecisionPolicy.of_model(self.model)

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Float32 logits [B, L, V] (the last `logits_to_keep` columns if > 0), and with `labels` the
        mean next-token cross-entropy over the labels != -100 whose position and the one before it are
        real tokens (attention_mask 1). Positions default to 0, 1, ... over each row's real tokens."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if use_cache:
            raise ValueError("use_cache=True: ParityForCausalLM has no KV cache (generate with parity's Engine)")
        if logits_to_keep < 0 or (labels is not None and logits_to_keep):
            raise ValueError(f"logits_to_keep must be >= 0 and 0 with labels, got {logits_to_keep}")
        batch, length = input_ids.shape
        for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids), ("labels", labels)):
            if t is not None and tuple(t.shape) != (batch, length):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected input_ids' {(batch, length)}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        positions = position_ids[mask]
        max_positions = self.model.cos_table.shape[0]
        if positions.numel() and int(positions.max()) >= max_positions:
            raise ValueError(f"position {int(positions.max())} is past the model's max_positions={max_positions}")
        lens = [n for n in mask.sum(-1).tolist() if n]
        if not lens:
            raise ValueError("attention_mask marks no real token in the batch")
        hidden = self.model(input_ids[mask], positions, AttentionMetadata.for_packed_sequences(lens, input_ids.device))

        keep = mask if not logits_to_keep else mask[:, -logits_to_keep:]
        if logits_to_keep:  # the packed rows of the kept columns
            columns = torch.zeros_like(mask)
            columns[:, -logits_to_keep:] = True
            hidden = hidden[columns[mask]]
        flat = self.model.compute_logits(hidden)
        logits = flat.new_zeros(*keep.shape, flat.shape[-1]).masked_scatter(keep[..., None], flat)
        loss = None
        if labels is not None:
            # A label counts where it and the token that predicts it are real (the row's first token has none).
            labels = labels.masked_fill(~mask, -100)
            labels[:, 1:] = labels[:, 1:].masked_fill(~mask[:, :-1], -100)
            loss = self.loss_function(logits, labels, vocab_size=flat.shape[-1], num_items_in_batch=num_items_in_batch)
        return CausalLMOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------------- HF model interface
    def get_input_embeddings(self):
        raise NotImplementedError("parity's decoder keeps its embedding as a parameter: model.model.embed_tokens")

    def get_output_embeddings(self):
        return None  # the LM head is a parameter (model.model.lm_head_weight), not an nn.Linear

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1) -> None:
        """Recompute every `every_n_layers`-th decoder layer in backward (torch.utils.checkpoint,
        non-reentrant unless `gradient_checkpointing_kwargs` says otherwise)."""
        if every_n_layers < 1:
            raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
        self.gradient_checkpointing_disable()
        fn = functools.partial(checkpoint, **{"use_reentrant": False, **(gradient_checkpointing_kwargs or {})})
        for i, layer in enumerate(self.model.layers):
            layer.gradient_checkpointing = i % every_n_layers == 0
            if layer.gradient_checkpointing:
                layer.forward = _checkpointed(layer.forward, fn, layer)

    def gradient_checkpointing_disable(self) -> None:
        for layer in self.model.layers:
            if "forward" in vars(layer):
                del layer.forward  # back to the class's forward
            layer.gradient_checkpointing = False

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers' newer name, called by its Trainer with these keywords (offload is not implemented)."""
        if offload:
            raise ValueError("offload=True: ParityForCausalLM keeps checkpointed activations on the device")
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers)

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(layer, "gradient_checkpointing", False) for layer in self.model.layers)

    is_activation_checkpointing = is_gradient_checkpointing

    def fully_shard(self, mesh=None, reshard_after_forward: bool = True) -> ParityForCausalLM:
        """FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer, then on the decoder (the
        root, so both this forward and direct decoder calls gather what they need; `compute_logits` counts as
        a forward of it, so the tied or untied LM head is gathered for it too). Half-precision
        policies keep float32 sharded master weights and compute on them cast to the policy dtype."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        compute = self.model.dtype
        mp = MixedPrecisionPolicy()
        if compute != torch.float32:
            for p in self.model.parameters():  # RoPE tables (buffers) stay in the compute dtype
                p.data = p.data.float()
            mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for layer in self.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        fully_shard(self.model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        register_fsdp_forward_method(self.model, "compute_logits")  # the LM head runs after forward()
        return self

    # ------------------------------------------------------------------------------------- saving
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor under its HF name, as fresh contiguous tensors in the compute dtype
        (sharded parameters are gathered: call it on every rank)."""
        params = {name: _full(p.detach()).to(self.model.dtype) for name, p in self.model.named_parameters()}
        state = {}
        for name, target in build_weight_map(self.model.config).items():
            state[name] = target.view(params[target.param]).clone()
        return state

    def save_pretrained(self, save_directory: str | Path, max_shard_size: int | str = "5GB",
                        is_main_process: bool = True) -> Path:
        """config.json + generation_config.json + safetensors with HF names, loadable by transformers
        and by parity's engine. With FSDP every rank calls it; only `is_main_process` writes."""
        out = Path(save_directory)
        state = self.hf_state_dict()
        if not is_main_process:
            return out
        from huggingface_hub import save_torch_state_dict

        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.dtype = self.model.dtype
        config.save_pretrained(out)
        cfg = self.model.config
        eos = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else (cfg.eos_token_ids or None)
        GenerationConfig(eos_token_id=eos, bos_token_id=cfg.bos_token_id).save_pretrained(out)
        save_torch_state_dict(state, out, max_shard_size=max_shard_size)
        return out
