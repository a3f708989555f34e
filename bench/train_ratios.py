"""Forward+backward ratios of the fused op (its default backward, and deterministic=True)
against `apply_scaled_rope` + cuDNN SDPA and cuDNN SDPA without RoPE, on the suite's D=128
shapes plus GQA 4:1, D=64 and D=256: one table, JSON to $OUT when set. The numbers behind
bench/RESULTS.md's backward section:

    PYTHONPATH=. [ROUNDS=3] python bench/train_ratios.py [quick]

Each case times every pipeline once a round, ROUNDS rounds in turn (default 3): cuDNN's own
time swings by up to 10% between calls of one process, so a ratio comes from the times of one
round, and the table gives the median and the range over rounds (TF/s: the best round).
"""

import json
import os
import statistics
import sys

import triton

from bench.peers import Case, build_ropefast, build_sdpa, build_triton_rope_sdpa, make_inputs, step, yarn
from ropefast import scaled_rope_attention


def train_ms(fn, q, k, v):
    """Median ms of one forward and the backward of out with a fixed random gradient."""
    return triton.testing.do_bench(step(fn, q, k, v, "train"), warmup=10, rep=60, return_mode="median")


def cases(quick):
    if quick:
        return [Case("bf16", 128, 16, 16, 4096, causal) for causal in (False, True)]
    return ([Case("bf16", 128, 16, 16, n, causal) for n in (1024, 4096, 16384) for causal in (False, True)]
            + [Case("bf16", 128, 16, 4, 4096, causal) for causal in (False, True)]
            + [Case("bf16", 64, 32, 32, 4096, causal) for causal in (False, True)]
            + [Case("bf16", 256, 8, 8, 4096, True)])


def main(quick, rounds):
    rows = []
    for case in cases(quick):
        q, k, v = make_inputs(case, "cuda", requires_grad=True)
        sched = yarn(case.head_dim)
        pipelines = {
            "cudnn": build_sdpa("cudnn")(case, "cuda"),
            "rope+cudnn": build_triton_rope_sdpa(case, "cuda"),
            "fused": build_ropefast(case, "cuda"),
            "fused_deterministic": lambda q, k, v: scaled_rope_attention(q, k, v, schedule=sched, causal=case.causal,
                                                                         deterministic=True),
        }
        ms = [{name: train_ms(fn, q, k, v) for name, fn in pipelines.items()} for _ in range(rounds)]

        def ratios(peer, ours="fused"):
            return sorted(round(r[peer] / r[ours], 3) for r in ms)
        rows.append(dict(case=case.name, ms=[{name: round(t, 3) for name, t in r.items()} for r in ms],
                         tflops_fused=round(case.flops(True) / min(r["fused"] for r in ms) / 1e9, 1),
                         vs_cudnn=ratios("cudnn"), vs_rope_cudnn=ratios("rope+cudnn"),
                         deterministic_vs_cudnn=ratios("cudnn", "fused_deterministic")))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_ratios.json"), "w") as f:
            json.dump(rows, f, indent=1)

    def cell(values):  # median (min-max)
        return f"{statistics.median(values):.3f} ({values[0]:.3f}-{values[-1]:.3f})"
    print(f"{'case':40s} {'fused TF/s':>10s} {'/ cuDNN':>20s} {'/ rope+cuDNN':>20s} {'determ. / cuDNN':>20s}")
    for r in rows:
        print(f"{r['case']:40s} {r['tflops_fused']:10.1f} {cell(r['vs_cudnn']):>20s} {cell(r['vs_rope_cudnn']):>20s} "
              f"{cell(r['deterministic_vs_cudnn']):>20s}")


if __name__ == "__main__":
    main(quick=sys.argv[1:] == ["quick"], rounds=int(os.environ.get("ROUNDS", 3)))
