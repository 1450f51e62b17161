"""Engine configuration: one typed dataclass, every knob with the default users expect from vLLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parity.models.config import ModelConfig
from parity.precision.checks import check_bool, check_float, check_int
from parity.precision.dtypes import resolve_dtype
from parity.precision.policy import PrecisionPolicy


def check_device(name: str | torch.device | None) -> str | None:
    """A device name parity runs on ("cpu", "cuda", "cuda:N"), refused here if it cannot be used,
    rather than as a bare assertion deep inside torch; None (pick CUDA when present) passes."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: parity runs on 'cpu' or 'cuda'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda}); use device='cpu' or leave device unset")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return str(device)


@dataclass
class EngineConfig:
    """
    Every field is checked for type, range and NaN on construction (ValueError naming the field).
    dtype: "auto" (bf16 on CUDA unless the checkpoint says fp16; fp32 on CPU), "fp16", "bf16" or "fp32".
    device: "cpu", "cuda" or "cuda:N"; None picks CUDA when present.
    max_model_len: the context length; None = the model's max_position_embeddings (no more is accepted).
    kv_cache_memory: KV-cache budget in bytes; if None, from `memory_utilization`: on CUDA the share of the
        GPU's total memory parity may use (as vLLM), the KV cache taking what weights and a warm-up forward
        leave of it; on CPU that share of the available RAM.
    The number of KV blocks is derived from the budget, capped at what max_num_seqs sequences of
    max_model_len tokens could ever use.
    logits_fp32: run the LM head in float32 (MiniMax-M1's fix for train/rollout probability gaps).
    deterministic: batch-invariant kernels, so logprobs do not depend on batch composition.
    check_finite: raise NonFiniteActivationError, naming the layer, when a forward produces inf/nan
        (e.g. fp16 overflow). Every precision switch is documented in parity.precision.policy.
    enforce_eager: no CUDA graphs (otherwise decode steps and, for a dense model, steps that prefill replay them:
        parity.engine.cuda_graphs).
    async_scheduling: queue the next decode step on the device before the host books the current one (vLLM's
        async scheduling; results are step by step's but for the differences parity.engine.step_pipeline lists).
    """

    dtype: str = "auto"
    device: str | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    logits_fp32: bool = True
    deterministic: bool = False
    check_finite: bool = True
    enforce_eager: bool = False
    async_scheduling: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse a bad option before anything is loaded: the message names the field and the value."""
        if self.dtype != "auto":
            try:
                resolve_dtype(self.dtype)
            except ValueError as e:
                raise ValueError(f"dtype: {e}") from None
        self.device = check_device(self.device)
        self.block_size = check_int("block_size", self.block_size, 1)
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = check_int("kv_cache_memory", self.kv_cache_memory, 1)
        self.memory_utilization = check_float("memory_utilization", self.memory_utilization, 0.0, 1.0, low_open=True)
        self.max_num_seqs = check_int("max_num_seqs", self.max_num_seqs, 1)
        self.max_num_batched_tokens = check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.max_model_len is not None:
            self.max_model_len = check_int("max_model_len", self.max_model_len, 1)
        for name in ("enable_prefix_caching", "logits_fp32", "deterministic", "check_finite", "enforce_eager",
                     "async_scheduling"):
            setattr(self, name, check_bool(name, getattr(self, name)))
        self.seed = check_int("seed", self.seed, 0, 2**63, high_open=True)

    def precision_policy(self, device: torch.device, model: ModelConfig) -> PrecisionPolicy:
        """The policy the engine's model runs in, with dtype "auto" resolved for `device` and the checkpoint."""
        dtype = self.dtype
        if dtype == "auto":
            dtype = "fp32" if device.type == "cpu" else "fp16" if model.torch_dtype == torch.float16 else "bf16"
        return PrecisionPolicy(dtype, self.logits_fp32, self.deterministic, self.check_finite)
