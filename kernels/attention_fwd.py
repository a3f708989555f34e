"""Fused forward: scaled RoPE on q and k + per-query temperature + flash attention.

One program owns BLOCK_M queries of one (batch, query head). It loads its Q tile, rotates
it in registers (angles computed in-kernel, see rotary.py), folds rotary_scale**2 (on the
rotated features), softmax_scale, the query's temperature and log2(e) into it once, then
streams K/V tiles of the matching KV head (GQA by index, no repeated KV): each K tile is
rotated in registers with cos/sin rows of the key positions (a float32 table built once per
call, so the inner loop spends no special-function work on angles), and folded into an
online softmax in base 2. The features are kept split as (a, b, pass-through) for q and k
alike, so q.k is the sum of three dots and no tile is ever re-interleaved.

ROTATE_K=False is the other variant: K is rotated once per call by rope.py into a scratch
buffer (never saved), and the loop feeds K straight into the dots. Rotating per tile costs
(Nq / BLOCK_M) times the rotation work and keeps the K loads out of Triton's dot
pipelining; measured on H100 it runs at 0.28-0.51x of cuDNN (bench/RESULTS.md).
"""

import torch
import triton
import triton.language as tl

from .rope import bshd_strides, rope, row_strides
from .rotary import load_increments, load_pairs, load_table, rope_table, rotate_pairs, sincos_at

LOG2E = 1.4426950408889634


