"""Packed documents (varlen) on the device, each in one launch and without a host sync:

- `document_positions`: every token's default position within its document, by a binary
  search of cu_seqlens per token (in place of about fifteen PyTorch ops: about 260 us of host
  time and 45 us of device time per call at 16k tokens on an H100; bench/RESULTS.md).
- `document_tiles`: a table whose entry t is (document, tile within it) of the t-th tile of
  `tile` rows, documents in order, then (-1, 0) up to a length the host knows without
  reading cu_seqlens (its token count / tile + its document count). The Hopper kernels'
  work items index it, head fastest, so the entries past the last tile come last in their
  grids and exit at once; every other item finds its document in one load, where a search
  over cu_seqlens took a chain of dependent loads. One program builds it: documents in
  blocks, a running prefix of their tile counts, each block's tiles scattered by tile index
  (the loop runs as many times as a block's longest document has tiles).
"""
import torch
import triton
import triton.language as tl

from .launch import cdiv, launch

DOCUMENTS_PER_BLOCK = 256
TOKENS_PER_BLOCK = 1024


@triton.jit
def document_bounds(CU_SEQLENS, d, N):
    """(first row, rows) of document d (an index, or a block of them, below the document
    count), clamped into the packed row of N rows: bad offsets (the API checks them only on
    request) give wrong results, never accesses out of bounds. The Gluon kernels call it too."""
    start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + d), 0), N)
    return start, tl.minimum(tl.maximum(tl.load(CU_SEQLENS + d + 1), start), N) - start


@triton.jit
def document_positions_kernel(CU_SEQLENS_Q, CU_SEQLENS_K, Q_POS, K_POS, n_docs, search_steps, TOTAL_Q, TOTAL_K,
                              BLOCK: tl.constexpr):
    """Program (i, 0): queries [i BLOCK, + BLOCK), program (i, 1): keys. A token's document
    is the last d < n_docs with cu_seqlens[d] <= token (search_steps = ceil(log2 n_docs)
    halvings); its keys sit at 0..len_k - 1, its queries at len_k - len_q + 0..len_q - 1."""
    queries = tl.program_id(1) == 0
    cu = tl.where(queries, CU_SEQLENS_Q, CU_SEQLENS_K)
    total = tl.where(queries, TOTAL_Q, TOTAL_K)
    tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], tl.int32)
    hi = tl.zeros([BLOCK], tl.int32) + n_docs
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        below = tl.load(cu + mid) <= tokens
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    if queries:
        len_k = tl.load(CU_SEQLENS_K + lo + 1) - tl.load(CU_SEQLENS_K + lo)
        tl.store(Q_POS + tokens, tokens - tl.load(CU_SEQLENS_Q + lo + 1) + len_k, mask=tokens < total)
    else:
        tl.store(K_POS + tokens, tokens - tl.load(CU_SEQLENS_K + lo), mask=tokens < total)


@triton.jit
def document_tiles_kernel(CU_SEQLENS, TABLE, n_docs, N, n_entries, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """TABLE int32 [n_entries, 2] from cu_seqlens (int32 [n_docs + 1], offsets clamped by
    `document_bounds`, as the attention kernels clamp them; decreasing ones can overlap
    documents, whose tiles past n_entries are dropped)."""
    start = 0  # tiles of the blocks before this one
    for first in range(0, n_docs, BLOCK):
        docs = first + tl.arange(0, BLOCK)
        inside = docs < n_docs
        _, rows = document_bounds(CU_SEQLENS, tl.minimum(docs, n_docs - 1), N)
        tiles = tl.where(inside, (rows + TILE - 1) // TILE, 0)
        before = start + tl.cumsum(tiles, 0) - tiles  # each document's first tile
        for m in range(tl.max(tiles, 0)):
            present = (m < tiles) & (before + m < n_entries)  # overlapping offsets could list more
            tl.store(TABLE + 2 * (before + m), docs, mask=present)
            tl.store(TABLE + 2 * (before + m) + 1, tl.zeros_like(docs) + m, mask=present)
        start += tl.sum(tiles, 0)
    for first in range(start, n_entries, BLOCK):
        rest = first + tl.arange(0, BLOCK)
        tl.store(TABLE + 2 * rest, tl.full([BLOCK], -1, tl.int32), mask=rest < n_entries)
        tl.store(TABLE + 2 * rest + 1, tl.zeros([BLOCK], tl.int32), mask=rest < n_entries)


def document_positions(cu_seqlens_q, cu_seqlens_k, total_q, total_k):
    """The default positions of packed documents, int32 [total_q] and [total_k]: as
    `ropefast.varlen.document_positions` (its PyTorch reference), in one launch."""
    n_docs = cu_seqlens_q.shape[0] - 1
    q_positions = torch.empty(total_q, device=cu_seqlens_q.device, dtype=torch.int32)
    k_positions = torch.empty(total_k, device=cu_seqlens_q.device, dtype=torch.int32)
    launch(document_positions_kernel, (cdiv(max(total_q, total_k), TOKENS_PER_BLOCK), 2), cu_seqlens_q, cu_seqlens_k,
           q_positions, k_positions, n_docs, (n_docs - 1).bit_length(), total_q, total_k, BLOCK=TOKENS_PER_BLOCK)
    return q_positions, k_positions


def document_tiles(cu_seqlens, total, tile):
    """The (document, tile) table of packed documents of `total` rows in tiles of `tile`
    rows: int32 [cdiv(total, tile) + documents, 2] (module docstring). No host sync."""
    n_docs = cu_seqlens.shape[0] - 1
    n_entries = cdiv(total, tile) + n_docs  # each document's last tile may be partial
    table = torch.empty(n_entries, 2, device=cu_seqlens.device, dtype=torch.int32)
    launch(document_tiles_kernel, (1,), cu_seqlens, table, n_docs, total, n_entries, TILE=tile,
           BLOCK=DOCUMENTS_PER_BLOCK)
    return table
