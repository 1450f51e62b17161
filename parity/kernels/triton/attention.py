"""Triton attention over the paged KV cache, plus the cache write. Same signatures as `reference.py`.

Layout: the cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]`; token `n` of
sequence `s` lives in flat slot `block_tables[s, n // block_size] * block_size + n % block_size`.

- `prefill`: flash attention (online softmax, fp32 accumulation) for any ragged batch. One program
  owns a tile of query rows: TOKENS consecutive tokens of one sequence x HEADS query heads of one GQA
  group (fast mode: 16 or 64 tokens x 1 head; deterministic mode, `triton/invariant.py`: 16 rows of
  tokens x the whole group, so K/V tiles are read once per group). The (sequence, tile) pairs are laid
  out flat and each program finds its sequence by binary search over `query_start_loc`, so no host work
  is needed. Query row i of a sequence sits at position `seq_len - q_len + i` and attends to keys at
  positions <= its own (cached prefix + new tokens, causally). Without a cache the same kernel reads
  K/V straight from the packed `[tokens, kv_heads, head_dim]` tensors (the trainer's varlen path).
- `decode` (every sequence has one query): flash-decoding. One program owns one sequence, one KV head
  (all the query heads of its GQA group at once, so K/V are read once) and one split of the context;
  the last split of a (sequence, KV head) to finish, counted by an atomic, merges the splits by
  log-sum-exp, so a step launches one kernel per layer, not two. Splits keep a batch of one with a long
  context spread over the whole GPU. The split count depends only on host-known sizes, and each program
  derives its range from the device-side `seq_lens`, so a CUDA graph captured once serves every
  context length. `rope_decode` also has each program rotate (and per-head normalise) its query, and the
  program whose split holds the step's position write the step's key and value, in place of `rope_and_cache`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from parity.kernels import reference
from parity.kernels.metadata import AttentionMetadata
from parity.kernels.triton.mma import dot
from parity.kernels.triton.pdl import LAUNCH, prefetch_rows, preloads, wait_for_previous
from parity.kernels.triton.rotary import cos_sin_halves, norm_rotate, store_rotated_kv

LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc):
    """Fold one key tile (log2-scaled scores s [rows, keys], values v [keys, D]) into the running max,
    sum and float32 accumulator of flash attention. A row whose keys so far are all masked keeps (-inf, 0, 0)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + dot(p.to(v.dtype), v)


@triton.jit
def _merge_segment(m_a, l_a, acc_a, m_b, l_b, acc_b):
    """Running (max, sum, accumulator) a followed by one key segment's b. Explicit FMAs, so that the merge in a
    prefill program's registers and the one of a split decode (from memory) are the same operations; an empty
    segment (-inf, 0, 0) leaves a unchanged, exactly."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    alpha = tl.exp2(m_a - m_safe)
    beta = tl.exp2(m_b - m_safe)
    return m, tl.fma(l_b, beta, l_a * alpha), tl.fma(acc_b, beta[:, None], acc_a * alpha[:, None])


# ------------------------------------------------------------------------------------------ cache write
@triton.jit
def _store_kvcache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    wait_for_previous()
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = slot * stride_cs + h * stride_ch + d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write token t's K/V [T, KV, D] into flat slot `slot_mapping[t]` of the paged cache; -1 means skip."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    _store_kvcache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), num_kv_heads * head_dim, head_dim,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim), **LAUNCH,
    )


# -------------------------------------------------------------------------------------------- prefill
@triton.jit
def _no_keys(ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (max, sum, accumulator) of rows that have seen no key yet: (-inf, 0, 0)."""
    return tl.full([ROWS], float("-inf"), tl.float32), tl.zeros([ROWS], tl.float32), tl.zeros([ROWS, BLOCK_D], tl.float32)


