"""Rotary angles and tile rotation shared by the attention kernels.

Accurate angles at large positions. A naive kernel computes theta = p * f in float32,
whose rounding error grows with p (about 0.03 rad at p = 2**20, f = 1). Only theta mod
2*pi matters, so we work in *turns*: each program converts its float32 frequencies, in
float64, to u = frac(f / (2*pi)) as a 64-bit fixed-point fraction (hi, lo: two uint32
words; a few float64 operations per frequency, and no host-side preparation per call).
The phase p * u mod 1 is then taken exactly with integer arithmetic, keeping its top 32 bits:
    phase = p * hi + umulhi(p, lo)   (mod 2**32, wrapping; |p| < 2**31)
and split into a quarter turn k and a remainder x in [-pi/4, pi/4) (`sincos_at`). The error
is a few units of 2**-32 turns (~1e-9 rad) plus one float32 rounding of a number below
pi/4, for any position below 2**31, far below the fp32 rounding of p * f itself (measured:
cos and sin within 1e-7 of float64 at positions up to 2**20).
"""

import triton
import triton.language as tl


@triton.jit
def _phase(pos, inc_hi, inc_lo):
    """pos[:, None] * f[None, :] in 2**-32 turns, mod one turn (uint32 [M, P], exact)."""
    magnitude = tl.abs(pos).to(tl.uint32)[:, None]
    phase = magnitude * inc_hi[None, :] + tl.umulhi(magnitude, inc_lo[None, :])
    return tl.where(pos[:, None] < 0, 0 - phase, phase)  # p * f is odd in p


@triton.jit
def sincos_at(pos, inc_hi, inc_lo):
    """cos and sin of pos[:, None] * f[None, :] as float32 [M, P]; pos int32 [M],
    inc_hi / inc_lo uint32 [P] from `load_increments`. The phase's top two bits (rounded)
    pick the quadrant k, the rest is x in [-pi/4, pi/4); cos and sin of x are Taylor
    polynomials (degree 10 and 9: error below 3e-9, under float32 rounding), then turned by
    k quarter turns: 3x closer to float64 than tl.cos / tl.sin of the angle in [-pi, pi),
    and no libdevice range reduction (whose slow path keeps an array in local memory)."""
    phase = _phase(pos, inc_hi, inc_lo)
    quadrant = (phase + 0x20000000) >> 30  # round(turns * 4) mod 4
    x = (phase - (quadrant << 30)).to(tl.int32, bitcast=True).to(tl.float32) * 1.4629180792671596e-09  # 2 pi / 2**32
    x2 = x * x
    sin_x = x + x * x2 * (-0.16666666666666666 + x2 * (8.333333333333333e-3 + x2 * (
        -1.984126984126984e-4 + x2 * 2.7557319223985893e-6)))
    cos_x = 1.0 + x2 * (-0.5 + x2 * (4.1666666666666664e-2 + x2 * (-1.388888888888889e-3 + x2 * (
        2.48015873015873e-5 - x2 * 2.755731922398589e-7))))
    odd = (quadrant & 1) != 0
    cos = tl.where(odd, sin_x, cos_x)
    sin = tl.where(odd, cos_x, sin_x)
    cos = tl.where(((quadrant + 1) & 2) != 0, -cos, cos)  # k = 1, 2
    sin = tl.where((quadrant & 2) != 0, -sin, sin)  # k = 2, 3
    return cos, sin


@triton.jit
def sincos_mufu(pos, inc_hi, inc_lo):
    """As `sincos_at`, but the special-function unit's cos.approx / sin.approx evaluate the
    exact phase's remainder in [-pi, pi): absolute error below 1e-6 (as the Hopper forward),
    about a fifth of the instructions, for kernels that rotate every key they read (decode).
    Compiled GPUs only: the interpreter runs no inline assembly."""
    x = _phase(pos, inc_hi, inc_lo).to(tl.int32, bitcast=True).to(tl.float32) * 1.4629180792671596e-09  # 2 pi / 2**32
    return tl.inline_asm_elementwise("cos.approx.f32 $0, $2;\n\tsin.approx.f32 $1, $2;", "=f,=f,f", [x],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def load_increments(INV_FREQ, PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr):
    """inv_freq float32 [PAIRS] -> (hi, lo) uint32 [PAIRS_PAD]: frac(f / 2pi) * 2**64 in
    fixed point, computed in float64 (scaling by powers of two is exact there)."""
    offs = tl.arange(0, PAIRS_PAD)
    turns = tl.load(INV_FREQ + offs, mask=offs < PAIRS, other=0.0).to(tl.float64) / 6.283185307179586
    scaled = (turns - tl.floor(turns)) * 4294967296.0  # 2**32
    hi = tl.floor(scaled)
    lo = tl.floor((scaled - hi) * 4294967296.0)
    return hi.to(tl.uint32), lo.to(tl.uint32)


@triton.jit
def load_pairs(ptr, offs_row, row_mask, stride_row, PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr,
               INTERLEAVED: tl.constexpr):
    """Load the rotated features of a [M, D] tile as its two pair halves (a, b), in the
    tensor's dtype, [M, PAIRS_PAD] each: a = features 2i / i, b = 2i+1 / i + PAIRS
    (interleaved / halves). `ptr` points at feature 0 of row 0; padded pairs load as 0."""
    rows = offs_row[:, None] * stride_row
    if INTERLEAVED:
        # One contiguous [M, 2 * PAIRS_PAD] load, then split the (even, odd) columns in registers.
        cols = tl.arange(0, 2 * PAIRS_PAD)
        x = tl.load(ptr + rows + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < 2 * PAIRS), other=0.0)
        a, b = tl.split(tl.reshape(x, (x.shape[0], PAIRS_PAD, 2)))
    else:
        cols = tl.arange(0, PAIRS_PAD)
        mask = row_mask[:, None] & (cols[None, :] < PAIRS)
        a = tl.load(ptr + rows + cols[None, :], mask=mask, other=0.0)
        b = tl.load(ptr + rows + (cols + PAIRS)[None, :], mask=mask, other=0.0)
    return a, b


@triton.jit
def store_pairs(ptr, a, b, offs_row, row_mask, stride_row, PAIRS: tl.constexpr, PAIRS_PAD: tl.constexpr,
                INTERLEAVED: tl.constexpr, B_START: tl.constexpr):
    """Inverse of `load_pairs`: write the halves (a, b) [M, PAIRS_PAD] back; b of
    half-split pairs goes to features B_START + i (PAIRS + i: in place)."""
    rows = offs_row[:, None] * stride_row
    if INTERLEAVED:
        cols = tl.arange(0, 2 * PAIRS_PAD)
        x = tl.reshape(tl.join(a, b), (a.shape[0], 2 * PAIRS_PAD))
        tl.store(ptr + rows + cols[None, :], x, mask=row_mask[:, None] & (cols[None, :] < 2 * PAIRS))
    else:
        cols = tl.arange(0, PAIRS_PAD)
        mask = row_mask[:, None] & (cols[None, :] < PAIRS)
        tl.store(ptr + rows + cols[None, :], a, mask=mask)
        tl.store(ptr + rows + (cols + B_START)[None, :], b, mask=mask)


@triton.jit
def rotate_pairs(a, b, cos, sin):
    """(a, b) -> (a cos - b sin, b cos + a sin) in float32."""
    a, b = a.to(tl.float32), b.to(tl.float32)
    return a * cos - b * sin, b * cos + a * sin