@triton.jit
def split_dot(xa, xb, xp, ya, yb, yp, PASS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x . y^T over features kept split as (pair half a, pair half b, pass-through)."""
    acc = tl.dot(xa, tl.trans(ya), input_precision=DOT_PRECISION)
    acc = tl.dot(xb, tl.trans(yb), acc, input_precision=DOT_PRECISION)
    if PASS > 0:
        acc = tl.dot(xp, tl.trans(yp), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fwd_tile(acc, l_i, m_i, qa, qb, qp, k_ptr, v_ptr, cos_ptr, sin_ptr, offs_m, start_n, NQ, NK,
              stride_kn, stride_vn,
              PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
              ROTARY_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
              INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, ROTATE_K: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K/V tile of the online softmax. MASKED tiles check key bounds and causality."""
    offs_n = tl.arange(0, BLOCK_N)
    n_mask = (start_n + offs_n) < NK
    kn_off = tl.cast(start_n, tl.int64) * stride_kn
    if ROTATE_K:
        ka, kb = load_pairs(k_ptr + kn_off, offs_n, n_mask, stride_kn, PAIRS, PAIRS_PAD, INTERLEAVED)
        cos = load_table(cos_ptr + start_n * PAIRS, offs_n, n_mask, PAIRS, PAIRS_PAD)
        sin = load_table(sin_ptr + start_n * PAIRS, offs_n, n_mask, PAIRS, PAIRS_PAD)
        ka_rot, kb_rot = rotate_pairs(ka, kb, cos, sin)
        ka_rot, kb_rot = ka_rot.to(qa.dtype), kb_rot.to(qa.dtype)
    else:  # K was rotated once for this call (rope.py)
        ka_rot, kb_rot = load_pairs(k_ptr + kn_off, offs_n, n_mask, stride_kn, PAIRS, PAIRS_PAD, INTERLEAVED)
    if PASS > 0:
        cols = tl.arange(0, PASS_PAD)
        kp = tl.load(k_ptr + kn_off + offs_n[:, None] * stride_kn + ROTARY_DIM + cols[None, :],
                     mask=n_mask[:, None] & (cols[None, :] < PASS), other=0.0)
    else:
        kp = ka_rot  # unused: split_dot skips the pass-through dot
    qk = split_dot(qa, qb, qp, ka_rot, kb_rot, kp, PASS, DOT_PRECISION)

    if MASKED:
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & ((start_n + offs_n)[None, :] <= offs_m[:, None] + (NK - NQ))
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:  # a row with no visible key so far keeps m = -inf; subtract 0 instead of NaN
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(qk - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    d = tl.arange(0, D_PAD)
    v = tl.load(v_ptr + tl.cast(start_n, tl.int64) * stride_vn + offs_n[:, None] * stride_vn + d[None, :],
                mask=n_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


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
def rope_attention_fwd_kernel(
    Q, K, V, O, LSE, INC, COS_K, SIN_K, QPOS, QTEMP,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_table_b, stride_qpos_b, stride_qpos_n, stride_qtemp_b, stride_qtemp_n,
    NQ, NK, HQ, GROUP, q_scale, q_rot_scale,
    PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    ROTARY_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_QTEMP: tl.constexpr,
    ROTATE_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b = (pid_bh // HQ).to(tl.int64)
    off_h = (pid_bh % HQ).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < NQ
    rows_m = offs_m.to(tl.int64)

    # Q tile: rotate at the query positions, fold every logit scale in once.
    qa, qb, qp, qpos, scale = rotated_q_tile(
        Q, QPOS, QTEMP, INC, off_b, off_h, offs_m, m_mask, stride_qb, stride_qn, stride_qh, stride_qpos_b,
        stride_qpos_n, stride_qtemp_b, stride_qtemp_n, NQ, NK, q_scale, PAIRS, PAIRS_PAD, PASS, PASS_PAD,
        ROTARY_DIM, INTERLEAVED, HAS_QPOS, HAS_QTEMP)
    dtype = Q.dtype.element_ty
    rot_scale = (scale * q_rot_scale)[:, None]  # the k side's rotary_scale rides on q too
    qa_rot, qb_rot = (qa * rot_scale).to(dtype), (qb * rot_scale).to(dtype)
    qp = (qp * scale[:, None]).to(dtype)

    k_ptr = K + off_b * stride_kb + (off_h // GROUP) * stride_kh
    v_ptr = V + off_b * stride_vb + (off_h // GROUP) * stride_vh
    cos_ptr = COS_K + off_b * stride_table_b
    sin_ptr = SIN_K + off_b * stride_table_b

    # Tiles [0, lo) are fully visible to every row: no masks. [lo, hi) need masks.
    full_end = (NK // BLOCK_N) * BLOCK_N
    if CAUSAL:
        m0 = pid_m * BLOCK_M + (NK - NQ)  # the first row's last visible key
        hi = tl.minimum(NK, tl.maximum(m0 + BLOCK_M, 0))
        lo = tl.minimum((tl.maximum(m0 + 1, 0) // BLOCK_N) * BLOCK_N, full_end)
    else:
        hi = NK
        lo = full_end

    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start_n in range(0, lo, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, qa_rot, qb_rot, qp, k_ptr, v_ptr, cos_ptr, sin_ptr, offs_m,
                                  start_n, NQ, NK, stride_kn, stride_vn, PAIRS, PAIRS_PAD, PASS, PASS_PAD,
                                  ROTARY_DIM, HEAD_DIM, D_PAD, INTERLEAVED, CAUSAL, False, ROTATE_K, BLOCK_N,
                                  DOT_PRECISION)
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, qa_rot, qb_rot, qp, k_ptr, v_ptr, cos_ptr, sin_ptr, offs_m,
                                  start_n, NQ, NK, stride_kn, stride_vn, PAIRS, PAIRS_PAD, PASS, PASS_PAD,
                                  ROTARY_DIM, HEAD_DIM, D_PAD, INTERLEAVED, CAUSAL, True, ROTATE_K, BLOCK_N,
                                  DOT_PRECISION)

    # A row that saw no key (causal, Nq > Nk) gets out = 0 and lse = -inf.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    d = tl.arange(0, D_PAD)
    o_ptr = O + off_b * stride_ob + off_h * stride_oh
    tl.store(o_ptr + rows_m[:, None] * stride_on + d[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & (d[None, :] < HEAD_DIM))
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * NQ + offs_m, lse, mask=m_mask)


def _dot_pad(n):
    """Power-of-two tile width >= 16 (tl.dot's smallest reduction size)."""
    return max(16, triton.next_power_of_2(n))


def fwd_config(head_dim_pad, dtype, is_cuda):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim. D=128 is the best of the
    H100 sweep in bench/RESULTS.md; D=64 and D=256 are not yet tuned."""
    if not is_cuda:  # the interpreter: larger tiles, fewer programs
        return 32, 32, 4, 1
    if head_dim_pad <= 64:
        return 128, 64, 4, 3
    if head_dim_pad <= 128:
        return 128, 64, 8, 3
    return 64, 64, 8, 2


def rope_attention_fwd(q, k, v, increments, q_positions, k_positions, q_temperature, *, rotary_dim, interleaved,
                       causal, softmax_scale, rotary_scale, layout, rotate_k_in_loop=True, config=None):
    """Launch the fused forward. q/k/v in `layout` ("bshd" or "bhsd"), last dim contiguous;
    increments int32 [2, P] (rotary.turn_increments); q_positions [B, Nq] and k_positions
    [B or 1, Nk] ints or None (arange, queries offset by Nk - Nq); q_temperature [B, Nq]
    float32 or None. With rotate_k_in_loop (the default, the variant verified and timed on
    H100 so far) each K tile is rotated inside the attention loop from a cos/sin table of
    the key positions; without it K is rotated once for the call (rope.py) into a scratch
    buffer that is not kept, and the loop is a plain flash loop (not yet run on a GPU; see
    bench/RESULTS.md). Returns out (q's layout and dtype) and lse [B, Hq, Nq] float32."""
    batch, nq, hq, head_dim = q.shape if layout == "bshd" else (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    nk, hkv = (k.shape[1], k.shape[2]) if layout == "bshd" else (k.shape[2], k.shape[1])
    pairs = rotary_dim // 2
    d_pad = _dot_pad(head_dim)
    block_m, block_n, num_warps, num_stages = config or fwd_config(d_pad, q.dtype, q.is_cuda)
    if rotate_k_in_loop:
        cos_k, sin_k = rope_table(k_positions, nk, 0, increments)
        table_stride = cos_k.stride(0) if cos_k.shape[0] > 1 else 0
    else:
        k = rope(k, increments, k_positions, 0, rotary_dim=rotary_dim, interleaved=interleaved, layout=layout)
        cos_k = sin_k = increments  # unused
        table_stride = 0
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, nq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(nq, block_m), batch * hq)
    rope_attention_fwd_kernel[grid](
        q, k, v, out, lse, increments, cos_k, sin_k, q_positions, q_temperature,
        *bshd_strides(q, layout), *bshd_strides(k, layout), *bshd_strides(v, layout), *bshd_strides(out, layout),
        table_stride, *row_strides(q_positions), *row_strides(q_temperature),
        nq, nk, hq, hq // hkv, softmax_scale * LOG2E, rotary_scale * rotary_scale,
        PAIRS=pairs, PAIRS_PAD=_dot_pad(pairs), PASS=head_dim - rotary_dim,
        PASS_PAD=_dot_pad(head_dim - rotary_dim), ROTARY_DIM=rotary_dim, HEAD_DIM=head_dim,
        D_PAD=d_pad, INTERLEAVED=interleaved, CAUSAL=causal, HAS_QPOS=q_positions is not None,
        HAS_QTEMP=q_temperature is not None, ROTATE_K=rotate_k_in_loop, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