@triton.jit
def _paged_rows(block_tables_ptr, seq, stride_bt, offs_n, n_mask, PAGE_SIZE: tl.constexpr):
    """The cache's flat slots (int64) of positions offs_n of sequence seq, through its block table."""
    page = tl.load(block_tables_ptr + seq * stride_bt + offs_n // PAGE_SIZE, mask=n_mask, other=0)
    return page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE


@triton.jit
def _kv_tile(k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head, start_n, hi, stride_kt, stride_kh, stride_vt,
             stride_vh, stride_bt, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The keys and values [BLOCK_N, D] at positions [start_n, start_n + BLOCK_N) (zeros past hi), in the cache's
    dtype, and those positions."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hi
    if PAGED:
        kv_rows = _paged_rows(block_tables_ptr, seq, stride_bt, offs_n, n_mask, PAGE_SIZE)
    else:
        kv_rows = (q_start + offs_n).to(tl.int64)
    kv_mask = n_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + kv_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v, offs_n


@triton.jit
def _tile_scores(q, q_pos, qk_scale, k, offs_n, hi):
    """The log2-scaled scores [rows, BLOCK_N] of the rows' queries against the key tile k at positions offs_n, masked
    past hi and past each row's own position q_pos."""
    s = dot(q, tl.trans(k.to(q.dtype))) * qk_scale
    return tl.where((offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < hi), s, float("-inf"))


@triton.jit
def _key_tile(q, q_pos, qk_scale, k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head, start_n, hi,
              stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
              PAGED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """`_tile_scores` of the keys [start_n, start_n + BLOCK_N) and those keys' values [BLOCK_N, D]."""
    k, v, offs_n = _kv_tile(k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head, start_n, hi, stride_kt, stride_kh,
                            stride_vt, stride_vh, stride_bt, HEAD_DIM, PAGE_SIZE, PAGED, BLOCK_N, BLOCK_D)
    return _tile_scores(q, q_pos, qk_scale, k, offs_n, hi), v


@triton.jit
def _attend_keys(q, q_pos, qk_scale, k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head, lo, hi,
                 stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax of the rows' queries over keys [lo, hi), in BLOCK_N tiles from lo. Keys past a row's own
    position (q_pos) are masked for it; a tile with none of its keys left leaves its numbers unchanged."""
    m_i, l_i, acc = _no_keys(ROWS, BLOCK_D)
    return _attend_more_keys(m_i, l_i, acc, q, q_pos, qk_scale, k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head,
                             lo, hi, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, HEAD_DIM, PAGE_SIZE, PAGED,
                             BLOCK_N, BLOCK_D)


@triton.jit
def _attend_more_keys(m_i, l_i, acc, q, q_pos, qk_scale, k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head, lo,
                      hi, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, HEAD_DIM: tl.constexpr,
                      PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """`_attend_keys` continued from the running (max, sum, accumulator) of the keys before lo."""
    for start_n in range(lo, hi, BLOCK_N):
        s, v = _key_tile(q, q_pos, qk_scale, k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head, start_n, hi,
                         stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, HEAD_DIM, PAGE_SIZE, PAGED, BLOCK_N,
                         BLOCK_D)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _prefetch_keys(k_ptr, v_ptr, block_tables_ptr, seq, kv_head, lo, hi, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_bt, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """L2 prefetch of one KV head's keys and values at positions [lo, hi) of a paged sequence, before
    `wait_for_previous`: the block table is a step input and the keys are earlier steps' (pdl.py: why that is safe)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        rows = _paged_rows(block_tables_ptr, seq, stride_bt, offs_n, n_mask, PAGE_SIZE)
        prefetch_rows(k_ptr + rows * stride_kt + kv_head * stride_kh, n_mask, HEAD_DIM, 8)
        prefetch_rows(v_ptr + rows * stride_vt + kv_head * stride_vh, n_mask, HEAD_DIM, 8)


@triton.jit
def _attend_segments(q, q_pos, qk_scale, k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head, hi,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, ROWS: tl.constexpr,
                     HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, SEGMENT: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Keys [0, hi) in fixed segments of SEGMENT positions, each an online softmax of its own (`_attend_keys` over
    it), merged in order: the same operations on the same values as one `_attend_keys` call per segment, in one
    loop over the key tiles, so the loads stay pipelined across segment boundaries (a loop per segment restarts
    the pipeline at each). The merge runs at every tile and is kept only at a segment's last one: a select, not a
    branch, so the loop body stays one block the pipeliner can overlap."""
    m_t, l_t, acc_t = _no_keys(ROWS, BLOCK_D)
    m_s, l_s, acc_s = _no_keys(ROWS, BLOCK_D)
    for start_n in range(0, hi, BLOCK_N):
        s, v = _key_tile(q, q_pos, qk_scale, k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head, start_n, hi,
                         stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, HEAD_DIM, PAGE_SIZE, PAGED, BLOCK_N,
                         BLOCK_D)
        m_s, l_s, acc_s = _online_softmax_step(s, v, m_s, l_s, acc_s)
        last = ((start_n + BLOCK_N) % SEGMENT == 0) | (start_n + BLOCK_N >= hi)
        m_m, l_m, acc_m = _merge_segment(m_t, l_t, acc_t, m_s, l_s, acc_s)
        m_t = tl.where(last, m_m, m_t)
        l_t = tl.where(last, l_m, l_t)
        acc_t = tl.where(last, acc_m, acc_t)
        m_s = tl.where(last, float("-inf"), m_s)
        l_s = tl.where(last, 0.0, l_s)
        acc_s = tl.where(last, 0.0, acc_s)
    return m_t, l_t, acc_t


@triton.jit
def _rows(ptr, token, head, offs_d, stride_t, stride_h):
    """Pointers [rows, BLOCK_D] to each row's (token, head) vector of a [T, H, D] tensor (computed where used: kept
    live across the key loop they would cost registers)."""
    return ptr + token.to(tl.int64)[:, None] * stride_t + head[:, None] * stride_h + offs_d[None, :]


# The batch's sequence count and block-table width change every step: not specialised on (each new
# divisibility class would compile a variant mid-run).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, part_ptr, counter_ptr,
    num_seqs, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
    GROUP: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, TOKENS: tl.constexpr, HEADS: tl.constexpr, SEGMENT: tl.constexpr, SPLIT: tl.constexpr,
    SKIP_SINGLE: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Until `wait_for_previous`, only step inputs (query starts, lengths, block tables) and earlier steps' keys are
    # read: PREFETCH (split decode under dependent launch) streams the program's segment into L2 meanwhile.
    # The program's rows: TOKENS consecutive query tokens of one sequence x HEADS query heads of one GQA
    # group (HEADS > 1 reads each K/V tile once for several heads).
    pid = tl.program_id(0)
    SUBS: tl.constexpr = (GROUP + HEADS - 1) // HEADS  # programs per KV head
    kv_head = tl.program_id(1) // SUBS
    first_head = (tl.program_id(1) % SUBS) * HEADS  # within the group
    # Sequence s owns flat tiles [qsl[s] // TOKENS + s, qsl[s+1] // TOKENS + s + 1).
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // TOKENS + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile = pid - (q_start // TOKENS + seq)
    if tile * TOKENS >= q_len or (SKIP_SINGLE and q_len == 1):  # a single-token query: the decode kernel's
        wait_for_previous()
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    if PREFETCH:
        seg_lo = tl.program_id(2) * SEGMENT
        _prefetch_keys(k_ptr, v_ptr, block_tables_ptr, seq, kv_head, seg_lo, tl.minimum(seg_lo + SEGMENT, seq_len),
                       stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, HEAD_DIM, PAGE_SIZE, BLOCK_N)
    wait_for_previous()

    ROWS: tl.constexpr = TOKENS * HEADS
    rows = tl.arange(0, ROWS)
    tok = tile * TOKENS + rows // HEADS  # index among the sequence's query rows
    in_group = first_head + rows % HEADS
    head = kv_head * GROUP + in_group
    row_ok = (tok < q_len) & (in_group < GROUP)
    q_pos = context + tok  # each row attends to keys 0..q_pos
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    out_mask = row_ok[:, None] & d_mask
    q = tl.load(_rows(q_ptr, q_start + tok, head, offs_d, stride_qt, stride_qh), mask=out_mask, other=0.0)
    kv_end = tl.minimum(seq_len, context + (tile + 1) * TOKENS)
    if SEGMENT == 0:  # one online softmax over all keys from position 0 (fast mode)
        m_t, l_t, acc_t = _attend_keys(q, q_pos, qk_scale, k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head,
                                       0, kv_end, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
                                       ROWS, HEAD_DIM, PAGE_SIZE, PAGED, BLOCK_N, BLOCK_D)
    elif not SPLIT:
        # Fixed key segments from position 0, each an online softmax of its own, merged in order: the numbers a
        # split decode gets from the same segments computed by separate programs.
        m_t, l_t, acc_t = _attend_segments(q, q_pos, qk_scale, k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head,
                                           kv_end, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
                                           ROWS, HEAD_DIM, PAGE_SIZE, PAGED, SEGMENT, BLOCK_N, BLOCK_D)
    else:
        # Split decode (one query per sequence): this program takes segment program_id(2) and stores its
        # (max, sum, accumulator) per (token, head); the last of the sequence's segments to finish, counted by
        # an atomic, merges them in order with the prefill programs' merge.
        seg = tl.program_id(2)
        seg_lo = seg * SEGMENT
        if seg_lo >= kv_end:
            if seg == 0:  # a row with no keys at all (CUDA-graph padding) is written as zeros
                tl.store(_rows(out_ptr, q_start + tok, head, offs_d, stride_ot, stride_oh),
                         tl.zeros([ROWS, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty), mask=out_mask)
            return
        m_s, l_s, acc_s = _attend_keys(q, q_pos, qk_scale, k_ptr, v_ptr, block_tables_ptr, seq, q_start, kv_head,
                                       seg_lo, tl.minimum(seg_lo + SEGMENT, kv_end),
                                       stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
                                       ROWS, HEAD_DIM, PAGE_SIZE, PAGED, BLOCK_N, BLOCK_D)
        max_segs = tl.num_programs(2)
        part = ((q_start + tok).to(tl.int64) * NUM_HEADS + head) * max_segs  # segment 0's slot of each row
        slot_stride: tl.constexpr = BLOCK_D + 2  # per slot: max, sum, accumulator
        tl.store(part_ptr + (part + seg) * slot_stride, m_s, mask=row_ok)
        tl.store(part_ptr + (part + seg) * slot_stride + 1, l_s, mask=row_ok)
        tl.store(part_ptr + ((part + seg) * slot_stride + 2)[:, None] + offs_d[None, :], acc_s, mask=out_mask)
        tl.debug_barrier()  # every thread's stores, then one release/acquire count (threadfence reduction)
        num_segs = tl.cdiv(kv_end, SEGMENT)
        counter = counter_ptr + pid * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(counter, 1, sem="acq_rel") != num_segs - 1:
            return
        tl.store(counter, 0)  # ready for the next launch (the counters are kept between launches)
        m_t, l_t, acc_t = _no_keys(ROWS, BLOCK_D)
        for i in range(0, num_segs):
            m_s = tl.load(part_ptr + (part + i) * slot_stride, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(part_ptr + (part + i) * slot_stride + 1, mask=row_ok, other=0.0, cache_modifier=".cg")
            acc_s = tl.load(part_ptr + ((part + i) * slot_stride + 2)[:, None] + offs_d[None, :], mask=out_mask,
                            other=0.0, cache_modifier=".cg")
            m_t, l_t, acc_t = _merge_segment(m_t, l_t, acc_t, m_s, l_s, acc_s)
    out = acc_t / tl.where(l_t > 0, l_t, 1.0)[:, None]  # a row with no keys (CUDA-graph padding) gives zeros
    tl.store(_rows(out_ptr, q_start + tok, head, offs_d, stride_ot, stride_oh), out.to(out_ptr.dtype.element_ty),
             mask=out_mask)


def prefill(q, k, v, out, meta: AttentionMetadata, scale: float, block_tables, page_size: int,
            tokens: int, heads: int, segment: int = 0, split: bool = False, num_warps: int = 4,
            num_stages: int = 2, maxnreg: int | None = None, skip_single: bool = False) -> None:
    """Causal attention of the ragged batch q into `out`, `tokens` query tokens x `heads` heads per program;
    K/V from the paged cache (`block_tables`) or, with `block_tables=None`, packed like q.

    `segment` > 0 (a multiple of 64): the keys in fixed segments of that many positions from 0, each its own online
    softmax, merged in order; `split` (decode steps only: one query per sequence, paged): the segments run in
    programs of their own, up to `meta.max_seq_len`, and give the same bits as one program walking them.
    `maxnreg` caps the registers per thread (ptxas spills the rest; deterministic mode caps its segmented launches).
    `skip_single`: sequences with a single-token query are left to the decode kernel (their rows are not written)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[-2]
    group = num_heads // num_kv_heads
    paged = block_tables is not None
    if segment % 64 or segment < 0:
        raise ValueError(f"segment must be 0 or a positive multiple of the 64-key tile, got {segment}")
    if split and not (segment and paged and meta.is_decode(q.shape[0])):
        raise ValueError("split attention needs segment > 0, a paged cache and one query per sequence")
    grid0 = q.shape[0] // tokens + meta.num_seqs
    grid1 = num_kv_heads * triton.cdiv(group, heads)
    block_d = triton.next_power_of_2(head_dim)
    max_segs = triton.cdiv(meta.max_seq_len, segment) if split else 1
    if split:  # per (token, head, segment): max, sum and the BLOCK_D accumulator
        part = torch.empty(q.shape[0] * num_heads * max_segs * (block_d + 2), dtype=torch.float32, device=q.device)
        counters = _split_counters(q.device, grid0 * grid1)
    else:
        part = counters = out
    _prefill_kernel[(grid0, grid1, max_segs)](
        q, k, v, out, meta.query_start_loc, meta.seq_lens, block_tables if paged else meta.seq_lens, part, counters,
        meta.num_seqs, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k.stride(-3), k.stride(-2), v.stride(-3), v.stride(-2), block_tables.stride(0) if paged else 0,
        GROUP=group, NUM_HEADS=num_heads, HEAD_DIM=head_dim, PAGE_SIZE=page_size, PAGED=paged, TOKENS=tokens,
        HEADS=heads, SEGMENT=segment, SPLIT=split, SKIP_SINGLE=skip_single, PREFETCH=split and bool(LAUNCH),
        BLOCK_N=64, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}), **LAUNCH,
    )


def _fast_prefill(q, k, v, out, meta: AttentionMetadata, scale: float, block_tables, page_size: int,
                  skip_single: bool = False) -> None:
    """Fast mode: 16 or 64 query tokens of one head per program, from the longest query of this step."""
    prefill(q, k, v, out, meta, scale, block_tables, page_size, tokens=16 if meta.max_query_len <= 16 else 64, heads=1,
            skip_single=skip_single)


# --------------------------------------------------------------------------------------------- decode
@triton.jit
def _patch_row(k, v, row, k_cache_ptr, v_cache_ptr, offset, BLOCK_D: tl.constexpr):
    """Key and value tiles [BLOCK_N, D] with the rows where `row` holds replaced by the cache's key and value at
    `offset` (the two caches share a layout), read back after this block stored them: the values as stored, and the
    key's norm and rotation compiled exactly as without the patch."""
    d = tl.arange(0, BLOCK_D)
    return (tl.where(row[:, None], tl.load(k_cache_ptr + offset + d)[None, :], k),
            tl.where(row[:, None], tl.load(v_cache_ptr + offset + d)[None, :], v))


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
    k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr, eps,
    stride_knt, stride_knh, stride_vnt, stride_vnh, stride_ct, stride_st,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, MIXED: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr, PRELOAD: tl.constexpr,
):
    # Until `wait_for_previous`, only step inputs (query starts, lengths, block tables), which no kernel of the step
    # writes, are read, and with PRELOAD (`rope_decode` only) the split's first key tile: earlier steps' keys, but for
    # the step's own, which this kernel writes and patches into that tile below.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_loc_ptr + seq)
    if MIXED:  # beside longer queries (the prefill kernel's): only the sequences that compute one token
        if tl.load(query_start_loc_ptr + seq + 1) - token != 1:
            wait_for_previous()
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if PRELOAD:
        k_first, v_first, offs_first = _kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, 0, kv_head, start, end,
                                                stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, HEAD_DIM,
                                                PAGE_SIZE, True, BLOCK_N, BLOCK_D)
    wait_for_previous()

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h[:, None] < GROUP
    d_mask = offs_d[None, :] < HEAD_DIM
    if ROPE:  # `rope_decode`: q and this step's k, v come as the projection gives them (rope_and_cache's inputs)
        HALF: tl.constexpr = BLOCK_D // 2
        dt = q_ptr.dtype.element_ty
        c1, c2, s1, s2 = cos_sin_halves(cos_ptr, sin_ptr, token, stride_ct, stride_st, HALF, HALF)
        q1, q2 = norm_rotate(q_ptr + kv_head * GROUP * stride_qh, qw_ptr, token, stride_qt, stride_qh,
                             c1, c2, s1, s2, eps, dt, GROUP, HALF, BLOCK_H, HALF, NORM)
        q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (BLOCK_H, BLOCK_D))  # [q1 | q2]
        slot = tl.load(slot_ptr + token)
        holds = (start <= seq_len - 1) & (seq_len - 1 < end) & (slot >= 0)  # the program whose keys include the step's
        if holds:
            k1, k2 = norm_rotate(k_new_ptr + kv_head * stride_knh, kw_ptr, token, stride_knt, stride_knh,
                                 c1, c2, s1, s2, eps, dt, 1, HALF, 2, HALF, NORM)
            h = tl.arange(0, 2)[:, None]
            j = tl.arange(0, HALF)[None, :]
            store_rotated_kv(k_cache_ptr, v_cache_ptr, slot * stride_kt + (kv_head + h) * stride_kh + j, k1, k2,
                             v_new_ptr + token * stride_vnt + (kv_head + h) * stride_vnh + j, h < 1, HALF)
        tl.debug_barrier()  # the block's cache stores before any of its threads loads keys
        if PRELOAD:
            if holds & (seq_len - 1 < start + BLOCK_N):  # the step's key in the preloaded tile: read back as stored
                k_first, v_first = _patch_row(k_first, v_first, offs_first == seq_len - 1, k_cache_ptr, v_cache_ptr,
                                              slot * stride_kt + kv_head * stride_kh, BLOCK_D)
    else:
        q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=h_mask & d_mask,
                    other=0.0)

    # The one query sees every key of the sequence: its position is the last one.
    q_pos = tl.full([BLOCK_H], 0, tl.int32) + seq_len - 1
    if PRELOAD:  # the first tile from registers, then the loop's own from its second: the same operations
        m_i, l_i, acc = _no_keys(BLOCK_H, BLOCK_D)
        m_i, l_i, acc = _online_softmax_step(_tile_scores(q, q_pos, qk_scale, k_first, offs_first, end), v_first,
                                             m_i, l_i, acc)
        m_i, l_i, acc = _attend_more_keys(m_i, l_i, acc, q, q_pos, qk_scale, k_cache_ptr, v_cache_ptr,
                                          block_tables_ptr, seq, 0, kv_head, start + BLOCK_N, end, stride_kt,
                                          stride_kh, stride_vt, stride_vh, stride_bt, HEAD_DIM, PAGE_SIZE, True,
                                          BLOCK_N, BLOCK_D)
    else:
        m_i, l_i, acc = _attend_keys(q, q_pos, qk_scale, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, 0, kv_head,
                                     start, end, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
                                     BLOCK_H, HEAD_DIM, PAGE_SIZE, True, BLOCK_N, BLOCK_D)

    safe_l = tl.where(l_i > 0, l_i, 1.0)  # an empty range (padding row, or split past the end) gives 0
    out_offs = token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + out_offs, (acc / safe_l[:, None]).to(out_ptr.dtype.element_ty), mask=h_mask & d_mask)
    else:
        part = (seq * NUM_HEADS + heads) * NUM_SPLITS  # split 0's row of each head
        tl.store(part_out_ptr + (part + split)[:, None] * HEAD_DIM + offs_d[None, :], acc / safe_l[:, None],
                 mask=h_mask & d_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + part + split, lse, mask=offs_h < GROUP)
        # Every thread's stores, then one release/acquire count (the threadfence-reduction pattern): the
        # program that counts last sees every split's stores.
        tl.debug_barrier()
        counter = counter_ptr + seq * NUM_KV_HEADS + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel") == NUM_SPLITS - 1:
            tl.store(counter, 0)  # ready for the next launch (the counters are kept between launches)
            m = tl.full([BLOCK_H], float("-inf"), tl.float32)
            for i in tl.static_range(NUM_SPLITS):
                m = tl.maximum(m, tl.load(part_lse_ptr + part + i, mask=offs_h < GROUP, other=float("-inf"),
                                          cache_modifier=".cg"))
            total = tl.zeros([BLOCK_H], tl.float32)
            merged = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
            for i in tl.static_range(NUM_SPLITS):
                lse_i = tl.load(part_lse_ptr + part + i, mask=offs_h < GROUP, other=float("-inf"), cache_modifier=".cg")
                w = tl.where(lse_i > float("-inf"), tl.exp2(lse_i - m), 0.0)
                parts = tl.load(part_out_ptr + (part + i)[:, None] * HEAD_DIM + offs_d[None, :], mask=h_mask & d_mask,
                                other=0.0, cache_modifier=".cg")
                total += w
                merged += parts * w[:, None]
            tl.store(out_ptr + out_offs, (merged / tl.where(total > 0, total, 1.0)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=h_mask & d_mask)


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: pretend to be an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Split the context until about 2 programs per SM exist, keeping every split >= 128 keys, at most 16.

    benchmarks/decode_attention_sweep.py on the H200 (8 KV heads, contexts 1024-8192): the best split count at
    batch 1, 4, 16 and 64 is 16, 8-16, 4 and 1, what 2 programs per SM gives (4 per SM gave 8 at batch 16 and
    2 at batch 64, 5-7% slower); at batch 256 one split is within 1-4% of the best."""
    splits = 1
    while splits < 16 and num_seqs * num_kv_heads * splits < 2 * num_sms and max_seq_len >= 128 * splits * 2:
        splits *= 2
    return splits


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, KV head) of a split decode, kept per device: each launch's
    merging programs set theirs back to 0. The first decode (eager, before any CUDA-graph capture: the
    graphs run each batch size once uncaptured first) allocates them for the largest batch it will see."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"split-KV decode needs {n} counters inside a CUDA-graph capture; run the "
                               "captured batch size once uncaptured first")
        counters = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return counters


@dataclass(frozen=True)
class StepRope:
    """What `rope_and_cache` would apply before a decode step, for a decode kernel that applies it itself: this
    step's k and v rows [T, KV, D] as the projection gives them, cos/sin [T, D], the per-head norm weights (None:
    no norm) and the cache slot of each row (-1: padding)."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None
    eps: float
    slot_mapping: torch.Tensor


