"""Scaled rotary attention forward: two rope passes, then a flash-attention kernel.

rope.py rotates q and k once per call into scratch buffers (Q^ is kept for the backward
when autograd records the call, `save_q`; K^ is not): Q^ carries
every logit scale (rotary_scale**2 on the rotated features, softmax_scale, the query's
temperature, log2(e)), K^ is the plain rotation. Each pass reads and writes its tensor once
(0.055 ms for 16k tokens x 16 heads x 128 on H100, 2.4 TB/s; the two passes are about 9%
of a forward call at N = 4k, 2-3% at 16k). The kernel is then a plain flash loop: one
program owns BLOCK_M queries of one (batch, query head), streams K^ and V tiles of the
matching KV head (GQA by index, no repeated KV) through TMA descriptors (asynchronous;
buffered ahead of the dots when the config has stages), and keeps an online softmax in
base 2. Q^ and K^ are stored sequence-major and read as 2-D tiles (`row_tiles`), which the
dots take straight from shared memory. Packed documents (varlen) are one row of B = 1 with
document bounds: `VARLEN` programs read their document's offsets from cu_seqlens and loop
over its keys only (`sequence_bounds`); tiles past a document's end exit.

Measured alternatives (H100, bench/RESULTS.md): rotating each K tile inside the loop was
1.5x slower (the rotated tile goes registers -> shared memory before its dot, once per
query tile). Rotating Q inside the kernel's prologue (no Q rope pass) compiles without
spills with polynomial angles (rotary.sincos_at), but the rotated tile feeds the dots from
registers and ptxas then serializes every wgmma of the loop: 5-17% slower than the pass.
Triton (3.6, and 3.9 compiled for sm_90) ignores `warp_specialize` loops on Hopper (no
partitions in the compiled IR), so within a program the softmax of one tile never overlaps
the dots of the next; small programs, several per SM (`fwd_config`), overlap across programs.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import device
from .documents import document_bounds
from .launch import Descriptor, cdiv, dot_pad, launch, scratch
from .rope import rope

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, k_row, off_b, k_start, off_hkv, offs_m, start_n, NQ, NK,
              D_PAD: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
              V_FIRST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K/V tile of the online softmax (keys start_n.. of the sequence, whose first key
    is row k_start of v). MASKED tiles check key bounds and causality (keys past NK are the
    next sequence's or document's rows of K^, or zeros: their logits need -inf).
    V_FIRST issues V's load before the QK^T dot, so it lands during the dot and the softmax;
    without stages that takes a second tile buffer (`fwd_config` says when it pays)."""
    k = k_desc.load([k_row + start_n, 0])
    if V_FIRST:
        v = v_desc.load([off_b, k_start + start_n, off_hkv, 0]).reshape(BLOCK_N, D_PAD)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visible = (offs_n < NK)[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + (NK - NQ))
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:  # a row with no visible key so far keeps m = -inf; subtract 0 instead of NaN
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(qk - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if not V_FIRST:
        v = v_desc.load([off_b, k_start + start_n, off_hkv, 0]).reshape(BLOCK_N, D_PAD)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, seq, NQ, NK, VARLEN: tl.constexpr):
    """(batch row, first query row, query count, first key row, key count) of sequence `seq`:
    batch row `seq` of NQ queries and NK keys, or, VARLEN, document `seq` of the one packed
    row, bounded by cu_seqlens (int32 [documents + 1], read here: no host ever sees them).
    Offsets are clamped into the row, so that unchecked bad ones (the API reads them only
    on request) give wrong results, never accesses out of bounds."""
    if VARLEN:
        q_start, q_len = document_bounds(CU_SEQLENS_Q, seq, NQ)
        k_start, k_len = document_bounds(CU_SEQLENS_K, seq, NK)
        return tl.zeros((), tl.int32), q_start, q_len, k_start, k_len
    else:
        return seq, 0, NQ, 0, NK


