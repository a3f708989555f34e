"""A/B of Hopper forward (or backward) builds in one process: the timing behind bench/RESULTS.md's
"new / old" columns. Each build is a copy of kernels/hopper/attention_fwd.py (attention_bwd.py)
under another name in the same folder, e.g. the last commit's:

    git show HEAD:kernels/hopper/attention_fwd.py > kernels/hopper/fwd_before.py
    python -m bench.ab fwd_before attention_fwd            # env: CASES=0,2 ROUNDS=3 MODE=train
    git show HEAD:kernels/hopper/attention_bwd.py > kernels/hopper/bwd_before.py
    KERNEL=bwd python -m bench.ab bwd_before attention_bwd  # forward+backward, the backward swapped

Make the copies where the commits are and let them travel as untracked files: a GPU machine's
copy of the tree may hold an older history, where `git show HEAD:` gives an older kernel.

Rounds alternate between the builds, with cuDNN SDPA (no RoPE) and `apply_scaled_rope` + cuDNN
timed in the same rounds, so that clock drift moves every column alike. A line per case and round:
TF/s of each build (its ratio to cuDNN, to `apply_scaled_rope` + cuDNN), the last build's speed
over the first's, and the largest difference of their outputs (KERNEL=bwd: of their gradients,
which float32 atomics sum in a varying order). Delete the copies afterwards.
"""

import importlib
import os
import sys

import torch
import triton

from ropefast import ops, repeat

from .peers import Case, build_ropefast, build_sdpa, build_triton_rope_sdpa, make_inputs, step

CASES = [Case("bf16", 128, 16, 16, n, causal) for n in (1024, 4096, 16384) for causal in (False, True)] + [
    Case("bf16", 128, 32, 8, 4096, True), Case("bf16", 256, 8, 8, 4096, True), Case("bf16", 256, 8, 8, 4096, False),
    Case("bf16", 128, 32, 8, 1024, True), Case("bf16", 64, 32, 32, 4096, False), Case("bf16", 64, 32, 32, 16384, True),
    Case("bf16", 64, 32, 32, 1024, True), Case("bf16", 64, 32, 32, 2048, True), Case("bf16", 64, 32, 32, 4096, True),
    Case("bf16", 64, 32, 32, 1024, False)]


def use(module, kernel):
    """Route the op's Hopper forward (kernel "fwd") or backward ("bwd") through `module`, for
    fresh calls (no repeated launches)."""
    if kernel == "bwd":
        ops.hopper_bwd = module
    else:
        ops.rope_attention_fwd_hopper = module.rope_attention_fwd_hopper
    repeat.clear()


def result(fn, q, k, v, kernel):
    """What the builds must agree on: the output, or (kernel "bwd") the gradients of q, k and v
    for one fixed output gradient, flattened into one float32 vector."""
    if kernel != "bwd":
        with torch.no_grad():
            return fn(q, k, v).float()
    torch.manual_seed(0)  # step's output gradient
    return torch.cat([g.float().flatten() for g in step(fn, q, k, v, "train")()])


def main(names):
    modules = {name: importlib.import_module("ropefast.kernels.hopper." + name) for name in names}
    kernel = os.environ.get("KERNEL", "fwd")
    mode = "train" if kernel == "bwd" else os.environ.get("MODE", "fwd")
    rounds = int(os.environ.get("ROUNDS", "2"))
    cases = [CASES[int(i)] for i in os.environ["CASES"].split(",")] if os.environ.get("CASES") else CASES
    first, last = names[0], names[-1]
    for case in cases:
        q, k, v = make_inputs(case, "cuda", requires_grad=mode == "train")
        outs = {}
        for name, module in modules.items():
            use(module, kernel)
            outs[name] = result(build_ropefast(case, "cuda"), q, k, v, kernel)
        diff = max((out - outs[first]).abs().max().item() for out in outs.values())
        peers = {"cudnn": build_sdpa("cudnn")(case, "cuda"), "rope+cudnn": build_triton_rope_sdpa(case, "cuda")}
        flops = case.flops(mode == "train")
        for r in range(rounds):
            ms = {name: triton.testing.do_bench(step(fn, q, k, v, mode), warmup=10, rep=60, return_mode="median")
                  for name, fn in peers.items()}
            for name, module in modules.items():
                use(module, kernel)
                ms[name] = triton.testing.do_bench(step(build_ropefast(case, "cuda"), q, k, v, mode), warmup=10,
                                                   rep=60, return_mode="median")
            row = "  ".join(f"{name} {flops / ms[name] / 1e9:6.1f} ({ms['cudnn'] / ms[name]:.3f} "
                            f"{ms['rope+cudnn'] / ms[name]:.3f})" for name in names)
            print(f"{mode} {case.name:34s} r{r} {row}  {last}/{first} {ms[first] / ms[last]:.3f}  "
                  f"cudnn {flops / ms['cudnn'] / 1e9:6.1f}  maxdiff {diff:.2e}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
