"""Attention of a few new queries (decode, chunked prefill) over a KV cache that stores keys
UNROTATED: an append kernel, a split-KV attention kernel that rotates keys as it reads them,
and the combine of the splits (flash-decoding).

Why unrotated: a cache of rotated keys freezes each key's angles at the step that wrote it,
so a schedule whose frequencies depend on the length (dynamic NTK, CLEX) attends with stale
keys. Here every key is rotated in registers at its cache index, with this call's
frequencies and the exact angles of rotary.py (fixed-point phases): each step attends
exactly as a full recompute would. Decode reads the whole cache once per step; one angle per
key and pair, shared by every query head of the KV head, is arithmetic the loads hide once
the special-function unit evaluates it (`sincos_mufu`; with the polynomial the loop was
instruction-bound: bench/RESULTS.md).

Work split: one program owns one KV head of one sequence, BLOCK_M query rows of its GQA
group (row r = token r // GROUP, query head r % GROUP of the KV head: the Hq / Hkv * Nq rows
that read these keys, rotated in the prologue with every logit scale folded in) and one of
NUM_SPLITS contiguous key ranges. Splits keep the GPU busy when B * Hkv programs are too few
(small batches, long caches); each writes a normalized partial output and its log-sum-exp,
and `combine_kernel` merges them. Cache rows are read with plain pointer loads: a dense
cache by row index, a paged one through block_table; no TMA, so the kernels run under
Triton's interpreter and on any GPU.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import device
from .launch import cdiv, dot_pad, launch, next_power_of_2
from .rotary import load_increments, load_pairs, rotate_pairs, sincos_at, sincos_mufu

LOG2E = 1.4426950408889634

# num_splits heuristic (`decode_splits`). Splits are added while the grid still fits in one
# wave of the config's `programs_per_sm` programs per SM (as many as its pipelined K and V
# tiles fit an SM's shared memory): a second, partial wave leaves SMs idle while it runs
# (H100, B = 8 with 32k caches and 64-key tiles, two programs an SM: 2.48 TB/s at 9 splits,
# 2.2 waves; 2.86 at 4, one wave; bench/RESULTS.md). Each split keeps at least
# MIN_KEYS_PER_SPLIT keys of the cache's capacity (a shorter split spends more on its
# prologue and its combine row than on keys), and at most MAX_SPLITS (the combine holds
# every split's partial row in one tile).
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64
# Query rows per program: the GQA group times the new tokens, padded to tl.dot's minimum of
# 16, and tiled past MAX_BLOCK_M (chunked prefill).
MAX_BLOCK_M = 64


@triton.jit
def _cache_slots(BLOCK_TABLE, stride_table_b, off_b, offs_n, mask, page_size, num_pages, PAGED: tl.constexpr):
    """Where cache rows offs_n of sequence off_b live, as (page, slot) int64 and the mask of
    rows to touch: (b, n) in a dense cache [B, max_len, H, D] (b a scalar);
    (block_table[b, n // page_size], n % page_size) in a paged one [num_pages, page_size,
    H, D], where a page index outside [0, num_pages) (a bad table the host did not check)
    masks its rows off instead of reaching outside the cache."""
    if PAGED:
        page = tl.load(BLOCK_TABLE + off_b * stride_table_b + offs_n // page_size, mask=mask, other=0).to(tl.int64)
        mask = mask & (page >= 0) & (page < num_pages)
        page = tl.where(mask, page, 0)
        slot = (offs_n % page_size).to(tl.int64)
    else:
        page, slot = off_b, offs_n.to(tl.int64)
    return page, slot, mask


@triton.jit
def append_kernel(K_NEW, V_NEW, K_CACHE, V_CACHE, CACHE_SEQLENS, BLOCK_TABLE,
                  stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh,
                  stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch, stride_table_b,
                  N_NEW, HKV, page_size, num_pages, capacity, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  PAGED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Copy k_new / v_new [B, N_NEW, HKV, D] into the caches at rows cache_seqlens[b] + i
    (rows outside [0, capacity), from lengths the host did not check, are skipped)."""
    pid_n, off_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(CACHE_SEQLENS + off_b)
    mask = (offs_n < N_NEW) & (start + offs_n >= 0) & (start + offs_n < capacity)
    page, slot, mask = _cache_slots(BLOCK_TABLE, stride_table_b, off_b, start + offs_n, mask, page_size, num_pages,
                                    PAGED)
    d = tl.arange(0, D_PAD)
    mask = mask[:, None] & (d < HEAD_DIM)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    for h in range(0, HKV):
        k = tl.load(K_NEW + off_b * stride_knb + rows * stride_knn + h * stride_knh + d[None, :], mask=mask)
        v = tl.load(V_NEW + off_b * stride_vnb + rows * stride_vnn + h * stride_vnh + d[None, :], mask=mask)
        tl.store(K_CACHE + (page * stride_kcb + slot * stride_kcn)[:, None] + h * stride_kch + d[None, :], k,
                 mask=mask)
        tl.store(V_CACHE + (page * stride_vcb + slot * stride_vcn)[:, None] + h * stride_vch + d[None, :], v,
                 mask=mask)


@triton.jit
def decode_attention_kernel(
    Q, K_CACHE, V_CACHE, CACHE_SEQLENS, BLOCK_TABLE, INV_FREQ, TEMP, O, LSE, O_PART, LSE_PART,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh, stride_table_b, stride_temp_b, stride_temp_n,
    NQ, N_NEW, HKV, page_size, num_pages, capacity, rot_scale, pass_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROTARY_DIM: tl.constexpr,
    PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    INTERLEAVED: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr, HAS_TEMP: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MUFU: tl.constexpr,
):
    """One (sequence, KV head, query row block, key split). Keys: the first
    cache_seqlens[b] + N_NEW cache rows (at most `capacity`: lengths the host did not check
    never reach outside the cache); query t sits at position keys - NQ + t. MUFU: the keys'
    angles through the special-function unit (`rotary.sincos_mufu`: every key read is
    rotated, and the polynomial's instructions would bound the loop, not the loads)."""
    pid_bh, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_b = (pid_bh // HKV).to(tl.int64)
    off_hkv = pid_bh % HKV
    n_keys = tl.minimum(tl.load(CACHE_SEQLENS + off_b) + N_NEW, capacity)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token = offs_m // GROUP
    head = off_hkv * GROUP + offs_m % GROUP
    row_mask = token < NQ
    q_pos = n_keys - NQ + token

    # Queries: rotated at their positions, with softmax scale, rotary_scale**2, log2(e) and
    # the temperature folded in (the logits come out in base 2).
    inc_hi, inc_lo = load_increments(INV_FREQ, PAIRS, PAIRS_PAD)
    row_scale = tl.full((BLOCK_M,), 1.0, tl.float32)
    if HAS_TEMP:
        row_scale = tl.load(TEMP + off_b * stride_temp_b + token * stride_temp_n, mask=row_mask, other=0.0)
    cos, sin = sincos_at(q_pos, inc_hi, inc_lo)
    cos, sin = cos * (rot_scale * row_scale)[:, None], sin * (rot_scale * row_scale)[:, None]
    q_rows = off_b * stride_qb + token.to(tl.int64) * stride_qn + head.to(tl.int64) * stride_qh
    q_a, q_b = load_pairs(Q, q_rows, row_mask, 1, PAIRS, PAIRS_PAD, INTERLEAVED)
    q_a, q_b = rotate_pairs(q_a, q_b, cos, sin)
    q_a, q_b = q_a.to(K_CACHE.dtype.element_ty), q_b.to(K_CACHE.dtype.element_ty)
    pass_cols = tl.arange(0, PASS_PAD)
    if PASS > 0:
        q_p = tl.load(Q + q_rows[:, None] + ROTARY_DIM + pass_cols[None, :],
                      mask=row_mask[:, None] & (pass_cols < PASS)[None, :], other=0.0)
        q_p = (q_p.to(tl.float32) * (pass_scale * row_scale)[:, None]).to(K_CACHE.dtype.element_ty)

    # This program's keys: its split of those its last query sees.
    end = n_keys
    if CAUSAL:
        last_token = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, NQ * GROUP - 1) // GROUP
        end = tl.minimum(end, n_keys - NQ + last_token + 1)
    per_split = tl.cdiv(tl.cdiv(tl.maximum(end, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = pid_s * per_split
    end = tl.minimum(end, start + per_split)

    d = tl.arange(0, D_PAD)
    k_head, v_head = K_CACHE + off_hkv * stride_kh, V_CACHE + off_hkv * stride_vh
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_mask = offs_n < end
        page, slot, in_cache = _cache_slots(BLOCK_TABLE, stride_table_b, off_b, offs_n, key_mask, page_size,
                                            num_pages, PAGED)
        k_rows = page * stride_kb + slot * stride_kn
        k_a, k_b = load_pairs(k_head, k_rows, in_cache, 1, PAIRS, PAIRS_PAD, INTERLEAVED)
        if MUFU:  # each key at its cache index
            k_cos, k_sin = sincos_mufu(offs_n, inc_hi, inc_lo)
        else:
            k_cos, k_sin = sincos_at(offs_n, inc_hi, inc_lo)
        k_a, k_b = rotate_pairs(k_a, k_b, k_cos, k_sin)
        qk = tl.dot(q_a, tl.trans(k_a.to(K_CACHE.dtype.element_ty)), input_precision=DOT_PRECISION)
        qk = tl.dot(q_b, tl.trans(k_b.to(K_CACHE.dtype.element_ty)), qk, input_precision=DOT_PRECISION)
        if PASS > 0:
            k_p = tl.load(k_head + k_rows[:, None] + ROTARY_DIM + pass_cols[None, :],
                          mask=in_cache[:, None] & (pass_cols < PASS)[None, :], other=0.0)
            qk = tl.dot(q_p, tl.trans(k_p), qk, input_precision=DOT_PRECISION)
        visible = key_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v = tl.load(v_head + (page * stride_vb + slot * stride_vn)[:, None] + d[None, :],
                    mask=in_cache[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)

    # A row that saw no key (causal, or an empty split) gets out = 0 and lse = -inf.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    lse_row = (off_b * (HKV * GROUP) + head) * NQ + token  # [B, Hq, Nq]
    out_mask = row_mask[:, None] & (d < HEAD_DIM)[None, :]
    if NUM_SPLITS == 1:
        o_rows = off_b * stride_ob + token.to(tl.int64) * stride_on + head.to(tl.int64) * stride_oh
        tl.store(O + o_rows[:, None] + d[None, :], out.to(O.dtype.element_ty), mask=out_mask)
        tl.store(LSE + lse_row, lse2 * 0.6931471805599453, mask=row_mask)
    else:  # partials [NUM_SPLITS, B * Hq * Nq, D] float32, lse in base 2
        part_row = pid_s * (tl.num_programs(0) * GROUP * NQ) + lse_row
        tl.store(O_PART + part_row[:, None] * HEAD_DIM + d[None, :], out, mask=out_mask)
        tl.store(LSE_PART + part_row, lse2, mask=row_mask)


@triton.jit
def combine_kernel(O_PART, LSE_PART, O, LSE, stride_ob, stride_on, stride_oh, ROWS, HQ, NQ,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   SPLITS_PAD: tl.constexpr):
    """Merge the splits of one (b, query head, token) row: out = sum_s w_s out_s with
    w_s = 2**lse_s / sum 2**lse_s, lse = log of that sum (natural log)."""
    row = tl.program_id(0).to(tl.int64)  # (b * HQ + h) * NQ + token
    splits = tl.arange(0, SPLITS_PAD)
    lse_s = tl.load(LSE_PART + splits * ROWS + row, mask=splits < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.math.exp2(lse_s - m_safe)
    total = tl.sum(weight, 0)
    d = tl.arange(0, D_PAD)
    out_s = tl.load(O_PART + (splits.to(tl.int64) * ROWS + row)[:, None] * HEAD_DIM + d[None, :],
                    mask=(splits < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(out_s * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    off_b, off_h, token = row // (HQ * NQ), (row // NQ) % HQ, row % NQ
    tl.store(O + off_b * stride_ob + token * stride_on + off_h * stride_oh + d, out.to(O.dtype.element_ty),
             mask=d < HEAD_DIM)
    lse = (m + tl.math.log2(tl.where(total > 0, total, 1.0))) * 0.6931471805599453
    tl.store(LSE + row, tl.where(total > 0, lse, float("-inf")))


class DecodeConfig(NamedTuple):
    """Launch configuration of `decode_attention_kernel`, and how many of its programs an SM
    holds at once (the shared memory of its pipelined K and V tiles): `decode_splits` sizes
    the grid to one wave of them."""

    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int


# Decode (at most 16 query rows per program) over a dense cache on sm_90: 128-key tiles (64
# KB of K and V at D = 128, 16-bit), three stages (two tiles' loads in flight through
# cp.async, 192 KB: one program an SM), four warps (250 registers, no spills, Triton 3.6). On
# an H100, where B x len >= 256k, 3.04-3.11 TB/s of K and V against 2.99-3.05 with 64-key tiles
# (copy: 3.02; `python -m bench.sweep decode`, bench/RESULTS.md).
SM90_DENSE_DECODE_CONFIG = DecodeConfig(128, 4, 3, 1)
# Decode elsewhere: paged caches (whose page lookups want two programs an SM to hide their
# latency: 1.3-1.4x the dense time with these tiles on an H100, 1.8x with 128-key ones) and
# GPUs with less shared memory. 64-key tiles (96 KB in three stages) beat four other configs
# on an H200: 3.1-4.0 TB/s at B = 8-32 with 32k caches, where (32, 8, 3) read 1.9-2.5.
DECODE_CONFIG = DecodeConfig(64, 4, 3, 2)
# Taller row blocks (chunked prefill) and D = 256 spill with 64-key tiles (88 and 104 bytes,
# Triton 3.6) and keep (32, 8, 3): 128-175 registers, no spills.
PREFILL_CONFIG = DecodeConfig(32, 8, 3, 2)
INTERPRETER_CONFIG = DecodeConfig(16, 4, 1, 1)


def decode_config(capability, block_m, head_dim_pad, paged):
    """The `DecodeConfig` for programs of block_m query rows on a GPU of `capability` (None:
    the interpreter)."""
    if capability is None:
        return INTERPRETER_CONFIG
    if block_m > 16 or head_dim_pad > 128:
        return PREFILL_CONFIG
    return SM90_DENSE_DECODE_CONFIG if capability == (9, 0) and not paged else DECODE_CONFIG


def decode_splits(programs, capacity, sms, programs_per_sm):
    """How many key splits per (sequence, KV head, row block): as many as keep the grid within
    programs_per_sm programs on each of `sms` SMs (at least one), at most one per
    MIN_KEYS_PER_SPLIT keys of the cache's `capacity` (the host does not know the lengths
    without a sync; each program splits its real length evenly) and at most MAX_SPLITS.
    `programs` = B * Hkv * row blocks."""
    wanted = programs_per_sm * sms // programs
    return max(1, min(wanted, capacity // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def _cache_geometry(k_cache, block_table):
    """(page size, pages, rows a sequence can hold): (1, B, max_len) for a dense cache."""
    if block_table is None:
        return 1, k_cache.shape[0], k_cache.shape[1]
    return k_cache.shape[1], k_cache.shape[0], block_table.shape[1] * k_cache.shape[1]


def append_kv(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table):
    """Write k_new / v_new [B, N, Hkv, D] into the caches (dense [B, max_len, Hkv, D] or
    paged [num_pages, page_size, Hkv, D] with block_table [B, max_pages] int32) at rows
    cache_seqlens[b] + i, in place. Inputs are checked by the caller."""
    batch, n_new, heads, head_dim = k_new.shape
    block_n = 16
    paged = block_table is not None
    launch(
        append_kernel, (cdiv(n_new, block_n), batch),
        k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, *k_new.stride()[:3], *v_new.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0) if paged else 0,
        n_new, heads, *_cache_geometry(k_cache, block_table),
        HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim), PAGED=paged, BLOCK_N=block_n, num_warps=4,
    )


def decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, inv_freq, q_temperature, *, n_new, rotary_dim,
                     interleaved, causal, softmax_scale, rotary_scale, num_splits=None, config=None):
    """out (like q) and lse [B, Hq, Nq] float32 of q [B, Nq, Hq, D] over the first
    cache_seqlens[b] + n_new rows of the caches (dense or paged, see `append_kv`), keys
    rotated at their cache index, query t at cache_seqlens[b] + n_new - Nq + t.
    q_temperature [B, Nq] float32 (any strides) or None. num_splits None: `decode_splits`.
    config: a `DecodeConfig`, default `decode_config`."""
    batch, nq, hq, head_dim = q.shape
    paged = block_table is not None
    hkv = k_cache.shape[2]
    group = hq // hkv
    block_m = min(dot_pad(group * nq), MAX_BLOCK_M)
    m_blocks = cdiv(group * nq, block_m)
    block_n, num_warps, num_stages, programs_per_sm = config or decode_config(device.capability(q.device), block_m,
                                                                               dot_pad(head_dim), paged)
    page_size, num_pages, capacity = _cache_geometry(k_cache, block_table)
    if num_splits is None:
        num_splits = decode_splits(batch * hkv * m_blocks, capacity, device.multiprocessors(q.device), programs_per_sm)
    pairs, passthrough = rotary_dim // 2, head_dim - rotary_dim
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, nq, device=q.device, dtype=torch.float32)
    o_part = lse_part = None
    if num_splits > 1:
        o_part = torch.empty(num_splits, batch * hq * nq, head_dim, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(num_splits, batch * hq * nq, device=q.device, dtype=torch.float32)
    temp_strides = (0, 0) if q_temperature is None else q_temperature.stride()
    launch(
        decode_attention_kernel, (batch * hkv, m_blocks, num_splits),
        q, k_cache, v_cache, cache_seqlens, block_table, inv_freq, q_temperature, out, lse, o_part, lse_part,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
        block_table.stride(0) if paged else 0, *temp_strides, nq, n_new, hkv, page_size, num_pages, capacity,
        softmax_scale * LOG2E * rotary_scale**2, softmax_scale * LOG2E,
        GROUP=group, HEAD_DIM=head_dim, D_PAD=dot_pad(head_dim), ROTARY_DIM=rotary_dim, PAIRS=pairs,
        PAIRS_PAD=dot_pad(pairs), PASS=passthrough, PASS_PAD=dot_pad(passthrough), INTERLEAVED=interleaved, PAGED=paged,
        CAUSAL=causal, HAS_TEMP=q_temperature is not None, NUM_SPLITS=num_splits, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", MUFU=q.is_cuda, num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        launch(
            combine_kernel, (batch * hq * nq,),
            o_part, lse_part, out, lse, *out.stride()[:3], batch * hq * nq, hq, nq,
            HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim), NUM_SPLITS=num_splits,
            SPLITS_PAD=next_power_of_2(num_splits), num_warps=4,
        )
    return out, lse
