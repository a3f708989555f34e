"""`kernels.launch`: the keys of its compiled-kernel cache, its descriptors, and, on a GPU, that
a call on the direct route (a key seen before) computes what the first call, which went
through `kernel[grid]`, computed."""

import contextlib

import pytest
import torch
from triton.knobs import HookChain

from conftest import rel_err, requires_cuda
from ropefast import (apply_scaled_rope, dispatch, scaled_rope_attention, scaled_rope_attention_varlen,
                      scaled_rope_attention_with_kvcache, schedules)
from ropefast.kernels import launch
from ropefast.kernels.hopper import compat


def test_keys_tell_apart_what_triton_specializes_on():
    key = launch._arg_key
    aligned = torch.empty(64)
    assert key(aligned) != key(aligned[1:])  # 16-byte alignment
    assert key(aligned) != key(aligned.half())
    assert len({key(n) for n in (1, 16, 17, 2**31, 2**63)}) == 5  # 1, multiples of 16, widths
    assert key(17) == key(33) and key(32) == key(4096)
    assert key(0.5) == key(2.0) and key(None) != key(False) != key(True)
    desc = launch.Descriptor(aligned, [4, 16], [16, 1], [4, 16])
    assert key(desc) == key(desc._replace(base=torch.empty(64)))  # not keyed on the address
    assert key(desc) != key(desc._replace(block_shape=[2, 16]))
    with pytest.raises(TypeError, match="unsupported argument type"):
        key("text")


def test_the_inlined_keys_are_the_per_argument_ones():
    aligned = torch.empty(64)
    args = (aligned, aligned[1:], torch.nn.Parameter(aligned), 1, 16, 17, -5, 2**40, 2**63, None, True, False, 0.5,
            launch.Descriptor(aligned, [4, 16], [16, 1], [4, 16]))
    assert launch._args_key(args) == tuple(map(launch._arg_key, args))


def test_descriptors_become_tritons_own():
    x = torch.empty(4, 16)
    tl_desc = launch.Descriptor(x, [4, 16], [16, 1], [2, 16]).triton()
    assert type(tl_desc).__module__ == "triton.tools.tensor_descriptor"
    assert (tl_desc.base is x and tl_desc.shape == [4, 16] and tl_desc.strides == [16, 1]
            and tl_desc.block_shape == [2, 16])
    if compat.SUPPORTED:
        from ropefast.kernels.hopper.attention_fwd import shared_layout

        layout = shared_layout([2, 16], torch.float16)
        gluon_desc = launch.Descriptor(x.half(), [4, 16], [16, 1], [2, 16], layout).triton()
        assert gluon_desc.layout is layout and type(gluon_desc).__module__.startswith("triton.experimental.gluon")


def test_hooks_count_as_set_only_when_one_is():
    chain = HookChain()
    assert not launch._hooked(None) and not launch._hooked(chain)
    chain.add(print)
    assert launch._hooked(chain) and launch._hooked(print)


def _yarn(dim=128):
    return schedules.YaRN(dim, factor=4.0, original_max_position_embeddings=256)


def _dense(dtype, deterministic, portable, head_dim=128, causal=True):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 300, 8, head_dim, generator=gen).cuda().to(dtype).requires_grad_()
    k, v = (torch.randn(2, 300, 2, head_dim, generator=gen).cuda().to(dtype).requires_grad_() for _ in range(2))
    with dispatch.portable_kernels() if portable else contextlib.nullcontext():
        out = scaled_rope_attention(q, k, v, schedule=_yarn(head_dim), causal=causal, deterministic=deterministic)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    return out, *grads


def _varlen(dtype):
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 200, 201, 460], dtype=torch.int32, device="cuda")
    q = torch.randn(460, 8, 128, generator=gen).cuda().to(dtype).requires_grad_()
    k, v = (torch.randn(460, 2, 128, generator=gen).cuda().to(dtype).requires_grad_() for _ in range(2))
    out = scaled_rope_attention_varlen(q, k, v, cu, cu, 259, 259, schedule=_yarn(), causal=True)
    return out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))


def _decode(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 8, 128, generator=gen).cuda().to(dtype)
    k_cache, v_cache = (torch.randn(2, 1000, 2, 128, generator=gen).cuda().to(dtype) for _ in range(2))
    seqlens = torch.tensor([999, 517], dtype=torch.int32, device="cuda")
    return (scaled_rope_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, schedule=_yarn()),)


def _rope(dtype):
    x = torch.randn(2, 300, 8, 128, generator=torch.Generator().manual_seed(0)).cuda().to(dtype).requires_grad_()
    out = apply_scaled_rope(x, schedule=_yarn())
    return out, *torch.autograd.grad(out.float().square().sum(), (x,))


CALLS = {
    "hopper": lambda dtype: _dense(dtype, False, False),
    "hopper-d64-full": lambda dtype: _dense(dtype, False, False, head_dim=64, causal=False),
    "deterministic": lambda dtype: _dense(dtype, True, False),
    "portable": lambda dtype: _dense(dtype, True, True),
    "varlen": _varlen,
    "decode": _decode,
    "rope": _rope,
}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", CALLS)
def test_direct_route_computes_what_the_first_call_did(name, dtype):
    launch._compiled.clear()  # the first call compiles or finds each kernel, and keys it
    first = CALLS[name](dtype)
    second = CALLS[name](dtype)
    # the Hopper backward adds dQ with atomics in a varying order; everything else repeats bitwise
    for a, b in zip(first, second):
        assert rel_err(b, a) < 1e-3 if name in ("hopper", "hopper-d64-full", "varlen") else torch.equal(a, b)
