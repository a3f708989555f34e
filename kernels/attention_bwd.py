"""Fused backward of scaled rotary attention: dq, dk, dv in the unrotated frame, plus the
gradients of inv_freq and of the per-query temperature. No atomics: every output is
written by exactly one program and the frequency partials are summed in a fixed order,
so the backward is deterministic.

Notation (as the forward): K^ = R(p) k (rotated, no amplitude), Q^ = c log2(e) t
[m^2 R(p) q_rot, q_pass] (c = softmax_scale, t = temperature, m = rotary_scale), so
s2 = Q^ . K^ = log2(e) * s. With dS = P * (dP - delta), delta = rowsum(dO * O) - dlse:
  dk  = R^T ln2 (dS^T Q^)_rot,   dk_pass = ln2 (dS^T Q^)_pass,   dv = P^T dO
  G   = dS K^;  dq = c t m^2 R^T G_rot,  dq_pass = c t G_pass
  dt  = c (m^2 <R q_rot, G_rot> + <q_pass, G_pass>)
  d theta (per row, pair) = g_b x_a - g_a x_b for a rotated x = (x_a, x_b) with gradient g,
  and d inv_freq = sum over rows of position * d theta.
K^ (and Q^ for the dK/dV loop) are recomputed by the rope kernel into scratch buffers for
this call only; nothing rotated is saved between forward and backward.
"""

import torch
import triton
import triton.language as tl

from .attention_fwd import LOG2E, _dot_pad
from .rope import bshd_strides, rope, row_strides
from .rotary import load_increments, load_pairs, rotate_pairs, sincos_at, store_pairs


