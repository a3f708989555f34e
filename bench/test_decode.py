"""Decode benchmark (CUDA only): one new token per sequence over a KV cache, bf16, Hq=32,
Hkv=8, D=128 (Llama-3-8B's attention), YaRN (factor 4), B in {1, 8, 32}, cache lengths
{4k, 32k} (the new token included), eager and replayed from a CUDA graph.

Pipelines, each a whole decode step (rotation, cache write, attention):
  ropefast        `scaled_rope_attention_with_kvcache` over an UNROTATED dense cache
                  [B, max_len, Hkv, D] (append, split-KV attention rotating keys as it reads)
  ropefast_paged  the same over a paged cache (pages of 256 rows, shuffled)
  eager_rope+sdpa the pipeline users run today (HF): cos/sin of the new position, q and k
                  rotated eagerly, k and v written into a PRE-ROTATED cache [B, Hkv, max_len, D]
                  (index_copy_ at the position, as HF's StaticCache), SDPA (its own backend
                  choice, GQA) over the filled slice
  triton_rope+sdpa the same with ropefast's `apply_scaled_rope` kernel doing the rotation
  flash_attn      flash-attn's `flash_attn_with_kvcache` rotating q and k (rotary_cos/sin
                  tables) into a pre-rotated cache, when flash_attn is importable (else skipped)
All compute the same function of the same data (the peers' caches hold the same
keys, rotated) at the same position. `extra_info`: median ms, decode tokens/s
(B per step time), achieved bandwidth (GB/s of K and V cache read: 2 * B * len * Hkv * D * 2
bytes per step) and, on ropefast's tests (last of each case), its speedup over every peer
and its bandwidth as a fraction of the card's copy bandwidth (`copy_gbps`: bytes read and
written per second by a device-to-device copy of 2 GiB, measured once per run).
Run: `pytest bench/test_decode.py --benchmark-only [--benchmark-json decode.json]`.
"""

import pytest
import torch
import torch.nn.functional as F

from ropefast import apply_scaled_rope, scaled_rope_attention_with_kvcache

from .peers import median_ms, yarn
from .test_latency import graphed

HQ, HKV, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 256
# B in {1, 8, 32, 64} x cache {4k, 32k, 128k} up to 2M cached tokens: B = 32 and 64 at 128k
# would hold 17-34 GB of K and V per pipeline, with two pipelines' caches alive at once.
CASES = [(batch, length) for length in (4096, 32768, 131072) for batch in (1, 8, 32, 64)
         if batch * length <= 64 * 32768]
PIPELINES = ("eager_rope+sdpa", "triton_rope+sdpa", "flash_attn", "ropefast_paged", "ropefast")  # ropefast last
PARAMS = [pytest.param(batch, length, impl, graph, id=f"B{batch}-len{length // 1024}k-{impl}-{graph}")
          for batch, length in CASES for graph in ("eager", "cuda_graph") for impl in PIPELINES]
_MS = {}  # (batch, length, graph) -> {impl: ms} measured in this pytest run
_COPY_GBPS = []  # the card's copy bandwidth, measured once per run


