"""Engine configuration: one typed dataclass, every knob with the default users expect from vLLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parity.models.config import ModelConfig
from parity.precision.policy import PrecisionPolicy


@dataclass
class EngineConfig:
    """
    dtype: "auto" (bf16 on CUDA unless the checkpoint says fp16; fp32 on CPU), "fp16", "bf16" or "fp32".
    kv_cache_memory: KV-cache budget in bytes; if None, `memory_utilization` of the device's memory
        (on CUDA, what is left after weights and a warm-up forward; on CPU, of available RAM).
    The number of KV blocks is derived from the budget, capped at what max_num_seqs sequences of
    max_model_len tokens could ever use.
    logits_fp32: run the LM head in float32 (MiniMax-M1's fix for train/rollout probability gaps).
    deterministic: batch-invariant kernels, so logprobs do not depend on batch composition.
    check_finite: raise NonFiniteActivationError, naming the layer, when a forward produces inf/nan
        (e.g. fp16 overflow). Every precision switch is documented in parity.precision.policy.
    enforce_eager: no CUDA graphs.
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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")

    def precision_policy(self, device: torch.device, model: ModelConfig) -> PrecisionPolicy:
        """The policy the engine's model runs in, with dtype "auto" resolved for `device` and the checkpoint."""
        dtype = self.dtype
        if dtype == "auto":
            dtype = "fp32" if device.type == "cpu" else "fp16" if model.torch_dtype == torch.float16 else "bf16"
        return PrecisionPolicy(dtype, self.logits_fp32, self.deterministic, self.check_finite)
