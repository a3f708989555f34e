"""One device session: forward block-config sweep, then the forward or forward+backward
table against the peers (TF/s, ratios, peak memory), as markdown on stdout.

python -m bench.gpu_attention [--sweep] [--backward]   (CUDA only)
"""

import argparse
import sys

import torch
import triton

from ropefast import schedules
from ropefast.kernels import attention_fwd

from .peers import attention_flops, eager_rope_sdpa, rope_cos_sin, ropefast_attention, sdpa, triton_rope_sdpa

TOKENS = 16384


def bench_ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def inputs(n, heads, head_dim, dtype=torch.bfloat16):
    batch = TOKENS // n
    q, k, v = (torch.randn(batch, n, heads, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    sched = schedules.YaRN(head_dim, factor=4.0, original_max_position_embeddings=4096)
    return q, k, v, sched


def sweep(configs_by_shape, lengths=(4096, 16384)):
    """Time the forward per block config (rope passes included), and the rope pass alone."""
    from ropefast.kernels.rope import rope

    print("| D | N | causal | config (BM, BN, warps, stages) | ms | TF/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (heads, head_dim), configs in configs_by_shape.items():
        for n in lengths:
            q, k, v, sched = inputs(n, heads, head_dim)
            inc = sched.inv_freq(device="cuda")
            ms = bench_ms(lambda: rope(k, inc, None, 0, rotary_dim=head_dim, interleaved=False))
            print(f"| {head_dim} | {n} | - | one rope pass | {ms:.3f} | - |")
            for causal in (False, True):
                flops = attention_flops(q.shape[0], heads, n, n, head_dim, causal)
                for cfg in configs:
                    def fn():
                        attention_fwd.rope_attention_fwd(
                            q, k, v, inc, None, None, None, rotary_dim=head_dim, interleaved=False, causal=causal,
                            softmax_scale=head_dim**-0.5, rotary_scale=1.1, layout="bshd", config=cfg)
                    try:
                        ms = bench_ms(fn)
                        res = f"{ms:.3f} | {flops / ms / 1e9:.0f}"
                    except Exception as e:  # out of shared memory, etc.
                        res = f"failed: {type(e).__name__} |"
                    print(f"| {head_dim} | {n} | {causal} | {cfg} | {res} |")
                    sys.stdout.flush()


def table(backward=False):
    rows = []
    for heads, head_dim in ((16, 128), (32, 64)):
        for n in (1024, 4096, 16384):
            for causal in (False, True):
                q, k, v, sched = inputs(n, heads, head_dim)
                cos, sin = rope_cos_sin(sched, n, "cuda", q.dtype)
                flops = attention_flops(q.shape[0], heads, n, n, head_dim, causal, backward=backward)
                impls = {
                    "ropefast": lambda: ropefast_attention(q, k, v, causal, sched),
                    "sdpa_cudnn_norope": lambda: sdpa(q, k, v, causal, "cudnn"),
                    "sdpa_flash_norope": lambda: sdpa(q, k, v, causal, "flash"),
                    "eager_rope+cudnn": lambda: eager_rope_sdpa(q, k, v, causal, cos, sin, "cudnn"),
                    "triton_rope+cudnn": lambda: triton_rope_sdpa(q, k, v, causal, sched, "cudnn"),
                }
                if backward:
                    for x in (q, k, v):
                        x.requires_grad_()
                    grad = torch.randn_like(q)
                    impls = {name: (lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad)) for name, fn in
                             impls.items()}
                tf, mem = {}, {}
                for name, fn in impls.items():
                    fn()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    fn()
                    mem[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    tf[name] = flops / bench_ms(fn) / 1e9
                rows.append((head_dim, heads, n, causal, tf, mem))
                print(f"D={head_dim} N={n} causal={causal}: " + ", ".join(f"{k} {v:.0f}" for k, v in tf.items()),
                      file=sys.stderr)
    names = list(rows[0][4])
    print(f"{'forward+backward' if backward else 'forward'}: TF/s (peak extra MiB)")
    print("| D | H | N | B | causal | " + " | ".join(names) + " | vs cudnn | vs flash | vs eager+cudnn | vs triton rope+cudnn |")
    print("| --- " * (5 + len(names) + 4) + "|")
    for head_dim, heads, n, causal, tf, mem in rows:
        r = tf["ropefast"]
        print(f"| {head_dim} | {heads} | {n} | {TOKENS // n} | {causal} | "
              + " | ".join(f"{tf[k]:.0f} ({mem[k]:.0f})" for k in names)
              + f" | {r / tf['sdpa_cudnn_norope']:.2f} | {r / tf['sdpa_flash_norope']:.2f}"
              + f" | {r / tf['eager_rope+cudnn']:.2f} | {r / tf['triton_rope+cudnn']:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args()
    if args.sweep:
        sweep({
            (16, 128): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
            (32, 64): [(128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 4)],
            (8, 256): [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
        })
    table(backward=args.backward)
