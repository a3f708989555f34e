"""Decode at B = 64 with 128k caches (8M cached tokens, 34 GB of K and V per pipeline), which
the suite (test_decode.py) cannot hold beside a peer's cache on an 80 GB card: ropefast over
an unrotated dense cache, then, with its cache freed, the eager pipeline (HF-style rotation of
the new q and k, SDPA over a pre-rotated cache of random keys of the same size). CUDA only:

    PYTHONPATH=. python bench/decode_large.py
"""

import gc

import torch

from bench.peers import median_ms, yarn
from bench.test_decode import HEAD_DIM, HKV, HQ, copy_gbps, sdpa_step
from ropefast import scaled_rope_attention_with_kvcache

BATCH, LENGTH = 64, 131072


def main():
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    sched = yarn(HEAD_DIM)
    cache_bytes = 2 * BATCH * LENGTH * HKV * HEAD_DIM * 2
    q = torch.randn(BATCH, 1, HQ, HEAD_DIM, **bf16)
    k_new, v_new = (torch.randn(BATCH, 1, HKV, HEAD_DIM, **bf16) for _ in range(2))
    position = torch.full((BATCH,), LENGTH - 1, device="cuda", dtype=torch.int32)

    k_cache, v_cache = (torch.randn(BATCH, LENGTH, HKV, HEAD_DIM, **bf16) for _ in range(2))
    ours = median_ms(lambda: scaled_rope_attention_with_kvcache(q, k_cache, v_cache, k_new=k_new, v_new=v_new,
                                                                cache_seqlens=position, schedule=sched), "cuda")
    del k_cache, v_cache
    gc.collect()
    torch.cuda.empty_cache()

    k_cache, v_cache = (torch.randn(BATCH, HKV, LENGTH, HEAD_DIM, **bf16) for _ in range(2))
    pipeline = sdpa_step("eager_rope+sdpa", sched, q, k_new, v_new, k_cache, v_cache, position, LENGTH)
    theirs = median_ms(pipeline, "cuda")
    copy = copy_gbps()
    print(f"copy {copy:.0f} GB/s; ropefast {ours * 1e3:.0f} us, {cache_bytes / ours / 1e6:.0f} GB/s "
          f"({cache_bytes / ours / 1e6 / copy:.2f} of copy); eager rotation + SDPA {theirs * 1e3:.0f} us, "
          f"{cache_bytes / theirs / 1e6:.0f} GB/s; speedup {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