@triton.jit
def rope_attention_fwd_kernel(
    q_desc, k_desc, v_desc, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K, stride_ob, stride_on, stride_oh, NQ, NK, HQ, GROUP,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, V_FIRST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """Flash attention over Q^ (rotated, every logit scale folded in, base 2) and K^ (rotated).
    Program (m, s h): query tile m of query head h of sequence s, a batch row, or (VARLEN) a
    document of the packed row ([1, NQ] queries, [1, NK] keys): its bounds come from
    cu_seqlens, and tiles past its end exit. STORE_LSE: lse to LSE (else not touched)."""
    # Causal: the last query tiles see the most keys; launching them first shortens the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_sh = tl.program_id(1)
    off_h = pid_sh % HQ
    off_hkv = off_h // GROUP
    off_b, q_start, seq_nq, k_start, seq_nk = sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, pid_sh // HQ, NQ, NK,
                                                              VARLEN)
    if VARLEN:
        if pid_m * BLOCK_M >= seq_nq:  # the grid covers the longest document
            return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_row = (off_b * HQ + off_h) * NQ + q_start  # this sequence's first row of Q^ and of LSE
    q = q_desc.load([q_row + pid_m * BLOCK_M, 0])
    k_row = (off_b * (HQ // GROUP) + off_hkv) * NK + k_start

    # Tiles [0, lo) are fully visible to every row: no masks. [lo, hi) need masks.
    full_end = (seq_nk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        m0 = pid_m * BLOCK_M + (seq_nk - seq_nq)  # the first row's last visible key
        hi = tl.minimum(seq_nk, tl.maximum(m0 + BLOCK_M, 0))
        lo = tl.minimum((tl.maximum(m0 + 1, 0) // BLOCK_N) * BLOCK_N, full_end)
    else:
        hi = seq_nk
        lo = full_end

    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start_n in range(0, lo, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, k_row, off_b, k_start, off_hkv, offs_m, start_n,
                                  seq_nq, seq_nk, D_PAD, CAUSAL, False, BLOCK_N, V_FIRST, DOT_PRECISION)
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, k_row, off_b, k_start, off_hkv, offs_m, start_n,
                                  seq_nq, seq_nk, D_PAD, CAUSAL, True, BLOCK_N, V_FIRST, DOT_PRECISION)

    # A row that saw no key (causal, Nq > Nk) gets out = 0 and lse = -inf.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    d = tl.arange(0, D_PAD)
    o_ptr = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    rows = (q_start + offs_m).to(tl.int64)
    tl.store(o_ptr + rows[:, None] * stride_on + d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m < seq_nq)[:, None] & (d[None, :] < HEAD_DIM))
    if STORE_LSE:
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + (off_b * HQ + off_h).to(tl.int64) * NQ + q_start + offs_m, lse, mask=offs_m < seq_nq)


class FwdConfig(NamedTuple):
    """Launch configuration of `rope_attention_fwd_kernel`."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    v_first: bool  # V's load issued before the QK^T dot (`_fwd_tile`)


# sm_90, per (padded head dim, causal), from the H100 sweeps in bench/RESULTS.md (`python -m
# bench.sweep fwd`). Non-causal D <= 128 runs one warpgroup per program with one unbuffered
# tile at a time (K, then V in the same buffer): 50 KB of shared memory, so three programs
# share an SM and one's softmax runs beside another's dots (Triton 3.6 syncs a program's
# warps every K/V tile, so the two warpgroups of a 128-row program never overlap): +10-12% at
# N <= 4k over (128, 128, 8, 3). Causal rows keep the 128-row tiles, with V's load issued
# first (+2-10%); the small config loses there. V first on the small config would need a
# second buffer (two programs per SM) and loses 20%. D = 256 (one program per SM whatever the
# config: 64 KB of Q^ tile) runs best on 64-key tiles with two stages: +11-17% over
# (128, 32, 8, 3).
SM90_FWD_CONFIGS = {
    (64, False): FwdConfig(64, 128, 4, 2, False), (64, True): FwdConfig(64, 128, 4, 2, False),
    (128, False): FwdConfig(64, 128, 4, 1, False), (128, True): FwdConfig(128, 128, 8, 3, True),
    (256, False): FwdConfig(128, 64, 8, 2, False), (256, True): FwdConfig(128, 64, 8, 2, False),
}
# Tuned on sm_90 only: other GPUs take its table (for sm_80 and sm_89 it compiles, with
# descriptor loads lowered to plain loads, but spills).
FWD_CONFIGS = {(9, 0): SM90_FWD_CONFIGS}
# The interpreter: small tiles; both load orders run in the tests.
INTERPRETER_FWD_CONFIGS = {causal: FwdConfig(32, 32, 4, 1, causal) for causal in (False, True)}


def fwd_config(head_dim_pad, causal, capability):
    """The `FwdConfig` for a padded head dim (16-256) on a GPU of `capability` ((major,
    minor); None: the interpreter)."""
    if capability is None:
        return INTERPRETER_FWD_CONFIGS[causal]
    return FWD_CONFIGS.get(capability, SM90_FWD_CONFIGS)[(max(64, head_dim_pad), causal)]



def tile_descriptor(x, block_rows, d_pad):
    """A TMA descriptor over a [B, N, H, D] tensor (any strides), indexed as [b, n, h,
    feature], loading [1, block_rows, 1, d_pad] tiles (rows past N and features past D read
    as zero)."""
    return Descriptor(x, list(x.shape), [*x.stride()[:3], 1], [1, block_rows, 1, d_pad])


def sequence_major(batch, n, heads, head_dim, like, dtype=None):
    """Scratch stored [B, H, N, D] contiguous (each head's sequence one block of rows, a
    `row_view`), returned as a [B, N, H, D] view."""
    return torch.empty(batch, heads, n, head_dim, device=like.device, dtype=dtype or like.dtype).transpose(1, 2)


def row_view(x, d_pad):
    """The 2-D [rows, features] view that `row_tiles` reads, as (shape, row stride, row_b,
    row_h, col_h): the tile of batch b, head h starting at position n is at
    [b row_b + h row_h + n, h col_h]. Views exist for sequence-major storage ([B, H, N, D]:
    features past D read as zero) and for heads inside a token's row ([B, N, H, D] and
    slices of packed qkv) when D = d_pad; None otherwise. Rows past N read the next
    sequence's rows: every kernel masks them."""
    batch, n, heads, head_dim = x.shape
    stride_b, stride_n, stride_h = x.stride()[:3]
    if stride_h == n * stride_n and stride_b == heads * stride_h:
        return [batch * heads * n, head_dim], stride_n, heads * n, n, 0
    if stride_b == n * stride_n and head_dim == d_pad and (heads - 1) * stride_h + head_dim <= stride_n:
        return [batch * n, (heads - 1) * stride_h + head_dim], stride_n, n, 0, stride_h
    return None


def row_tiles(x, block_rows, d_pad):
    """2-D TMA tiles over `row_view`: (descriptor, row_b, row_h, col_h). Dots take such
    tiles straight from shared memory; a tile of a 4-D descriptor must be reshaped, and
    Triton 3.6 then copies a dot's left operand into registers (in the backward: 64 more
    registers per thread, and spills)."""
    shape, stride, row_b, row_h, col_h = row_view(x, d_pad)
    return Descriptor(x, shape, [stride, 1], [block_rows, d_pad]), row_b, row_h, col_h


def tma_readable(x):
    """Whether TMA can read x: last dim contiguous, 16-byte aligned data and strides."""
    size = x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in x.stride()[:-1])


