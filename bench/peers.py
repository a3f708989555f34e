"""The pipelines a user would build instead of ropefast, the benchmark cases, and the
timing helpers shared by the pytest-benchmark suite (test_attention.py) and the sweeps.

Every pipeline takes q [B, N, Hq, D] and k, v [B, N, Hkv, D] in flash-attn's layout, like
ropefast, and computes the same function: YaRN-scaled RoPE on q and k (factor 4, with its
attention factor m), softmax attention, causal or not. The SDPA peers without RoPE skip the
rotation: they are the speed ceiling a user knows. The SDPA pipelines get transposed views,
as HF's attention modules hand them over.
"""

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ropefast import apply_scaled_rope, dispatch, scaled_rope_attention, schedules

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


@dataclass(frozen=True)
class Case:
    """One benchmark shape: B = tokens // n sequences of n tokens."""

    dtype: str
    head_dim: int
    heads: int
    kv_heads: int
    n: int
    causal: bool
    tokens: int = 16384

    @property
    def batch(self):
        return max(1, self.tokens // self.n)

    @property
    def name(self):
        gqa = f"-gqa{self.heads // self.kv_heads}" if self.kv_heads != self.heads else ""
        return (f"{self.dtype}-D{self.head_dim}-H{self.heads}{gqa}-N{self.n}-B{self.batch}"
                f"-{'causal' if self.causal else 'full'}")

    def flops(self, backward):
        """4*B*H*N*N*D, halved when causal; forward+backward is 3.5x forward."""
        flops = 4 * self.batch * self.heads * self.n * self.n * self.head_dim // (2 if self.causal else 1)
        return flops * 3.5 if backward else flops


def gpu_cases():
    """bf16 at 16k tokens per batch: D=128 (H=16) and D=64 (H=32), N = 1k-16k, causal and
    not; then fp16, GQA 4:1, D=256 (H=8) and a 64k-token causal sequence at D=128."""
    cases = [Case("bf16", d, h, h, n, causal) for d, h in ((128, 16), (64, 32)) for n in (1024, 4096, 16384)
             for causal in (False, True)]
    cases += [Case("fp16", 128, 16, 16, 4096, causal) for causal in (False, True)]
    cases += [Case("bf16", 256, 8, 8, 4096, causal) for causal in (False, True)]
    cases += [Case("bf16", 128, 16, 4, 4096, causal) for causal in (False, True)]
    cases += [Case("bf16", 128, 16, 16, 65536, True, tokens=65536)]
    return cases


def cpu_cases():
    """Small shapes for a machine without a GPU: they exercise the suite, not the kernels."""
    return [Case("fp32", 64, 4, 4, n, causal, tokens=n) for n in (128, 256) for causal in (False, True)]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(case, device, requires_grad=False, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    q = torch.randn(case.batch, case.n, case.heads, case.head_dim, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(case.batch, case.n, case.kv_heads, case.head_dim, device=device, dtype=dtype, generator=gen)
            for _ in range(2))
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


def yarn(head_dim):
    return schedules.YaRN(head_dim, factor=4.0, original_max_position_embeddings=4096)


def log_uniform_lengths(total, low, high, seed):
    """Document lengths drawn log-uniformly in [low, high] (fixed seed) until they fill
    `total` tokens, the last one cut to fit: the packed-training case (bench/test_varlen.py)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        draw = math.exp(math.log(low) + torch.rand(1, generator=gen).item() * (math.log(high) - math.log(low)))
        lengths.append(min(int(draw), total - sum(lengths)))
    return lengths


# ---- the pipelines: build(case, device) -> fn(q, k, v) -> out [B, N, Hq, D] ----

def _sdpa(q, k, v, causal, backend):
    with sdpa_kernel([SDPA_BACKENDS[backend]]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def build_ropefast(case, device):
    sched = yarn(case.head_dim)
    return lambda q, k, v: scaled_rope_attention(q, k, v, schedule=sched, causal=case.causal)


def build_sdpa(backend):
    def build(case, device):
        return lambda q, k, v: _sdpa(q, k, v, case.causal, backend)
    return build


def build_eager_rope_sdpa(case, device, backend="cudnn"):
    """HF Llama: a cos/sin cache [N, D] (once per model forward), x * cos + rotate_half(x) * sin
    on [B, H, N, D] views, then SDPA."""
    sched = yarn(case.head_dim)
    freqs = torch.arange(case.n, device=device, dtype=torch.float32)[:, None] * sched.inv_freq(device=device)
    emb = torch.cat((freqs, freqs), dim=-1)
    m = sched.rotary_scale()
    cos, sin = ((emb.cos() * m).to(DTYPES[case.dtype]), (emb.sin() * m).to(DTYPES[case.dtype]))
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads of [B, N, H, D]

    def fn(q, k, v):
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return _sdpa(q, k, v, case.causal, backend)
    return fn


def build_triton_rope_sdpa(case, device, backend="cudnn"):
    """The best unfused pipeline: ropefast's standalone `apply_scaled_rope` kernel, then SDPA."""
    sched = yarn(case.head_dim)
    return lambda q, k, v: _sdpa(apply_scaled_rope(q, schedule=sched), apply_scaled_rope(k, schedule=sched), v,
                                 case.causal, backend)


def build_flex(case, device):
    """`apply_scaled_rope` (no amplitude) + compiled FlexAttention whose score_mod multiplies
    each query's logits by its temperature (here YaRN's m^2 for every query, the same function
    as the other pipelines; a per-query tensor, as Entropy-ABF's log-length scaling needs)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sched = yarn(case.head_dim)
    temperature = torch.full((case.n,), sched.rotary_scale() ** 2, device=device)
    inv_freq = sched.inv_freq(device=device)
    block_mask = None
    if case.causal:
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, case.n, case.n,
                                       device=device)
    flex = _compiled_flex(flex_attention)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * temperature[q_idx]

    def fn(q, k, v):
        q, k = (apply_scaled_rope(x, inv_freq=inv_freq) for x in (q, k))
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                   block_mask=block_mask, enable_gqa=case.kv_heads != case.heads)
        return out.transpose(1, 2)
    return fn


_FLEX = []


def _compiled_flex(flex_attention):
    """One compiled flex_attention per pytest run. Each shape compiles anew (static shapes are
    its fastest code), so dynamo's recompile limit is raised: at the default limit it would
    silently fall back to the (slow) eager flex after a few cases."""
    if not _FLEX:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 4096)
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


GPU_PIPELINES = {
    "sdpa_cudnn_norope": build_sdpa("cudnn"),
    "sdpa_flash_norope": build_sdpa("flash"),
    "sdpa_efficient_norope": build_sdpa("efficient"),
    "eager_rope+cudnn": build_eager_rope_sdpa,
    "triton_rope+cudnn": build_triton_rope_sdpa,
    "triton_rope+flex_temperature": build_flex,
    "ropefast_portable": build_ropefast,  # `step(..., portable=True)`
    "ropefast": build_ropefast,  # last: its ratios use the peers timed just before it
}
CPU_PIPELINES = {
    "sdpa_math_norope": build_sdpa("math"),
    "eager_rope+math": lambda case, device: build_eager_rope_sdpa(case, device, "math"),
    "ropefast": build_ropefast,
}


# ---- timing ----

def step(fn, q, k, v, mode, portable=False):
    """What one timed call runs: the forward (mode "fwd"), or forward and backward with a
    fixed random output gradient ("train"); `portable`: within `dispatch.portable_kernels`,
    the backward included (autograd reads the dispatcher when it runs it)."""
    grad = None if mode == "fwd" else torch.randn_like(q)

    def run():
        return fn(q, k, v) if grad is None else torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
    if not portable:
        return run

    def run_portable():
        with dispatch.portable_kernels():
            return run()
    return run_portable


def median_ms(fn, device):
    """Median time of fn in ms: CUDA events through triton's do_bench (which also flushes L2
    between runs), or a host clock on the CPU."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device):
    """Peak allocation of one call above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
