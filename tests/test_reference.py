"""The reference against hand-computable cases and the identities the operation must obey."""

import math

import pytest
import torch

from ropefast.reference import rotate, scaled_rope_attention_reference as ref_attn
from ropefast.schedules.base import default_inv_freq

from conftest import rel_err

F64 = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=F64)


def inv_freq(rotary_dim, base=10000.0):
    return default_inv_freq(rotary_dim, base).float()


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_by_known_angles(interleaved):
    # One pair per frequency: feature a = 1, b = 0 rotates to (m cos theta, m sin theta).
    rotary_dim, p, scale = 8, 7, 1.5
    f = torch.tensor([1.0, 0.5, 0.25, 0.125])
    x = torch.zeros(1, 1, 1, rotary_dim, dtype=F64)
    a_idx = torch.arange(0, rotary_dim, 2) if interleaved else torch.arange(rotary_dim // 2)
    b_idx = a_idx + 1 if interleaved else a_idx + rotary_dim // 2
    x[..., a_idx] = 1.0
    out = rotate(x, torch.tensor([[p]]), f, interleaved=interleaved, rotary_scale=scale)[0, 0, 0]
    expect_cos = torch.tensor([scale * math.cos(p * fi) for fi in f.tolist()], dtype=F64)
    expect_sin = torch.tensor([scale * math.sin(p * fi) for fi in f.tolist()], dtype=F64)
    torch.testing.assert_close(out[a_idx], expect_cos, rtol=0, atol=1e-14)
    torch.testing.assert_close(out[b_idx], expect_sin, rtol=0, atol=1e-14)


def test_rotation_is_complex_multiplication_and_passes_the_rest():
    B, N, H, D, R = 2, 5, 3, 12, 8
    x = rand(B, N, H, D)
    pos = torch.randint(0, 10**6, (B, N))
    f = inv_freq(R)
    out = rotate(x, pos, f, rotary_dim=R)
    z = torch.complex(x[..., : R // 2], x[..., R // 2 : R])
    angle = pos.double()[..., None, None] * f.double()
    z_rot = z * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(out[..., : R // 2], z_rot.real, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[..., R // 2 : R], z_rot.imag, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[..., R:], x[..., R:], rtol=0, atol=0)


def test_interleaved_equals_half_split_after_permutation():
    B, N, H, D, R = 2, 6, 2, 16, 12
    q, k, v = rand(B, N, H, D), rand(B, N, H, D), rand(B, N, H, D)
    f = inv_freq(R)
    # interleaved pair i = (2i, 2i+1) is half-split pair i = (i, i + R/2) after this permutation
    perm = torch.cat((torch.arange(0, R, 2), torch.arange(1, R, 2), torch.arange(R, D)))
    out_inter = ref_attn(q, k, v, inv_freq=f, rotary_dim=R, interleaved=True)
    out_half = ref_attn(q[..., perm], k[..., perm], v, inv_freq=f, rotary_dim=R, interleaved=False)
    assert rel_err(out_inter, out_half) < 1e-13


def test_gqa_equals_repeated_kv_heads():
    B, Nq, Nk, Hq, Hkv, D = 2, 5, 7, 6, 2, 16
    q, k, v = rand(B, Nq, Hq, D), rand(B, Nk, Hkv, D), rand(B, Nk, Hkv, D)
    f = inv_freq(D)
    out = ref_attn(q, k, v, inv_freq=f, causal=True)
    out_rep = ref_attn(q, k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2), inv_freq=f, causal=True)
    assert rel_err(out, out_rep) < 1e-14


def test_q_temperature_equals_scaling_q():
    B, N, H, D = 2, 6, 2, 16
    q, k, v = rand(B, N, H, D), rand(B, N, H, D), rand(B, N, H, D)
    t = torch.rand(B, N, dtype=F64) + 0.5
    f = inv_freq(D)
    out_t = ref_attn(q, k, v, inv_freq=f, q_temperature=t)
    out_q = ref_attn(q * t[:, :, None, None], k, v, inv_freq=f)
    assert rel_err(out_t, out_q) < 1e-13


def test_rotary_scale_squares_into_the_logits():
    B, N, H, D, m = 1, 6, 2, 16, 1.3
    q, k, v = rand(B, N, H, D), rand(B, N, H, D), rand(B, N, H, D)
    f = inv_freq(D)
    out_m = ref_attn(q, k, v, inv_freq=f, rotary_scale=m)
    out_s = ref_attn(q, k, v, inv_freq=f, softmax_scale=D**-0.5 * m * m)
    assert rel_err(out_m, out_s) < 1e-13


def _naive_attention(q_rot, k_rot, v, allowed, scale):
    # q_rot [Nq, D], k_rot [Nk, D], v [Nk, D], allowed [Nq, Nk] bool: one query at a time.
    out = torch.zeros(q_rot.shape[0], v.shape[1], dtype=F64)
    lse = torch.full((q_rot.shape[0],), float("-inf"), dtype=F64)
    for i in range(q_rot.shape[0]):
        js = allowed[i].nonzero().flatten()
        if len(js) == 0:
            continue
        s = scale * (k_rot[js] @ q_rot[i])
        lse[i] = math.log(sum(math.exp(x) for x in s.tolist()))
        out[i] = (torch.exp(s - lse[i])[:, None] * v[js]).sum(0)
    return out, lse


@pytest.mark.parametrize("nq,nk", [(3, 8), (8, 8), (8, 3)])
def test_causal_bottom_right_alignment_and_lse(nq, nk):
    D = 8
    q, k, v = rand(1, nq, 1, D), rand(1, nk, 1, D), rand(1, nk, 1, D)
    f = inv_freq(D)
    out, lse = ref_attn(q, k, v, inv_freq=f, causal=True, return_lse=True)
    q_rot = rotate(q, torch.arange(nq)[None] + nk - nq, f)[0, :, 0]
    k_rot = rotate(k, torch.arange(nk)[None], f)[0, :, 0]
    allowed = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
    out_naive, lse_naive = _naive_attention(q_rot, k_rot, v[0, :, 0], allowed, D**-0.5)
    torch.testing.assert_close(out[0, :, 0], out_naive, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[0, 0].double(), lse_naive.float().double(), rtol=1e-6, atol=0)
    assert lse.dtype == torch.float32 and lse.shape == (1, 1, nq)


def test_relative_positions_only():
    # Shifting every position by the same amount leaves attention unchanged (RoPE is relative).
    B, N, H, D = 1, 6, 2, 16
    q, k, v = rand(B, N, H, D), rand(B, N, H, D), rand(B, N, H, D)
    f = inv_freq(D)
    pos = torch.randint(0, 1000, (B, N))
    out0 = ref_attn(q, k, v, inv_freq=f, q_positions=pos, k_positions=pos)
    out1 = ref_attn(q, k, v, inv_freq=f, q_positions=pos + 12345, k_positions=pos + 12345)
    assert rel_err(out0, out1) < 1e-9


def test_bhsd_layout_equals_bshd():
    B, N, H, D = 2, 5, 4, 16
    q, k, v = rand(B, N, H, D), rand(B, N, 2, D), rand(B, N, 2, D)
    f = inv_freq(D)
    out = ref_attn(q, k, v, inv_freq=f, causal=True)
    out_t = ref_attn(*(x.transpose(1, 2) for x in (q, k, v)), inv_freq=f, causal=True, layout="bhsd")
    assert rel_err(out, out_t.transpose(1, 2)) < 1e-15


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = rand(1, 5, 1, 8), rand(1, 2, 1, 8), rand(1, 2, 1, 8)
    out, lse = ref_attn(q, k, v, inv_freq=inv_freq(8), causal=True, return_lse=True)
    # Nk - Nq = -3: queries 0..2 see no key.
    assert torch.all(out[0, :3] == 0) and torch.all(torch.isneginf(lse[0, 0, :3]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[0, 0, 3:]).all()


def test_low_precision_inputs_compute_in_float32_and_keep_dtype():
    q, k, v = (rand(1, 4, 1, 8).half() for _ in range(3))
    out = ref_attn(q, k, v, inv_freq=inv_freq(8))
    assert out.dtype == torch.float16
    assert rel_err(out, ref_attn(q.double(), k.double(), v.double(), inv_freq=inv_freq(8))) < 1e-3
