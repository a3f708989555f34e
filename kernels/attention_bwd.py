"""Backward of scaled rotary attention: dq, dk, dv in the unrotated frame, plus the
gradients of inv_freq and of the per-query temperature. No atomics: every output is
written by exactly one program and every reduction runs in a fixed order, so the
backward is deterministic.

Notation (as the forward): K^ = R(p) k, Q^ = r [m^2 R(p) q_rot, q_pass] with the row scale
r = c log2(e) t (c = softmax_scale, t = temperature, m = rotary_scale), so the natural
logits are s = ln2 Q^ . K^. With dS = P * (dP - delta), delta = rowsum(dO * O) - dlse:
  dQ^ = ln2 dS K^,   dK^ = ln2 dS^T Q^,   dv = P^T dO          (two flash-style kernels)
  dq = r m^2 R^T dQ^_rot (r on the pass-through),  dk = R^T dK^  (inverse rope passes)
  dt_i = <dQ^_i, Q^_i> / t_i
  d theta (per row, pair) = dX^_b X^_a - dX^_a X^_b for X = Q or K (the scales cancel),
  and d inv_freq = sum over rows and heads of position * d theta.
The rope passes recompute Q^ and K^ into scratch for this call only; nothing rotated is
saved between forward and backward. dQ^ and dK^ are written into the dq and dk buffers
and rotated back in place.
"""

import torch
import triton
import triton.language as tl

from .attention_fwd import _dot_pad, q_scales, rotate_q_k, tile_descriptor, tma_readable
from .rope import bshd_strides, frequency_grad, rope


