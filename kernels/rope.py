"""Standalone scaled RoPE: rotate a [B, N, H, D] tensor (any strides) at given positions.

One program owns BLOCK_N positions of one sequence and HEADS_PER_PROGRAM of its heads: it
computes their angles once (rotary.sincos_at, exact fixed-point phases) and rotates each of
those heads with them. INVERSE
applies the transposed rotation (the backward of a rotation, and how gradients of rotated
tensors go back to the unrotated frame). Scales: `scale` on the rotated features,
`pass_scale` on the pass-through ones, and an optional per-position ROW_SCALE on both (the
attention folds softmax scale, rotary_scale**2, log2(e) and the temperature into queries).
SLOT_HALF > 0 writes the Hopper attention kernel's feature order instead of the natural one
(kernels/hopper/attention_fwd.py): pair i's halves at features i and SLOT_HALF + i, pass-
through feature c at (c % 2) SLOT_HALF + c // 2, zeros in the slots past the head dim.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2, scratch
from .rotary import load_increments, load_pairs, rotate_pairs, sincos_at, store_pairs


@triton.jit
def rope_kernel(X, OUT, POS, INV_FREQ, ROW_SCALE, stride_xb, stride_xn, stride_xh, stride_ob, stride_on, stride_oh,
                stride_pos_b, stride_pos_n, stride_row_b, stride_row_n, N, H, offset, scale, pass_scale,
                HEADS_PER_PROGRAM,
                PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
                ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_POS: tl.constexpr,
                HAS_ROW_SCALE: tl.constexpr, INVERSE: tl.constexpr, SLOT_HALF: tl.constexpr, BLOCK_N: tl.constexpr):
    # 64-bit batch and head indices: their offsets pass 2**31 in large (sequence-major) tensors
    pid_n, pid_b, pid_h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    if HAS_POS:
        pos = tl.load(POS + pid_b * stride_pos_b + offs * stride_pos_n, mask=mask, other=0).to(tl.int32)
    else:
        pos = offs + offset
    inc_hi, inc_lo = load_increments(INV_FREQ, PAIRS, PAIRS_PAD)
    cos, sin = sincos_at(pos, inc_hi, inc_lo)
    row_scale = tl.full((BLOCK_N,), 1.0, tl.float32)
    if HAS_ROW_SCALE:
        row_scale = tl.load(ROW_SCALE + pid_b * stride_row_b + offs * stride_row_n, mask=mask, other=0.0)
    cos, sin = cos * (scale * row_scale)[:, None], sin * (scale * row_scale)[:, None]
    if INVERSE:
        sin = -sin
    rows = offs.to(tl.int64)
    cols = tl.arange(0, PASS_PAD)
    for i in range(0, HEADS_PER_PROGRAM):
        # a 64-bit head index: its offset passes 2**31 in large (sequence-major) tensors. The
        # bound is checked inside: Triton 3.6's interpreter takes no tensor loop bounds.
        h = pid_h * HEADS_PER_PROGRAM + i
        if h < H:
            x_ptr = X + pid_b * stride_xb + h * stride_xh
            o_ptr = OUT + pid_b * stride_ob + h * stride_oh
            a, b = load_pairs(x_ptr, rows, mask, stride_xn, PAIRS, PAIRS_PAD, INTERLEAVED)
            a, b = rotate_pairs(a, b, cos, sin)
            store_pairs(o_ptr, a.to(OUT.dtype.element_ty), b.to(OUT.dtype.element_ty), rows, mask, stride_on,
                        PAIRS, PAIRS_PAD, INTERLEAVED, SLOT_HALF if SLOT_HALF > 0 else PAIRS)
            if SLOT_HALF > 0:  # pass-through slots s in [PAIRS, SLOT_HALF) of each half: features 2s, 2s + 1
                slots = PAIRS + tl.arange(0, PASS_PAD)
                in_half = mask[:, None] & (slots < SLOT_HALF)[None, :]
                for half in tl.static_range(2):
                    feature = 2 * slots + half
                    x = tl.load(x_ptr + rows[:, None] * stride_xn + feature[None, :],
                                mask=in_half & (feature < ROTARY_DIM + PASS)[None, :], other=0.0)
                    x = x.to(tl.float32) * (pass_scale * row_scale)[:, None]
                    tl.store(o_ptr + rows[:, None] * stride_on + (half * SLOT_HALF + slots)[None, :],
                             x.to(OUT.dtype.element_ty), mask=in_half)
            elif PASS > 0:
                pass_mask = mask[:, None] & (cols[None, :] < PASS)
                x = tl.load(x_ptr + rows[:, None] * stride_xn + ROTARY_DIM + cols[None, :], mask=pass_mask)
                x = x.to(tl.float32) * (pass_scale * row_scale)[:, None]
                tl.store(o_ptr + rows[:, None] * stride_on + ROTARY_DIM + cols[None, :], x.to(OUT.dtype.element_ty),
                         mask=pass_mask)


def row_strides(t):
    """(batch, seq) strides of a [B or 1, N] per-position tensor (batch stride 0 when shared), or (0, 0)."""
    return (0, 0) if t is None else (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1))


def slot_order(head_dim_pad, rotary_dim, interleaved):
    """Whether the Hopper kernels' feature order (`kernels.hopper.attention_fwd`) differs from
    the natural one: half-split pairs that do not fill the padded head dim."""
    return not interleaved and rotary_dim < head_dim_pad


class RopeConfig(NamedTuple):
    """Launch configuration of `rope_kernel`."""

    block_n: int  # positions per program
    heads_per_program: int
    num_warps: int


# Every GPU: the H100 sweep in bench/RESULTS.md (`python -m bench.sweep rope`) read 2.3-2.4 TB/s
# at D = 64, 128, 256 whatever the split; wider row blocks fall off at D >= 128.
ROPE_CONFIG = RopeConfig(16, 4, 4)


def rope(x, inv_freq, positions, offset, *, rotary_dim, interleaved, scale=1.0, pass_scale=1.0, row_scale=None,
         inverse=False, out=None, slot_half=0, config=None):
    """Rotate x [B, N, H, D] (any strides, last dim contiguous) with inv_freq float32
    [rotary_dim / 2] at positions [B or 1, N] (or offset + arange(N) when None): amplitude
    `scale` on the rotated features, `pass_scale` on the others, and row_scale [B or 1, N]
    float32 (optional) on every feature of a position.
    Writes `out` (default: a new tensor like x; may be x itself: each program loads its
    rows before storing them) and returns it; slot_half > 0 writes the Hopper attention
    kernel's feature order, 2 slot_half features wide (the module docstring). config: a
    `RopeConfig`, for sweeps (default `ROPE_CONFIG`)."""
    batch, n, heads, head_dim = x.shape
    out = scratch("out", torch.empty_like(x)) if out is None else out
    pairs, passthrough = rotary_dim // 2, head_dim - rotary_dim
    slots = slot_half - pairs if slot_half else passthrough  # pass-through slots per half, or features
    block_n, heads_per_program, num_warps = config or ROPE_CONFIG
    grid = (cdiv(n, block_n), batch, cdiv(heads, heads_per_program))
    launch(
        rope_kernel, grid,
        x, out, positions, inv_freq, row_scale, *x.stride()[:3], *out.stride()[:3],
        *row_strides(positions), *row_strides(row_scale), n, heads, offset, scale, pass_scale, heads_per_program,
        PAIRS=pairs, PAIRS_PAD=next_power_of_2(pairs), PASS=passthrough,
        PASS_PAD=next_power_of_2(max(slots, 1)), ROTARY_DIM=rotary_dim, INTERLEAVED=interleaved,
        HAS_POS=positions is not None, HAS_ROW_SCALE=row_scale is not None, INVERSE=inverse, SLOT_HALF=slot_half,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out


def frequency_grad(grad, rotated, positions, *, rotary_dim, interleaved):
    """d loss / d inv_freq [P] (float64) from one rotated tensor: for each row and pair,
    d theta = g_b x_a - g_a x_b (x = the rotated tensor, g = the gradient it received; any
    amplitude or row scale common to both cancels), summed over heads, then
    sum over rows of position * d theta. grad and rotated [B, N, H, D]; positions [B or 1, N]
    ints."""
    g, x = grad.float()[..., :rotary_dim], rotated.float()[..., :rotary_dim]
    if interleaved:
        g_a, g_b, x_a, x_b = g[..., 0::2], g[..., 1::2], x[..., 0::2], x[..., 1::2]
    else:
        (g_a, g_b), (x_a, x_b) = g.chunk(2, -1), x.chunk(2, -1)
    dtheta = (g_b * x_a - g_a * x_b).sum(2)  # [B, N, P]
    return (positions.to(torch.float64)[..., None] * dtheta).sum((0, 1))
