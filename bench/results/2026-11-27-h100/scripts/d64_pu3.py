"""D = 64 causal forwards: the dispatched Gluon config against three consumers on pair units.
usage: python exp/d64_pu3.py   env ROUNDS, NS"""
import functools, os, torch, triton
import ropefast.ops, ropefast.repeat as rp
from ropefast.kernels.hopper import attention_fwd as hopper
from bench.peers import Case, build_ropefast, build_sdpa, build_triton_rope_sdpa, make_inputs, step
launcher = ropefast.ops.rope_attention_fwd_hopper
VARIANTS = {"three_tile": functools.partial(launcher, config=hopper.HopperFwdConfig(3, 128, 2, 160, 128, 0)),
            "default": launcher}
def use(v):
    ropefast.ops.rope_attention_fwd_hopper = VARIANTS[v]; rp.clear()
rounds = int(os.environ.get("ROUNDS", "2"))
cases = [Case("bf16", 64, 32, 32, n, True) for n in [int(x) for x in os.environ.get("NS", "1024,2048,4096").split(",")]]
for case in cases:
    q, k, v = make_inputs(case, "cuda")
    outs = {}
    with torch.no_grad():
        for var in VARIANTS:
            use(var); outs[var] = build_ropefast(case, "cuda")(q, k, v).float()
    diff = max((outs[m] - outs["three_tile"]).abs().max().item() for m in outs)
    peers = {"cudnn": build_sdpa("cudnn")(case, "cuda"), "rope+cudnn": build_triton_rope_sdpa(case, "cuda")}
    for r in range(rounds):
        ms = {name: triton.testing.do_bench(step(fn, q, k, v, "fwd"), warmup=10, rep=60, return_mode="median")
              for name, fn in peers.items()}
        for var in VARIANTS:
            use(var)
            ms[var] = triton.testing.do_bench(step(build_ropefast(case, "cuda"), q, k, v, "fwd"), warmup=10, rep=60,
                                              return_mode="median")
        fl = case.flops(False)
        row = "  ".join(f"{m} {fl / ms[m] / 1e9:6.1f} ({ms['cudnn'] / ms[m]:.3f} {ms['rope+cudnn'] / ms[m]:.3f})"
                        for m in VARIANTS)
        print(f"fwd {case.name:32s} r{r} {row}  default/three_tile {ms['three_tile'] / ms['default']:.3f}  "
              f"cudnn {fl / ms['cudnn'] / 1e9:6.1f}  maxdiff {diff:.2e}", flush=True)
