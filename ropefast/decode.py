"""Public entry point `scaled_rope_attention_with_kvcache`: decode and chunked prefill over a
KV cache that stores keys UNROTATED (kernels/decode.py rotates them as it reads them, at
their cache index, with this call's frequencies). Checks, schedule resolution, dispatch:
the decode kernels on CUDA and under the interpreter, `ropefast.reference` elsewhere."""

from typing import Optional, Union

import torch
from torch import Tensor

from . import dispatch
from ._validate import (as_batched, check_flags, check_head_tensor, check_int32, check_positive, check_q_temperature,
                        check_qkv, resolve_rotary)
from .kernels.decode import MAX_SPLITS, append_kv, decode_attention
from .reference import scaled_rope_attention_with_kvcache_reference
from .schedules.base import RopeSchedule

__all__ = ["scaled_rope_attention_with_kvcache"]


def scaled_rope_attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    *,
    k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None,
    cache_seqlens: Tensor,
    block_table: Optional[Tensor] = None,
    schedule: Optional[RopeSchedule] = None,
    inv_freq: Optional[Tensor] = None,
    rotary_dim: Optional[int] = None,
    interleaved: Optional[bool] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    rotary_scale: Optional[float] = None,
    q_temperature: Optional[Tensor] = None,
    return_lse: bool = False,
    seq_len: Optional[int] = None,
    num_splits: Optional[int] = None,
    check_values: Optional[bool] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of Nq >= 1 new queries per sequence over a KV cache of UNROTATED keys.

    Appends k_new / v_new (unrotated, if given) in place at rows cache_seqlens[b] + i, then
    attends: the keys of sequence b are its first L_b = cache_seqlens[b] + N_new cache rows
    (N_new = Nq with k_new, 0 without: the cache then already holds the queries' own keys),
    key j rotated at position j, query i at position L_b - Nq + i, key j visible to query i
    iff j <= L_b - Nq + i when causal (bottom-right, as flash-attn). Every step thus equals
    `scaled_rope_attention` over the whole prefix, also when the schedule's frequencies
    change with the length (dynamic NTK, CLEX), which a cache of rotated keys cannot do.

    Args:
        q: [B, Nq, Hq, D]; float16, bfloat16 or float32 (float64 runs the reference).
        k_cache, v_cache: dense [B, max_len, Hkv, D], or paged [num_pages, page_size, Hkv, D]
            with block_table; q's dtype and device; Hq % Hkv == 0. Keys stored unrotated.
        k_new, v_new: [B, Nq, Hkv, D] unrotated, both or neither; written into the caches.
        cache_seqlens: int32 [B], tokens in the cache before this call (the caller advances
            it by Nq afterwards, as with flash-attn's `flash_attn_with_kvcache`).
        block_table: int32 [B, max_pages]: page p of sequence b is k_cache[block_table[b, p]].
        schedule, inv_freq, rotary_dim, interleaved, softmax_scale, rotary_scale,
            q_temperature ([Nq] or [B, Nq]), return_lse: as `scaled_rope_attention`.
        causal: default True (decoding); False lets every query see all L_b keys.
        seq_len: the length a length-dependent schedule (`schedule.depends_on_seq_len`:
            dynamic NTK, CLEX, LongRoPE) sees. Default: max(cache_seqlens) + N_new, read on
            the host, a device sync taken only for such schedules. Pass it (the HF
            integration does) to keep the call free of syncs.
        num_splits: key splits per (sequence, KV head) (flash-decoding), 1..64; default from
            B, Hkv, the cache's capacity and the SM count (`kernels.decode.decode_splits`).
        check_values: check the values of cache_seqlens and block_table (L_b within the
            cache's capacity, page indices within num_pages); default: only for CPU tensors,
            where it costs no sync. True checks CUDA tensors too (one sync per call), False
            skips. Unchecked bad values never reach outside the caches (the kernels skip
            rows past the capacity and pages outside the cache), but that sequence's
            output is then wrong.

    Returns:
        out [B, Nq, Hq, D] (q's dtype), or (out, lse [B, Hq, Nq] float32). Forward only
        (inference): tensors that require grad, with grad mode on, raise a ValueError. A
        query that sees no key gets out = 0 and lse = -inf.

    Dispatch: CUDA tensors run kernels/decode.py (append, split-KV attention, combine: no
    host sync unless seq_len or check_values ask for one); CPU tensors run the same kernels
    under TRITON_INTERPRET=1 (float16/float32) and `ropefast.reference` otherwise.

    Example:
        >>> k_cache = torch.zeros(1, 256, 2, 64); v_cache = torch.zeros_like(k_cache)
        >>> lens = torch.zeros(1, dtype=torch.int32)
        >>> sched = schedules.DynamicNTKScaling(64, factor=2.0, max_position_embeddings=128)
        >>> q, k, v = torch.randn(1, 16, 4, 64), torch.randn(1, 16, 2, 64), torch.randn(1, 16, 2, 64)
        >>> out = scaled_rope_attention_with_kvcache(q, k_cache, v_cache, k_new=k, v_new=v,
        ...                                          cache_seqlens=lens, schedule=sched)
        >>> lens += 16
    """
    capacity, n_new = check_cache_args(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    check_flags(causal=causal, return_lse=return_lse)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)):
        raise TypeError(f"num_splits must be an int or None, got {type(num_splits).__name__}")
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    if check_values is None:
        check_values = q.device.type == "cpu"
    if check_values:
        check_cache_values(cache_seqlens, block_table, n_new, capacity, num_pages=k_cache.shape[0],
                           page_size=k_cache.shape[1])

    if schedule is not None and schedule.depends_on_seq_len and seq_len is None:
        seq_len = max(1, int(cache_seqlens.max()) + n_new)  # the one host sync: length-dependent schedules only
    batch, nq, _, head_dim = q.shape
    inv_freq, rotary_dim, interleaved, rotary_scale = resolve_rotary(
        schedule, inv_freq, rotary_dim, interleaved, rotary_scale, head_dim=head_dim,
        seq_len=1 if seq_len is None else seq_len, like=q, like_name="q")
    if schedule is not None and q_temperature is None and schedule.has_q_temperature:
        positions = cache_seqlens.long()[:, None] + (n_new - nq) + torch.arange(nq, device=q.device)
        q_temperature = schedule.q_temperature(positions)
    softmax_scale = head_dim**-0.5 if softmax_scale is None else check_positive("softmax_scale", softmax_scale)
    check_q_temperature(q_temperature, batch, nq, q.device)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (
            q, k_cache, v_cache, k_new, v_new, inv_freq, q_temperature)):
        raise ValueError("scaled_rope_attention_with_kvcache is forward only (inference): call it under "
                         "torch.no_grad() or on tensors that do not require grad")

    if dispatch.path(q) == "reference":
        out, lse = scaled_rope_attention_with_kvcache_reference(
            q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table, k_new=k_new, v_new=v_new,
            inv_freq=inv_freq, rotary_dim=rotary_dim, interleaved=interleaved, causal=causal,
            softmax_scale=softmax_scale, rotary_scale=rotary_scale, q_temperature=q_temperature, return_lse=True)
    else:
        if k_new is not None:
            append_kv(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)
        temperature = None if q_temperature is None else as_batched(q_temperature.float()).expand(batch, nq)
        out, lse = decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, inv_freq, temperature,
                                    n_new=n_new, rotary_dim=rotary_dim, interleaved=interleaved, causal=causal,
                                    softmax_scale=softmax_scale, rotary_scale=rotary_scale, num_splits=num_splits)
    return (out, lse) if return_lse else out


def check_cache_args(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    """The tensors' shapes, dtypes and devices; returns (rows a sequence's cache can hold,
    new tokens appended by this call)."""
    check_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    (batch, nq, hq, head_dim), (_, cache_rows, hkv, _) = q.shape, k_cache.shape
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must have q's head dim {head_dim}, got {tuple(k_cache.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the cache's KV heads ({hkv})")
    if batch == 0 or nq == 0 or cache_rows == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")

    check_int32("cache_seqlens", cache_seqlens, (batch,), q.device)
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"a dense k_cache must be [B={batch}, max_len, Hkv, D], got {tuple(k_cache.shape)} "
                             "(a paged cache needs block_table)")
        capacity = cache_rows
    else:
        check_int32("block_table", block_table, (batch, None), q.device)
        capacity = block_table.shape[1] * cache_rows  # pages per sequence x page size
    if (k_new is None) != (v_new is None):
        raise ValueError("give k_new and v_new together, or neither")
    n_new = 0
    if k_new is not None:
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            check_head_tensor(name, x)
            if x.shape != (batch, nq, hkv, head_dim):
                raise ValueError(f"{name} must be [B, Nq, Hkv, D] = {[batch, nq, hkv, head_dim]}, got {tuple(x.shape)}")
            if x.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
            if x.device != q.device:
                raise ValueError(f"{name} is on {x.device}, q is on {q.device}")
        n_new = nq
    if nq > capacity:
        raise ValueError(f"q has {nq} tokens per sequence, more than the cache holds ({capacity})")
    return capacity, n_new


def check_cache_values(cache_seqlens, block_table, n_new, capacity, *, num_pages, page_size):
    """cache_seqlens[b] + n_new within the capacity, and the pages those rows use within the
    cache (reads the values: a sync on a GPU)."""
    lengths = cache_seqlens.long().cpu()
    if (lengths < 0).any():
        raise ValueError(f"cache_seqlens must be >= 0, got {lengths.tolist()}")
    if (lengths + n_new > capacity).any():
        worst = int(lengths.max())
        raise ValueError(f"cache_seqlens + {n_new} new tokens passes the cache's capacity of {capacity} rows "
                         f"(largest cache_seqlens: {worst})")
    if block_table is not None:
        used = torch.arange(block_table.shape[1]) < ((lengths + n_new + page_size - 1) // page_size)[:, None]
        pages = block_table.cpu()[used]
        if ((pages < 0) | (pages >= num_pages)).any():
            raise ValueError(f"block_table has page indices outside [0, {num_pages}) among the pages in use: "
                             f"{pages[(pages < 0) | (pages >= num_pages)].unique().tolist()[:8]}")
