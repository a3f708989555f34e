"""Context parallel on GPUs: `torchrun --nproc_per_node 2 bench/cp_check.py [--seq-lens 32768,131072] [--iters 3]`.

For each N and causal/full: the ring (`ropefast.distributed`) on the P GPUs of the run, each
holding N/P tokens in the load-balanced layout, against the dense op on one GPU over the
whole sequence. B=1, Hq=32, Hkv=8, D=128, bf16, YaRN.
  correctness: the ring's out, lse, dq, dk, dv and d inv_freq (summed over ranks) against
    the dense op's, as ||ring - dense|| / ||dense|| (both bf16: "ok" under 1e-2);
  strong scaling: forward+backward (no learnable frequencies) in ms, the median of --iters
    timed steps after a warm-up; the ring's step is the slowest rank's, its calls include
    the per-call shape check. speedup = dense 1 GPU / ring P GPUs (the issue asks >= 1.7 at P=2).
Rank 0 prints a table and, if $OUT is set, writes $OUT/cp_check.json.
"""

import argparse
import json
import os
import statistics
import subprocess

import torch
import torch.distributed as dist

import triton
from ropefast import dispatch, scaled_rope_attention, schedules
from ropefast.distributed import gather_from_context_parallel, ring_scaled_rope_attention, shard_for_context_parallel

B, HQ, HKV, D = 1, 32, 8, 128
TOLERANCE = 1e-2


def rel_err(x, ref):
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm()).item()


def inputs(n):
    """The whole sequence, identical on every rank (same seed, same generator)."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(B, n, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(B, n, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    grad = torch.randn(B, n, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v, grad


def fwd_bwd(op, q, k, v, grad, inv_freq=None, **kwargs):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if inv_freq is not None:
        leaves.append(inv_freq.detach().requires_grad_())
    out, lse = op(*leaves[:3], inv_freq=leaves[3] if inv_freq is not None else None, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad)
    return (out.detach(), lse.detach(), *grads)


def timed_ms(step, iters):
    """Median wall time of `step` over iters, the slowest rank's, after one warm-up."""
    step()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        elapsed = torch.tensor(start.elapsed_time(end), device="cuda")
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times)


def check(n, causal, iters, rank, world_size):
    yarn = schedules.YaRN(D, factor=4.0, original_max_position_embeddings=4096)
    q, k, v, grad = inputs(n)
    shards = [shard_for_context_parallel(x)[0] for x in (q, k, v, grad)]
    inv_freq = yarn.inv_freq(device="cuda")
    kwargs = dict(schedule=yarn, causal=causal)

    # correctness, with learnable frequencies (their gradient is each rank's share: summed here)
    out, lse, dq, dk, dv, dfreq = fwd_bwd(ring_scaled_rope_attention, *shards, inv_freq=inv_freq, **kwargs)
    dist.all_reduce(dfreq)
    ring = dict(out=out, dq=dq, dk=dk, dv=dv)
    ring = {name: gather_from_context_parallel(t) for name, t in ring.items()}
    ring["lse"], ring["dfreq"] = gather_from_context_parallel(lse, dim=2), dfreq
    row = dict(n=n, causal=causal, world_size=world_size)
    if rank == 0:
        out, lse, dq, dk, dv, dfreq = fwd_bwd(scaled_rope_attention, q, k, v, grad, inv_freq=inv_freq, **kwargs)
        dense = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, dfreq=dfreq)
        row["rel_err"] = {name: rel_err(ring[name], dense[name]) for name in dense}
        row["ok"] = all(err < TOLERANCE for err in row["rel_err"].values())
    del ring, out, lse, dq, dk, dv, dfreq
    torch.cuda.empty_cache()

    # strong scaling: the ring on P GPUs against the dense op on one (rank 0's; the others wait)
    row["ring_ms"] = timed_ms(lambda: fwd_bwd(ring_scaled_rope_attention, *shards, **kwargs), iters)
    dense_ms = timed_ms(lambda: fwd_bwd(scaled_rope_attention, q, k, v, grad, **kwargs) if rank == 0 else None, iters)
    row["dense_ms"] = dense_ms
    row["speedup"] = dense_ms / row["ring_ms"]
    row["path"] = dispatch.path(q)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="32768,131072")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = [check(n, causal, args.iters, rank, world_size)
            for n in map(int, args.seq_lens.split(",")) for causal in (True, False)]
    if rank == 0:
        print(f"\ncontext parallel, {world_size} x {torch.cuda.get_device_name()}, B={B} Hq={HQ} Hkv={HKV} D={D} bf16, "
              f"YaRN; ring vs the dense op on 1 GPU (path {rows[0]['path']})")
        print(f"{'N':>7} {'causal':>6} {'dense 1 GPU ms':>15} {'ring ms':>9} {'speedup':>8}  max rel err (of)       ok")
        for row in rows:
            worst = max(row["rel_err"], key=row["rel_err"].get)
            print(f"{row['n']:>7} {str(row['causal']):>6} {row['dense_ms']:>15.1f} {row['ring_ms']:>9.1f} "
                  f"{row['speedup']:>8.2f}  {row['rel_err'][worst]:.2e} ({worst:<5})  {row['ok']}")
        if os.environ.get("OUT"):
            try:
                commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True).stdout.strip()
            except OSError:
                commit = ""
            meta = dict(device=torch.cuda.get_device_name(), world_size=world_size, torch=torch.__version__,
                        triton=triton.__version__, commit=commit)
            with open(os.path.join(os.environ["OUT"], "cp_check.json"), "w") as f:
                json.dump(dict(meta, rows=rows), f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
