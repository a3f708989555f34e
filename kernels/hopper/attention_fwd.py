"""Scaled rotary attention forward for Hopper (sm_90), in Gluon: FlashAttention-3's structure
with the query rotation inside.

A work item is BLOCK_M = 64 x CONSUMERS queries (128; 192 at D <= 64 in the natural feature
order, where a step's softmax costs as much as its matmuls) of one (batch, query head), or of
one packed document and head
(varlen: `kernels.documents` lists the documents' tiles); a program runs items in turn
(`_work_item`: persistent for non-causal calls, packed documents and short causal calls,
whose items come in units of two tiles of equal work; one item each for longer causal calls) as
1 + CONSUMERS warpgroups (`gl.warp_specialize`):
- a producer (few registers) streams K^ (rotated keys) and V tiles through TMA into a ring
  of STAGES shared-memory buffers, each guarded by a "ready" and an "empty" mbarrier; it runs
  ahead into the next item while the consumers finish one;
- the consumers own 64 query rows each. Each rotates its rows of q (angles from exact
  fixed-point phases, every logit scale folded in) and stores them to shared memory, where
  the QK^T wgmma reads them (for a call autograd records, they also go to global memory for
  the backward: `save_q`). Up to D = 128 the rows come in ahead: half-split pairs filling
  the head dim are copied raw into a staging buffer (cp.async, issued as soon as the previous
  item's rows have left it, so the copies fly during that item's key tiles) and rotated from
  there chunk by chunk of rows, in a loop (the rotation unrolled over the whole tile made the
  consumers' code miss in the instruction cache at 1k causal); interleaved pairs and the slot
  order are loaded into registers during the previous item's epilogue. Then per key tile j it
  issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} asynchronously, runs the softmax of S_j and
  hands the tensor cores to the next consumer through an mbarrier "turn" (ping-pong), so one
  warpgroup's exponentials overlap the others' matmuls. (ptxas places the wait for PV_{j-1}
  before the softmax's first shuffle, so within a warpgroup only the row maximum overlaps it;
  holding the wait back behind a shared-memory store of the row sums ran slower:
  bench/RESULTS.md.) The epilogue's TMA store of O runs on while the next item starts.
Only tiles that can hold a hidden key (past Nk, or the causal diagonal) are masked.

Feature order. A rotation pairs feature a_i with b_i: (2i, 2i+1) interleaved, (i, i + R/2)
otherwise. The consumers hold a tile as its two halves [a | b] of D_PAD/2 "slots" each:
slot i < R/2 holds pair i, and slot i >= R/2 holds the pass-through features (2i, 2i+1).
Their shared-memory tile is [a slots | b slots] (halves) or interleaved (a_0 b_0 a_1 ...):
the natural feature order, except for half-split pairs with R < D_PAD (partial rotary, or a
head dim that is no power of two). Logits are sums over features, so K^ only has to use the
same order: the key rope pass writes it so (`kernels.rope`, SLOT_ORDER), D_PAD wide.

Angles: the phase p * f in turns is exact in 32-bit fixed point (`kernels.rotary`), its
quarter-free remainder x in [-pi, pi) goes to the MUFU's sin.approx / cos.approx (absolute
error below 1e-6 on that range, against 0.03 rad for float32 p * f at p = 2**20).
"""

import functools
from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .. import device
from ..attention_fwd import LOG2E, lse_buffer, rotate_q_k, sequence_major
from ..documents import document_bounds, document_tiles
from ..launch import Descriptor, cdiv, dot_pad, launch, scratch
from ..rope import rope, row_strides, slot_order
from .compat import cp_async_load, reinterpret, tma_load, tma_store

WG_ROWS = gl.constexpr(64)  # query rows of one consumer warpgroup (the wgmma M atom)
LN2 = gl.constexpr(0.6931471805599453)


# ---- the rotation of a consumer's rows (the queries here, the keys in the backward) ----

