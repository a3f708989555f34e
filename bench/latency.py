"""Host-side cost of a call: `python -m bench.latency [--breakdown] [--profile]` (CUDA).

Wall time per call of ropefast and its peers on short sequences, where the host, not the
GPU, sets the pace: 200 calls after a warm-up, one synchronization at the end (what a model
that calls attention in every layer sees), the median of five such rounds. B=1, Hq=32,
Hkv=8, D=128, causal, YaRN; N = 128 and 512. Beside it, `apply_scaled_rope` on q against one
eager elementwise op on the same tensor (`q * 2.0`), at N = 128, 512 and 16k. --breakdown
times the layers of ropefast's forward one by one (public op, custom op, its eager route,
launcher, key rope pass alone); --profile prints cProfile's top entries.
"""

import cProfile
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ropefast import apply_scaled_rope, dispatch, scaled_rope_attention, schedules

CALLS = 200


def wall_us(fn, calls=CALLS, rounds=5):
    """Microseconds per call: the median over `rounds` rounds of `calls` calls, each round
    synchronized once (a machine's host noise moved single rounds by 1.5x)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def pipelines(n, train):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    for x in (q, k, v):
        x.requires_grad_(train)
    grad = torch.randn_like(q)
    yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=4096)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                              enable_gqa=True).transpose(1, 2)

    def ropefast():
        return scaled_rope_attention(q, k, v, schedule=yarn, causal=True)

    def portable():
        with dispatch.portable_kernels():
            return ropefast()

    fns = dict(sdpa_cudnn_norope=lambda: sdpa(q, k, v),
               rope_kernel_sdpa=lambda: sdpa(apply_scaled_rope(q, schedule=yarn), apply_scaled_rope(k, schedule=yarn),
                                             v),
               ropefast=ropefast, ropefast_portable=portable)
    if train:
        return {name: (lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad)) for name, fn in fns.items()}, ropefast
    return fns, ropefast


def rotations(n):
    """`apply_scaled_rope` of q [1, n, 32, 128] bf16 and one eager elementwise op on q."""
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
    yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=4096)
    return dict(elementwise=lambda: q * 2.0, apply_scaled_rope=lambda: apply_scaled_rope(q, schedule=yarn))


def breakdown(n=128):
    from ropefast import ops
    from ropefast.kernels.hopper.attention_fwd import rope_attention_fwd_hopper
    from ropefast.kernels.rope import rope

    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=4096)
    inv_freq, scale = yarn.inv_freq(device="cuda"), yarn.rotary_scale()
    args = (q, k, v, inv_freq, None, None, None, 128, False, True, 128**-0.5, scale)
    layers = dict(
        public_op=lambda: scaled_rope_attention(q, k, v, schedule=yarn, causal=True),
        custom_op=lambda: ops.attention_fwd(*args),
        eager_op=lambda: ops.attention(*args),
        launcher=lambda: rope_attention_fwd_hopper(*args[:7], rotary_dim=128, interleaved=False, causal=True,
                                                   softmax_scale=128**-0.5, rotary_scale=scale),
        key_pass=lambda: rope(k, inv_freq, None, 0, rotary_dim=128, interleaved=False),
        empty_like=lambda: torch.empty_like(q),
    )
    print(f"\nN = {n}, forward: " + ", ".join(f"{name} {wall_us(fn):.0f} us" for name, fn in layers.items()))


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        print("| N | mode | " + " | ".join(pipelines(128, False)[0]) + " |")
        print("| --- " * 6 + "|")
        for n in (128, 512):
            for train in (False, True):
                fns, _ = pipelines(n, train)
                print(f"| {n} | {'fwd+bwd' if train else 'fwd'} | "
                      + " | ".join(f"{wall_us(fn):.0f} us" for fn in fns.values()) + " |")
        print("\n| N | one elementwise op | apply_scaled_rope | ratio |\n| --- | --- | --- | --- |")
        for n in (128, 512, 16384):
            elementwise, rope = (wall_us(fn) for fn in rotations(n).values())
            print(f"| {n} | {elementwise:.0f} us | {rope:.0f} us | {rope / elementwise:.2f} |")
        if "--breakdown" in sys.argv:
            breakdown()
        if "--profile" in sys.argv:
            _, fn = pipelines(512, False)
            wall_us(fn)
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(CALLS):
                fn()
            profile.disable()
            torch.cuda.synchronize()
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
