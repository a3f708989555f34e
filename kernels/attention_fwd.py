"""Scaled rotary attention forward: two rope passes, then a flash-attention kernel.

rope.py rotates q and k once per call into scratch buffers that are not kept: Q^ carries
every logit scale (rotary_scale**2 on the rotated features, softmax_scale, the query's
temperature, log2(e)), K^ is the plain rotation. Each pass reads and writes its tensor once
(0.055 ms for 16k tokens x 16 heads x 128 on H100; the two passes are about 9% of a
forward call at N = 4k, 2-3% at 16k). The kernel is then a plain flash loop: one program owns BLOCK_M queries of one
(batch, query head), streams K^ and V tiles of the matching KV head (GQA by index, no
repeated KV) through TMA descriptors (asynchronous, pipelined with the dots), and keeps an
online softmax in base 2.

Measured alternatives (H100, bench/RESULTS.md): rotating each K tile inside the loop was
1.5x slower (the rotated tile goes registers -> shared memory before its dot, once per
query tile), and rotating Q inside the kernel's prologue cost 255 registers with spills and
~35 us per program (~0.55 ms per call at 2048 programs), 10x the rope pass it replaces.
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .rope import bshd_strides, rope

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, off_b, off_hkv, offs_m, start_n, NQ, NK,
              D_PAD: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """One K/V tile of the online softmax. MASKED tiles check key bounds and causality
    (the descriptors zero-fill keys past NK; their logits still need -inf)."""
    k = k_desc.load([off_b, start_n, off_hkv, 0]).reshape(BLOCK_N, D_PAD)
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
    v = v_desc.load([off_b, start_n, off_hkv, 0]).reshape(BLOCK_N, D_PAD)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def rope_attention_fwd_kernel(
    q_desc, k_desc, v_desc, O, LSE, stride_ob, stride_on, stride_oh, NQ, NK, HQ, GROUP,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Flash attention over Q^ (rotated, every logit scale folded in, base 2) and K^ (rotated)."""
    # Causal: the last query tiles see the most keys; launching them first shortens the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // HQ
    off_h = pid_bh % HQ
    off_hkv = off_h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = q_desc.load([off_b, pid_m * BLOCK_M, off_h, 0]).reshape(BLOCK_M, D_PAD)

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
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, off_b, off_hkv, offs_m, start_n, NQ, NK,
                                  D_PAD, CAUSAL, False, BLOCK_N, DOT_PRECISION)
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_desc, v_desc, off_b, off_hkv, offs_m, start_n, NQ, NK,
                                  D_PAD, CAUSAL, True, BLOCK_N, DOT_PRECISION)

    # A row that saw no key (causal, Nq > Nk) gets out = 0 and lse = -inf.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    d = tl.arange(0, D_PAD)
    o_ptr = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    tl.store(o_ptr + offs_m.to(tl.int64)[:, None] * stride_on + d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m < NQ)[:, None] & (d[None, :] < HEAD_DIM))
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * NQ + offs_m, lse, mask=offs_m < NQ)


def _dot_pad(n):
    """Power-of-two tile width >= 16 (tl.dot's smallest reduction size)."""
    return max(16, triton.next_power_of_2(n))


def fwd_config(head_dim_pad, is_cuda):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, from the H100 sweeps in
    bench/RESULTS.md."""
    if not is_cuda:  # the interpreter: larger tiles, fewer programs
        return 32, 32, 4, 1
    if head_dim_pad <= 64:
        return 128, 64, 4, 4
    if head_dim_pad <= 128:
        return 128, 128, 8, 3
    return 128, 32, 8, 3


def tile_descriptor(x, layout, block_rows, d_pad):
    """A TMA descriptor over a q, k or v-shaped tensor in either layout, indexed as
    [b, n, h, feature], loading [1, block_rows, 1, d_pad] tiles (rows past N and features
    past D read as zero)."""
    batch, n, heads, head_dim = x.shape if layout == "bshd" else (x.shape[0], x.shape[2], x.shape[1], x.shape[3])
    return TensorDescriptor(x, [batch, n, heads, head_dim], [*bshd_strides(x, layout), 1], [1, block_rows, 1, d_pad])


def tma_readable(x):
    """Whether TMA can read x: last dim contiguous, 16-byte aligned data and strides."""
    size = x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in x.stride()[:-1])


def q_scales(softmax_scale, rotary_scale):
    """The query rope pass's scales: every logit scale but the per-query temperature (its
    row scale), in base 2: c log2(e) m^2 on the rotated features, c log2(e) on the rest."""
    return dict(scale=softmax_scale * LOG2E * rotary_scale**2, pass_scale=softmax_scale * LOG2E)


def rotate_q_k(q, k, inv_freq, q_positions, k_positions, q_temperature, *, rotary_dim, interleaved, softmax_scale,
               rotary_scale, layout):
    """The two rope passes of forward and backward: Q^ = c log2(e) t [m^2 R q_rot, q_pass]
    (c = softmax_scale, t = temperature, m = rotary_scale) and K^ = R k, into scratch
    buffers for this call only. Queries default to positions Nk - Nq + arange(Nq)."""
    nq, nk = (q.shape[1], k.shape[1]) if layout == "bshd" else (q.shape[2], k.shape[2])
    q_rot = rope(q, inv_freq, q_positions, nk - nq, rotary_dim=rotary_dim, interleaved=interleaved,
                 row_scale=q_temperature, layout=layout, **q_scales(softmax_scale, rotary_scale))
    k_rot = rope(k, inv_freq, k_positions, 0, rotary_dim=rotary_dim, interleaved=interleaved, layout=layout)
    return q_rot, k_rot


def rope_attention_fwd(q, k, v, inv_freq, q_positions, k_positions, q_temperature, *, rotary_dim, interleaved,
                       causal, softmax_scale, rotary_scale, layout, config=None):
    """Scaled rotary attention forward: the two rope passes, then the flash kernel. q/k/v
    in `layout` ("bshd" or "bhsd"), last dim contiguous, v 16-byte aligned (TMA);
    inv_freq float32 [rotary_dim / 2]; q_positions [B, Nq] and k_positions
    [B or 1, Nk] ints or None; q_temperature [B, Nq] float32 or None. Returns out (q's
    layout and dtype) and lse [B, Hq, Nq] float32 (natural log)."""
    batch, nq, hq, head_dim = q.shape if layout == "bshd" else (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    nk, hkv = (k.shape[1], k.shape[2]) if layout == "bshd" else (k.shape[2], k.shape[1])
    d_pad = _dot_pad(head_dim)
    block_m, block_n, num_warps, num_stages = config or fwd_config(d_pad, q.is_cuda)
    q_rot, k_rot = rotate_q_k(q, k, inv_freq, q_positions, k_positions, q_temperature, rotary_dim=rotary_dim,
                              interleaved=interleaved, softmax_scale=softmax_scale, rotary_scale=rotary_scale,
                              layout=layout)
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, nq, device=q.device, dtype=torch.float32)
    rope_attention_fwd_kernel[(triton.cdiv(nq, block_m), batch * hq)](
        tile_descriptor(q_rot, layout, block_m, d_pad), tile_descriptor(k_rot, layout, block_n, d_pad),
        tile_descriptor(v, layout, block_n, d_pad), out, lse, *bshd_strides(out, layout), nq, nk, hq, hq // hkv,
        HEAD_DIM=head_dim, D_PAD=d_pad, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