@triton.jit
def split_dot(xa, xb, xp, ya, yb, yp, PASS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x . y^T over features kept split as (pair half a, pair half b, pass-through)."""
    acc = tl.dot(xa, tl.trans(ya), input_precision=DOT_PRECISION)
    acc = tl.dot(xb, tl.trans(yb), acc, input_precision=DOT_PRECISION)
    if PASS > 0:
        acc = tl.dot(xp, tl.trans(yp), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def rotated_q_tile(Q, QPOS, QTEMP, INC, off_b, off_h, offs_m, m_mask, stride_qb, stride_qn, stride_qh,
                   stride_qpos_b, stride_qpos_n, stride_qtemp_b, stride_qtemp_n, NQ, NK, q_scale,
                   PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
                   ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_QPOS: tl.constexpr,
                   HAS_QTEMP: tl.constexpr):
    """A Q tile rotated at its positions (angles in-kernel): returns the rotated halves
    (a, b) and the pass-through features, float32, the positions, and each row's logit
    scale q_scale * temperature."""
    q_ptr = Q + off_b * stride_qb + off_h * stride_qh
    if HAS_QPOS:
        qpos = tl.load(QPOS + off_b * stride_qpos_b + offs_m * stride_qpos_n, mask=m_mask, other=0).to(tl.int32)
    else:
        qpos = offs_m + (NK - NQ)
    scale = tl.zeros(offs_m.shape, tl.float32) + q_scale
    if HAS_QTEMP:
        scale *= tl.load(QTEMP + off_b * stride_qtemp_b + offs_m * stride_qtemp_n, mask=m_mask, other=1.0)
    inc_hi, inc_lo = load_increments(INC, PAIRS, PAIRS_PAD)
    cos, sin = sincos_at(qpos, inc_hi, inc_lo)
    rows = offs_m.to(tl.int64)
    qa, qb = load_pairs(q_ptr, rows, m_mask, stride_qn, PAIRS, PAIRS_PAD, INTERLEAVED)
    qa, qb = rotate_pairs(qa, qb, cos, sin)
    cols = tl.arange(0, PASS_PAD)
    qp = tl.load(q_ptr + rows[:, None] * stride_qn + ROTARY_DIM + cols[None, :],
                 mask=m_mask[:, None] & (cols[None, :] < PASS), other=0.0).to(tl.float32)
    return qa, qb, qp, qpos, scale


@triton.jit
def bwd_preprocess_kernel(O, DO, DLSE, DELTA, stride_ob, stride_on, stride_oh, stride_dob, stride_don, stride_doh,
                          NQ, HQ, HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dlse, [B, Hq, Nq] float32."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = (pid_bh // HQ).to(tl.int64), (pid_bh % HQ).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    mask = (offs_m < NQ)[:, None] & (d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows * stride_on + d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_don + d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh.to(tl.int64) * NQ + offs_m, mask=offs_m < NQ, other=0.0)
    tl.store(DELTA + pid_bh.to(tl.int64) * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit
def _load_features(ptr, offs_row, row_mask, stride_row, PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr,
                   PASS: tl.constexpr, PASS_PAD: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """A [M, D] tile as (a, b, pass-through), in the tensor's dtype."""
    a, b = load_pairs(ptr, offs_row, row_mask, stride_row, PAIRS, PAIRS_PAD, INTERLEAVED)
    cols = tl.arange(0, PASS_PAD)
    p = tl.load(ptr + offs_row[:, None] * stride_row + ROTARY_DIM + cols[None, :],
                mask=row_mask[:, None] & (cols[None, :] < PASS), other=0.0)
    return a, b, p


@triton.jit
def _store_features(ptr, a, b, p, offs_row, row_mask, stride_row, PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr,
                    PASS: tl.constexpr, PASS_PAD: tl.constexpr, ROTARY_DIM: tl.constexpr,
                    INTERLEAVED: tl.constexpr):
    dtype = ptr.dtype.element_ty
    store_pairs(ptr, a.to(dtype), b.to(dtype), offs_row, row_mask, stride_row, PAIRS, PAIRS_PAD, INTERLEAVED)
    cols = tl.arange(0, PASS_PAD)
    tl.store(ptr + offs_row[:, None] * stride_row + ROTARY_DIM + cols[None, :], p.to(dtype),
             mask=row_mask[:, None] & (cols[None, :] < PASS))


@triton.jit
def rope_attention_bwd_dkdv_kernel(
    QH, KH, V, DO, LSE2, DELTA, DK, DV, DFREQ, KPOS, INC,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_kpos_b, stride_kpos_n, NQ, NK, HKV, GROUP,
    PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    ROTARY_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, INTERLEAVED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPOS: tl.constexpr, NEED_DFREQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_N keys of one (batch, KV head); loops over the GROUP query heads
    that read this KV head and over their query tiles (so GQA sums need no atomics)."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_hk = (pid_bh // HKV).to(tl.int64), (pid_bh % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NK
    rows_n = offs_n.to(tl.int64)
    ka, kb, kp = _load_features(KH + off_b * stride_kb + off_hk * stride_kh, rows_n, n_mask, stride_kn,
                                PAIRS, PAIRS_PAD, PASS, PASS_PAD, ROTARY_DIM, INTERLEAVED)
    d = tl.arange(0, D_PAD)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + rows_n[:, None] * stride_vn + d[None, :],
                mask=n_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    dka = tl.zeros((BLOCK_N, PAIRS_PAD), tl.float32)
    dkb = tl.zeros((BLOCK_N, PAIRS_PAD), tl.float32)
    dkp = tl.zeros((BLOCK_N, PASS_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)

    # Causal: query i sees key j iff i >= j - (NK - NQ); earlier query tiles see none of these keys.
    m_start = 0
    if CAUSAL:
        m_start = (tl.maximum(pid_n * BLOCK_N - (NK - NQ), 0) // BLOCK_M) * BLOCK_M
    offs_m_base = tl.arange(0, BLOCK_M)
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        q_ptr = QH + off_b * stride_qb + off_h * stride_qh
        do_ptr = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * HKV * GROUP + off_h) * NQ
        for start_m in range(m_start, NQ, BLOCK_M):
            offs_m = start_m + offs_m_base
            m_mask = offs_m < NQ
            rows_m = offs_m.to(tl.int64)
            qa, qb, qp = _load_features(q_ptr, rows_m, m_mask, stride_qn, PAIRS, PAIRS_PAD, PASS, PASS_PAD,
                                        ROTARY_DIM, INTERLEAVED)
            s2t = split_dot(ka, kb, kp, qa, qb, qp, PASS, DOT_PRECISION)
            lse2 = tl.load(LSE2 + row_base + offs_m, mask=m_mask, other=float("inf"))
            pt = tl.math.exp2(s2t - lse2[None, :])
            visible = m_mask[None, :] & n_mask[:, None]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + (NK - NQ))
            pt = tl.where(visible, pt, 0.0)
            do = tl.load(do_ptr + rows_m[:, None] * stride_don + d[None, :],
                         mask=m_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
            dst = (pt * (dpt - delta[None, :])).to(qa.dtype)
            dka = tl.dot(dst, qa, dka, input_precision=DOT_PRECISION)
            dkb = tl.dot(dst, qb, dkb, input_precision=DOT_PRECISION)
            if PASS > 0:
                dkp = tl.dot(dst, qp, dkp, input_precision=DOT_PRECISION)

    # Q^ carries log2(e): scale back to natural units, then rotate back to k's frame.
    ln2 = 0.6931471805599453
    dka, dkb, dkp = dka * ln2, dkb * ln2, dkp * ln2
    if HAS_KPOS:
        kpos = tl.load(KPOS + off_b * stride_kpos_b + offs_n * stride_kpos_n, mask=n_mask, other=0).to(tl.int32)
    else:
        kpos = offs_n
    inc_hi, inc_lo = load_increments(INC, PAIRS, PAIRS_PAD)
    cos, sin = sincos_at(kpos, inc_hi, inc_lo)
    dk_a, dk_b = rotate_pairs(dka, dkb, cos, -sin)
    _store_features(DK + off_b * stride_dkb + off_hk * stride_dkh, dk_a, dk_b, dkp, rows_n, n_mask, stride_dkn,
                    PAIRS, PAIRS_PAD, PASS, PASS_PAD, ROTARY_DIM, INTERLEAVED)
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + rows_n[:, None] * stride_dvn + d[None, :],
             dv.to(DV.dtype.element_ty), mask=n_mask[:, None] & (d[None, :] < HEAD_DIM))
    if NEED_DFREQ:
        dtheta = dkb * ka.to(tl.float32) - dka * kb.to(tl.float32)
        partial = tl.sum(dtheta * kpos.to(tl.float32)[:, None], 0)
        cols = tl.arange(0, PAIRS_PAD)
        tl.store(DFREQ + (pid_bh.to(tl.int64) * tl.num_programs(0) + pid_n) * PAIRS + cols, partial,
                 mask=cols < PAIRS)


@triton.jit
def rope_attention_bwd_dq_kernel(
    Q, KH, V, DO, LSE2, DELTA, DQ, DTEMP, DFREQ, QPOS, QTEMP, INC,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh, stride_dqb, stride_dqn, stride_dqh,
    stride_qpos_b, stride_qpos_n, stride_qtemp_b, stride_qtemp_n,
    NQ, NK, HQ, GROUP, softmax_scale, q_rot_scale,
    PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    ROTARY_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, INTERLEAVED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_QTEMP: tl.constexpr,
    NEED_DTEMP: tl.constexpr, NEED_DFREQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, query head); loops over key tiles."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = (pid_bh // HQ).to(tl.int64), (pid_bh % HQ).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < NQ
    rows_m = offs_m.to(tl.int64)
    # R q (float32) and Q^ = c log2(e) t [m^2 R q_rot, q_pass], exactly as the forward built it.
    ra, rb, qp, qpos, scale = rotated_q_tile(
        Q, QPOS, QTEMP, INC, off_b, off_h, offs_m, m_mask, stride_qb, stride_qn, stride_qh, stride_qpos_b,
        stride_qpos_n, stride_qtemp_b, stride_qtemp_n, NQ, NK, softmax_scale * 1.4426950408889634,
        PAIRS, PAIRS_PAD, PASS, PASS_PAD, ROTARY_DIM, INTERLEAVED, HAS_QPOS, HAS_QTEMP)
    dtype = Q.dtype.element_ty
    qa = (ra * (scale * q_rot_scale)[:, None]).to(dtype)
    qb = (rb * (scale * q_rot_scale)[:, None]).to(dtype)
    qh_p = (qp * scale[:, None]).to(dtype)
    d = tl.arange(0, D_PAD)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows_m[:, None] * stride_don + d[None, :],
                 mask=m_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    lse2 = tl.load(LSE2 + pid_bh.to(tl.int64) * NQ + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * NQ + offs_m, mask=m_mask, other=0.0)
    ga = tl.zeros((BLOCK_M, PAIRS_PAD), tl.float32)
    gb = tl.zeros((BLOCK_M, PAIRS_PAD), tl.float32)
    gp = tl.zeros((BLOCK_M, PASS_PAD), tl.float32)

    k_ptr = KH + off_b * stride_kb + (off_h // GROUP) * stride_kh
    v_ptr = V + off_b * stride_vb + (off_h // GROUP) * stride_vh
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, tl.maximum(pid_m * BLOCK_M + BLOCK_M + (NK - NQ), 0))
    offs_n_base = tl.arange(0, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n_base
        n_mask = offs_n < NK
        rows_n = offs_n.to(tl.int64)
        ka, kb, kp = _load_features(k_ptr, rows_n, n_mask, stride_kn, PAIRS, PAIRS_PAD, PASS, PASS_PAD,
                                    ROTARY_DIM, INTERLEAVED)
        s2 = split_dot(qa, qb, qh_p, ka, kb, kp, PASS, DOT_PRECISION)
        p = tl.math.exp2(s2 - lse2[:, None])
        visible = m_mask[:, None] & n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + (NK - NQ))
        p = tl.where(visible, p, 0.0)
        v = tl.load(v_ptr + rows_n[:, None] * stride_vn + d[None, :],
                    mask=n_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(dtype)
        ga = tl.dot(ds, ka, ga, input_precision=DOT_PRECISION)
        gb = tl.dot(ds, kb, gb, input_precision=DOT_PRECISION)
        if PASS > 0:
            gp = tl.dot(ds, kp, gp, input_precision=DOT_PRECISION)

    # Back to q's frame: dq_rot = c t m^2 R^T G_rot, dq_pass = c t G_pass.
    ct = scale * 0.6931471805599453  # scale = c log2(e) t
    inc_hi, inc_lo = load_increments(INC, PAIRS, PAIRS_PAD)
    cos, sin = sincos_at(qpos, inc_hi, inc_lo)
    rot = (ct * q_rot_scale)[:, None]
    dq_a, dq_b = rotate_pairs(ga * rot, gb * rot, cos, -sin)
    _store_features(DQ + off_b * stride_dqb + off_h * stride_dqh, dq_a, dq_b, gp * ct[:, None], rows_m, m_mask,
                    stride_dqn, PAIRS, PAIRS_PAD, PASS, PASS_PAD, ROTARY_DIM, INTERLEAVED)
    if NEED_DTEMP:
        dt = softmax_scale * (q_rot_scale * tl.sum(ra * ga + rb * gb, 1) + tl.sum(qp * gp, 1))
        tl.store(DTEMP + pid_bh.to(tl.int64) * NQ + offs_m, dt, mask=m_mask)
    if NEED_DFREQ:
        dtheta = (gb * ra - ga * rb) * rot
        partial = tl.sum(dtheta * qpos.to(tl.float32)[:, None], 0)
        cols = tl.arange(0, PAIRS_PAD)
        tl.store(DFREQ + (pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m) * PAIRS + cols, partial,
                 mask=cols < PAIRS)


def bwd_config(head_dim_pad, dtype, is_cuda):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of both backward kernels."""
    if not is_cuda:
        return 32, 32, 4, 1
    if head_dim_pad <= 64:
        return 64, 64, 4, 2
    if head_dim_pad <= 128:
        return 64, 64, 8, 2
    return 32, 32, 8, 1


def rope_attention_bwd(do, q, k, v, out, lse, dlse, increments, q_positions, k_positions, q_temperature, *,
                       rotary_dim, interleaved, causal, softmax_scale, rotary_scale, layout, need_dfreq,
                       need_dtemp, config=None):
    """Launch the backward. Arguments as `rope_attention_fwd`, plus do (dO, q's layout),
    out and lse of the forward, and dlse [B, Hq, Nq] or None. Returns dq, dk, dv (in the
    inputs' layouts and dtypes), d inv_freq [P] float32 or None, and d temperature
    [B, Hq, Nq] float32 (per head; the caller sums) or None."""
    batch, nq, hq, head_dim = q.shape if layout == "bshd" else (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    nk, hkv = (k.shape[1], k.shape[2]) if layout == "bshd" else (k.shape[2], k.shape[1])
    pairs = rotary_dim // 2
    d_pad = _dot_pad(head_dim)
    block_m, block_n, num_warps, num_stages = config or bwd_config(d_pad, q.dtype, q.is_cuda)
    do = do if do.stride(-1) == 1 else do.contiguous()  # autograd may hand a broadcast gradient
    common = dict(PAIRS=pairs, PAIRS_PAD=_dot_pad(pairs), PASS=head_dim - rotary_dim,
                  PASS_PAD=_dot_pad(head_dim - rotary_dim), ROTARY_DIM=rotary_dim, HEAD_DIM=head_dim, D_PAD=d_pad,
                  INTERLEAVED=interleaved, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps,
                  num_stages=num_stages)

    delta = torch.empty_like(lse)
    bwd_preprocess_kernel[(triton.cdiv(nq, 64), batch * hq)](
        out, do, dlse, delta, *bshd_strides(out, layout), *bshd_strides(do, layout), nq, hq,
        HAS_DLSE=dlse is not None, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=64)
    # log2-domain LSE; +inf for rows that saw no key, so their probabilities come out 0.
    lse2 = torch.where(torch.isneginf(lse), float("inf"), lse * LOG2E)

    # The rotated operands the loops stream (scratch for this call only).
    rope_args = dict(rotary_dim=rotary_dim, interleaved=interleaved, layout=layout)
    k_hat = rope(k, increments, k_positions, 0, **rope_args)
    q_row_scale = torch.full((batch, nq), softmax_scale * LOG2E, device=q.device, dtype=torch.float32)
    if q_temperature is not None:
        q_row_scale = q_row_scale * q_temperature
    q_hat = rope(q, increments, q_positions, nk - nq, scale=rotary_scale**2, row_scale=q_row_scale, **rope_args)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    n_blocks, m_blocks = triton.cdiv(nk, block_n), triton.cdiv(nq, block_m)
    dfreq_k = torch.empty(batch * hkv * n_blocks, pairs, device=q.device, dtype=torch.float32) if need_dfreq else None
    dfreq_q = torch.empty(batch * hq * m_blocks, pairs, device=q.device, dtype=torch.float32) if need_dfreq else None
    dtemp = torch.empty(batch, hq, nq, device=q.device, dtype=torch.float32) if need_dtemp else None
    rope_attention_bwd_dkdv_kernel[(n_blocks, batch * hkv)](
        q_hat, k_hat, v, do, lse2, delta, dk, dv, dfreq_k, k_positions, increments,
        *bshd_strides(q_hat, layout), *bshd_strides(k_hat, layout), *bshd_strides(v, layout),
        *bshd_strides(do, layout), *bshd_strides(dk, layout), *bshd_strides(dv, layout), *row_strides(k_positions),
        nq, nk, hkv, hq // hkv, HAS_KPOS=k_positions is not None, NEED_DFREQ=need_dfreq, **common)
    rope_attention_bwd_dq_kernel[(m_blocks, batch * hq)](
        q, k_hat, v, do, lse2, delta, dq, dtemp, dfreq_q, q_positions, q_temperature, increments,
        *bshd_strides(q, layout), *bshd_strides(k_hat, layout), *bshd_strides(v, layout),
        *bshd_strides(do, layout), *bshd_strides(dq, layout), *row_strides(q_positions), *row_strides(q_temperature),
        nq, nk, hq, hq // hkv, softmax_scale, rotary_scale * rotary_scale,
        HAS_QPOS=q_positions is not None, HAS_QTEMP=q_temperature is not None, NEED_DTEMP=need_dtemp,
        NEED_DFREQ=need_dfreq, **common)
    dfreq = dfreq_k.sum(0) + dfreq_q.sum(0) if need_dfreq else None
    return dq, dk, dv, dfreq, dtemp