def _decode(q, k_cache, v_cache, out, meta: AttentionMetadata, scale: float, splits: int | None = None,
            mixed: bool = False, rope: StepRope | None = None) -> None:
    """Fast mode's split-KV decode step; `splits` overrides `decode_num_splits` (benchmarks/decode_attention_sweep.py).
    `mixed`: q holds longer queries too; only the sequences that compute one token are attended (one row each).
    `rope`: q is unrotated, and the step's keys and values are not in the cache yet (`rope_decode`)."""
    num_seqs = meta.num_seqs
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    splits = splits or decode_num_splits(num_seqs, num_kv_heads, meta.max_seq_len, _num_sms(q.device))
    if splits > 1:
        part_out = torch.empty(num_seqs * num_heads * splits * head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs * num_heads * splits, dtype=torch.float32, device=q.device)
        counters = _split_counters(q.device, num_seqs * num_kv_heads)
    else:
        part_out = part_lse = counters = out
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, k_cache, v_cache, out, part_out, part_lse, counters, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        *_rope_arguments(rope, q),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        NUM_SPLITS=splits, MIXED=mixed, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=64,
        BLOCK_D=triton.next_power_of_2(head_dim), ROPE=rope is not None,
        NORM=rope is not None and rope.q_weight is not None, PRELOAD=rope is not None and splits > 1 and preloads(),
        num_warps=4, num_stages=2, **LAUNCH,
    )


