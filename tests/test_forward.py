"""The fused forward kernel against the float64 reference.

CPU: through the Triton interpreter (TRITON_INTERPRET=1), float32 and float16, small shapes.
GPU: bfloat16 and float16 over realistic shapes, on the default path (the Gluon kernel on a
Hopper GPU) and on the portable kernels (skipped without CUDA).
"""

import contextlib

import pytest
import torch

from ropefast import dispatch, scaled_rope_attention, schedules
from ropefast.reference import scaled_rope_attention_reference

from conftest import DEVICE, TOLERANCE, rel_err, requires_cuda, requires_kernel


def run_case(B, Nq, Nk, Hq, Hkv, D, R, dtype, device, *, interleaved=False, causal=False, layout="bshd",
             positions=False, temperature=False, rotary_scale=1.0, base=10000.0, pos_scale=1, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape_q, shape_k = ((B, Nq, Hq, D), (B, Nk, Hkv, D)) if layout == "bshd" else ((B, Hq, Nq, D), (B, Hkv, Nk, D))
    q = torch.randn(shape_q, generator=gen).to(device, dtype)
    k = torch.randn(shape_k, generator=gen).to(device, dtype)
    v = torch.randn(shape_k, generator=gen).to(device, dtype)
    inv_freq = schedules.YaRN(R, base, factor=4.0, original_max_position_embeddings=64).inv_freq(device=device)
    kw = dict(rotary_dim=R, interleaved=interleaved, causal=causal, layout=layout, rotary_scale=rotary_scale)
    if positions:
        kw["q_positions"] = torch.randint(0, 1000 * pos_scale, (B, Nq), generator=gen).to(device)
        kw["k_positions"] = torch.randint(0, 1000 * pos_scale, (Nk,), generator=gen).to(device)
    if temperature:
        kw["q_temperature"] = (torch.rand(B, Nq, generator=gen) + 0.5).to(device)
    out, lse = scaled_rope_attention(q, k, v, inv_freq=inv_freq, return_lse=True, **kw)
    ref_kw = {key: (val.double() if key == "q_temperature" else val) for key, val in kw.items()}
    ref_out, ref_lse = scaled_rope_attention_reference(q.double(), k.double(), v.double(), inv_freq=inv_freq,
                                                       return_lse=True, **ref_kw)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, Hq, Nq)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    seen = torch.isfinite(ref_lse)
    return rel_err(out, ref_out), rel_err(lse[seen], ref_lse[seen])


# (B, Nq, Nk, Hq, Hkv, D, R) and the features each case turns on.
CPU_CASES = [
    ((1, 40, 40, 2, 2, 32, 32), dict()),
    ((2, 40, 40, 4, 2, 32, 32), dict(causal=True)),
    ((1, 24, 70, 4, 1, 32, 32), dict(causal=True, interleaved=True)),  # Nq < Nk, MQA
    ((1, 70, 33, 2, 1, 48, 32), dict(causal=True)),  # Nq > Nk: rows that see nothing
    ((1, 33, 40, 2, 2, 64, 32), dict(temperature=True, rotary_scale=1.3)),  # partial rotary
    ((1, 33, 47, 2, 2, 40, 24), dict(interleaved=True, positions=True)),  # non-power-of-two D and R
    ((2, 35, 35, 4, 2, 32, 32), dict(layout="bhsd", causal=True, temperature=True)),
    ((1, 32, 32, 2, 2, 32, 16), dict(positions=True, pos_scale=1000, causal=True)),  # positions ~1e6
]


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "-".join(map(str, c[0])) + "-" + "-".join(c[1]))
def test_forward_small(case, dtype):
    device = DEVICE
    shape, features = case
    err_out, err_lse = run_case(*shape, dtype, device, **features)
    assert err_out < TOLERANCE[dtype], err_out
    assert err_lse < TOLERANCE[dtype], err_lse


@requires_kernel
def test_forward_positions_near_2_pow_20_are_exact():
    # fp32 p * f would be off by up to 0.03 rad here; the kernel's fixed-point phases are not.
    device = DEVICE
    B, N, H, D = 1, 32, 2, 32
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, N, H, D, generator=gen).to(device) for _ in range(3))
    inv_freq = torch.tensor([1.0, 0.77, 0.5, 0.3, 0.1, 0.05, 0.01, 1e-3] * 2, device=device)
    pos = 2**20 - torch.randint(0, 4096, (B, N), generator=gen).to(device)
    out = scaled_rope_attention(q, k, v, inv_freq=inv_freq, q_positions=pos, k_positions=pos, softmax_scale=1.0)
    ref = scaled_rope_attention_reference(q.double(), k.double(), v.double(), inv_freq=inv_freq,
                                          q_positions=pos, k_positions=pos, softmax_scale=1.0)
    assert rel_err(out, ref) < 2e-6
    # Naive float32 angles give a visibly different answer at these positions.
    naive_freq = inv_freq.double()
    theta32 = (pos.float()[..., None] * inv_freq).double()
    assert (theta32 - pos.double()[..., None] * naive_freq).abs().max() > 1e-3


