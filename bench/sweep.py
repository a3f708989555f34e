"""Block-config sweeps behind the tables in kernels/ (CUDA only):
python -m bench.sweep [rope] [fwd] [bwd] [hopper] [hopper_bwd] [decode]   (default: the first three)

rope: the rope pass per (rows, heads per program, warps); fwd: the forward launcher (rope
passes included) per (BLOCK_M, BLOCK_N, warps, stages, V first); bwd: the backward launcher per
dK/dV and dQ config, varying one kernel's config at a time; hopper: the Gluon forward per
(BLOCK_N, stages, consumer registers, maxnreg) beside cuDNN SDPA (no RoPE) and
`apply_scaled_rope` + cuDNN, in alternating rounds, with the share of its time the key rope
pass takes; hopper_bwd: the Gluon backward's gradient kernel alone (its preprocess included, no
rope passes) per `HopperBwdConfig`, with K^ given and, up to D = 128, the keys rotated inside
(alternating), also with GQA 4:1; decode: the decode kernel per `DecodeConfig` and key splits (Nq=1,
Hq=32, Hkv=8, D=128, dense cache), with the read rate of K and V. bf16, 16k tokens (not
decode); markdown on stdout.
The speed claims of the project come from the suite (pytest bench/), not from here.
"""

import sys

import torch
import triton

from ropefast.kernels import attention_bwd, attention_fwd, device, rope

from .peers import Case, build_sdpa, build_triton_rope_sdpa, make_inputs, yarn


def _ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _row(*cells):
    print("| " + " | ".join(str(c) for c in cells) + " |")
    sys.stdout.flush()


def _timed(fn, flops):
    try:
        ms = _ms(fn)
        return f"{ms:.3f}", f"{flops / ms / 1e9:.0f}"
    except Exception as err:  # out of shared memory and the like
        return f"failed: {type(err).__name__}", "-"


def sweep_rope(configs=((16, 4, 4), (16, 8, 4), (32, 4, 4), (8, 8, 4), (16, 16, 8), (32, 8, 8), (8, 4, 2))):
    _row("D", "H", "(rows, heads/program, warps)", "output", "ms", "GB/s")
    _row(*["---"] * 6)
    for heads, head_dim in ((16, 128), (32, 64), (8, 256)):
        x, _, _ = make_inputs(Case("bf16", head_dim, heads, heads, 4096, False), "cuda")
        inv_freq = yarn(head_dim).inv_freq(device="cuda")
        for cfg in configs:
            for output in ("like x", "sequence-major"):
                out = attention_fwd.sequence_major(*x.shape, x) if output != "like x" else None
                ms = _ms(lambda: rope.rope(x, inv_freq, None, 0, rotary_dim=head_dim, interleaved=False, out=out,
                                           config=cfg))
                _row(head_dim, heads, cfg, output, f"{ms:.4f}", f"{2 * x.numel() * x.element_size() / ms / 1e6:.0f}")


def _args(head_dim, causal):
    return dict(rotary_dim=head_dim, interleaved=False, causal=causal, softmax_scale=head_dim**-0.5, rotary_scale=1.1)