def _rope_arguments(rope: StepRope | None, q: torch.Tensor) -> tuple:
    """The decode kernel's RoPE operands, from `rope` (q stands in for the pointers when there is none)."""
    if rope is None:
        return (q,) * 7 + (0.0,) + (0,) * 6
    norm = rope.q_weight is not None
    return (rope.k, rope.v, rope.cos, rope.sin, rope.q_weight if norm else q, rope.k_weight if norm else q,
            rope.slot_mapping, float(rope.eps) if norm else 0.0, *rope.k.stride()[:2], *rope.v.stride()[:2],
            rope.cos.stride(0), rope.sin.stride(0))


def rope_fuses_into_decode(q, k, v, cos, sin, kv_cache, meta: AttentionMetadata) -> bool:
    """Whether `rope_decode` takes this step: one query per sequence over a paged cache (of the same layout for K and
    V), a power-of-two head size (the kernel joins the two rotated halves) and unit-stride rows."""
    if kv_cache is None or not q.shape[0] or not meta.is_decode(q.shape[0]):
        return False
    k_cache, v_cache = kv_cache
    head_dim = q.shape[-1]
    return (head_dim & (head_dim - 1) == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k_cache.shape == v_cache.shape and all(t.stride(-1) == 1 for t in (q, k, v, cos, sin)))


