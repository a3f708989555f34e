"""Latency of one call on short sequences, where the host sets the pace (CUDA only):
microseconds per call of ropefast and its peers at N = 128 and 512 (B=1, Hq=32, Hkv=8,
D=128, causal, YaRN), eager (the median of five rounds of 200 calls, one synchronization
each) and replayed from a CUDA graph.
And `apply_scaled_rope` against one eager elementwise op on the same tensor, N = 128, 512
and 16k. `extra_info` carries us_per_call; `python -m bench.latency` prints the same tables
by hand."""

import pytest
import torch

from .latency import pipelines, rotations, wall_us

PIPELINES = ("sdpa_cudnn_norope", "rope_kernel_sdpa", "ropefast_portable", "ropefast")
PARAMS = [pytest.param(n, train, impl, graph, id=f"N{n}-{'train' if train else 'fwd'}-{impl}-{graph}")
          for n in (128, 512) for train in (False, True) for impl in PIPELINES for graph in ("eager", "cuda_graph")]


def graphed(fn):
    """fn captured once into a CUDA graph; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up (compilation, caches) off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@pytest.mark.skipif(not torch.cuda.is_available(), reason="latency is measured on a CUDA GPU")
@pytest.mark.parametrize("n,train,impl,graph", PARAMS)
def test_latency(benchmark, n, train, impl, graph):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        fn = pipelines(n, train)[0][impl]
        fn = graphed(fn) if graph == "cuda_graph" else fn
        us = wall_us(fn)
        benchmark.group = f"latency N{n} {'train' if train else 'fwd'}"
        benchmark.extra_info.update(n=n, mode="train" if train else "fwd", impl=impl, graph=graph, us_per_call=us)
        benchmark.pedantic(fn, rounds=20, warmup_rounds=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="latency is measured on a CUDA GPU")
@pytest.mark.parametrize("n", (128, 512, 16384))
@pytest.mark.parametrize("impl", ("elementwise", "apply_scaled_rope"))
def test_rope_latency(benchmark, n, impl):
    """apply_scaled_rope against one eager elementwise op on the same tensor (eager)."""
    fn = rotations(n)[impl]
    us = wall_us(fn)
    benchmark.group = f"rotation N{n}"
    benchmark.extra_info.update(n=n, mode="rope", impl=impl, graph="eager", us_per_call=us)
    benchmark.pedantic(fn, rounds=20, warmup_rounds=1)
