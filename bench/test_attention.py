"""The benchmark suite: `pytest bench/ --benchmark-only [--benchmark-json results.json]`,
then `python -m bench.report results.json`.

One test per (case, mode, pipeline): mode "fwd" is the forward, "train" forward+backward
(gradients of q, k, v). Each test times its pipeline twice: the median of CUDA-event
timings (triton's do_bench), which the report uses (TF/s, ratios), and pytest-benchmark's
own rounds, each ending in a device synchronization, for pytest-benchmark's table.
`extra_info` carries the case, median ms, TF/s, peak extra memory, and, on ropefast's test
(the last of each case), its speed ratio to every peer timed in the same pytest run.

pytest-benchmark prints one table per (case, mode). ropefast's test id and extra_info name
the path it ran (`ropefast.dispatch`: "hopper", "kernel", "interpreter" or "reference"); on
a GPU, "ropefast_portable" times the portable `tl.*` kernels beside it.

Without a GPU the suite runs small fp32 shapes on the CPU (ropefast's PyTorch reference
path, SDPA's math backend): those numbers exercise the suite and say nothing about GPU
speed; their names and extra_info say "cpu". With TRITON_INTERPRET=1 exported, ropefast's
tests time Triton's interpreter instead, and warn.
"""

import contextlib
import warnings

import pytest
import torch

from ropefast import dispatch

from .peers import CPU_PIPELINES, DTYPES, GPU_PIPELINES, cpu_cases, gpu_cases, make_inputs, median_ms, peak_mib
from .peers import step as timed_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES, PIPELINES = (gpu_cases(), GPU_PIPELINES) if DEVICE == "cuda" else (cpu_cases(), CPU_PIPELINES)


def ropefast_path(case, impl):
    """The path ropefast's pipelines take on this case ("torch" for the peers)."""
    if not impl.startswith("ropefast"):
        return "torch"
    like = torch.empty(1, case.n, 1, case.head_dim, dtype=DTYPES[case.dtype], device=DEVICE)
    with dispatch.portable_kernels() if impl == "ropefast_portable" else contextlib.nullcontext():
        return dispatch.forward_path(like)


def _label(case, impl):
    return f"ropefast-{ropefast_path(case, impl)}" if impl == "ropefast" else impl


PARAMS = [pytest.param(case, mode, impl, id=f"{DEVICE}-{case.name}-{mode}-{_label(case, impl)}")
          for case in CASES for mode in ("fwd", "train") for impl in PIPELINES]
_TFLOPS = {}  # (case, mode) -> {impl: TF/s} measured in this pytest run


@pytest.mark.parametrize("case,mode,impl", PARAMS)
def test_attention(benchmark, case, mode, impl):
    q, k, v = make_inputs(case, DEVICE, requires_grad=mode == "train")
    try:
        step = timed_step(PIPELINES[impl](case, DEVICE), q, k, v, mode, portable=impl == "ropefast_portable")
        step()  # compile / warm up; a backend that cannot take the case says so here
    except RuntimeError as err:
        if impl.startswith("ropefast"):  # only a peer may lack support for a case; ropefast must run all
            raise
        pytest.skip(f"{impl} cannot run {case.name} {mode}: {str(err).splitlines()[0][:200]}")

    path = ropefast_path(case, impl)
    if path == "interpreter":
        warnings.warn("timing ropefast through Triton's interpreter (TRITON_INTERPRET is set): these times measure "
                      "Python, not a kernel; unset it to time the reference on a CPU, or run on a GPU")
    ms = median_ms(step, DEVICE)
    tflops = case.flops(mode == "train") / ms / 1e9
    peers = _TFLOPS.setdefault((case, mode), {})
    peers[impl] = tflops
    info = benchmark.extra_info
    info.update(device=DEVICE, gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "none (CPU numbers)",
                case=case.name, dtype=case.dtype, head_dim=case.head_dim, heads=case.heads,
                kv_heads=case.kv_heads, n=case.n, batch=case.batch, causal=case.causal, mode=mode, impl=impl,
                path=path, median_ms=ms, tflops=tflops, peak_mib=peak_mib(step, DEVICE))
    if impl == "ropefast":
        info["speedup"] = {peer: tflops / value for peer, value in peers.items() if peer != impl}

    def synced():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{case.name} {mode}"
    benchmark.pedantic(synced, rounds=max(3, min(20, int(200 / ms))), warmup_rounds=1)