@requires_kernel
def test_forward_writes_every_output():
    # Outputs come from torch.empty; a second call on poisoned memory must give the same result.
    device = DEVICE
    q, k, v = (torch.randn(1, 37, 2, 32, device=device) for _ in range(3))
    f = schedules.DefaultRope(32).inv_freq(device=device)
    first = scaled_rope_attention(q, k, v, inv_freq=f, causal=True)
    poison = torch.full((1 << 16,), float("nan"), device=device)  # fill the allocator's free blocks
    del poison
    second = scaled_rope_attention(q, k, v, inv_freq=f, causal=True)
    assert torch.isfinite(second).all() and torch.equal(first, second)


GPU_CASES = [
    (2, 1024, 1024, 16, 16, 128, 128, dict(causal=True)),
    (2, 1024, 1024, 16, 16, 128, 128, dict()),
    (1, 512, 2048, 32, 4, 128, 128, dict(causal=True)),  # Nq != Nk, GQA 8:1
    (2, 777, 777, 8, 1, 64, 64, dict(causal=True, interleaved=True)),
    (1, 1024, 1024, 8, 2, 256, 256, dict(causal=True)),
    (2, 1000, 1000, 8, 8, 128, 64, dict(temperature=True, rotary_scale=1.2)),  # rotary_dim = D/2
    (1, 1024, 1024, 8, 8, 80, 80, dict(layout="bhsd")),
    (1, 1024, 1024, 8, 8, 96, 96, dict(causal=True, positions=True, pos_scale=1000)),  # long positions
    (1, 700, 300, 4, 2, 128, 96, dict(causal=True)),  # Nq > Nk: rows that see nothing; partial rotary
    (2, 300, 1100, 8, 8, 256, 128, dict(positions=True, temperature=True)),  # D = 256, partial, Nq < Nk
    (1, 2000, 2000, 4, 4, 80, 48, dict(causal=True, layout="bhsd")),  # half-split pairs, D no power of two
    (3, 129, 129, 2, 2, 128, 128, dict(causal=True, interleaved=True, temperature=True)),  # one row past a tile
    (4, 832, 832, 24, 8, 128, 128, dict(causal=True)),  # Gluon: 3 rounds of pair units, odd tile count
    (16, 64, 64, 32, 8, 128, 128, dict(causal=True)),  # one tile per sequence: units of two heads' tiles only
    # D = 64: the Gluon forward's items are three warpgroups' rows (192)
    (2, 1000, 1000, 8, 8, 64, 64, dict()),  # a partial last tile
    (3, 193, 193, 4, 4, 64, 32, dict(temperature=True, interleaved=True)),  # one row past a tile, partial
    (2, 300, 300, 4, 4, 32, 32, dict()),  # below 64: the portable forward
]
# Causal calls at D = 64 take the Gluon forward (`dispatch.forward_path`): two consumers on pair
# units up to 2k queries, three consumers on pair units up to 6k, one program per tile beyond
# (natural feature order: half-split pairs filling D, or interleaved ones).
SMALL_HEAD_DIM_CAUSAL_CASES = [
    (1, 4500, 4500, 2, 1, 64, 64, dict(causal=True)),  # three consumers on pair units
    (1, 3000, 3500, 2, 1, 64, 64, dict(causal=True)),  # the same with Nq < Nk
    (1, 6500, 6500, 1, 1, 64, 64, dict(causal=True)),  # three consumers, one program per tile
    (2, 1000, 1000, 8, 8, 64, 64, dict(causal=True)),
    (1, 400, 1500, 8, 2, 64, 32, dict(causal=True, positions=True, interleaved=True)),  # Nq < Nk, partial
    (2, 777, 777, 8, 1, 64, 64, dict(causal=True, interleaved=True)),
    (1, 2100, 2100, 4, 2, 64, 64, dict(causal=True, temperature=True, layout="bhsd")),
]
PATHS = {"default": contextlib.nullcontext, "portable": dispatch.portable_kernels}