@gluon.constexpr_function
def pair_layout(half, interleaved, num_warps):
    """[64, half, 2] register layout of a tile as (row, slot, half of the pair): each thread
    holds 8 consecutive slots of both halves, so its loads are 16 bytes wide in either pair
    order and a pair never leaves its thread."""
    vec = min(8, half)
    cols = min(half // vec, 32)
    return gl.BlockedLayout([1, vec, 2], [32 // cols, cols, 1], [num_warps, 1, 1],
                            [2, 1, 0] if interleaved else [1, 2, 0])


@gluon.constexpr_function
def chunk_rows(half, num_warps):
    """Rows that a `pair_layout` tile spans once (each thread one run of 8 slots): 16 at D = 128,
    32 at 64, all 64 below."""
    return min(64, 32 // min(half // min(8, half), 32) * num_warps)


@gluon.constexpr_function
def staged_queries(d_pad, head_dim, pairs, interleaved, varlen):
    """Whether the consumers stage the next item's queries in shared memory (`_stage_q`): its
    copies move 16-byte runs of half-split pairs filling D_PAD (the only layout measured on a
    GPU so far; interleaved pairs would copy whole rows); D = 32 to 128 (at 256 the buffers would
    not fit beside the ring; at 16 two threads hold each element, untried); packed documents up
    to D = 64 (1.04-1.06x loading them in turn there; at D = 128 0.98-1.01x on the bench's
    documents and 0.94-0.98x on 1k ones: H100, bench/RESULTS.md)."""
    return (32 <= d_pad <= (64 if varlen else 128) and head_dim == d_pad and not interleaved
            and 2 * pairs == d_pad)


@gluon.constexpr_function
def mma_layout(columns, num_warps):
    """The register layout of a wgmma accumulator of 64 rows and `columns` columns, one
    warpgroup (Hopper's MMA v3)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, columns, 16])


@gluon.constexpr_function
def _row_layout(half, num_warps):
    """[64, 2 half] layout of interleaved rows that reshapes to `pair_layout` for free."""
    vec = min(8, half)
    cols = min(half // vec, 32)
    return gl.BlockedLayout([1, 2 * vec], [32 // cols, cols], [num_warps, 1], [1, 0])


@gluon.jit
def increments(INV_FREQ, PAIRS: gl.constexpr, HALF: gl.constexpr, SL: gl.constexpr):
    """frac(f / 2pi) of each slot's frequency as a 64-bit fixed-point fraction (hi, lo),
    uint32 [HALF] in layout SL, computed in float64 (`kernels.rotary.load_increments`)."""
    slot = gl.arange(0, HALF, layout=SL)
    turns = gl.load(INV_FREQ + slot, mask=slot < PAIRS, other=0.0).to(gl.float64) * 0.15915494309189535
    scaled = (turns - gl.floor(turns)) * 4294967296.0
    inc_hi = gl.floor(scaled)
    return inc_hi.to(gl.uint32), gl.floor((scaled - inc_hi) * 4294967296.0).to(gl.uint32)


@gluon.jit
def sincos(pos, inc_hi, inc_lo):
    """cos and sin of pos[:, None] * f[None, :]: the phase in 2**-32 turns is exact
    (`kernels.rotary`), the MUFU evaluates the rest on [-pi, pi)."""
    magnitude = gl.abs(pos).to(gl.uint32)
    phase = gl.expand_dims(magnitude, 1) * gl.expand_dims(inc_hi, 0) + gl.umulhi(gl.expand_dims(magnitude, 1),
                                                                                 gl.expand_dims(inc_lo, 0))
    phase = gl.where(gl.expand_dims(pos < 0, 1), 0 - phase, phase)  # p * f is odd in p
    x = phase.to(gl.int32, bitcast=True).to(gl.float32) * 1.4629180792671596e-09  # 2 pi / 2**32
    return gl.inline_asm_elementwise("cos.approx.f32 $0, $2;\n\tsin.approx.f32 $1, $2;", "=f,=f,f", [x],
                                     dtype=(gl.float32, gl.float32), is_pure=True, pack=1)


@gluon.jit
def _row_index(row0, ROWS: gl.constexpr, D_PAD: gl.constexpr, RL: gl.constexpr):
    """(rows, features) of rows [row0, row0 + ROWS) whole, in the `_row_layout` RL."""
    rows = gl.expand_dims(row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, RL)), 1)
    return rows, gl.expand_dims(gl.arange(0, D_PAD, layout=gl.SliceLayout(0, RL)), 0)


@gluon.jit
def _pair_index(row0, ROWS: gl.constexpr, D_PAD: gl.constexpr, PAIRS: gl.constexpr, L3: gl.constexpr):
    """(rows, features) of rows [row0, row0 + ROWS) as half-split pairs, in the `pair_layout` L3."""
    HALF: gl.constexpr = D_PAD // 2
    SL: gl.constexpr = gl.SliceLayout(2, L3)
    rows = gl.expand_dims(gl.expand_dims(row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, SL)), 1), 2)
    slot = gl.expand_dims(gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(0, SL)), 0), 2)
    half = gl.expand_dims(gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))), 0), 1)
    if PAIRS == HALF:
        return rows, slot + half * HALF
    # slot order: pairs (i, i + R/2), then the pass-through features (2i, 2i + 1)
    return rows, gl.where(slot < PAIRS, slot + half * PAIRS, 2 * slot + half)


@gluon.jit
def load_rows(Q, stride_qn, row0, row_end, HEAD_DIM: gl.constexpr, D_PAD: gl.constexpr, PAIRS: gl.constexpr,
              INTERLEAVED: gl.constexpr, L3: gl.constexpr):
    """Rows [row0, row0 + 64) below row_end of q (or k) as [64, D_PAD / 2, 2] (row, slot,
    half of the pair: the kernel's feature order, module docstring); zeros elsewhere and
    past HEAD_DIM. Q points at this (batch, head)'s row 0."""
    if INTERLEAVED:  # pairs side by side: load whole rows (16-byte loads), then view them as pairs
        rows, col = _row_index(row0, WG_ROWS, D_PAD, _row_layout(D_PAD // 2, gl.num_warps()))
        x = gl.load(Q + rows.to(gl.int64) * stride_qn + col, mask=(rows < row_end) & (col < HEAD_DIM), other=0.0)
        return gl.convert_layout(gl.reshape(x, [WG_ROWS, D_PAD // 2, 2]), L3, assert_trivial=True)
    rows, col = _pair_index(row0, WG_ROWS, D_PAD, PAIRS, L3)
    return gl.load(Q + rows.to(gl.int64) * stride_qn + col, mask=(rows < row_end) & (col < HEAD_DIM), other=0.0)


@gluon.jit
def store_rows(X, stride_n, row0, row_end, pairs, HEAD_DIM: gl.constexpr, D_PAD: gl.constexpr,
               INTERLEAVED: gl.constexpr, L3: gl.constexpr):
    """`load_rows` backwards, for the natural feature order (interleaved, or half-split pairs
    filling D_PAD): a [rows, D_PAD / 2, 2] tile to rows [row0, row0 + rows) below row_end of X,
    features below HEAD_DIM. Evict-first: this kernel does not read them again (against TMA
    stores of the shared-memory tile: level on an H100, bench/RESULTS.md)."""
    ROWS: gl.constexpr = pairs.shape[0]
    if INTERLEAVED:
        RL: gl.constexpr = _row_layout(D_PAD // 2, gl.num_warps())
        rows, col = _row_index(row0, ROWS, D_PAD, RL)
        tile = gl.convert_layout(gl.reshape(pairs, [ROWS, D_PAD]), RL, assert_trivial=True)
    else:
        rows, col = _pair_index(row0, ROWS, D_PAD, D_PAD // 2, L3)
        tile = pairs
    gl.store(X + rows.to(gl.int64) * stride_n + col, tile, mask=(rows < row_end) & (col < HEAD_DIM),
             eviction_policy="evict_first")


@gluon.jit
def rotate_rows(x, Q_POS, stride_pos_n, TEMP, stride_temp_n, inc_hi, inc_lo, row0, NQ, q_pos_offset, row_scale,
                rot_scale, D_PAD: gl.constexpr, PAIRS: gl.constexpr, INTERLEAVED: gl.constexpr,
                HAS_POS: gl.constexpr, HAS_TEMP: gl.constexpr, L3: gl.constexpr):
    """The `load_rows` rows rotated and scaled (queries: every logit scale folded in, base 2;
    keys: row_scale = rot_scale = 1), [rows, D_PAD / 2, 2] as loaded (`mma_tile` makes the
    tile a wgmma reads). Q_POS and TEMP point at this batch's row 0."""
    HALF: gl.constexpr = D_PAD // 2
    ROWS: gl.constexpr = x.shape[0]
    SL: gl.constexpr = gl.SliceLayout(2, L3)  # [ROWS, HALF]
    dtype: gl.constexpr = x.dtype
    a, b = gl.split(x)
    a = gl.convert_layout(a, SL, assert_trivial=True).to(gl.float32)
    b = gl.convert_layout(b, SL, assert_trivial=True).to(gl.float32)
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, SL))
    if HAS_POS:
        pos = gl.load(Q_POS + rows.to(gl.int64) * stride_pos_n, mask=rows < NQ, other=0).to(gl.int32)
    else:
        pos = rows + q_pos_offset
    cos, sin = sincos(pos, inc_hi, inc_lo)
    scale = gl.full([ROWS], row_scale, gl.float32, gl.SliceLayout(1, SL))
    if HAS_TEMP:
        scale = scale * gl.load(TEMP + rows.to(gl.int64) * stride_temp_n, mask=rows < NQ, other=0.0)
    rotated = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(0, SL)) < PAIRS, 0)
    c = gl.where(rotated, cos * gl.expand_dims(scale * rot_scale, 1), gl.expand_dims(scale, 1))
    s = gl.where(rotated, sin * gl.expand_dims(scale * rot_scale, 1), 0.0)
    return gl.join((a * c - b * s).to(dtype), (b * c + a * s).to(dtype))


@gluon.jit
def sequence_row(X, off_b, begin, stride_b, stride_n, PRESENT: gl.constexpr):
    """X [B or 1, N] (positions, temperatures) at row 0 of the sequence at (off_b, begin);
    X itself when absent (never read then)."""
    if PRESENT:
        return X + off_b.to(gl.int64) * stride_b + begin.to(gl.int64) * stride_n
    return X


@gluon.jit
def mma_tile(pairs, D_PAD: gl.constexpr, INTERLEAVED: gl.constexpr):
    """A [rows, D_PAD / 2, 2] tile of pairs as the [rows, D_PAD] tile of the kernel's feature order."""
    if not INTERLEAVED:
        pairs = gl.permute(pairs, (0, 2, 1))  # [rows, 2, HALF]: the a slots, then the b slots
    return gl.reshape(pairs, [pairs.shape[0], D_PAD])


# ---- the persistent schedule, producer and consumers ----

@gluon.jit
def document_tile(TILES, t):
    """(document, tile within it) of entry t of a `kernels.documents.document_tiles` table; the
    document is -1 past the last tile."""
    return gl.load(TILES + 2 * t), gl.load(TILES + 2 * t + 1)


@gluon.jit
def _work_item(item, n_items, NQ, NK, HQ, GROUP, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, CAUSAL: gl.constexpr,
               VARLEN: gl.constexpr, PAIR_UNITS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Work item -> (batch row, query head, KV head, first query row and query count of its
    sequence, first key row and key count, first query of the tile within the sequence, key
    tiles visible to every row, key tiles in all). A sequence is a batch row, or (VARLEN) a
    document of the one packed row: items are (query tile of the TILES table, head), head
    fastest, and the table's entries past the last tile are items of no rows (nq = 0).
    Non-causal items run through the query tiles of one (batch, head) before the next, so
    the persistent programs running at one time share K/V in L2; causal ones come in units
    of two tiles of equal work (below). Packed documents' items run head fastest, longest
    first within a document (the heads of a tile read neighbouring bytes of q and, GQA, the
    same K/V)."""
    if VARLEN:
        off_b = 0
        off_h = item % HQ
        doc, pid_m = document_tile(TILES, item // HQ)
        q_begin, nq = document_bounds(CU_SEQLENS_Q, gl.maximum(doc, 0), NQ)
        k_begin, nk = document_bounds(CU_SEQLENS_K, gl.maximum(doc, 0), NK)
        nq = gl.where(doc >= 0, nq, 0)
        n_m = gl.cdiv(nq, BLOCK_M)
    else:
        n_m = gl.cdiv(NQ, BLOCK_M)
        if CAUSAL and PAIR_UNITS:
            # Units of two query tiles of equal work: the (n_m - 1 - i)-th and the i-th from
            # the top of one (batch, head), ranked (batch, i, head), then (odd n_m) the middle
            # tiles of two (batch, head)s. Program p runs units p, p + P, ... (P programs), one
            # tile per lap: the programs' work is even, and each unit's second tile finds its
            # keys in L2. Only the last unit can lack its second tile.
            programs = gl.num_programs(0)
            lap = item // programs
            unit = lap // 2 * programs + (item - lap * programs)
            second = lap % 2
            sequences = n_items // n_m  # batch * HQ
            pair_units = sequences * (n_m // 2)
            paired = unit < pair_units
            per_batch = HQ * gl.maximum(n_m // 2, 1)  # pair units of a batch row (n_m = 1: none)
            off_b = unit // per_batch
            pair = (unit - off_b * per_batch) // HQ
            middle = 2 * (unit - pair_units) + second  # batch * HQ + head of a middle tile
            off_b = gl.where(paired, off_b, middle // HQ)
            off_h = gl.where(paired, unit % HQ, middle % HQ)
            # counted from the bottom, as below
            pid_m = gl.where(paired, gl.where(second == 1, n_m - 1 - pair, pair), n_m // 2)
            real = paired | ((n_m % 2 == 1) & (middle < sequences))
        elif CAUSAL:  # one program each: (batch, query tile, head), head fastest
            off_h = item % HQ
            pid_m = (item // HQ) % n_m
            off_b = item // HQ // n_m
        else:  # (batch, head, query tile)
            pid_bh = item // n_m
            pid_m = item % n_m
            off_b = pid_bh // HQ
            off_h = pid_bh % HQ
        q_begin = 0
        k_begin = 0
        nq = NQ
        if CAUSAL and PAIR_UNITS:
            nq = gl.where(real, NQ, 0)  # the second tile of an odd count's middle unit, or a unit past the last
        nk = NK
    if CAUSAL:
        pid_m = gl.maximum(n_m - 1 - pid_m, 0)
    q_start = pid_m * BLOCK_M
    # Key tiles [0, n_full) are visible to every row of the tile; [n_full, n_tiles) need masks.
    if CAUSAL:
        last_key = gl.minimum(q_start + BLOCK_M, nq) - 1 + (nk - nq)  # of the tile's last row
        n_tiles = gl.cdiv(gl.minimum(gl.maximum(last_key + 1, 0), nk), BLOCK_N)
        n_full = gl.minimum(gl.maximum(q_start + (nk - nq) + 1, 0) // BLOCK_N, nk // BLOCK_N)
    else:
        n_tiles = gl.cdiv(nk, BLOCK_N)
        n_full = nk // BLOCK_N
    n_tiles = gl.where(q_start < nq, n_tiles, 0)
    return off_b, off_h, off_h // GROUP, q_begin, nq, k_begin, nk, q_start, n_full, n_tiles


@triton.jit
def pair_unit_count(sequences, n_m):
    """Causal pair units (`_work_item`) of `sequences` (batch, head)s of n_m query tiles; the
    launcher sizes the grid with the same function (`.fn`, plain Python on the host)."""
    return sequences * (n_m // 2) + (sequences + 1) // 2 * (n_m % 2)


@gluon.jit
def _items_end(n_items, NQ, PAIR_UNITS: gl.constexpr, BLOCK_M: gl.constexpr):
    """The end of the programs' item loop: the causal units' (`_work_item`) two laps per
    round of programs, the last round's missing units included; n_items otherwise."""
    if PAIR_UNITS:
        n_m = gl.cdiv(NQ, BLOCK_M)
        return gl.cdiv(pair_unit_count(n_items // n_m, n_m), gl.num_programs(0)) * 2 * gl.num_programs(0)
    return n_items


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, NQ, NK, HQ, GROUP, n_items,
              CU_SEQLENS_Q, CU_SEQLENS_K, TILES, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
              PAIR_UNITS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of the K^ and V tiles of this program's work items into the ring; it runs
    ahead into the next item while the consumers finish the current one."""
    count = 0  # tiles loaded so far: the ring position
    for item in range(gl.program_id(0), _items_end(n_items, NQ, PAIR_UNITS, BLOCK_M), gl.num_programs(0)):
        off_b, _, off_hkv, _, _, k_begin, _, _, _, n_tiles = _work_item(
            item, n_items, NQ, NK, HQ, GROUP, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, CAUSAL, VARLEN, PAIR_UNITS, BLOCK_M,
            BLOCK_N)
        kv_head = off_b * (HQ // GROUP) + off_hkv
        for j in range(n_tiles):
            stage = count % STAGES
            phase = (count // STAGES) & 1
            # an mbarrier starts as if its phase 1 had completed: the first lap does not block
            mbarrier.wait(k_empty.index(stage), phase ^ 1)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            tma_load(k_desc, [kv_head, k_begin + j * BLOCK_N, 0], k_ready.index(stage), k_smem.index(stage))
            mbarrier.wait(v_empty.index(stage), phase ^ 1)
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            tma_load(v_desc, [off_b, k_begin + j * BLOCK_N, off_hkv, 0], v_ready.index(stage), v_smem.index(stage))
            count += 1


@gluon.jit
def _softmax(s, m_i, l_i, row0, start_n, NQ, NK, CAUSAL: gl.constexpr, MASKED: gl.constexpr,
             BLOCK_N: gl.constexpr, S_L: gl.constexpr):
    """Online softmax (base 2: the log2(e) is folded into Q^) of one key tile, of query rows
    [row0, + 64). MASKED tiles hide keys past NK (rows of another head, or zeros) and, causal,
    past the diagonal."""
    if MASKED:
        # A score is visible iff its column <= the last visible column of its row. In the wgmma
        # layout a thread's columns are 2 (lane % 4) + 8 i + {0, 1}: split so, the lane's part
        # leaves with one subtraction a row, and each score costs one compare with a constant
        # and a select (the whole column, hoisted out of the loop, would take 32 registers).
        cols = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L)), 0)
        if CAUSAL:
            rows = row0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, S_L))
            last = gl.expand_dims(gl.minimum(rows + (NK - NQ), NK - 1) - start_n, 1)
        else:
            last = NK - 1 - start_n
        LANE_BITS: gl.constexpr = 6
        s = gl.where((cols & ~LANE_BITS) <= last - (cols & LANE_BITS), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    if MASKED:  # a row that has seen no key keeps m = -inf: subtract 0 instead of NaN
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(s - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _kv_step(j, count, q_tile, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn_mine, turn_other,
             turn_phase, p, alpha, acc, m_i, l_i, row0, NQ, NK, CAUSAL: gl.constexpr, MASKED: gl.constexpr,
             BLOCK_N: gl.constexpr, D_PAD: gl.constexpr, STAGES: gl.constexpr, S_L: gl.constexpr,
             O_L: gl.constexpr, P_L: gl.constexpr):
    """Key tile j >= 1 (ring position count): S_j = Q K_j^T and O = alpha_{j-1} O +
    P_{j-1} V_{j-1} issued together, then the softmax of S_j while PV_{j-1} still runs."""
    stage = count % STAGES
    prev = (count - 1) % STAGES
    mbarrier.wait(k_ready.index(stage), (count // STAGES) & 1)
    mbarrier.wait(v_ready.index(prev), ((count - 1) // STAGES) & 1)
    mbarrier.wait(turn_mine, turn_phase)  # my turn on the tensor cores
    k = k_smem.index(stage).reshape([BLOCK_N, D_PAD]).permute((1, 0))
    s_token = warpgroup_mma(q_tile, k, gl.zeros([WG_ROWS, BLOCK_N], gl.float32, S_L), use_acc=False, is_async=True)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_L)), 1)
    o_token = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_N, D_PAD]), acc, is_async=True)
    mbarrier.arrive(turn_other, count=1)  # the other consumer's matmuls run during my softmax
    s = warpgroup_mma_wait(1, deps=[s_token])
    mbarrier.arrive(k_empty.index(stage), count=1)
    p_next, m_i, l_i, alpha = _softmax(s, m_i, l_i, row0, j * BLOCK_N, NQ, NK, CAUSAL, MASKED, BLOCK_N, S_L)
    # P_{j-1} stays in its registers until PV_{j-1} is done: convert P_j only after the wait.
    acc, p = warpgroup_mma_wait(0, deps=[o_token, p])
    mbarrier.arrive(v_empty.index(prev), count=1)
    return gl.convert_layout(p_next.to(p.dtype), P_L), alpha, acc, m_i, l_i, turn_phase ^ 1


@gluon.jit
def _next_rows(item, Q, stride_qb, stride_qn, stride_qh, NQ, NK, HQ, GROUP, n_items, CU_SEQLENS_Q, CU_SEQLENS_K,
               TILES, CAUSAL: gl.constexpr, VARLEN: gl.constexpr, PAIR_UNITS: gl.constexpr, BLOCK_M: gl.constexpr,
               BLOCK_N: gl.constexpr):
    """Where a consumer fetches an item's queries: (Q at its sequence's row 0 and head, the
    tile's first row, the sequence's query count; 0 past the last item)."""
    if VARLEN:  # the document tiles' table has no entry past the last item
        item_read = gl.minimum(item, n_items - 1)
    else:
        item_read = item
    off_b, off_h, _, q_begin, nq, _, _, q_start, _, _ = _work_item(
        item_read, n_items, NQ, NK, HQ, GROUP, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, CAUSAL, VARLEN, PAIR_UNITS, BLOCK_M,
        BLOCK_N)
    if not PAIR_UNITS:  # pair units have nq = 0 past the last
        nq = gl.where(item < n_items, nq, 0)
    base = Q + off_b.to(gl.int64) * stride_qb + q_begin.to(gl.int64) * stride_qn + off_h.to(gl.int64) * stride_qh
    return base, q_start, nq


@gluon.jit
def _prefetch_q(item, Q, stride_qb, stride_qn, stride_qh, NQ, NK, HQ, GROUP, n_items, CID: gl.constexpr,
                HEAD_DIM: gl.constexpr, D_PAD: gl.constexpr, PAIRS: gl.constexpr, INTERLEAVED: gl.constexpr,
                CAUSAL: gl.constexpr, PAIR_UNITS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                L3: gl.constexpr):
    """`load_rows` of a consumer's rows of a dense item's query tile (zeros past the last item)."""
    base, q_start, nq = _next_rows(item, Q, stride_qb, stride_qn, stride_qh, NQ, NK, HQ, GROUP, n_items, Q, Q, Q,
                                   CAUSAL, False, PAIR_UNITS, BLOCK_M, BLOCK_N)
    return load_rows(base, stride_qn, q_start + CID * WG_ROWS, nq, HEAD_DIM, D_PAD, PAIRS, INTERLEAVED, L3)


@gluon.jit
def _stage_q(raw, base, q_start, nq, stride_qn, CID: gl.constexpr, HEAD_DIM: gl.constexpr, D_PAD: gl.constexpr,
             PAIRS: gl.constexpr, L3: gl.constexpr):
    """Asynchronous copies (cp.async, one group) of a consumer's rows of an item's query tile
    (`_next_rows`: base, q_start, nq) into its chunks of raw [consumers x chunks, `chunk_rows`,
    D_PAD / 2, 2], as `pair_layout` L3 holds them (each thread later reads what it copied);
    zeros past the sequence's rows."""
    CR: gl.constexpr = raw.shape[1]
    CHUNKS: gl.constexpr = WG_ROWS // CR
    for c in gl.static_range(CHUNKS):
        rows, col = _pair_index(q_start + CID * WG_ROWS + c * CR, CR, D_PAD, PAIRS, L3)
        cp_async_load(raw.index(CID * CHUNKS + c), base + rows.to(gl.int64) * stride_qn + col,
                      mask=(rows < nq) & (col < HEAD_DIM))
    async_copy.commit_group()


@gluon.jit
def _consumer(args, HEAD_DIM: gl.constexpr, D_PAD: gl.constexpr, PAIRS: gl.constexpr, INTERLEAVED: gl.constexpr,
              HAS_POS: gl.constexpr, HAS_TEMP: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
              PAIR_UNITS: gl.constexpr, CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              STORE_Q: gl.constexpr, STORE_LSE: gl.constexpr, CID: gl.constexpr):
    """Consumer CID of CONSUMERS: rows [q_start + 64 CID, + 64) of each work item's query
    tile; it takes the tensor cores after consumer CID - 1 and hands them to CID + 1 (turn
    barriers, cyclic). STORE_Q: its rows of Q^ also go to QR for the backward. args: the
    kernel's runtime arguments and shared memory, as the kernel packs them."""
    (Q, stride_qb, stride_qn, stride_qh, INV_FREQ, Q_POS, stride_pos_b, stride_pos_n, TEMP, stride_temp_b,
     stride_temp_n, O, stride_ob, stride_on, stride_oh, LSE, o_desc, QR, stride_qrb, stride_qrn, stride_qrh, q_smem,
     k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, NQ, NK, HQ, GROUP, n_items, CU_SEQLENS_Q,
     CU_SEQLENS_K, TILES, q_pos_offset, row_scale, rot_scale, inc_smem, raw_smem) = args
    NW: gl.constexpr = gl.num_warps()
    S_L: gl.constexpr = mma_layout(BLOCK_N, NW)
    O_L: gl.constexpr = mma_layout(D_PAD, NW)
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)  # P stays in registers
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
    dtype: gl.constexpr = Q.dtype.element_ty
    q_tile = q_smem.index(CID)
    q_mma = q_tile.reshape([WG_ROWS, D_PAD])
    L3: gl.constexpr = pair_layout(D_PAD // 2, INTERLEAVED, NW)
    BLOCK_M: gl.constexpr = CONSUMERS * WG_ROWS
    turn_mine = turn.index(CID)
    turn_other = turn.index((CID + 1) % CONSUMERS)

    # The frequencies' fixed-point increments, computed once (float64) and kept in shared
    # memory: per item they would cost a global load's latency and the float64 chain, in
    # registers 16 per thread across the item loop.
    HALF: gl.constexpr = D_PAD // 2
    INC_L: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, L3))
    inc_hi, inc_lo = increments(INV_FREQ, PAIRS, HALF, INC_L)
    inc_hi_smem = inc_smem.slice(2 * CID * HALF, HALF)
    inc_lo_smem = inc_smem.slice((2 * CID + 1) * HALF, HALF)
    inc_hi_smem.store(inc_hi)
    inc_lo_smem.store(inc_lo)

    count = 0  # tiles consumed so far: the ring position, as the producer's
    turn_phase = 0
    # Up to D = 128 a warpgroup fetches the next item's queries ahead: into its staging buffer
    # (`_stage_q`) once this item's rows have left it, or (dense calls: interleaved, slot
    # order) into 32 registers during this item's epilogue; at D = 256 those would take 64 and
    # spill: it loads them in turn, as packed documents' consumers do where not staged (D > 64).
    STAGE_Q: gl.constexpr = staged_queries(D_PAD, HEAD_DIM, PAIRS, INTERLEAVED, VARLEN)
    PREFETCH_Q: gl.constexpr = (D_PAD <= 128) and (not VARLEN) and (not STAGE_Q)
    if STAGE_Q:
        CHUNKS: gl.constexpr = raw_smem.shape[0] // CONSUMERS
        CR: gl.constexpr = raw_smem.shape[1]
        # Each rotated chunk goes to its rows of the Q^ buffer in pieces of 128 bytes a row: the
        # NVMMA layout keeps each such column block's rows together (at D = 128 the pairs' first
        # halves, then their second halves), [consumer, block, chunk] pieces.
        Q_COLS: gl.constexpr = min(D_PAD, 64)
        BLOCKS: gl.constexpr = D_PAD // Q_COLS
        q_pieces = reinterpret(q_smem, dtype, [CONSUMERS * BLOCKS * CHUNKS, CR, Q_COLS],
                               gl.NVMMASharedLayout(swizzle_byte_width=q_smem.layout.swizzle_byte_width,
                                                    element_bitwidth=16, rank=2))
        next_base, next_row, next_rows = _next_rows(gl.program_id(0), Q, stride_qb, stride_qn, stride_qh, NQ, NK, HQ,
                                                    GROUP, n_items, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, CAUSAL, VARLEN,
                                                    PAIR_UNITS, BLOCK_M, BLOCK_N)
        _stage_q(raw_smem, next_base, next_row, next_rows, stride_qn, CID, HEAD_DIM, D_PAD, PAIRS, L3)
    elif PREFETCH_Q:
        x = _prefetch_q(gl.program_id(0), Q, stride_qb, stride_qn, stride_qh, NQ, NK, HQ, GROUP, n_items, CID,
                        HEAD_DIM, D_PAD, PAIRS, INTERLEAVED, CAUSAL, PAIR_UNITS, BLOCK_M, BLOCK_N, L3)
    for item in range(gl.program_id(0), _items_end(n_items, NQ, PAIR_UNITS, BLOCK_M), gl.num_programs(0)):
        off_b, off_h, off_hkv, q_begin, nq, k_begin, nk, q_start, n_full, n_tiles = _work_item(
            item, n_items, NQ, NK, HQ, GROUP, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, CAUSAL, VARLEN, PAIR_UNITS, BLOCK_M,
            BLOCK_N)
        if q_start < nq:  # not an entry past the document tiles' last
            row0 = q_start + CID * WG_ROWS
            if STAGE_Q:
                # where the next item's queries are: decoded before the rotation, so that a packed
                # document's table reads land during it
                next_base, next_row, next_rows = _next_rows(
                    item + gl.num_programs(0), Q, stride_qb, stride_qn, stride_qh, NQ, NK, HQ, GROUP, n_items,
                    CU_SEQLENS_Q, CU_SEQLENS_K, TILES, CAUSAL, VARLEN, PAIR_UNITS, BLOCK_M, BLOCK_N)
            elif not PREFETCH_Q:  # neither staged nor prefetched (D = 256, packed documents)
                x = load_rows(Q + off_b.to(gl.int64) * stride_qb + q_begin.to(gl.int64) * stride_qn
                              + off_h.to(gl.int64) * stride_qh, stride_qn, row0, nq, HEAD_DIM, D_PAD, PAIRS,
                              INTERLEAVED, L3)
            pos_ptr = sequence_row(Q_POS, off_b, q_begin, stride_pos_b, stride_pos_n, HAS_POS)
            temp_ptr = sequence_row(TEMP, off_b, q_begin, stride_temp_b, stride_temp_n, HAS_TEMP)
            qr_ptr = (QR + off_b.to(gl.int64) * stride_qrb + q_begin.to(gl.int64) * stride_qrn
                      + off_h.to(gl.int64) * stride_qrh)
            inc_hi = inc_hi_smem.load(INC_L)  # each thread reads back what it stored
            inc_lo = inc_lo_smem.load(INC_L)
            if STAGE_Q:
                # Rotated a chunk at a time into the Q^ buffer, in a loop: unrolled over the whole
                # tile (as below) the rotation is over a third of a consumer's code, twice per
                # program, and at 1k causal the instruction cache missed (bench/RESULTS.md). Each
                # thread reads back what it copied.
                async_copy.wait_group(0)
                tma.store_wait(0)  # the previous item's O left the Q^ buffer
                for c in range(CHUNKS):
                    chunk = raw_smem.index(CID * CHUNKS + c)
                    rotated = rotate_rows(chunk.load(L3), pos_ptr, stride_pos_n, temp_ptr, stride_temp_n, inc_hi,
                                          inc_lo, row0 + c * CR, nq, q_pos_offset, row_scale, rot_scale, D_PAD, PAIRS,
                                          INTERLEAVED, HAS_POS, HAS_TEMP, L3)
                    if STORE_Q:
                        store_rows(qr_ptr, stride_qrn, row0 + c * CR, nq, rotated, HEAD_DIM, D_PAD, INTERLEAVED, L3)
                    if BLOCKS == 1:
                        q_pieces.index(CID * CHUNKS + c).store(mma_tile(rotated, D_PAD, INTERLEAVED))
                    else:
                        first, second = gl.split(rotated)
                        q_pieces.index(2 * CID * CHUNKS + c).store(first)
                        q_pieces.index((2 * CID + 1) * CHUNKS + c).store(second)
                # the next item's queries: their copies fly during this item's key tiles (each
                # thread copies over what it has just read). Issued in the epilogue, their latency
                # showed at the next item's start: this is 1.03-1.04x at 1k causal (H100,
                # bench/RESULTS.md)
                _stage_q(raw_smem, next_base, next_row, next_rows, stride_qn, CID, HEAD_DIM, D_PAD, PAIRS, L3)
            else:
                rotated = rotate_rows(x, pos_ptr, stride_pos_n, temp_ptr, stride_temp_n, inc_hi, inc_lo, row0, nq,
                                      q_pos_offset, row_scale, rot_scale, D_PAD, PAIRS, INTERLEAVED, HAS_POS,
                                      HAS_TEMP, L3)
                if STORE_Q:
                    store_rows(qr_ptr, stride_qrn, row0, nq, rotated, HEAD_DIM, D_PAD, INTERLEAVED, L3)
                tma.store_wait(0)  # the previous item's O left this buffer
                q_mma.store(mma_tile(rotated, D_PAD, INTERLEAVED))
            fence_async_shared()  # generic-proxy stores, read next by the wgmma (async proxy)

            acc = gl.zeros([WG_ROWS, D_PAD], gl.float32, O_L)
            m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, ROW_S)
            l_i = gl.full([WG_ROWS], 0.0, gl.float32, ROW_S)
            if n_tiles > 0:
                # tile 0: S only (masked: it may be the causal diagonal or the last, partial tile)
                stage = count % STAGES
                mbarrier.wait(k_ready.index(stage), (count // STAGES) & 1)
                mbarrier.wait(turn_mine, turn_phase)
                k = k_smem.index(stage).reshape([BLOCK_N, D_PAD]).permute((1, 0))
                s_token = warpgroup_mma(q_mma, k, gl.zeros([WG_ROWS, BLOCK_N], gl.float32, S_L), use_acc=False,
                                        is_async=True)
                mbarrier.arrive(turn_other, count=1)
                s = warpgroup_mma_wait(0, deps=[s_token])
                mbarrier.arrive(k_empty.index(stage), count=1)
                p, m_i, l_i, alpha = _softmax(s, m_i, l_i, row0, 0, nq, nk, CAUSAL, True, BLOCK_N, S_L)
                p = gl.convert_layout(p.to(dtype), P_L)
                turn_phase ^= 1
                count += 1
                for j in range(1, n_full):
                    p, alpha, acc, m_i, l_i, turn_phase = _kv_step(
                        j, count, q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn_mine, turn_other,
                        turn_phase, p, alpha, acc, m_i, l_i, row0, nq, nk, CAUSAL, False, BLOCK_N, D_PAD, STAGES,
                        S_L, O_L, P_L)
                    count += 1
                for j in range(gl.maximum(n_full, 1), n_tiles):
                    p, alpha, acc, m_i, l_i, turn_phase = _kv_step(
                        j, count, q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn_mine, turn_other,
                        turn_phase, p, alpha, acc, m_i, l_i, row0, nq, nk, CAUSAL, True, BLOCK_N, D_PAD, STAGES,
                        S_L, O_L, P_L)
                    count += 1
                # drain: the last PV
                last = (count - 1) % STAGES
                mbarrier.wait(v_ready.index(last), ((count - 1) // STAGES) & 1)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_L)), 1)
                o_token = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_N, D_PAD]), acc, is_async=True)
                acc, p = warpgroup_mma_wait(0, deps=[o_token, p])
                mbarrier.arrive(v_empty.index(last), count=1)

            if PREFETCH_Q:  # the next item's queries: their loads fly during this epilogue
                x = _prefetch_q(item + gl.num_programs(0), Q, stride_qb, stride_qn, stride_qh, NQ, NK, HQ, GROUP,
                                n_items, CID, HEAD_DIM, D_PAD, PAIRS, INTERLEAVED, CAUSAL, PAIR_UNITS, BLOCK_M, BLOCK_N,
                                L3)

            # epilogue: O = acc / l through this warpgroup's (now unused) Q^ buffer and a TMA
            # store that runs on while the next item starts (rows past NQ and features past
            # HEAD_DIM are clipped); lse in natural log. A row that saw no key (causal, Nq >
            # Nk) gets O = 0 and lse = -inf.
            seen = l_i > 0
            l_safe = gl.where(seen, l_i, 1.0)
            acc = acc * gl.expand_dims(gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, O_L)), 1)
            if (row0 + WG_ROWS > nq) if VARLEN else False:
                # a document's last rows: a TMA store would also write the next document's
                o_rows = gl.expand_dims(row0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, O_L)), 1)
                cols = gl.expand_dims(gl.arange(0, D_PAD, layout=gl.SliceLayout(0, O_L)), 0)
                o_ptr = O + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
                gl.store(o_ptr + (q_begin + o_rows).to(gl.int64) * stride_on + cols, acc.to(dtype),
                         mask=(o_rows < nq) & (cols < HEAD_DIM))
            else:
                q_mma.store(acc.to(dtype))
                fence_async_shared()
                tma_store(o_desc, [off_b, q_begin + row0, off_h, 0], q_tile)
            if STORE_LSE:
                rows = row0 + gl.arange(0, WG_ROWS, layout=ROW_S)
                log2_l = gl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [l_safe], dtype=gl.float32,
                                                   is_pure=True, pack=1)
                gl.store(LSE + (off_b * HQ + off_h).to(gl.int64) * NQ + q_begin + rows,
                         gl.where(seen, (m_i + log2_l) * LN2, float("-inf")), mask=rows < nq)
    tma.store_wait(0)


@gluon.jit
def rope_attention_fwd_hopper_kernel(
    Q, stride_qb, stride_qn, stride_qh, k_desc, v_desc, o_desc, O, stride_ob, stride_on, stride_oh, LSE, QR,
    stride_qrb, stride_qrn, stride_qrh, INV_FREQ, Q_POS, stride_pos_b, stride_pos_n, TEMP, stride_temp_b,
    stride_temp_n, NQ, NK, HQ, GROUP, n_items, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, q_pos_offset, row_scale, rot_scale,
    HEAD_DIM: gl.constexpr, D_PAD: gl.constexpr, PAIRS: gl.constexpr, INTERLEAVED: gl.constexpr,
    HAS_POS: gl.constexpr, HAS_TEMP: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
    PAIR_UNITS: gl.constexpr, CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, STORE_Q: gl.constexpr, STORE_LSE: gl.constexpr,
):
    """Persistent: program i runs work items i, i + grid, ... (`_work_item`) of CONSUMERS * 64
    queries, on a producer and CONSUMERS consumer warpgroups. Q unrotated (any
    strides, last dim contiguous), K^ rotated (3-D descriptor over [B * Hkv, Nk, D or D_PAD] in
    the kernel's feature order), V and O through 4-D descriptors over their [B, N, H, D]
    strides (O also as a pointer, for the last rows of packed documents); lse [B, Hq, Nq].
    row_scale = softmax_scale log2(e), rot_scale = rotary_scale**2; TEMP [B or 1, Nq]
    multiplies row_scale per query. VARLEN: B = 1, documents bounded by cu_seqlens (int32
    [documents + 1], read here only) with positions (HAS_POS), and TILES their query tiles
    (`kernels.documents.document_tiles`). STORE_Q: Q^, as the consumers rotate it, to QR
    ([B, Nq, Hq, D] strides, natural feature order). STORE_LSE: lse to LSE (else not touched)."""
    gl.static_assert(CONSUMERS == 2 or CONSUMERS == 3, "two or three consumer warpgroups")
    dtype: gl.constexpr = Q.dtype.element_ty
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, WG_ROWS, 1, D_PAD], o_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, D_PAD], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, D_PAD], v_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    # each consumer's frequency increments (hi, lo), room for four (a power of two)
    inc_smem = gl.allocate_shared_memory(gl.uint32, [4 * D_PAD], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    if staged_queries(D_PAD, HEAD_DIM, PAIRS, INTERLEAVED, VARLEN):  # the consumers' next queries (`_stage_q`)
        CR: gl.constexpr = chunk_rows(D_PAD // 2, gl.num_warps())
        raw_smem = gl.allocate_shared_memory(dtype, [CONSUMERS * (WG_ROWS // CR), CR, D_PAD // 2, 2],
                                             gl.SwizzledSharedLayout(1, 1, 1, [1, 2, 0]))
    else:  # not read
        raw_smem = inc_smem
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)  # every consumer releases a buffer
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()
    mbarrier.arrive(turn.index(0), count=1)  # consumer 0 takes the first turn

    # warp_specialize takes no None: an absent input passes a pointer it never reads
    pos = Q_POS if HAS_POS else LSE
    temp = TEMP if HAS_TEMP else LSE
    cu_q = CU_SEQLENS_Q if VARLEN else LSE
    cu_k = CU_SEQLENS_K if VARLEN else LSE
    tiles = TILES if VARLEN else LSE
    # The consumers' runtime arguments travel as one tuple; their constexprs follow it in each
    # entry (a tuple assigned to a name turns constexprs into tensors).
    args = (Q, stride_qb, stride_qn, stride_qh, INV_FREQ, pos, stride_pos_b, stride_pos_n, temp, stride_temp_b,
            stride_temp_n, O, stride_ob, stride_on, stride_oh, LSE, o_desc, QR, stride_qrb, stride_qrn, stride_qrh,
            q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, NQ, NK, HQ, GROUP, n_items, cu_q, cu_k,
            tiles, q_pos_offset, row_scale, rot_scale, inc_smem, raw_smem)
    # The producer and the first CONSUMERS of three consumer entries (a list assigned to a name,
    # or built in a conditional expression, loses its constexprs).
    gl.warp_specialize([
        (_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, NQ, NK, HQ, GROUP, n_items,
                     cu_q, cu_k, tiles, CAUSAL, VARLEN, PAIR_UNITS, CONSUMERS * WG_ROWS, BLOCK_N, STAGES)),
        (_consumer, (args, HEAD_DIM, D_PAD, PAIRS, INTERLEAVED, HAS_POS, HAS_TEMP, CAUSAL, VARLEN, PAIR_UNITS,
                     CONSUMERS, BLOCK_N, STAGES, STORE_Q, STORE_LSE, 0)),
        (_consumer, (args, HEAD_DIM, D_PAD, PAIRS, INTERLEAVED, HAS_POS, HAS_TEMP, CAUSAL, VARLEN, PAIR_UNITS,
                     CONSUMERS, BLOCK_N, STAGES, STORE_Q, STORE_LSE, 1)),
        (_consumer, (args, HEAD_DIM, D_PAD, PAIRS, INTERLEAVED, HAS_POS, HAS_TEMP, CAUSAL, VARLEN, PAIR_UNITS,
                     CONSUMERS, BLOCK_N, STAGES, STORE_Q, STORE_LSE, 2)),
    ][:CONSUMERS + 1], [4] * CONSUMERS, [CONSUMER_REGS] * CONSUMERS)


# ---- launcher ----

class HopperFwdConfig(NamedTuple):
    """Launch configuration of `rope_attention_fwd_hopper_kernel`: its 1 + `consumers`
    warpgroups at `maxnreg` registers fill the register file; the producer gives its share
    to the consumers (`consumer_regs` each)."""

    consumers: int  # consumer warpgroups: a work item is 64 x consumers queries
    block_n: int
    stages: int
    consumer_regs: int
    maxnreg: int
    # Causal calls of at most this many query tiles per sequence run persistent programs over
    # units of two tiles (`_work_item`); longer ones one program per tile, which the
    # hardware hands out as SMs free up (their tail imbalance is smaller than the units').
    pair_units_tiles: int


# per padded head dim, from the H200 sweeps in bench/RESULTS.md (`python -m bench.sweep hopper`);
# pair_units_tiles from the H100 comparison there (2026-11-26)
# D <= 64: three consumers at 160 registers (FlashAttention-3's 192-query tiles there; H100,
# 2026-11-26); causal calls of up to 32 tiles (6k queries) on pair units (4k: 1.02-1.05x one
# program per tile, 8k: 0.91-1.00x; H100, 2026-11-27).
HOPPER_FWD_CONFIGS = {64: HopperFwdConfig(3, 128, 2, 160, 128, 32), 128: HopperFwdConfig(2, 128, 2, 240, 168, 32),
                      256: HopperFwdConfig(2, 64, 2, 240, 168, 0)}
# D <= 64 with two consumers on pair units: causal calls of at most TWO_CONSUMERS_CAUSAL_QUERIES_64
# queries (1k: 1.24x three consumers' one program per tile, 1.06x the portable forward, 1.17x
# three consumers on pair units; 2k: 1.02x the portable one, level with three on pair units; H100, 2026-11-27),
# and tiles in the slot order, which gather their features (`_pair_index`): three consumers would
# spill about 1 KB, two do not (such calls take the portable forward unless sent here directly).
HOPPER_FWD_TWO_CONSUMERS_64 = HopperFwdConfig(2, 128, 2, 240, 168, 32)
TWO_CONSUMERS_CAUSAL_QUERIES_64 = 2048


def fwd_config(head_dim_pad, slot_order=False, causal_queries=0):
    """The `HopperFwdConfig` for a padded head dim (16-256), the tile's feature order
    (`kernels.rope.slot_order`) and, for a causal call, its queries per sequence."""
    if head_dim_pad <= 64 and (slot_order or 0 < causal_queries <= TWO_CONSUMERS_CAUSAL_QUERIES_64):
        return HOPPER_FWD_TWO_CONSUMERS_64
    return HOPPER_FWD_CONFIGS[max(64, head_dim_pad)]


@functools.cache
def _shared_layout(block, torch_dtype):
    dtype = gl.bfloat16 if torch_dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def shared_layout(block, torch_dtype):
    """The NVMMA shared-memory layout of a TMA block (cached: it costs microseconds a call)."""
    return _shared_layout(tuple(block), torch_dtype)


def rope_attention_fwd_hopper(q, k, v, inv_freq, q_positions, k_positions, q_temperature, *, rotary_dim,
                              interleaved, causal, softmax_scale, rotary_scale, cu_seqlens_q=None, cu_seqlens_k=None,
                              max_seqlen_q=0, max_seqlen_k=0, save_q=False, store_lse=True, config=None):
    """Scaled rotary attention forward on Hopper: the key rope pass (into a K^ buffer for this
    call only, in the kernel's feature order), then the warp-specialized kernel, which
    rotates the queries itself. Arguments and results as
    `kernels.attention_fwd.rope_attention_fwd` (q, k, v 16-bit; varlen with both positions
    given): with `save_q` the kernel also stores the Q^ it rotated (sequence-major, natural
    feature order), except where its tile is in the slot order: there the query rope pass
    writes Q^. The max_seqlen ints are not needed here: packed documents' work items come from
    a table of their tiles built on the device (`kernels.documents.document_tiles`)."""
    batch, nq, hq, head_dim = q.shape
    _, nk, hkv, _ = k.shape
    d_pad = dot_pad(head_dim)
    slot_half = d_pad // 2 if slot_order(d_pad, rotary_dim, interleaved) else 0
    consumers, block_n, stages, consumer_regs, maxnreg, pair_units_tiles = config or fwd_config(
        d_pad, slot_half > 0, nq if causal and cu_seqlens_q is None else 0)
    block_m = consumers * WG_ROWS.value
    width = d_pad if slot_half else head_dim
    k_rot = scratch("k_rot", torch.empty(batch, hkv, nk, width, device=k.device, dtype=k.dtype))
    rope(k, inv_freq, k_positions, 0, rotary_dim=rotary_dim, interleaved=interleaved, out=k_rot.transpose(1, 2),
         slot_half=slot_half)

    q_rot, store_q = None, False
    if save_q:
        store_q = not slot_half
        if slot_half:
            q_rot, _ = rotate_q_k(q, k, inv_freq, q_positions, k_positions, q_temperature, rotary_dim=rotary_dim,
                                  interleaved=interleaved, softmax_scale=softmax_scale, rotary_scale=rotary_scale,
                                  keys=False)
        else:
            q_rot = scratch("q_rot", sequence_major(*q.shape, q))

    out = scratch("out", torch.empty_like(q))
    lse = lse_buffer(q, store_lse)
    k_block, v_block, o_block = [1, block_n, d_pad], [1, block_n, 1, d_pad], [1, WG_ROWS.value, 1, d_pad]
    k_desc = Descriptor(k_rot, [batch * hkv, nk, width], [nk * width, width, 1], k_block,
                        shared_layout(k_block, q.dtype))
    v_desc = Descriptor(v, [batch, nk, hkv, head_dim], [*v.stride()[:3], 1], v_block,
                        shared_layout(v_block, q.dtype))
    o_desc = Descriptor(out, [batch, nq, hq, head_dim], [*out.stride()[:3], 1], o_block,
                        shared_layout(o_block, q.dtype))
    q_out = q_rot if store_q else out  # the kernel reads no Q^ arguments unless it stores Q^
    varlen = cu_seqlens_q is not None
    if varlen:
        # Items are (query tile, head) of the document tiles' table (its last entries are
        # empty), run by one program per SM in turn: its producer loads the next item's first
        # tiles during the last one's epilogue, and each program starts only once (against one
        # program per item: 1.09-1.16x on the bench's documents, 1.21-1.22x on 1k ones; H100,
        # bench/RESULTS.md).
        tiles = document_tiles(cu_seqlens_q, nq, block_m)
        n_items = tiles.shape[0] * hq
        grid, pair_units = min(n_items, device.multiprocessors(q.device)), False
    else:
        # One program per SM runs items in turn (its producer loads the next item's first
        # tiles during the last one's epilogue): non-causal items are equal, and so are the
        # causal pair units (`_work_item`). Causal items beyond `pair_units_tiles`: one
        # program each, longest first, as SMs free up.
        tiles = None
        n_m = cdiv(nq, block_m)
        n_items = n_m * batch * hq
        pair_units = causal and n_m <= pair_units_tiles
        if pair_units:
            grid = min(pair_unit_count.fn(batch * hq, n_m), device.multiprocessors(q.device))
        elif causal:
            grid = n_items
        else:
            grid = min(n_items, device.multiprocessors(q.device))
    launch(
        rope_attention_fwd_hopper_kernel, (grid,),
        q, *q.stride()[:3], k_desc, v_desc, o_desc, out, *out.stride()[:3], lse if store_lse else out, q_out,
        *q_out.stride()[:3],
        inv_freq, q_positions,
        *row_strides(q_positions), q_temperature, *row_strides(q_temperature), nq, nk, hq, hq // hkv, n_items,
        cu_seqlens_q, cu_seqlens_k, tiles, nk - nq, softmax_scale * LOG2E, rotary_scale**2,
        HEAD_DIM=head_dim, D_PAD=d_pad, PAIRS=rotary_dim // 2, INTERLEAVED=interleaved,
        HAS_POS=q_positions is not None, HAS_TEMP=q_temperature is not None, CAUSAL=causal, VARLEN=varlen,
        PAIR_UNITS=pair_units, CONSUMERS=consumers, BLOCK_N=block_n, STAGES=stages, CONSUMER_REGS=consumer_regs,
        STORE_Q=store_q, STORE_LSE=store_lse,
        num_warps=4, maxnreg=maxnreg,
    )
    return out, lse, q_rot
