"""The public standalone op `apply_scaled_rope`: forward and gradients (x and inv_freq)
against autograd through `reference.rotate` in float64."""

import pytest
import torch

from ropefast import apply_scaled_rope, schedules
from ropefast.reference import rotate

from conftest import DEVICE, TOLERANCE, rel_err, requires_kernel


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("D,R,interleaved,positions", [(32, 32, False, False), (48, 32, True, True),
                                                       (40, 24, False, True)])
def test_apply_scaled_rope_forward_and_grads(dtype, layout, D, R, interleaved, positions):
    gen = torch.Generator().manual_seed(0)
    B, N, H = 2, 33, 3
    x = torch.randn(B, N, H, D, generator=gen)
    pos = torch.randint(0, 10**5, (B, N), generator=gen) if positions else torch.arange(N).expand(B, N)
    inv_freq = schedules.YaRN(R, factor=4.0, original_max_position_embeddings=16).inv_freq()
    grad = torch.randn(B, N, H, D, generator=gen)

    x_dev = (x if layout == "bshd" else x.transpose(1, 2)).to(DEVICE, dtype, copy=True).contiguous().requires_grad_()
    f_dev = inv_freq.to(DEVICE, copy=True).requires_grad_()
    out = apply_scaled_rope(x_dev, inv_freq=f_dev, positions=pos.to(DEVICE) if positions else None,
                            rotary_dim=R, interleaved=interleaved, rotary_scale=1.2, layout=layout)
    g_dev = (grad if layout == "bshd" else grad.transpose(1, 2)).contiguous().to(DEVICE, dtype)
    out.backward(g_dev)

    x64 = x.double().requires_grad_()
    f64 = inv_freq.double().requires_grad_()
    ref = rotate(x64, pos, f64, rotary_dim=R, interleaved=interleaved, rotary_scale=1.2)
    ref.backward(grad.double())
    as_bshd = (lambda t: t) if layout == "bshd" else (lambda t: t.transpose(1, 2))
    assert out.dtype == dtype and out.shape == x_dev.shape
    assert rel_err(as_bshd(out), ref) < TOLERANCE[dtype]
    assert rel_err(as_bshd(x_dev.grad), x64.grad) < TOLERANCE[dtype]
    assert rel_err(f_dev.grad, f64.grad) < (1e-5 if dtype == torch.float32 else 3e-3)


def test_apply_scaled_rope_reference_path_and_schedule():
    x = torch.randn(1, 9, 2, 16, dtype=torch.float64)
    s = schedules.YaRN(16, factor=2.0, original_max_position_embeddings=4)
    out = apply_scaled_rope(x, schedule=s)
    expect = rotate(x, torch.arange(9)[None], s.inv_freq(), rotary_scale=s.rotary_scale())
    assert rel_err(out, expect) < 1e-14


@pytest.mark.parametrize("kwargs,error", [
    (dict(), ValueError), (dict(inv_freq=torch.ones(4), schedule=schedules.DefaultRope(16)), ValueError),
    (dict(inv_freq=torch.ones(8).half()), TypeError), (dict(inv_freq=torch.ones(9)), ValueError),
    (dict(inv_freq=torch.ones(8), positions=torch.zeros(5, dtype=torch.long)), ValueError),
    (dict(inv_freq=torch.ones(8), layout="sbhd"), ValueError),
    (dict(inv_freq=torch.ones(8), rotary_scale=0.0), ValueError),
])
def test_apply_scaled_rope_rejects_bad_input(kwargs, error):
    with pytest.raises(error):
        apply_scaled_rope(torch.randn(1, 9, 2, 16), **kwargs)
