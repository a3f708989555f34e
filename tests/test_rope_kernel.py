"""The standalone rope kernel (kernels/rope.py) against reference.rotate."""

import os

import pytest
import torch

from ropefast.kernels.rope import rope
from ropefast.reference import rotate

from conftest import rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("D,R", [(32, 32), (48, 24)])
def test_rope_matches_reference_and_inverts(interleaved, layout, D, R):
    gen = torch.Generator().manual_seed(0)
    B, N, H = 2, 37, 3
    x = torch.randn(B, N, H, D, generator=gen).to(DEVICE)
    pos = torch.randint(-5000, 2**20, (B, N), generator=gen).to(DEVICE)
    inv_freq = (torch.rand(R // 2, generator=gen) + 1e-3).to(DEVICE)
    row_scale = (torch.rand(B, N, generator=gen) + 0.5).to(DEVICE)
    x_in = x if layout == "bshd" else x.transpose(1, 2).contiguous()
    out = rope(x_in, inv_freq, pos, 0, rotary_dim=R, interleaved=interleaved, scale=1.3,
               pass_scale=0.7, row_scale=row_scale, layout=layout)
    out = out if layout == "bshd" else out.transpose(1, 2)
    expect = rotate(x.double(), pos, inv_freq, rotary_dim=R, interleaved=interleaved, rotary_scale=1.3)
    expect[..., R:] *= 0.7
    expect = expect * row_scale.double()[:, :, None, None]
    assert rel_err(out, expect) < 1e-6
    # The transposed rotation undoes it (up to the amplitude).
    back = rope(out.contiguous(), inv_freq, pos, 0, rotary_dim=R, interleaved=interleaved,
                scale=1 / 1.3, pass_scale=1 / 0.7, inverse=True, row_scale=1 / row_scale)
    assert rel_err(back, x) < 1e-6