def q_scales(softmax_scale, rotary_scale):
    """The query rope pass's scales: every logit scale but the per-query temperature (its
    row scale), in base 2: c log2(e) m^2 on the rotated features, c log2(e) on the rest."""
    return dict(scale=softmax_scale * LOG2E * rotary_scale**2, pass_scale=softmax_scale * LOG2E)


def rotate_q_k(q, k, inv_freq, q_positions, k_positions, q_temperature, *, rotary_dim, interleaved, softmax_scale,
               rotary_scale, queries=True, keys=True):
    """The two rope passes of forward and backward: Q^ = c log2(e) t [m^2 R q_rot, q_pass]
    (c = softmax_scale, t = temperature, m = rotary_scale; None unless `queries`) and K^ = R k
    (None unless `keys`), stored sequence-major (`row_tiles`). Queries default to positions
    Nk - Nq + arange(Nq)."""
    nq, nk = q.shape[1], k.shape[1]
    q_rot = k_rot = None
    if queries:
        q_rot = rope(q, inv_freq, q_positions, nk - nq, rotary_dim=rotary_dim, interleaved=interleaved,
                     row_scale=q_temperature, out=scratch("q_rot", sequence_major(*q.shape, q)),
                     **q_scales(softmax_scale, rotary_scale))
    if keys:
        k_rot = rope(k, inv_freq, k_positions, 0, rotary_dim=rotary_dim, interleaved=interleaved,
                     out=scratch("k_rot", sequence_major(*k.shape, k)))
    return q_rot, k_rot