def copy_gbps():
    """GB/s read plus written by `copy_` of a 2 GiB bf16 tensor into another (the memory
    system's practical rate, the bar for a bandwidth-bound kernel)."""
    if not _COPY_GBPS:
        src = torch.empty(2**30, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        _COPY_GBPS.append(2 * src.numel() * 2 / median_ms(lambda: dst.copy_(src), "cuda") / 1e6)
    return _COPY_GBPS[0]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def build(impl, batch, length):
    """A decode step fn() for `impl` with its inputs and cache: the new token sits at position
    length - 1 of every sequence (each call rewrites it: the step repeats identically)."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    sched = yarn(HEAD_DIM)
    q, k_new, v_new = randn(batch, 1, HQ, HEAD_DIM), randn(batch, 1, HKV, HEAD_DIM), randn(batch, 1, HKV, HEAD_DIM)
    keys, values = randn(batch, length, HKV, HEAD_DIM), randn(batch, length, HKV, HEAD_DIM)  # the prefix, unrotated
    position = torch.full((batch,), length - 1, device="cuda", dtype=torch.int32)
    if impl.startswith("ropefast"):
        block_table, k_cache, v_cache = None, keys, values
        if impl == "ropefast_paged":  # the same rows, in shuffled pages
            pages = length // PAGE_SIZE
            block_table = torch.randperm(batch * pages, device="cuda", generator=gen).view(batch, pages).int()
            k_cache, v_cache = (torch.empty(batch * pages, PAGE_SIZE, HKV, HEAD_DIM, device="cuda", dtype=x.dtype)
                                for x in (keys, values))
            k_cache[block_table.long()] = keys.unflatten(1, (pages, PAGE_SIZE))
            v_cache[block_table.long()] = values.unflatten(1, (pages, PAGE_SIZE))
        return lambda: scaled_rope_attention_with_kvcache(q, k_cache, v_cache, k_new=k_new, v_new=v_new,
                                                          cache_seqlens=position, block_table=block_table,
                                                          schedule=sched)
    inv_freq, m = sched.inv_freq(device="cuda"), sched.rotary_scale()
    rotated_keys = apply_scaled_rope(keys, schedule=sched)  # the peers' caches hold keys rotated when written
    if impl == "flash_attn":
        flash_attn = pytest.importorskip("flash_attn")
        k_cache, v_cache = rotated_keys, values
        angles = torch.arange(length, device="cuda", dtype=torch.float32)[:, None] * inv_freq
        cos, sin = ((angles.cos() * m).to(torch.bfloat16), (angles.sin() * m).to(torch.bfloat16))
        return lambda: flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, rotary_cos=cos,
                                                          rotary_sin=sin, cache_seqlens=position, causal=True,
                                                          rotary_interleaved=False)
    # HF: a [B, Hkv, max_len, D] cache of rotated keys, SDPA over the filled part
    k_cache, v_cache = rotated_keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()
    return sdpa_step(impl, sched, q, k_new, v_new, k_cache, v_cache, position, length)


def sdpa_step(impl, sched, q, k_new, v_new, k_cache, v_cache, position, length):
    """A step of the pipelines users run today ("eager_rope+sdpa", "triton_rope+sdpa") over
    pre-rotated caches [B, Hkv, max_len, D]: q and the new key rotated at position[0] (one
    position for the batch, as HF's StaticCache takes it), k and v written there, SDPA over
    the first `length` rows."""
    inv_freq, m = sched.inv_freq(device="cuda"), sched.rotary_scale()
    cache_position = position[:1].long()

    def rotate(x):
        if impl == "triton_rope+sdpa":
            return apply_scaled_rope(x, schedule=sched, positions=cache_position)
        freqs = cache_position[:, None].float() * inv_freq  # HF's rotary embedding, per forward
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = ((emb.cos() * m).to(x.dtype)[:, None], (emb.sin() * m).to(x.dtype)[:, None])
        return x * cos + _rotate_half(x) * sin

    def step():
        q_rot, k_rot = rotate(q), rotate(k_new)
        k_cache.index_copy_(2, cache_position, k_rot.transpose(1, 2))
        v_cache.index_copy_(2, cache_position, v_new.transpose(1, 2))
        out = F.scaled_dot_product_attention(q_rot.transpose(1, 2), k_cache[:, :, :length], v_cache[:, :, :length],
                                             enable_gqa=True)
        return out.transpose(1, 2)
    return step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="decode is benchmarked on a CUDA GPU")
@pytest.mark.parametrize("batch,length,impl,graph", PARAMS)
def test_decode(benchmark, batch, length, impl, graph):
    step = build(impl, batch, length)
    try:
        step()  # compile / warm up; a peer that cannot take the case says so here
    except RuntimeError as err:
        if impl.startswith("ropefast"):
            raise
        pytest.skip(f"{impl} cannot run B{batch} len{length}: {str(err).splitlines()[0][:200]}")
    fn = graphed(step) if graph == "cuda_graph" else step
    ms = median_ms(fn, "cuda")
    cache_bytes = 2 * batch * length * HKV * HEAD_DIM * 2  # K and V, bf16
    peers = _MS.setdefault((batch, length, graph), {})
    peers[impl] = ms
    info = benchmark.extra_info
    info.update(device="cuda", gpu=torch.cuda.get_device_name(), case=f"decode-B{batch}-len{length}", batch=batch,
                cache_len=length, heads=HQ, kv_heads=HKV, head_dim=HEAD_DIM, dtype="bf16", impl=impl, graph=graph,
                median_ms=ms, tokens_per_s=batch / ms * 1e3, gbps=cache_bytes / ms / 1e6)
    if impl == "ropefast":
        info["speedup"] = {peer: value / ms for peer, value in peers.items() if peer != impl}
        info.update(copy_gbps=copy_gbps(), of_copy=info["gbps"] / copy_gbps())
    benchmark.group = f"decode B{batch} len{length // 1024}k {graph}"

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, warmup_rounds=1)