def rope_decode(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
    """`rope_and_cache`, then `paged_attention`, of a decode step in one launch (`rope_fuses_into_decode`): each
    program normalises and rotates its GQA group's query heads as `elementwise.rope_and_cache` does (the same
    code), and the program whose split holds the step's position writes its rotated key and its value into the
    cache before it reads keys. One launch a layer fewer on the batch-1 critical path. Fast mode only: the norm's
    sum over a head is reduced in this kernel's tile, which may order it differently from `rope_and_cache`'s."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _decode(q, *kv_cache, out, meta, scale, rope=StepRope(k, v, cos, sin, q_weight, k_weight, eps, meta.slot_mapping))
    return out


# ------------------------------------------------------------------------------------------ public API
def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of the ragged batch q: [T, H, D] over the paged cache [blocks, block_size, KV, D]."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] and meta.is_decode(q.shape[0]):
        _decode(q, k_cache, v_cache, out, meta, scale)
    elif q.shape[0]:
        # Decode rows beside prefill chunks go to the decode kernel, which reads each KV head's keys once for its
        # whole GQA group, where the prefill kernel would give each of them a 64-row tile of one head.
        mixed = meta.single_token_seqs
        _fast_prefill(q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), out, meta, scale, meta.block_tables,
                      k_cache.shape[1], skip_single=mixed)
        if mixed:
            _decode(q, k_cache, v_cache, out, meta, scale, mixed=True)
    return out


def varlen_attention(q, k, v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence, with no cache (trainer-side forward)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0]:
        _fast_prefill(q, k, v, out, meta, scale, None, 1)
    return out


attention = reference.attention_from(paged_attention, varlen_attention)