@triton.jit
def bwd_preprocess_kernel(O, DO, LSE, DLSE, DELTA, LSE2, stride_ob, stride_on, stride_oh, stride_dob, stride_don,
                          stride_doh, NQ, HQ, HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dlse and the base-2 lse2 = lse log2(e), [B, Hq, Nq] float32
    each; lse2 = +inf for rows that saw no key (lse = -inf), so their probabilities are 0."""
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
    row_stats = pid_bh.to(tl.int64) * NQ + offs_m  # [B, Hq, Nq] row-major
    if HAS_DLSE:
        delta -= tl.load(DLSE + row_stats, mask=in_bounds, other=0.0)
    tl.store(DELTA + row_stats, delta, mask=in_bounds)
    lse = tl.load(LSE + row_stats, mask=in_bounds, other=0.0)
    tl.store(LSE2 + row_stats, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), mask=in_bounds)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_desc, do_desc, LSE2, DELTA, row_base, off_b, off_h, offs_n, start_m, NQ, NK,
               D_PAD: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query tile's share of dK^ and dv. Only causal diagonal tiles need MASKED: queries
    past NQ load lse2 = +inf (probability 0), and keys past NK only touch their own rows of
    dk and dv, which are never stored."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([off_b, start_m, off_h, 0]).reshape(BLOCK_M, D_PAD)
    do = do_desc.load([off_b, start_m, off_h, 0]).reshape(BLOCK_M, D_PAD)
    lse2 = tl.load(LSE2 + row_base + offs_m, mask=offs_m < NQ, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < NQ, other=0.0)
    pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) - lse2[None, :])
    if MASKED:
        pt = tl.where(offs_n[:, None] <= offs_m[None, :] + (NK - NQ), pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk = tl.dot(dst, q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def rope_attention_bwd_dkdv_kernel(
    q_desc, k_desc, v_desc, do_desc, LSE2, DELTA, DK, DV,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, NQ, NK, HKV, GROUP,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_N keys of one (batch, KV head); loops over the GROUP query heads
    that read this KV head and over their query tiles (so GQA sums need no atomics).
    Writes dK^ (rotated frame) and dv."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_hk = pid_bh // HKV, pid_bh % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = k_desc.load([off_b, start_n, off_hk, 0]).reshape(BLOCK_N, D_PAD)
    v = v_desc.load([off_b, start_n, off_hk, 0]).reshape(BLOCK_N, D_PAD)
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)

    # Causal: query i sees key j iff i >= j - (NK - NQ). Query tiles before m_lo see none of
    # these keys; tiles in [m_lo, m_hi) see some (masked); from m_hi on they see all.
    m_lo = 0
    m_hi = 0
    if CAUSAL:
        m_lo = (tl.maximum(start_n - (NK - NQ), 0) // BLOCK_M) * BLOCK_M
        m_hi = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (NK - NQ), 0), BLOCK_M) * BLOCK_M, NQ)
        m_hi = tl.maximum(m_hi, m_lo)
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        row_base = (off_b * HKV * GROUP + off_h).to(tl.int64) * NQ
        for start_m in range(m_lo, m_hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_desc, do_desc, LSE2, DELTA, row_base, off_b, off_h, offs_n, start_m,
                                NQ, NK, D_PAD, True, BLOCK_M, DOT_PRECISION)
        for start_m in range(m_hi, NQ, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_desc, do_desc, LSE2, DELTA, row_base, off_b, off_h, offs_n, start_m,
                                NQ, NK, D_PAD, False, BLOCK_M, DOT_PRECISION)

    d = tl.arange(0, D_PAD)
    rows = offs_n.to(tl.int64)[:, None]
    mask = (offs_n < NK)[:, None] & (d < HEAD_DIM)[None, :]
    dk_ptr = DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh
    tl.store(dk_ptr + rows * stride_dkn + d[None, :], (dk * 0.6931471805599453).to(DK.dtype.element_ty), mask=mask)
    dv_ptr = DV + off_b.to(tl.int64) * stride_dvb + off_hk.to(tl.int64) * stride_dvh
    tl.store(dv_ptr + rows * stride_dvn + d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_desc, v_desc, off_b, off_hk, offs_m, start_n, NQ, NK,
             D_PAD: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """One key tile's share of dQ^. MASKED tiles check causality and key bounds (a zero-filled
    key past NK could otherwise give an overflowing probability times a zero key: NaN)."""
    k = k_desc.load([off_b, start_n, off_hk, 0]).reshape(BLOCK_N, D_PAD)
    v = v_desc.load([off_b, start_n, off_hk, 0]).reshape(BLOCK_N, D_PAD)
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
    q_desc, k_desc, v_desc, do_desc, LSE2, DELTA, DQ, stride_dqb, stride_dqn, stride_dqh, NQ, NK, HQ, GROUP,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, query head); loops over key tiles
    (unmasked, then masked, as the forward). Writes dQ^ (rotated, scaled frame)."""
    # Causal: the last query tiles see the most keys; launching them first shortens the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b, off_h = pid_bh // HQ, pid_bh % HQ
    off_hk = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([off_b, start_m, off_h, 0]).reshape(BLOCK_M, D_PAD)
    do = do_desc.load([off_b, start_m, off_h, 0]).reshape(BLOCK_M, D_PAD)
    lse2 = tl.load(LSE2 + pid_bh.to(tl.int64) * NQ + offs_m, mask=offs_m < NQ, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * NQ + offs_m, mask=offs_m < NQ, other=0.0)
    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)

    full_end = (NK // BLOCK_N) * BLOCK_N
    if CAUSAL:
        m0 = start_m + (NK - NQ)  # the first row's last visible key
        hi = tl.minimum(NK, tl.maximum(m0 + BLOCK_M, 0))
        lo = tl.minimum((tl.maximum(m0 + 1, 0) // BLOCK_N) * BLOCK_N, full_end)
    else:
        hi = NK
        lo = full_end
    for start_n in range(0, lo, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_desc, v_desc, off_b, off_hk, offs_m, start_n, NQ, NK, D_PAD, CAUSAL,
                      False, BLOCK_N, DOT_PRECISION)
    for start_n in range(lo, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_desc, v_desc, off_b, off_hk, offs_m, start_n, NQ, NK, D_PAD, CAUSAL,
                      True, BLOCK_N, DOT_PRECISION)

    d = tl.arange(0, D_PAD)
    dq_ptr = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
    tl.store(dq_ptr + offs_m.to(tl.int64)[:, None] * stride_dqn + d[None, :],
             (dq * 0.6931471805599453).to(DQ.dtype.element_ty),
             mask=(offs_m < NQ)[:, None] & (d < HEAD_DIM)[None, :])


def bwd_config(head_dim_pad, causal, is_cuda):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel and of the dQ kernel,
    from the H100 sweep at N = 4k in bench/RESULTS.md."""
    if not is_cuda:
        return (32, 32, 4, 1), (32, 32, 4, 1)
    if head_dim_pad <= 64:
        return (64, 128, 4, 2) if causal else (64, 64, 4, 3), (64, 64, 4, 3)
    if head_dim_pad <= 128:
        return (64, 64, 4, 3), (64, 64, 4, 3)
    return (64, 64, 8, 1), (64, 64, 8, 1)


def rope_attention_bwd(do, q, k, v, out, lse, dlse, inv_freq, q_positions, k_positions, q_temperature, *,
                       rotary_dim, interleaved, causal, softmax_scale, rotary_scale, layout, need_dfreq,
                       need_dtemp, config=None):
    """Launch the backward. Arguments as `rope_attention_fwd`, plus do (dO, q's layout),
    out and lse of the forward, and dlse [B, Hq, Nq] or None. Returns dq, dk, dv (in the
    inputs' layouts and dtypes), d inv_freq [P] float32 or None, and d temperature
    [B, Hq, Nq] float32 (per head; the caller sums) or None."""
    batch, nq, hq, head_dim = q.shape if layout == "bshd" else (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    nk, hkv = (k.shape[1], k.shape[2]) if layout == "bshd" else (k.shape[2], k.shape[1])
    d_pad = _dot_pad(head_dim)
    dkdv_config, dq_config = config or bwd_config(d_pad, causal, q.is_cuda)
    if not tma_readable(do):
        do = do.contiguous()  # autograd may hand a broadcast gradient

    delta, lse2 = torch.empty_like(lse), torch.empty_like(lse)
    bwd_preprocess_kernel[(triton.cdiv(nq, 64), batch * hq)](
        out, do, lse, dlse, delta, lse2, *bshd_strides(out, layout), *bshd_strides(do, layout), nq, hq,
        HAS_DLSE=dlse is not None, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=64)
    q_rot, k_rot = rotate_q_k(q, k, inv_freq, q_positions, k_positions, q_temperature, rotary_dim=rotary_dim,
                              interleaved=interleaved, softmax_scale=softmax_scale, rotary_scale=rotary_scale,
                              layout=layout)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(HEAD_DIM=head_dim, D_PAD=d_pad, CAUSAL=causal,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    block_m, block_n, num_warps, num_stages = dkdv_config
    rope_attention_bwd_dkdv_kernel[(triton.cdiv(nk, block_n), batch * hkv)](
        tile_descriptor(q_rot, layout, block_m, d_pad), tile_descriptor(k_rot, layout, block_n, d_pad),
        tile_descriptor(v, layout, block_n, d_pad), tile_descriptor(do, layout, block_m, d_pad), lse2, delta, dk, dv,
        *bshd_strides(dk, layout), *bshd_strides(dv, layout), nq, nk, hkv, hq // hkv, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)
    block_m, block_n, num_warps, num_stages = dq_config
    rope_attention_bwd_dq_kernel[(triton.cdiv(nq, block_m), batch * hq)](
        tile_descriptor(q_rot, layout, block_m, d_pad), tile_descriptor(k_rot, layout, block_n, d_pad),
        tile_descriptor(v, layout, block_n, d_pad), tile_descriptor(do, layout, block_m, d_pad), lse2, delta, dq,
        *bshd_strides(dq, layout), nq, nk, hq, hq // hkv, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages, **common)

    # dq and dk hold dQ^ and dK^ here: take the temperature and frequency gradients, then
    # rotate both back in place.
    dfreq = dtemp = None
    if need_dtemp:  # <dQ^, Q^> / t per (batch, head, query)
        dtemp = (dq.float() * q_rot.float()).sum(-1)
        dtemp = dtemp.transpose(1, 2) if layout == "bshd" else dtemp
        dtemp = dtemp / q_temperature[:, None, :]
    if need_dfreq:
        q_pos = (nk - nq + torch.arange(nq, device=q.device))[None] if q_positions is None else q_positions
        k_pos = torch.arange(nk, device=q.device)[None] if k_positions is None else k_positions
        rope_args = dict(rotary_dim=rotary_dim, interleaved=interleaved, layout=layout)
        dfreq = frequency_grad(dq, q_rot, q_pos, **rope_args) + frequency_grad(dk, k_rot, k_pos, **rope_args)
        dfreq = dfreq.float()
    rope(dq, inv_freq, q_positions, nk - nq, rotary_dim=rotary_dim, interleaved=interleaved, row_scale=q_temperature,
         layout=layout, inverse=True, out=dq, **q_scales(softmax_scale, rotary_scale))
    rope(dk, inv_freq, k_positions, 0, rotary_dim=rotary_dim, interleaved=interleaved, layout=layout, inverse=True,
         out=dk)
    return dq, dk, dv, dfreq, dtemp
