"""The precision policy: every numeric choice of a forward pass, documented in one place.

Chosen by the user (fields of `PrecisionPolicy`, mirrored by `EngineConfig`):
- `dtype` (fp16 | bf16 | fp32): weights, activations, KV cache and matmul inputs. BF16 rounding is
  the main source of rollout/trainer mismatch; FP16 in both engine and trainer mostly removes it
  (Qi et al. 2025, arXiv 2510.26788) but can overflow (max 65504), hence `check_finite`.
- `logits_fp32` (default on): the LM head runs in float32 (MiniMax-M1, arXiv 2506.13585, fixed its
  train/rollout probability gap this way); off, it runs in `dtype` and only the result is upcast.
- `deterministic`: batch-invariant kernels (`parity.kernels.invariant`), so a token's logprob does not
  depend on batch size, position in the batch, prefill chunking or cache layout, and equals the
  trainer-side parity forward's bit for bit (`parity.trainer.parity_model`).
- `check_finite` (default on): after each forward, one `isfinite` over the final hidden states; if
  anything is inf/nan the forward is re-run with per-module hooks and `NonFiniteActivationError`
  names the first layer and sub-module that produced it. Skipped while a CUDA graph is captured.

Fixed, whatever the dtype (HF transformers' cast order, so a float32 forward matches HF to rounding
and a bf16/fp16 forward rounds where HF rounds):
- RoPE: angles `position * inv_freq` and their cos/sin in float32, times the rope scaling factor in
  float32, then cast to `dtype` (HF `LlamaRotaryEmbedding`); rotation in `dtype`
  (`q * cos + rotate_half(q) * sin`). Tables: `parity.models.rope.cos_sin_tables`.
- RMSNorm: residual add in `dtype`; variance and normalisation in float32; the normalised value cast
  to `dtype` *before* the weight multiplies it (HF `LlamaRMSNorm`). `parity.kernels.reference.rms_norm`.
- Attention: scores, softmax and the probability-weighted sum in float32, output cast to `dtype`.
- Sampling: float32 logits; temperature, filters and log-softmax in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from parity.precision.dtypes import dtype_name, resolve_dtype


class NonFiniteActivationError(FloatingPointError):
    """A forward pass produced inf or nan; the message names the layer and sub-module."""


@dataclass(frozen=True)
class PrecisionPolicy:
    dtype: str = "bf16"
    logits_fp32: bool = True
    deterministic: bool = False
    check_finite: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(resolve_dtype(self.dtype)))

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)

    @classmethod
    def of_model(cls, model) -> PrecisionPolicy:
        """The policy a `DecoderModel` runs with."""
        return cls(
            dtype=dtype_name(model.dtype),
            logits_fp32=model.logits_fp32,
            deterministic=model.kernels.deterministic,
            check_finite=model.check_finite,
        )


# Sub-modules of a decoder layer in execution order, and how an error message calls them.
_PARTS = {
    # a norm module also runs the projection that reads it (`RMSNorm.forward(into=)`): its output is that projection's
    "input_layernorm": "residual add + input norm + qkv projection",
    "self_attn": "attention",
    "post_attention_layernorm": "residual add + post-attention norm (+ a dense MLP's gate_up and SiLU)",
    "mlp": "mlp",
}


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def _all_finite(x) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(x) if t.is_floating_point())


def _max_abs(x) -> float:
    vals = [float(t.detach().abs().amax()) for t in _tensors(x) if t.is_floating_point() and t.numel()]
    return max(vals, default=0.0)


def locate_nonfinite(model: nn.Module, rerun: Callable[[], torch.Tensor]) -> NonFiniteActivationError:
    """Re-run the forward (`rerun`) with hooks on every layer's sub-modules and describe the first
    one whose output is not finite although its inputs were.

    Re-running is safe for the engine's step: it writes the same K/V into the same cache slots.
    """
    found: list[str] = []

    def hook_for(label: str):
        def hook(module, args, output):
            args = [a for a in args if isinstance(a, torch.Tensor)]  # not the KV cache (a tuple)
            if not found and not _all_finite(output):
                detail = f"from finite inputs (largest |input| {_max_abs(args):.4g})" if _all_finite(args) else (
                    "from inputs that already held inf/nan")
                found.append(f"{label} produced inf/nan in {{dtype}} {detail}")
        return hook

    handles = []
    for i, layer in enumerate(model.layers):
        for name, part in _PARTS.items():
            handles.append(getattr(layer, name).register_forward_hook(hook_for(f"layer {i} ({part})")))
    handles.append(model.norm.register_forward_hook(hook_for("final norm (residual add + norm)")))
    previous = model.check_finite
    model.check_finite = False
    try:
        with torch.no_grad():
            rerun()
    finally:
        model.check_finite = previous
        for h in handles:
            h.remove()
    name = dtype_name(model.dtype)
    where = found[0] if found else "the embedding lookup produced inf/nan in {dtype}"
    hint = ("fp16 overflows above 65504: use dtype='bf16' or 'fp32', or scale the weights down."
            if name == "fp16" else "Check the weights and inputs.")
    return NonFiniteActivationError(f"{where.format(dtype=name)}. {hint}")


def check_activations(model: nn.Module, hidden: torch.Tensor, rerun: Callable[[], torch.Tensor]) -> None:
    """Raise NonFiniteActivationError if `hidden` holds inf/nan. One device sync; skipped while a CUDA
    graph is being captured (a graph replay never calls this: the runner may call it after replay)."""
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if not bool(torch.isfinite(hidden).all()):
        raise locate_nonfinite(model, rerun)
