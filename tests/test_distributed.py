"""Context parallel (`ropefast.distributed`) on the CPU: gloo processes run the ring, and its
forward and gradients equal the single-process op on the whole sequence (the float64
reference). Each block takes the dense op's path: the kernels in Triton's interpreter for
float32 under TRITON_INTERPRET=1, the reference otherwise (and for float64 always).

One spawn of 2 processes runs every 2-rank case (process start-up dominates); a second
spawn of 4 processes runs one float64 causal case on the reference path, for the rings
where keys and their gradients take several hops."""

import datetime
import os
import socket
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ropefast import scaled_rope_attention, schedules
from ropefast.distributed import (context_parallel_positions, gather_from_context_parallel,
                                  ring_scaled_rope_attention, shard_for_context_parallel)
from ropefast.reference import scaled_rope_attention_reference, scaled_rope_attention_reference_bwd

from conftest import TOLERANCE, rel_err

B, N, HQ, HKV, D = 1, 64, 4, 2, 32
# float64 runs the reference, whose lse is float32: the ring's merge is exact to ~1e-7 there
FLOAT64_RING_TOLERANCE = 1e-6


def _cases(world_size):
    """name -> (dtype, op keywords without tensors, learnable inv_freq, learnable temperature, lse in the loss)."""
    yarn = schedules.YaRN(D, factor=4.0, original_max_position_embeddings=16)
    # length-dependent: the ring must give it the global length
    ntk = schedules.DynamicNTKScaling(16, factor=2.0, max_position_embeddings=N // 2, interleaved=True)
    if world_size == 4:
        return {"causal_yarn_float64": (torch.float64, dict(schedule=yarn, causal=True), True, True, False)}
    return {
        "causal_yarn_temperature": (torch.float32, dict(schedule=yarn, causal=True), True, True, True),
        "full_yarn_temperature": (torch.float32, dict(schedule=yarn, causal=False), True, True, False),
        "causal_dynamic_ntk_bhsd": (torch.float32, dict(schedule=ntk, causal=True, layout="bhsd"), False, False, False),
    }


def _inputs(dtype, layout, learn_freq, learn_temp, schedule):
    """The whole sequence's tensors, the same in every process."""
    gen = torch.Generator().manual_seed(0)
    seq_dim = 2 if layout == "bhsd" else 1

    def randn(heads):
        shape = [B, N, heads, D]
        shape[1], shape[seq_dim] = shape[seq_dim], shape[1]
        return torch.randn(shape, generator=gen, dtype=dtype)

    q, k, v, grad = randn(HQ), randn(HKV), randn(HKV), randn(HQ)
    grad_lse = torch.randn(B, HQ, N, generator=gen)
    temperature = (0.5 + torch.rand(B, N, generator=gen)).to(dtype) if learn_temp else None
    inv_freq = schedule.inv_freq(seq_len=N) if learn_freq else None
    return dict(q=q, k=k, v=v, grad=grad, grad_lse=grad_lse, q_temperature=temperature, inv_freq=inv_freq,
                seq_dim=seq_dim)


def _ring_case(case, group):
    """The ring on this rank's shards: the gathered out, lse and gradients (inv_freq's summed)."""
    dtype, kwargs, learn_freq, learn_temp, lse_loss = case
    x = _inputs(dtype, kwargs.get("layout", "bshd"), learn_freq, learn_temp, kwargs["schedule"])
    dim = x["seq_dim"]
    (q, positions), (k, _), (v, _), (grad, _) = (shard_for_context_parallel(x[n], group, dim)
                                                 for n in ("q", "k", "v", "grad"))
    grad_lse = shard_for_context_parallel(x["grad_lse"], group, dim=2)[0]
    for t in (q, k, v):
        t.requires_grad_()
    temperature = None
    if learn_temp:
        temperature = shard_for_context_parallel(x["q_temperature"], group)[0].requires_grad_()
    inv_freq = x["inv_freq"].requires_grad_() if learn_freq else None
    out, lse = ring_scaled_rope_attention(q, k, v, group=group, inv_freq=inv_freq, q_temperature=temperature,
                                          return_lse=True, **kwargs)
    assert torch.equal(positions, context_parallel_positions(q.shape[dim], dist.get_rank(group),
                                                             dist.get_world_size(group)))
    loss = (out * grad).sum() + ((lse * grad_lse).sum() if lse_loss else 0)
    loss.backward()
    result = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    result = {name: gather_from_context_parallel(t, group, dim) for name, t in result.items()}
    result["lse"] = gather_from_context_parallel(lse.detach(), group, dim=2)
    if learn_temp:
        result["dtemp"] = gather_from_context_parallel(temperature.grad, group)
    if learn_freq:  # each rank holds its blocks' share
        result["dfreq"] = inv_freq.grad.clone()
        dist.all_reduce(result["dfreq"], group=group)
    return result


def _group_of_one():
    """A group of one rank: the dense op on the local tensors, no ring."""
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, 24, h, D, generator=gen) for h in (HQ, HKV, HKV))
    yarn = schedules.YaRN(D, factor=4.0, original_max_position_embeddings=16)
    results = []
    for op, group in ((ring_scaled_rope_attention, groups[dist.get_rank()]), (scaled_rope_attention, None)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        inv_freq = yarn.inv_freq(seq_len=24).requires_grad_()
        extra = {} if group is None else {"group": group}
        out = op(*leaves, schedule=yarn, inv_freq=inv_freq, causal=True, **extra)
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves] + [inv_freq.grad])
    return results


