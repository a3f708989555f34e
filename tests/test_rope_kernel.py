"""The standalone rope kernel (kernels/rope.py) against reference.rotate."""

import pytest
import torch
import triton
import triton.language as tl

from ropefast.kernels.rope import rope
from ropefast.kernels.rotary import load_increments, sincos_at
from ropefast.reference import rotate

from conftest import DEVICE, rel_err, requires_kernel

pytestmark = requires_kernel


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("memory", ["bshd", "bhsd"])
@pytest.mark.parametrize("D,R", [(32, 32), (48, 24)])
def test_rope_matches_reference_and_inverts(interleaved, memory, D, R):
    gen = torch.Generator().manual_seed(0)
    B, N, H = 2, 37, 3
    x = torch.randn(B, N, H, D, generator=gen).to(DEVICE)
    pos = torch.randint(-5000, 2**20, (B, N), generator=gen).to(DEVICE)
    inv_freq = (torch.rand(R // 2, generator=gen) + 1e-3).to(DEVICE)
    row_scale = (torch.rand(B, N, generator=gen) + 0.5).to(DEVICE)
    # [B, N, H, D] views of either memory order: the kernel reads strides
    x_in = x if memory == "bshd" else x.transpose(1, 2).contiguous().transpose(1, 2)
    out = rope(x_in, inv_freq, pos, 0, rotary_dim=R, interleaved=interleaved, scale=1.3,
               pass_scale=0.7, row_scale=row_scale)
    assert out.stride() == x_in.stride()
    expect = rotate(x.double(), pos, inv_freq, rotary_dim=R, interleaved=interleaved, rotary_scale=1.3)
    expect[..., R:] *= 0.7
    expect = expect * row_scale.double()[:, :, None, None]
    assert rel_err(out, expect) < 1e-6
    # The transposed rotation undoes it (up to the amplitude).
    back = rope(out.contiguous(), inv_freq, pos, 0, rotary_dim=R, interleaved=interleaved,
                scale=1 / 1.3, pass_scale=1 / 0.7, inverse=True, row_scale=1 / row_scale)
    assert rel_err(back, x) < 1e-6


@triton.jit
def _sincos_table(POS, INV_FREQ, COS, SIN, ROWS: tl.constexpr, PAIRS: tl.constexpr):
    cos, sin = sincos_at(tl.load(POS + tl.arange(0, ROWS)), *load_increments(INV_FREQ, PAIRS, PAIRS))
    offs = tl.arange(0, ROWS)[:, None] * PAIRS + tl.arange(0, PAIRS)[None, :]
    tl.store(COS + offs, cos)
    tl.store(SIN + offs, sin)


def test_angles_match_float64_at_large_positions():
    # Every quadrant, negative positions, 2**20 and frequencies up to 2 pi.
    gen = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.randint(-2**20, 2**20, (60,), generator=gen), torch.tensor([0, 1, -1, 2**20])])
    inv_freq = torch.cat([torch.rand(28, generator=gen) * 2, torch.tensor([1.0, 1e-4, 3.1415927, 6.2831855])])
    cos, sin = torch.full((64, 32), float("nan")), torch.full((64, 32), float("nan"))  # poisoned
    args = [t.to(DEVICE) for t in (pos.int(), inv_freq, cos, sin)]
    _sincos_table[(1,)](*args, ROWS=64, PAIRS=32)
    theta = pos.double()[:, None] * inv_freq.double()[None, :]
    assert (args[2].cpu().double() - theta.cos()).abs().max() < 2e-7
    assert (args[3].cpu().double() - theta.sin()).abs().max() < 2e-7
