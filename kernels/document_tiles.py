"""The tiles of packed documents, listed on the device: entry t of the table is (document,
tile within it) of the t-th tile of `tile` rows, documents in order, then (-1, 0) up to a
length the host knows without reading cu_seqlens (its token count / tile + its document
count). The Hopper kernels' work items index this table, head fastest, so the entries past
the last tile come last in their grids and exit at once; every other item finds its
document in one load, where a search over cu_seqlens took a chain of dependent loads.
One program builds the table: documents in blocks, a running prefix of their tile counts,
each block's tiles scattered by tile index (so the loop runs as many times as a block's
longest document has tiles).
"""

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch

DOCUMENTS_PER_BLOCK = 256


@triton.jit
def document_tiles_kernel(CU_SEQLENS, TABLE, n_docs, N, n_entries, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """TABLE int32 [n_entries, 2] from cu_seqlens (int32 [n_docs + 1], offsets clamped into
    [0, N], as the attention kernels clamp them)."""
    start = 0  # tiles of the blocks before this one
    for first in range(0, n_docs, BLOCK):
        docs = first + tl.arange(0, BLOCK)
        inside = docs < n_docs
        begin = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + docs, mask=inside, other=0), 0), N)
        end = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + docs + 1, mask=inside, other=0), begin), N)
        tiles = tl.where(inside, (end - begin + TILE - 1) // TILE, 0)
        before = start + tl.cumsum(tiles, 0) - tiles  # each document's first tile
        for m in range(tl.max(tiles, 0)):
            present = m < tiles
            tl.store(TABLE + 2 * (before + m), docs, mask=present)
            tl.store(TABLE + 2 * (before + m) + 1, tl.zeros_like(docs) + m, mask=present)
        start += tl.sum(tiles, 0)
    for first in range(start, n_entries, BLOCK):
        rest = first + tl.arange(0, BLOCK)
        tl.store(TABLE + 2 * rest, tl.full([BLOCK], -1, tl.int32), mask=rest < n_entries)
        tl.store(TABLE + 2 * rest + 1, tl.zeros([BLOCK], tl.int32), mask=rest < n_entries)


def document_tiles(cu_seqlens, total, tile):
    """The (document, tile) table of packed documents of `total` rows in tiles of `tile`
    rows: int32 [cdiv(total, tile) + documents, 2] (module docstring). No host sync."""
    n_docs = cu_seqlens.shape[0] - 1
    n_entries = cdiv(total, tile) + n_docs  # each document's last tile may be partial
    table = torch.empty(n_entries, 2, device=cu_seqlens.device, dtype=torch.int32)
    launch(document_tiles_kernel, (1,), cu_seqlens, table, n_docs, total, n_entries, TILE=tile,
           BLOCK=DOCUMENTS_PER_BLOCK)
    return table
