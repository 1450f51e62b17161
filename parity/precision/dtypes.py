"""One place that turns user-facing dtype names into torch dtypes."""

from __future__ import annotations

import torch

DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map 'fp16' / 'bf16' / 'fp32' (or their long names, or a torch dtype) to a torch dtype.

    Anything else raises ValueError naming the bad value and the accepted names.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _SHORT:
            raise ValueError(f"unsupported dtype {dtype}; parity computes in fp16, bf16 or fp32")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; expected one of: fp16, bf16, fp32 (or float16, bfloat16, float32)")


def dtype_name(dtype: torch.dtype) -> str:
    """The short name ('fp16', 'bf16', 'fp32') of a compute dtype."""
    return _SHORT[resolve_dtype(dtype)]
