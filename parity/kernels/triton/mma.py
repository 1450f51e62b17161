"""The one matrix product every Triton kernel here takes: tensor cores for 16-bit operands (exact products, float32
sums), IEEE float32 FMAs for float32 operands (Triton's default would be tf32), and in the CPU interpreter a plain
numpy sum over K in order.

Triton's CPU interpreter multiplies bf16 operands of tl.dot as raw integers, and its float32 tl.dot is numpy's
BLAS matmul, whose sums for a row depend on where the row sits in the tile (OpenBLAS 0.3.31's AVX-512 kernels).
In that mode the dots are float32 products summed over K in order by numpy (products of bf16/fp16 values are
exact in float32, so the maths is the same), one order for every row, as the GPU's MMA chain is."""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def dot(a, b):
    if INTERPRET:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)
