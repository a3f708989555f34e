"""Packed documents: `scaled_rope_attention_varlen` against the pipelines a user builds today
for the same result, on 16k tokens packed from documents of log-uniform lengths 64..8k
(fixed seed), Hq 32, Hkv 8, D 128, YaRN, causal within each document:

  sdpa_loop                    `apply_scaled_rope` at per-document positions, then SDPA on
                               each document (a host loop over known lengths)
  flex_document_mask           `apply_scaled_rope`, then compiled FlexAttention with a
                               document-causal block mask (built once, outside the timed step)
  ropefast_dense_16k(_portable)  the dense causal op on one 16k sequence: the TF/s yardstick
  ropefast_varlen(_portable)   the varlen op (the portable kernels: `dispatch.portable_kernels`)

TF/s count the useful FLOPs: per document 4 Hq L^2 D / 2 (causal), 3.5x for forward +
backward (gradients of q, k, v), as bench/peers.py counts. ropefast_varlen runs last; its
extra_info carries its TF/s ratio to every pipeline timed before it in the same pytest run
(the dense op's ratio is issue 17's >= 0.9x criterion, the peers' its >= 1.5x).

`pytest bench/test_varlen.py --benchmark-only`; every case skips without CUDA.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from ropefast import apply_scaled_rope, dispatch, scaled_rope_attention, scaled_rope_attention_varlen
from ropefast.varlen import document_positions

from .peers import DTYPES, _compiled_flex, log_uniform_lengths, median_ms, peak_mib, yarn
from .peers import step as timed_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen benchmark needs a CUDA GPU")

TOKENS, HEADS, KV_HEADS, HEAD_DIM = 16384, 32, 8, 128
LENGTHS = log_uniform_lengths(TOKENS, 64, 8192, seed=0)
CASES = ["bf16"]
_TFLOPS = {}  # (dtype, mode) -> {impl: TF/s} measured in this pytest run


def useful_flops(lengths, backward):
    flops = sum(4 * HEADS * n * n * HEAD_DIM // 2 for n in lengths)
    return flops * 3.5 if backward else flops


def _bounds(device):
    cu = torch.tensor([0, *LENGTHS], device=device).cumsum(0).to(torch.int32)
    return cu, max(LENGTHS)


def build_varlen(device):
    sched = yarn(HEAD_DIM)
    cu, longest = _bounds(device)
    return lambda q, k, v: scaled_rope_attention_varlen(q, k, v, cu, cu, longest, longest, schedule=sched,
                                                        causal=True)


def build_dense(device):
    sched = yarn(HEAD_DIM)
    # one causal sequence of every token (squeeze, not [0], whose backward copies: in every pipeline)
    return lambda q, k, v: scaled_rope_attention(q[None], k[None], v[None], schedule=sched, causal=True).squeeze(0)


def build_sdpa_loop(device):
    sched = yarn(HEAD_DIM)
    cu, _ = _bounds(device)
    positions = document_positions(cu, cu, TOKENS, TOKENS)[1][None]
    starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]

    def fn(q, k, v):
        q, k = (apply_scaled_rope(x[None], schedule=sched, positions=positions).squeeze(0) for x in (q, k))
        outs = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), is_causal=True,
                                               enable_gqa=True).squeeze(0).transpose(0, 1)
                for a, b in zip(starts, starts[1:])]
        return torch.cat(outs)
    return fn


def build_flex_document_mask(device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sched = yarn(HEAD_DIM)
    cu, _ = _bounds(device)
    positions = document_positions(cu, cu, TOKENS, TOKENS)[1][None]
    document = torch.repeat_interleave(torch.arange(len(LENGTHS), device=device),
                                       torch.tensor(LENGTHS, device=device))

    def document_causal(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, None, None, TOKENS, TOKENS, device=device)
    flex = _compiled_flex(flex_attention)

    def fn(q, k, v):
        q, k = (apply_scaled_rope(x[None], schedule=sched, positions=positions) for x in (q, k))
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v[None].transpose(1, 2), block_mask=block_mask,
                   enable_gqa=True)
        return out.transpose(1, 2).squeeze(0)
    return fn


PIPELINES = {
    "sdpa_loop": (build_sdpa_loop, LENGTHS),
    "flex_document_mask": (build_flex_document_mask, LENGTHS),
    "ropefast_dense_16k": (build_dense, [TOKENS]),
    "ropefast_dense_16k_portable": (build_dense, [TOKENS]),  # *_portable: forward and backward
    "ropefast_varlen_portable": (build_varlen, LENGTHS),
    "ropefast_varlen": (build_varlen, LENGTHS),  # last: its ratios use the pipelines timed before it
}


def _path(impl, dtype):
    like = torch.empty(1, HEAD_DIM, dtype=DTYPES[dtype], device="cuda")
    if impl.startswith("ropefast"):
        with dispatch.portable_kernels() if impl.endswith("portable") else contextlib.nullcontext():
            return dispatch.path(like)
    return "torch"


PARAMS = [pytest.param(dtype, mode, impl, id=f"cuda-{dtype}-varlen{len(LENGTHS)}docs-{mode}-{impl}")
          for dtype in CASES for mode in ("fwd", "train") for impl in PIPELINES]


@pytest.mark.parametrize("dtype,mode,impl", PARAMS)
def test_varlen(benchmark, dtype, mode, impl):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=DTYPES[dtype], generator=gen)
    k, v = (torch.randn(TOKENS, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPES[dtype], generator=gen)
            for _ in range(2))
    q, k, v = (x.requires_grad_(mode == "train") for x in (q, k, v))
    build, lengths = PIPELINES[impl]
    fn = build("cuda")
    step = timed_step(fn, q, k, v, mode, portable=impl.endswith("portable"))
    try:
        step()  # compile / warm up
    except RuntimeError as err:
        if impl.startswith("ropefast"):
            raise
        pytest.skip(f"{impl} cannot run {mode}: {str(err).splitlines()[0][:200]}")

    ms = median_ms(step, "cuda")
    tflops = useful_flops(lengths, mode == "train") / ms / 1e9
    timed = _TFLOPS.setdefault((dtype, mode), {})
    timed[impl] = tflops
    info = benchmark.extra_info
    info.update(device="cuda", gpu=torch.cuda.get_device_name(), case=f"varlen-{dtype}-D{HEAD_DIM}-H{HEADS}-"
                f"gqa{HEADS // KV_HEADS}-T{TOKENS}", dtype=dtype, head_dim=HEAD_DIM, heads=HEADS, kv_heads=KV_HEADS,
                tokens=TOKENS, n=TOKENS, batch=1, documents=lengths, causal=True, mode=mode, impl=impl,
                path=_path(impl, dtype),
                median_ms=ms, tflops=tflops, peak_mib=peak_mib(step, "cuda"))
    if impl == "ropefast_varlen":
        info["tflops_ratio"] = {other: tflops / value for other, value in timed.items() if other != impl}

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"varlen {dtype} {mode}"
    benchmark.pedantic(synced, rounds=max(3, min(20, int(200 / ms))), warmup_rounds=1)