def _errors(group):
    """The message of each bad call, on this rank (every rank must raise)."""
    messages = {}
    rank = dist.get_rank(group)
    q, k, v = (torch.randn(B, 32 if rank == 0 else 16, h, D) for h in (HQ, HKV, HKV))
    freq = torch.ones(D // 2)
    for name, call in (
        ("mismatched_lengths", lambda: ring_scaled_rope_attention(q, k, v, group=group, inv_freq=freq)),
        ("odd_length", lambda: ring_scaled_rope_attention(q[:, :15], k[:, :15], v[:, :15], inv_freq=freq)),
        ("q_k_lengths", lambda: ring_scaled_rope_attention(q[:, :8], k[:, :6], v[:, :6], inv_freq=freq)),
        ("positions_shape", lambda: ring_scaled_rope_attention(q[:, :16], k[:, :16], v[:, :16], inv_freq=freq,
                                                               q_positions=torch.arange(8))),
        ("shard_length", lambda: shard_for_context_parallel(torch.zeros(B, 30, HQ, D))),
    ):
        with pytest.raises(ValueError) as error:
            call()
        messages[name] = str(error.value)
    with mock.patch.object(dist, "get_backend", return_value="nccl"), pytest.raises(ValueError) as error:
        ring_scaled_rope_attention(q[:, :16], k[:, :16], v[:, :16], inv_freq=freq)
    messages["nccl_cpu"] = str(error.value)
    return messages


def _worker(rank, world_size, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: _ring_case(case, None) for name, case in _cases(world_size).items()}
        if world_size == 2:
            results["group_of_one"] = _group_of_one()
            results["errors"] = _errors(None)
        if rank == 0:
            torch.save(results, path)
    finally:
        dist.destroy_process_group()


def _spawn(world_size, path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world_size, port, str(path)), nprocs=world_size)
    return torch.load(path)


@pytest.fixture(scope="module")
def ring2(tmp_path_factory):
    return _spawn(2, tmp_path_factory.mktemp("ring") / "results2.pt")


def _dense(case):
    """The whole sequence in one process, in float64 (the reference): out, lse, gradients."""
    dtype, kwargs, learn_freq, learn_temp, lse_loss = case
    x = _inputs(dtype, kwargs.get("layout", "bshd"), learn_freq, learn_temp, kwargs["schedule"])
    q, k, v = (x[n].double().requires_grad_() for n in ("q", "k", "v"))
    temperature = x["q_temperature"].double().requires_grad_() if learn_temp else None
    inv_freq = x["inv_freq"].requires_grad_() if learn_freq else None
    out, lse = scaled_rope_attention(q, k, v, inv_freq=inv_freq, q_temperature=temperature, return_lse=True,
                                     **kwargs)
    loss = (out * x["grad"].double()).sum() + ((lse * x["grad_lse"]).sum() if lse_loss else 0)
    loss.backward()
    expect = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if learn_temp:
        expect["dtemp"] = temperature.grad
    if learn_freq:
        expect["dfreq"] = inv_freq.grad
    return expect


@pytest.mark.parametrize("name", list(_cases(2)))
def test_ring_equals_dense(ring2, name):
    case = _cases(2)[name]
    got, expect = ring2[name], _dense(case)
    assert set(got) == set(expect)
    for key in expect:
        assert rel_err(got[key], expect[key]) < TOLERANCE[case[0]], key


def test_ring_four_ranks_float64(tmp_path):
    (name, case), = _cases(4).items()
    got, expect = _spawn(4, tmp_path / "results4.pt")[name], _dense(case)
    for key in expect:
        assert rel_err(got[key], expect[key]) < FLOAT64_RING_TOLERANCE, key


def test_group_of_one_is_the_dense_op(ring2):
    ring, dense = ring2["group_of_one"]
    assert torch.equal(ring[0], dense[0])  # the same kernel call
    for got, expect in zip(ring[1:], dense[1:]):
        assert rel_err(got, expect) < TOLERANCE[torch.float32]


def test_errors(ring2):
    messages = ring2["errors"]
    assert "rank 0: (1, 32, 4, 32, 2, 2, 0), rank 1: (1, 16, 4, 32, 2, 2, 0)" in messages["mismatched_lengths"]
    assert "must be even, got 15" in messages["odd_length"]
    assert "q and k hold the same tokens" in messages["q_k_lengths"]
    assert "q_positions must be [1, 16] or [16]" in messages["positions_shape"]
    assert "needs a multiple of 4" in messages["shard_length"]
    assert "NCCL, which needs CUDA tensors" in messages["nccl_cpu"]


def test_needs_an_initialized_process_group():
    q = torch.randn(B, 8, HQ, D)
    with pytest.raises(ValueError, match="init_process_group"):
        ring_scaled_rope_attention(q, q[:, :, :HKV], q[:, :, :HKV], inv_freq=torch.ones(D // 2))


@pytest.mark.parametrize("causal", [False, True])
def test_reference_backward_from_out_and_lse(causal):
    """The reference backward the ring uses on the CPU equals autograd through the reference."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(B, 12, HQ, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, 15, HKV, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    inv_freq = schedules.YaRN(12, factor=2.0, original_max_position_embeddings=8).inv_freq().requires_grad_()
    temperature = (0.5 + torch.rand(B, 12, generator=gen, dtype=torch.float64)).requires_grad_()
    kwargs = dict(inv_freq=inv_freq, rotary_dim=12, interleaved=True, causal=causal, rotary_scale=1.2,
                  q_temperature=temperature)
    out, lse = scaled_rope_attention_reference(q, k, v, return_lse=True, **kwargs)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    ((out * grad_out).sum() + (lse * grad_lse).sum()).backward()
    got = scaled_rope_attention_reference_bwd(grad_out, grad_lse, q, k, v, out, lse, **kwargs)
    for mine, expect in zip(got, (q.grad, k.grad, v.grad, inv_freq.grad, temperature.grad)):
        assert rel_err(mine, expect) < FLOAT64_RING_TOLERANCE