@requires_cuda
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c[:7])) + "-" + "-".join(c[7]))
def test_forward_gpu(case, dtype, path):
    with PATHS[path]():
        err_out, err_lse = run_case(*case[:7], dtype, "cuda", **case[7])
    assert err_out < TOLERANCE[dtype], err_out
    assert err_lse < 1e-3, err_lse  # lse is float32 math over low-precision scores


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", SMALL_HEAD_DIM_CAUSAL_CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_forward_gpu_small_head_dims_causal_gluon(case, dtype):
    err_out, err_lse = run_case(*case[:7], dtype, "cuda", **case[7])
    assert err_out < TOLERANCE[dtype], err_out
    assert err_lse < 1e-3, err_lse


@requires_cuda
def test_hopper_gpus_take_the_gluon_path():
    q = torch.empty(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert dispatch.path(q) == ("hopper" if hopper else "kernel")
    assert dispatch.path(q.float()) == "kernel"
    # D = 64: the portable forward on slot-order tiles only
    small = torch.empty(1, 4096, 1, 64, device="cuda", dtype=torch.bfloat16)
    assert dispatch.forward_path(small) == ("hopper" if hopper else "kernel")
    assert dispatch.forward_path(small, slot_order=True) == "kernel"
    assert dispatch.forward_path(small[..., :32]) == "kernel"  # unmeasured below 64
    assert dispatch.backward_path(small) == ("hopper" if hopper else "kernel")  # the Gluon backward is faster
    assert dispatch.backward_path(q, deterministic=True) == "kernel"
    wide = torch.empty(1, 8, 1, 256, device="cuda", dtype=torch.bfloat16)
    assert dispatch.path(wide) == dispatch.backward_path(wide) == ("hopper" if hopper else "kernel")
    with dispatch.portable_kernels():
        assert dispatch.path(q) == "kernel" and dispatch.backward_path(q) == "kernel"


@requires_cuda
@pytest.mark.parametrize("path", PATHS)
def test_forward_beyond_2_pow_31_elements(path):
    # q of 2.3e9 elements (4.6 GB): every offset into it needs 64 bits. The last 64 rows of two
    # query heads against float64.
    B, N, Hq, Hkv, D = 1, 140_000, 128, 8, 128
    if torch.cuda.get_device_properties(0).total_memory < 3 * B * N * Hq * D * 2:
        pytest.skip("needs about 14 GB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, N, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(B, N, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    inv_freq = schedules.YaRN(D, factor=32.0, original_max_position_embeddings=4096).inv_freq(device="cuda")
    with PATHS[path]():
        out = scaled_rope_attention(q, k, v, inv_freq=inv_freq, causal=True)
    heads = [Hq - 16, Hq - 1]  # of the last KV head
    ref = scaled_rope_attention_reference(q[:, -64:, heads].double(), k[:, :, -1:].double(), v[:, :, -1:].double(),
                                          inv_freq=inv_freq, causal=True)
    assert rel_err(out[:, -64:, heads], ref) < TOLERANCE[torch.bfloat16]


@requires_cuda
@pytest.mark.parametrize("hkv", [16, 4])
def test_inference_forward_memory_is_sdpas_and_one_k(hkv):
    # issue 14's bound: a forward's extra memory is at most SDPA's (the output) and one K-sized
    # buffer (the Gluon forward's K^ scratch); no lse where nothing reads it
    B, N, Hq, D = 4, 4096, 16, 128
    q = torch.randn(B, N, Hq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, N, hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    yarn = schedules.YaRN(D, factor=4.0, original_max_position_embeddings=4096)
    with torch.no_grad():
        scaled_rope_attention(q, k, v, schedule=yarn, causal=True)  # compiled, schedule cached
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = scaled_rope_attention(q, k, v, schedule=yarn, causal=True)
        peak = torch.cuda.max_memory_allocated() - before
    hopper = dispatch.forward_path(q) == "hopper"
    bound = q.nbytes + (k.nbytes if hopper else k.nbytes + q.nbytes)  # the portable forward also holds Q^
    assert peak <= bound, (peak, bound)
    _, lse = scaled_rope_attention(q, k, v, schedule=yarn, causal=True, return_lse=True)
    assert lse.shape == (B, Hq, N) and torch.isfinite(lse).all() and out.shape == q.shape


@requires_kernel
def test_kernel_path_rejects_tensors_tma_cannot_read():
    device = DEVICE
    q, k = (torch.randn(1, 8, 2, 16, device=device) for _ in range(2))
    v = torch.randn(1, 8, 2, 17, device=device)[..., :16]  # row strides of 68 bytes
    with pytest.raises(ValueError, match="v needs a 16-byte aligned data pointer and strides"):
        scaled_rope_attention(q, k, v, inv_freq=schedules.DefaultRope(16).inv_freq(device=device))