def sequences(batch, nq, nk, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(count, most queries, most keys) of the sequences the kernels' grids cover: the batch
    rows, or, with cu_seqlens (varlen: one packed row), its documents, as long as the
    caller's max_seqlen says (an int: the grid never waits on a device value)."""
    if cu_seqlens_q is None:
        return batch, nq, nk
    return cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k


def lse_buffer(q, store_lse):
    """The forward's lse [B, Hq, Nq] float32 for q [B, Nq, Hq, D]; empty where the call needs
    none (inference: SDPA's flash and cuDNN kernels keep theirs too)."""
    if not store_lse:
        return q.new_empty(0, dtype=torch.float32)
    return scratch("lse", torch.empty(q.shape[0], q.shape[2], q.shape[1], device=q.device, dtype=torch.float32))


def rope_attention_fwd(q, k, v, inv_freq, q_positions, k_positions, q_temperature, *, rotary_dim, interleaved,
                       causal, softmax_scale, rotary_scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                       max_seqlen_k=0, save_q=False, store_lse=True, config=None):
    """Scaled rotary attention forward: the two rope passes, then the flash kernel. q
    [B, Nq, Hq, D], k and v [B, Nk, Hkv, D], any strides (the API turns SDPA's layout into
    such views), last dim contiguous, v 16-byte aligned (TMA); inv_freq float32
    [rotary_dim / 2]; q_positions [B, Nq] and k_positions [B or 1, Nk] ints or None;
    q_temperature [B, Nq] float32 or None. Varlen: B = 1, and cu_seqlens_q / cu_seqlens_k
    (int32 [documents + 1]) split the row into documents of at most max_seqlen_q /
    max_seqlen_k tokens, each attending within itself (causal: bottom-right per document).
    Returns out (like q: shape, strides, dtype), lse [B, Hq, Nq] float32 (natural log; with
    `store_lse` False, an empty tensor: nothing allocated or written for it) and, with
    `save_q`, Q^ (`rotate_q_k`: the backward reads it instead of rotating q again; None
    otherwise)."""
    batch, nq, hq, head_dim = q.shape
    _, nk, hkv, _ = k.shape
    d_pad = dot_pad(head_dim)
    block_m, block_n, num_warps, num_stages, v_first = config or fwd_config(d_pad, causal, device.capability(q.device))
    q_rot, k_rot = rotate_q_k(q, k, inv_freq, q_positions, k_positions, q_temperature, rotary_dim=rotary_dim,
                              interleaved=interleaved, softmax_scale=softmax_scale, rotary_scale=rotary_scale)
    out = scratch("out", torch.empty_like(q))
    lse = lse_buffer(q, store_lse)
    seqs, most_q, _ = sequences(batch, nq, nk, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    launch(
        rope_attention_fwd_kernel, (cdiv(most_q, block_m), seqs * hq),
        row_tiles(q_rot, block_m, d_pad)[0], row_tiles(k_rot, block_n, d_pad)[0],
        tile_descriptor(v, block_n, d_pad), out, lse if store_lse else out, cu_seqlens_q, cu_seqlens_k,
        *out.stride()[:3], nq, nk, hq, hq // hkv, HEAD_DIM=head_dim, D_PAD=d_pad, CAUSAL=causal,
        VARLEN=cu_seqlens_q is not None, BLOCK_M=block_m, BLOCK_N=block_n, V_FIRST=v_first,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", STORE_LSE=store_lse,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse, q_rot if save_q else None
