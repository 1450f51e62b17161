"""The analytic backward passes of parity.kernels.autograd against autograd through the torch reference
(float64, so any difference is a wrong derivative, not rounding); the forward values are the wrapped
implementation's, bit for bit; and a deterministic-mode model's loss gradient through them matches."""

from __future__ import annotations

import pytest
import torch

from parity.kernels import autograd, invariant, reference
from parity.kernels.metadata import AttentionMetadata

LENS = [5, 1, 7]  # packed sequences, one of a single token
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def leaf(*shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)


def assert_same_grads(ours_fn, reference_fn, inputs, seed: int = 99, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Equal forward values; gradients of a random projection of the outputs equal to float64 rounding."""
    ours = ours_fn(*inputs)
    want = reference_fn(*inputs)
    ours, want = (o if isinstance(o, tuple) else (o,) for o in (ours, want))
    gen = torch.Generator().manual_seed(seed)
    projections = [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in want]
    for o, w in zip(ours, want):
        assert torch.equal(o, w)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(sum((o * p).sum() for o, p in zip(ours, projections)), wrt)
    expected = torch.autograd.grad(sum((w * p).sum() for w, p in zip(want, projections)), wrt)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(6, 16), (6, HEADS, HEAD_DIM)])  # a layer norm; a per-head q/k norm
def test_rms_norm_backward(fused, shape):
    """The reference normalises in float32 even for float64 input (HF's cast order): float32 tolerances."""
    tol = dict(rtol=1e-5, atol=1e-6)
    x, w = leaf(*shape, seed=0), leaf(shape[-1], seed=1)
    if fused:
        r = leaf(*shape, seed=2)
        assert_same_grads(lambda x, w, r: autograd.rms_norm(reference.rms_norm, x, w, 1e-6, r),
                          lambda x, w, r: reference.rms_norm(x, w, 1e-6, r), (x, w, r), **tol)
    else:
        assert_same_grads(lambda x, w: autograd.rms_norm(reference.rms_norm, x, w, 1e-6),
                          lambda x, w: reference.rms_norm(x, w, 1e-6), (x, w), **tol)


def test_rotary_backward():
    q, k = leaf(6, HEADS, HEAD_DIM, seed=3), leaf(6, KV_HEADS, HEAD_DIM, seed=4)
    angles = torch.arange(6, dtype=torch.float64)[:, None] * torch.linspace(0.1, 1.0, HEAD_DIM // 2)[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    assert_same_grads(lambda q, k: autograd.apply_rotary(reference.apply_rotary, q, k, cos, sin),
                      lambda q, k: reference.apply_rotary(q, k, cos, sin), (q, k))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_norm_rotary_backward(qk_norm):
    """Qwen3's q/k norm + RoPE as one forward op (`rope_and_cache` without a cache): the gradients of q, k and the
    norm weights through the rotation's adjoint, then each norm's, against autograd through the two reference ops."""
    q, k, v = leaf(6, HEADS, HEAD_DIM, seed=3), leaf(6, KV_HEADS, HEAD_DIM, seed=4), leaf(6, KV_HEADS, HEAD_DIM, seed=8)
    angles = torch.arange(6, dtype=torch.float64)[:, None] * torch.linspace(0.1, 1.0, HEAD_DIM // 2)[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    weights = (leaf(HEAD_DIM, seed=6), leaf(HEAD_DIM, seed=7)) if qk_norm else ()
    tol = dict(rtol=1e-5, atol=1e-6) if qk_norm else {}  # the reference norm's float32 maths, as above

    def ours(q, k, *w):
        return autograd.rope_and_cache(reference.rope_and_cache, q, k, v, cos, sin, *(w or (None, None)), 1e-6,
                                       None, None)

    def want(q, k, *w):
        return reference.rope_and_cache(q, k, v, cos, sin, *(w or (None, None)), 1e-6, None, None)

    assert_same_grads(ours, want, (q, k, *weights), **tol)


def test_silu_and_mul_backward():
    x = leaf(6, 2 * 16, seed=5)
    assert_same_grads(lambda x: autograd.silu_and_mul(reference.silu_and_mul, x), reference.silu_and_mul, (x,))


def test_packed_attention_backward():
    total = sum(LENS)
    q, k, v = leaf(total, HEADS, HEAD_DIM, seed=6), leaf(total, KV_HEADS, HEAD_DIM, seed=7), leaf(
        total, KV_HEADS, HEAD_DIM, seed=8)
    meta = AttentionMetadata.for_packed_sequences(LENS, "cpu")
    scale = HEAD_DIM**-0.5
    # The forward kernel is the CPU batch-invariant one; its values come back untouched. It (like the
    # reference) attends in float32 whatever the input dtype, SDPA here in float64: float32 tolerances.
    tol = dict(rtol=1e-4, atol=1e-6)
    assert_same_grads(lambda q, k, v: autograd.packed_attention(invariant.attention, q, k, v, meta, scale),
                      lambda q, k, v: invariant.attention(q, k, v, None, meta, scale), (q, k, v), **tol)
    # SDPA over the padded batch is the same attention as the reference.
    torch.testing.assert_close(autograd.padded_attention(q, k, v, meta, scale),
                               reference.varlen_attention(q, k, v, meta, scale), **tol)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_backward(bias):
    x, w = leaf(2, 3, 16, seed=9), leaf(8, 16, seed=10)
    b = leaf(8, seed=11) if bias else None
    inputs = (x, w) + ((b,) if bias else ())
    assert_same_grads(lambda x, w, *b: autograd.linear(reference.linear, x, w, *b), reference.linear, inputs)


def test_log_softmax_backward():
    logits = leaf(5, 32, seed=12)
    assert_same_grads(lambda t: autograd.log_softmax(reference.log_softmax, t), reference.log_softmax, (logits,))