def _cases(head_dim, lengths, gqa=False):
    """(case, q, k, v, inv_freq) for bf16 at 16k tokens, 2048 // D heads, full then causal
    (`gqa`: then causal with a quarter of the KV heads)."""
    heads = 2048 // head_dim
    for n in lengths:
        for kv_heads, causal in ((heads, False), (heads, True)) + (((heads // 4, True),) if gqa else ()):
            case = Case("bf16", head_dim, heads, kv_heads, n, causal)
            yield (case, *make_inputs(case, "cuda"), yarn(head_dim).inv_freq(device="cuda"))


def sweep_fwd(configs_by_dim=None, lengths=(4096, 16384)):
    configs_by_dim = configs_by_dim or {
        128: [(128, 128, 8, 3, True), (128, 128, 8, 3, False), (64, 128, 4, 1, False), (64, 128, 4, 1, True),
              (64, 64, 4, 3, False)],
        64: [(64, 128, 4, 2, False), (64, 128, 4, 2, True), (64, 128, 4, 1, False)],
    }
    _row("D", "N", "causal", "(BLOCK_M, BLOCK_N, warps, stages, V first)", "ms", "TF/s")
    _row(*["---"] * 6)
    for head_dim, configs in configs_by_dim.items():
        for case, q, k, v, inv_freq in _cases(head_dim, lengths):
            for cfg in configs:
                ms, tf = _timed(lambda: attention_fwd.rope_attention_fwd(
                    q, k, v, inv_freq, None, None, None, config=cfg, **_args(head_dim, case.causal)), case.flops(False))
                _row(head_dim, case.n, case.causal, cfg, ms, tf)


def sweep_bwd(candidates_by_dim=None, lengths=(4096, 16384)):
    """The whole backward launcher (rope passes, both kernels, inverse passes) per dK/dV
    config with the first dQ config, then per dQ config with the first dK/dV config."""
    candidates_by_dim = candidates_by_dim or {
        128: dict(dkdv=[(64, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3)],
                  dq=[(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 1), (64, 128, 4, 2)]),
        64: dict(dkdv=[(64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2)],
                 dq=[(64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2)]),
    }
    _row("D", "N", "causal", "dK/dV config", "dQ config", "ms", "backward TF/s (2.5x forward FLOPs)")
    _row(*["---"] * 7)
    for head_dim, cands in candidates_by_dim.items():
        combos = [(c, cands["dq"][0]) for c in cands["dkdv"]] + [(cands["dkdv"][0], c) for c in cands["dq"][1:]]
        for case, q, k, v, inv_freq in _cases(head_dim, lengths):
            args = _args(head_dim, case.causal)
            do = torch.randn_like(q)
            out, lse, _ = attention_fwd.rope_attention_fwd(q, k, v, inv_freq, None, None, None, **args)
            for cfg in combos:
                ms, tf = _timed(lambda: attention_bwd.rope_attention_bwd(
                    do, q, k, v, out, lse, None, inv_freq, None, None, None, need_dfreq=False, need_dtemp=False,
                    config=cfg, **args), case.flops(True) - case.flops(False))
                _row(head_dim, case.n, case.causal, cfg[0], cfg[1], ms, tf)


def sweep_hopper(configs_by_dim=None, lengths=(1024, 4096, 16384), rounds=2):
    from ropefast.kernels.hopper import attention_fwd as hopper

    configs_by_dim = configs_by_dim or {128: [None], 64: [None], 256: [None]}
    _row("D", "N", "causal", "round", "config", "ms", "TF/s", "cuDNN TF/s", "rope + cuDNN TF/s", "vs cuDNN",
         "vs rope + cuDNN", "key pass share")
    _row(*["---"] * 12)
    for head_dim, configs in configs_by_dim.items():
        for case, q, k, v, inv_freq in _cases(head_dim, lengths):
            args = _args(head_dim, case.causal)
            peers = {name: build(case, "cuda") for name, build in (("cudnn", build_sdpa("cudnn")),
                                                                   ("rope+cudnn", build_triton_rope_sdpa))}
            k_rot = torch.empty(case.batch, case.kv_heads, case.n, head_dim, device="cuda", dtype=k.dtype)
            key_pass_ms = _ms(lambda: rope.rope(k, inv_freq, None, 0, rotary_dim=head_dim, interleaved=False,
                                                out=k_rot.transpose(1, 2)))
            for r in range(rounds):
                peer_ms = {name: _ms(lambda: fn(q, k, v)) for name, fn in peers.items()}
                for cfg in configs:
                    ms = _ms(lambda: hopper.rope_attention_fwd_hopper(q, k, v, inv_freq, None, None, None,
                                                                      config=cfg, **args))
                    flops = case.flops(False)
                    _row(head_dim, case.n, case.causal, r, cfg or "default", f"{ms:.3f}", f"{flops / ms / 1e9:.0f}",
                         f"{flops / peer_ms['cudnn'] / 1e9:.0f}", f"{flops / peer_ms['rope+cudnn'] / 1e9:.0f}",
                         f"{peer_ms['cudnn'] / ms:.2f}", f"{peer_ms['rope+cudnn'] / ms:.2f}",
                         f"{key_pass_ms / ms:.1%}")


def sweep_hopper_bwd(configs_by_dim=None, lengths=(1024, 4096, 16384), rounds=2):
    from ropefast.kernels.hopper import attention_bwd as hopper

    configs_by_dim = configs_by_dim or {128: [None], 64: [None], 256: [None]}
    _row("D", "Hq/Hkv", "N", "causal", "round", "config", "keys", "ms", "backward TF/s (2.5x forward FLOPs)")
    _row(*["---"] * 9)
    for head_dim, configs in configs_by_dim.items():
        for case, q, k, v, inv_freq in _cases(head_dim, lengths, gqa=True):
            args = _args(head_dim, case.causal)
            out, lse, _ = attention_fwd.rope_attention_fwd(q, k, v, inv_freq, None, None, None, **args)
            q_rot, k_rot = attention_fwd.rotate_q_k(q, k, inv_freq, None, None, None, rotary_dim=head_dim,
                                                    interleaved=False, softmax_scale=args["softmax_scale"],
                                                    rotary_scale=args["rotary_scale"])
            do = torch.randn_like(q)
            dk = attention_fwd.sequence_major(*k.shape, k)
            keys = (k, inv_freq, None, head_dim, False)
            for r in range(rounds):
                # the two ways alternate their order between rounds (a single round's neighbours
                # differed by up to 15% where three alternating rounds read them level)
                ways = ((True, False) if r % 2 == 0 else (False, True)) if head_dim <= 128 else (True,)
                for cfg in configs:
                    for rotated in ways:
                        ms, tf = _timed(lambda: hopper.rope_attention_bwd_hopper(
                            do, out, lse, None, q_rot, k_rot if rotated else None, v, dk, causal=case.causal,
                            keys=keys, config=cfg), case.flops(True) - case.flops(False))
                        _row(head_dim, f"{case.heads}/{case.kv_heads}", case.n, case.causal, r, cfg or "default",
                             "K^ given" if rotated else "rotated inside", ms, tf)


def sweep_decode(configs=((32, 8, 3, 2), (64, 4, 3, 2), (64, 8, 3, 2), (128, 4, 3, 1), (128, 8, 3, 1)),
                 shapes=((1, 32768), (8, 4096), (8, 32768), (32, 32768), (8, 131072))):
    from ropefast.kernels import decode

    inv_freq = yarn(128).inv_freq(device="cuda")
    _row("B", "cache", "config", "splits", "us", "GB/s of K and V")
    _row(*["---"] * 6)
    for batch, length in shapes:
        q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, length, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lengths = torch.full((batch,), length - 1, device="cuda", dtype=torch.int32)
        for cfg in map(decode.DecodeConfig._make, configs):
            chosen = decode.decode_splits(batch * 8, length, device.multiprocessors(q.device), cfg.programs_per_sm)
            for splits in sorted({1, chosen, 2 * chosen, max(1, chosen // 2)}):
                ms = _ms(lambda: decode.decode_attention(
                    q, k, v, lengths, None, inv_freq, None, n_new=1, rotary_dim=128, interleaved=False, causal=True,
                    softmax_scale=128**-0.5, rotary_scale=1.0, num_splits=splits, config=cfg))
                default = " (default)" if splits == chosen else ""
                _row(batch, length, tuple(cfg), f"{splits}{default}", f"{ms * 1e3:.0f}",
                     f"{2 * batch * length * 8 * 128 * 2 / ms / 1e6:.0f}")


if __name__ == "__main__":
    chosen = sys.argv[1:] or ["rope", "fwd", "bwd"]
    for name in chosen:
        {"rope": sweep_rope, "fwd": sweep_fwd, "bwd": sweep_bwd, "hopper": sweep_hopper, "hopper_bwd": sweep_hopper_bwd,
         "decode": sweep_decode}[name]()
        print()
