"""Backward of scaled rotary attention: dq, dk, dv in the unrotated frame, plus the
gradients of inv_freq and of the per-query temperature.

Notation (as the forward): K^ = R(p) k, Q^ = r [m^2 R(p) q_rot, q_pass] with the row scale
r = c log2(e) t (c = softmax_scale, t = temperature, m = rotary_scale), so the natural
logits are s = ln2 Q^ . K^. With dS = P * (dP - delta), delta = rowsum(dO * O) - dlse:
  dQ^ = ln2 dS K^,   dK^ = ln2 dS^T Q^,   dv = P^T dO
  dq = r m^2 R^T dQ^_rot (r on the pass-through),  dk = R^T dK^  (inverse rope passes)
  dt_i = <dQ^_i, Q^_i> / t_i
  d theta (per row, pair) = dX^_b X^_a - dX^_a X^_b for X = Q or K (the scales cancel),
  and d inv_freq = sum over rows and heads of position * d theta.
Q^ is the one the forward saved (`q_rotated`; the API's default where autograd records
the call), or a query rope pass recomputes it. K^ comes from a rope pass into scratch for
this call only, or, on Hopper, the Gluon kernel rotates the keys, and dK^ back, itself
(unless the frequency gradient needs K^, the pairs are half-split with rotary_dim < the
padded head dim, or D = 256). Saving Q^ rather than K^: the forward has Q^ in shared memory
anyway, and dK^ may overwrite a K^ that nothing else holds (below).

Two kernels: a dQ kernel (one program per query tile, looping over key tiles) and a dK/dV
kernel (one program per key tile, looping over the query heads of its KV head and their
query tiles, so GQA sums need no atomics). Every output is written by one program and
every reduction runs in a fixed order: the backward is deterministic. Packed documents
(`VARLEN`) as in the forward: a program's tiles are one document's. Both keep their
loop-invariant K^/V (or Q^) tiles in shared memory as the left operand of their dots
(2-D `row_tiles` descriptors), which leaves the accumulators enough registers to run two
programs per SM (bench/RESULTS.md: the backward 14-29% faster than with 4-D tiles at
D=128, N=4k). Measured and dropped: one kernel that adds each key tile's share of dQ^ into
a float32 buffer with a TMA bulk reduce (5 matmuls instead of 7, as FlashAttention-2/3):
0.73-0.9x this scheme, with one program per SM and no overlap of its dots with the
elementwise work (that needs warp specialization, which Triton does not do on Hopper).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .attention_fwd import (q_scales, rotate_q_k, row_tiles, row_view, sequence_bounds,
                            sequence_major, sequences, tile_descriptor, tma_readable)
from . import device
from .launch import cdiv, dot_pad, launch, scratch
from .rope import frequency_grad, rope, slot_order

LN2 = tl.constexpr(0.6931471805599453)  # a kernel reads only constexpr globals


@triton.jit
def bwd_preprocess_kernel(O, DO, LSE, DLSE, DELTA, LSE2, DQ_ACC, stride_ob, stride_on, stride_oh, stride_dob,
                          stride_don, stride_doh, NQ, ROWS, HQ, HAS_DLSE: tl.constexpr, ZERO_DQ: tl.constexpr,
                          HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dlse and the base-2 lse2 = lse log2(e), [B, Hq, ROWS] float32
    each (ROWS >= NQ: the rows past NQ hold zeros); lse2 = +inf for rows that saw no key (lse
    = -inf), so their probabilities are 0. ZERO_DQ: also zero DQ_ACC [B, Hq, ROWS, D_PAD]."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = (pid_bh // HQ).to(tl.int64), (pid_bh % HQ).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_bounds = offs_m < NQ
    d = tl.arange(0, D_PAD)
    mask = in_bounds[:, None] & (d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows * stride_on + d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_don + d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_rows = pid_bh.to(tl.int64) * NQ + offs_m  # lse and dlse: [B, Hq, Nq] row-major
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_rows, mask=in_bounds, other=0.0)
    lse = tl.load(LSE + lse_rows, mask=in_bounds, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    stat_rows = pid_bh.to(tl.int64) * ROWS + offs_m
    in_rows = offs_m < ROWS
    tl.store(DELTA + stat_rows, tl.where(in_bounds, delta, 0.0), mask=in_rows)
    tl.store(LSE2 + stat_rows, tl.where(in_bounds, lse2, 0.0), mask=in_rows)
    if ZERO_DQ:
        tl.store(DQ_ACC + stat_rows[:, None] * D_PAD + d[None, :], tl.zeros((BLOCK_M, D_PAD), tl.float32),
                 mask=in_rows[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_desc, do_desc, LSE2, DELTA, q_row, off_b, q_start, off_h, offs_n, start_m, masked,
               NQ, NK, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One query tile's share of dK^ and dv (queries start_m.. of the sequence, whose first
    query is row q_row of Q^, lse2 and delta, row q_start of dO). Queries past NQ load
    lse2 = +inf (probability 0). `masked` tiles (the causal diagonal) zero the hidden probabilities. Keys past NK
    (another sequence's or document's rows of K^, or zeros) only touch rows of dk and dv that are never
    stored; the masked branch checks them anyway: without that check this kernel compiled
    3-11% slower on non-causal shapes, which never take the branch (bench/RESULTS.md)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([q_row + start_m, 0])
    do = do_desc.load([off_b, q_start + start_m, off_h, 0]).reshape(BLOCK_M, D_PAD)
    lse2 = tl.load(LSE2 + q_row.to(tl.int64) + offs_m, mask=offs_m < NQ, other=float("inf"))
    delta = tl.load(DELTA + q_row.to(tl.int64) + offs_m, mask=offs_m < NQ, other=0.0)
    pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) - lse2[None, :])
    if masked:
        visible = (offs_n < NK)[:, None]
        if CAUSAL:
            visible = visible & (offs_n[:, None] <= offs_m[None, :] + (NK - NQ))
        pt = tl.where(visible, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk = tl.dot(dst, q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def rope_attention_bwd_dkdv_kernel(
    q_desc, k_desc, v_desc, do_desc, LSE2, DELTA, DK, DV, CU_SEQLENS_Q, CU_SEQLENS_K, v_row_b, v_row_h, v_col_h,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, NQ, NK, HKV, GROUP,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_N keys of one (sequence, KV head); loops over the GROUP query heads
    that read this KV head and over their query tiles. A sequence is a batch row or (VARLEN)
    a document of the packed row (`sequence_bounds`); key tiles past its end exit. Writes dK^
    (rotated frame; DK may be the K^ buffer itself: this program alone reads these rows,
    before it writes them) and dv. Q^ and K^ are sequence-major scratch, V any `row_tiles` view."""
    pid_n, pid_sh = tl.program_id(0), tl.program_id(1)
    off_hk = pid_sh % HKV
    off_b, q_start, seq_nq, k_start, seq_nk = sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, pid_sh // HKV, NQ, NK,
                                                              VARLEN)
    start_n = pid_n * BLOCK_N
    if VARLEN:
        if start_n >= seq_nk:  # the grid covers the longest document
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = k_desc.load([(off_b * HKV + off_hk) * NK + k_start + start_n, 0])
    v = v_desc.load([off_b * v_row_b + off_hk * v_row_h + k_start + start_n, off_hk * v_col_h])
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)

    # Causal: query i sees key j iff i >= j - (seq_nk - seq_nq). Query tiles before m_lo see
    # none of these keys; tiles in [m_lo, m_hi) see some (masked); from m_hi on they see all.
    m_lo = 0
    m_hi = 0
    if CAUSAL:
        m_lo = (tl.maximum(start_n - (seq_nk - seq_nq), 0) // BLOCK_M) * BLOCK_M
        m_hi = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (seq_nk - seq_nq), 0), BLOCK_M) * BLOCK_M,
                          seq_nq)
        m_hi = tl.maximum(m_hi, m_lo)
    # One flat loop over (query head of the group, query tile): nested loops, or separate
    # masked and unmasked loops, keep more values live and spill at these tile sizes.
    m_tiles = tl.cdiv(seq_nq - m_lo, BLOCK_M)
    for i in range(0, GROUP * m_tiles):
        g = i // m_tiles
        start_m = m_lo + (i - g * m_tiles) * BLOCK_M
        off_h = off_hk * GROUP + g
        q_row = (off_b * HKV * GROUP + off_h) * NQ + q_start  # row of this head's sequence in Q^, lse2, delta
        dk, dv = _dkdv_tile(dk, dv, k, v, q_desc, do_desc, LSE2, DELTA, q_row, off_b, q_start, off_h, offs_n,
                            start_m, start_m < m_hi, seq_nq, seq_nk, CAUSAL, BLOCK_M, D_PAD, DOT_PRECISION)

    d = tl.arange(0, D_PAD)
    rows = (k_start + offs_n).to(tl.int64)[:, None]
    mask = (offs_n < seq_nk)[:, None] & (d < HEAD_DIM)[None, :]
    dk_ptr = DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh
    tl.store(dk_ptr + rows * stride_dkn + d[None, :], (dk * LN2).to(DK.dtype.element_ty), mask=mask)
    dv_ptr = DV + off_b.to(tl.int64) * stride_dvb + off_hk.to(tl.int64) * stride_dvh
    tl.store(dv_ptr + rows * stride_dvn + d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_desc, v_desc, k_row, v_row, v_col, offs_m, start_n, NQ, NK,
             CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile's share of dQ^. MASKED tiles check causality and key bounds (keys past
    NK are another sequence's or document's rows, or zeros)."""
    k = k_desc.load([k_row + start_n, 0])
    v = v_desc.load([v_row + start_n, v_col])
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) - lse2[:, None])
    if MASKED:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visible = (offs_n < NK)[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + (NK - NQ))
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    return tl.dot(ds, k, dq, input_precision=DOT_PRECISION)


@triton.jit
def rope_attention_bwd_dq_kernel(
    q_desc, k_desc, v_desc, do_desc, LSE2, DELTA, DQ, CU_SEQLENS_Q, CU_SEQLENS_K, v_row_b, v_row_h, v_col_h,
    stride_dqb, stride_dqn, stride_dqh, NQ, NK, HQ, GROUP, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ^: one program owns BLOCK_M queries of one (sequence, query head) and loops over key
    tiles (unmasked, then masked, as the forward); VARLEN as the forward."""
    # Causal: the last query tiles see the most keys; launching them first shortens the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_sh = tl.program_id(1)
    off_h = pid_sh % HQ
    off_hk = off_h // GROUP
    off_b, q_start, seq_nq, k_start, seq_nk = sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, pid_sh // HQ, NQ, NK,
                                                              VARLEN)
    start_m = pid_m * BLOCK_M
    if VARLEN:
        if start_m >= seq_nq:  # the grid covers the longest document
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_row = (off_b * HQ + off_h) * NQ + q_start  # this sequence's first row of Q^, lse2, delta
    q = q_desc.load([q_row + start_m, 0])
    do = do_desc.load([off_b, q_start + start_m, off_h, 0]).reshape(BLOCK_M, D_PAD)
    lse2 = tl.load(LSE2 + q_row.to(tl.int64) + offs_m, mask=offs_m < seq_nq, other=float("inf"))
    delta = tl.load(DELTA + q_row.to(tl.int64) + offs_m, mask=offs_m < seq_nq, other=0.0)
    k_row = (off_b * (HQ // GROUP) + off_hk) * NK + k_start
    v_row = off_b * v_row_b + off_hk * v_row_h + k_start
    v_col = off_hk * v_col_h
    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)

    full_end = (seq_nk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        m0 = start_m + (seq_nk - seq_nq)  # the first row's last visible key
        hi = tl.minimum(seq_nk, tl.maximum(m0 + BLOCK_M, 0))
        lo = tl.minimum((tl.maximum(m0 + 1, 0) // BLOCK_N) * BLOCK_N, full_end)
    else:
        hi = seq_nk
        lo = full_end
    for start_n in range(0, lo, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_desc, v_desc, k_row, v_row, v_col, offs_m, start_n, seq_nq, seq_nk,
                      CAUSAL, False, BLOCK_N, DOT_PRECISION)
    for start_n in range(lo, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_desc, v_desc, k_row, v_row, v_col, offs_m, start_n, seq_nq, seq_nk,
                      CAUSAL, True, BLOCK_N, DOT_PRECISION)

    d = tl.arange(0, D_PAD)
    dq_ptr = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
    rows = (q_start + offs_m).to(tl.int64)
    tl.store(dq_ptr + rows[:, None] * stride_dqn + d[None, :], (dq * LN2).to(DQ.dtype.element_ty),
             mask=(offs_m < seq_nq)[:, None] & (d < HEAD_DIM)[None, :])


def preprocess(out, do, lse, dlse, rows=None, dq_acc=None):
    """(delta, lse2), each [B, Hq, rows] float32 (`bwd_preprocess_kernel`; rows >= Nq,
    default Nq), from the forward's out and lse, dO and dlse ([B, Hq, Nq] or None). Zeroes
    dq_acc ([B, Hq, rows, D padded] float32) on the way when given: the Hopper backward sums
    dQ^ there, and one launch less is 10-20 us less host time at short sequences."""
    batch, nq, hq, head_dim = out.shape
    rows = rows or nq
    delta, lse2 = scratch("delta", lse.new_empty(batch, hq, rows)), scratch("lse2", lse.new_empty(batch, hq, rows))
    launch(
        bwd_preprocess_kernel, (cdiv(rows, 64), batch * hq),
        out, do, lse, dlse, delta, lse2, dq_acc, *out.stride()[:3], *do.stride()[:3], nq, rows, hq,
        HAS_DLSE=dlse is not None, ZERO_DQ=dq_acc is not None, HEAD_DIM=head_dim, D_PAD=dot_pad(head_dim),
        BLOCK_M=64)
    return delta, lse2


class BwdConfig(NamedTuple):
    """Launch configuration of one backward kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# sm_90, per padded head dim: (dK/dV kernel, dQ kernel), from the H100 sweeps in
# bench/RESULTS.md (`python -m bench.sweep bwd`): one warpgroup and under ~110 KB of shared
# memory per program, so that two programs share an SM. D = 256: the dQ config +15-17% over
# (64, 64, 8, 2). Other GPUs take this table (`attention_fwd.FWD_CONFIGS`).
SM90_BWD_CONFIGS = {
    64: (BwdConfig(32, 64, 4, 2), BwdConfig(64, 64, 4, 3)),
    128: (BwdConfig(64, 64, 4, 2), BwdConfig(64, 64, 4, 3)),
    256: (BwdConfig(32, 64, 8, 2), BwdConfig(64, 32, 4, 2)),
}
BWD_CONFIGS = {(9, 0): SM90_BWD_CONFIGS}
INTERPRETER_BWD_CONFIGS = (BwdConfig(32, 32, 4, 1), BwdConfig(32, 32, 4, 1))


def bwd_config(head_dim_pad, capability):
    """(dK/dV config, dQ config) for a padded head dim (16-256) on a GPU of `capability`
    (None: the interpreter)."""
    if capability is None:
        return INTERPRETER_BWD_CONFIGS
    return BWD_CONFIGS.get(capability, SM90_BWD_CONFIGS)[max(64, head_dim_pad)]


def rope_attention_bwd(do, q, k, v, out, lse, dlse, inv_freq, q_positions, k_positions, q_temperature, *,
                       rotary_dim, interleaved, causal, softmax_scale, rotary_scale, need_dfreq,
                       need_dtemp, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                       q_rotated=False, dq_stride=None, dq_out=None, gradient_kernel=None, config=None):
    """Launch the backward. Arguments as `rope_attention_fwd` (varlen included), plus do
    (dO, like q), out and lse of the forward, and dlse [B, Hq, Nq] or None; `q_rotated`: q
    is the Q^ that the forward saved (`save_q`), and no query rope pass runs. Returns dq, dk,
    dv (like q, k, v: shape, strides, dtype; dq with `dq_stride` where given, which a caller
    with `q_rotated` passes: the strides of the dense q that Q^ came from; into `dq_out`
    where given, a tensor of q's shape, which may share Q^'s storage: Q^ is last read before
    dq is written), d inv_freq [P]
    float32 or None, and d temperature [B, Hq, Nq] float32 (per head; the caller sums) or
    None. gradient_kernel replaces the preprocess and the two kernels here between the rope
    passes (the Hopper backward, `kernels.hopper.attention_bwd.rope_attention_bwd_hopper`): (do, out, lse, dlse, Q^, K^,
    v, dK^ buffer, causal, cu_seqlens_q, cu_seqlens_k, keys = (k, inv_freq, k_positions,
    rotary_dim, interleaved)) -> (dQ^ as a [B, Nq, Hq, D] view, dv), with K^ None where it
    rotates the keys itself and writes dk (like k) into the buffer."""
    batch, nq, hq, head_dim = q.shape
    _, nk, hkv, _ = k.shape
    d_pad = dot_pad(head_dim)
    dkdv_config, dq_config = config or bwd_config(d_pad, device.capability(q.device))
    if not tma_readable(do):
        do = do.contiguous()  # autograd may hand a broadcast gradient

    # The Hopper kernel rotates the keys, and dK^ back, itself, unless the frequency gradient
    # reads K^ and dK^, K^ would have to be in its slot order (Q^, saved or from the rope
    # pass, is in the natural one), or (D > 128) its warpgroups split each key's features.
    keys_inside = (gradient_kernel is not None and not need_dfreq and d_pad <= 128
                   and not slot_order(d_pad, rotary_dim, interleaved))
    q_rot, k_rot = rotate_q_k(q, k, inv_freq, q_positions, k_positions, q_temperature, rotary_dim=rotary_dim,
                              interleaved=interleaved, softmax_scale=softmax_scale, rotary_scale=rotary_scale,
                              queries=not q_rotated, keys=not keys_inside)
    if q_rotated:
        # Q^ as the forward wrote it (sequence-major), the layout the kernels' tiles read; a
        # saved-tensor hook (save_on_cpu) may hand it back in another, which is copied
        q_rot = q if q.transpose(1, 2).is_contiguous() else sequence_major(*q.shape, q).copy_(q)
    # Buffers, for SDPA's peak memory: dK^ overwrites K^ (each key tile is read only by the
    # program that writes it, before it writes: after the dQ kernel here, at the start of the
    # Gluon kernel's program) unless the frequency gradient still needs K^; with the keys
    # inside, the kernel writes dk itself; dQ^ and (unless the forward saved it) Q^ are freed
    # before dk is allocated otherwise.
    if keys_inside:
        dk = dk_hat = scratch("dk", torch.empty_like(k))
    else:
        dk_hat = sequence_major(*k.shape, k) if need_dfreq else k_rot
    if gradient_kernel is not None:
        dq_hat, dv = gradient_kernel(do, out, lse, dlse, q_rot, k_rot, v, dk_hat, causal=causal,
                                     cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                     keys=(k, inv_freq, k_positions, rotary_dim, interleaved))
    else:
        delta, lse2 = preprocess(out, do, lse, dlse)
        dq_hat, dv = _gradient_kernels(do, q_rot, k_rot, v, lse2, delta, dk_hat, causal, dkdv_config, dq_config,
                                       cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    # dq_hat and dk_hat hold dQ^ and dK^ (keys inside: dk, already done): take the temperature
    # and frequency gradients, then rotate them back into buffers shaped like q and k.
    dfreq = dtemp = None
    if need_dtemp:  # <dQ^, Q^> / t per (batch, head, query)
        dtemp = (dq_hat.float() * q_rot.float()).sum(-1).transpose(1, 2) / q_temperature[:, None, :]
    if need_dfreq:
        q_pos = (nk - nq + torch.arange(nq, device=q.device))[None] if q_positions is None else q_positions
        k_pos = torch.arange(nk, device=q.device)[None] if k_positions is None else k_positions
        rope_args = dict(rotary_dim=rotary_dim, interleaved=interleaved)
        dfreq = frequency_grad(dq_hat, q_rot, q_pos, **rope_args) + frequency_grad(dk_hat, k_rot, k_pos, **rope_args)
        dfreq = dfreq.float()
    del q_rot, k_rot
    if dq_out is None:
        dq_out = scratch("dq", torch.empty_like(q) if dq_stride is None else q.new_empty_strided(q.shape, dq_stride))
    dq = rope(dq_hat, inv_freq, q_positions, nk - nq, rotary_dim=rotary_dim, interleaved=interleaved,
              row_scale=q_temperature, inverse=True, out=dq_out,
              **q_scales(softmax_scale, rotary_scale))
    del dq_hat
    if not keys_inside:
        dk = rope(dk_hat, inv_freq, k_positions, 0, rotary_dim=rotary_dim, interleaved=interleaved, inverse=True,
                  out=scratch("dk", torch.empty_like(k)))
    return dq, dk, dv, dfreq, dtemp


def _gradient_kernels(do, q_rot, k_rot, v, lse2, delta, dk_hat, causal, dkdv_config, dq_config, cu_seqlens_q,
                      cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """The dQ and dK/dV kernels: dQ^ (sequence-major, like q) and dv; dK^ into dk_hat."""
    batch, nq, hq, head_dim = q_rot.shape
    _, nk, hkv, _ = k_rot.shape
    d_pad = dot_pad(head_dim)
    # V is a dot's left operand: 2-D tiles, from a sequence-major copy if v has no `row_view`.
    v_rows = v if row_view(v, d_pad) else sequence_major(*v.shape, v).copy_(v)
    dq_hat = scratch("dq_hat", sequence_major(batch, nq, hq, head_dim, q_rot))
    dv = scratch("dv", torch.empty_like(v))
    common = dict(HEAD_DIM=head_dim, D_PAD=d_pad, CAUSAL=causal, VARLEN=cu_seqlens_q is not None,
                  DOT_PRECISION="ieee" if q_rot.dtype == torch.float32 else "tf32")
    seqs, most_q, most_k = sequences(batch, nq, nk, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    block_m, block_n, num_warps, num_stages = dq_config
    v_desc, *v_geometry = row_tiles(v_rows, block_n, d_pad)
    launch(
        rope_attention_bwd_dq_kernel, (cdiv(most_q, block_m), seqs * hq),
        row_tiles(q_rot, block_m, d_pad)[0], row_tiles(k_rot, block_n, d_pad)[0], v_desc,
        tile_descriptor(do, block_m, d_pad), lse2, delta, dq_hat, cu_seqlens_q, cu_seqlens_k, *v_geometry,
        *dq_hat.stride()[:3], nq, nk, hq, hq // hkv, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages, **common)
    block_m, block_n, num_warps, num_stages = dkdv_config
    v_desc, *v_geometry = row_tiles(v_rows, block_n, d_pad)
    launch(
        rope_attention_bwd_dkdv_kernel, (cdiv(most_k, block_n), seqs * hkv),
        row_tiles(q_rot, block_m, d_pad)[0], row_tiles(k_rot, block_n, d_pad)[0], v_desc,
        tile_descriptor(do, block_m, d_pad), lse2, delta, dk_hat, dv, cu_seqlens_q, cu_seqlens_k, *v_geometry,
        *dk_hat.stride()[:3], *dv.stride()[:3], nq, nk, hkv, hq // hkv, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)
    return dq_hat, dv
