"""The public ops under torch.compile, torch.library.opcheck and CUDA graphs: the kernel
paths are the custom ops of `ropefast.ops`, so a compiled Llama-style block traces them
whole (fullgraph) and matches eager, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ropefast import apply_scaled_rope, dispatch, ops, scaled_rope_attention, schedules

from conftest import DEVICE, rel_err, requires_cuda, requires_kernel


class Attention(nn.Module):
    """A Llama attention block: projections, RoPE + causal attention (fused, or
    `apply_scaled_rope` then SDPA), output projection."""

    def __init__(self, fused, dim=64, heads=4, kv_heads=2, dtype=torch.float32, device=DEVICE):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.fused = heads, kv_heads, dim // heads, fused
        make = dict(bias=False, dtype=dtype, device=device)
        self.wq, self.wo = nn.Linear(dim, dim, **make), nn.Linear(dim, dim, **make)
        self.wk, self.wv = (nn.Linear(dim, kv_heads * self.head_dim, **make) for _ in range(2))
        self.schedule = schedules.YaRN(self.head_dim, factor=4.0, original_max_position_embeddings=16)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.heads, self.head_dim)
        k, v = (w(x).view(b, n, self.kv_heads, self.head_dim) for w in (self.wk, self.wv))
        if self.fused:
            out = scaled_rope_attention(q, k, v, schedule=self.schedule, causal=True)
        else:
            q, k = (apply_scaled_rope(t, schedule=self.schedule) for t in (q, k))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=True).transpose(1, 2)
        return self.wo(out.reshape(b, n, -1))


def _outputs_and_grads(block, x):
    out = block(x)
    return [out, *torch.autograd.grad(out.square().sum(), [x, *block.parameters()])]


@pytest.mark.parametrize("fused", [True, False], ids=["scaled_rope_attention", "apply_scaled_rope+sdpa"])
def test_fullgraph_compile_matches_eager(fused):
    torch.manual_seed(0)
    block = Attention(fused)
    x = torch.randn(2, 24, 64, device=DEVICE, requires_grad=True)
    eager = _outputs_and_grads(block, x)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    for got, expect in zip(_outputs_and_grads(compiled, x), eager):
        assert rel_err(got, expect) < 1e-6


def _attention_args(temperature, positions):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 20, 4, 16, generator=gen).to(DEVICE).requires_grad_()
    k, v = (torch.randn(1, 20, 2, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    inv_freq = schedules.DefaultRope(16).inv_freq(device=DEVICE).requires_grad_()
    temp = (torch.rand(1, 20, generator=gen) + 0.5).to(DEVICE).requires_grad_() if temperature else None
    pos = torch.randint(0, 100, (1, 20), generator=gen).to(DEVICE) if positions else None
    return (q, k, v, inv_freq, pos, pos, temp, 16, False, True, 0.25, 1.1)


@requires_kernel
@pytest.mark.parametrize("save_q", [False, True])  # True: the backward reads the forward's Q^
@pytest.mark.parametrize("temperature,positions", [(False, False), (True, True)])
def test_attention_op_passes_opcheck(temperature, positions, save_q):
    torch.library.opcheck(ops.attention_fwd, _attention_args(temperature, positions), dict(save_q=save_q))


@requires_kernel
def test_attention_op_without_lse_passes_opcheck():
    # inference (no autograd): no lse allocated or written, an empty tensor in its place
    args = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in _attention_args(True, True))
    torch.library.opcheck(ops.attention_fwd, args, dict(need_lse=False))
    out, lse, _ = ops.attention_fwd(*args, need_lse=False)
    assert lse.numel() == 0
    torch.testing.assert_close(out, ops.attention_fwd(*args)[0], rtol=0, atol=0)


@requires_kernel
def test_rope_op_passes_opcheck():
    x = torch.randn(2, 20, 3, 16, device=DEVICE, requires_grad=True)
    inv_freq = schedules.DefaultRope(8).inv_freq(device=DEVICE).requires_grad_()
    pos = torch.randint(0, 100, (1, 20), device=DEVICE)
    for positions in (None, pos):
        torch.library.opcheck(ops.rope_fwd, (x, inv_freq, positions, 8, True, 1.2))


@requires_cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_replays_forward_and_backward(deterministic):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k, v = (torch.randn(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(2))
    grad = torch.randn_like(q)
    yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=64)

    def step():
        out = scaled_rope_attention(q, k, v, schedule=yarn, causal=True, deterministic=deterministic)
        return [out, *torch.autograd.grad(out, (q, k, v), grad)]

    # the default Hopper backward sums dq with atomics in a varying order: dq matches closely,
    # everything else (and every output of the deterministic path) bitwise
    atomic_dq = dispatch.backward_path(q, deterministic=deterministic) == "hopper"
    stream = torch.cuda.Stream()  # warm up (compiles, fills caches) on a side stream, as capture wants
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for scale in (0.5, 2.0):  # new values in the same buffers: each replay must follow them
        with torch.no_grad():
            for x in (q, k, v):
                x.mul_(scale)
        graph.replay()
        expect = step()
        for index, (got, want) in enumerate(zip(captured, expect)):
            if atomic_dq and index == 1:
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
            else:
                assert torch.equal(got, want), index
