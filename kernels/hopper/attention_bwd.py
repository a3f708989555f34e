"""Scaled rotary attention backward for Hopper (sm_90), in Gluon: FlashAttention-3's
structure (5 matmuls per tile, dQ^ accumulated in float32 with atomics) over the rotated Q^
(the one the forward saved, or a query rope pass's) and the keys, which each program rotates
itself (K^ = R k once per key block, as the forward rotates its queries, and dk = R^T dK^ at
the end: no rope pass and no inverse pass over k), or K^ from the rope pass where the
frequency gradient reads it, the kernels' feature order is not the natural one
(`kernels.rope.slot_order`) or D = 256. The rope passes, the frequency and temperature
gradients and the rotation of dq back are shared with the portable backward
(`kernels.attention_bwd`).

A work item is BLOCK_N = 128 keys of one (batch, KV head), or of one packed document and KV
head (varlen, `kernels.documents`): one program each for causal calls and packed documents,
items in turn on one program per SM for full attention (PERSISTENT). An item loops over the
query heads that read its KV head and over their 64-query tiles (from the last down in short
causal GQA calls, whose programs then stream the same tiles together: `DESCENDING_MAX_KEYS`),
as three warpgroups (`gl.warp_specialize`; D = 256 below):
- a producer (few registers) loads an item's V (and K^) once both consumers are done with the
  last item's, then streams each step's Q^ and dO tiles through TMA into a ring of STAGES
  buffers guarded by "ready" / "empty" mbarriers;
- two consumers own 64 keys each. Per query tile one computes, with async wgmma,
  S^T = K^ Q^T and dP^T = V dO^T (both 64 x 64), P^T = exp2(S^T - lse2) and
  dS^T = ln2 P^T (dP^T - delta) in registers, then dV += P^T dO and dK^ += dS^T Q^ from
  registers, and stores dS^T to shared memory. When both halves are there (an mbarrier),
  each consumer computes half of dQ^ = dS K^ (64 queries x D/2 features over all 128 keys;
  at D = 64 the consumers take turns with the whole width), stages it in shared memory and
  adds it to the float32 dQ^ buffer with TMA reduce-adds (per-thread atomics cost 40% of
  the kernel's time, bench/RESULTS.md). The order of those sums varies, so this path is not
  bitwise repeatable; `deterministic=True` takes the portable kernels.
dK^ and dV go to memory once, at the item's end; where the program rotated the keys, dK^
goes back to k's frame on the way (dk = R^T dK^ from the accumulator, whose threads hold both
features of each pair: no inverse pass over dk). Only steps that can see a hidden pair (the causal
diagonal, keys past Nk, a partial first or last query tile) are masked.

At D = 256 a warpgroup's dK^ and dV over all features would take all its registers, and the
register file cannot hold them for 128 keys at all: a program owns 64 keys, and each
consumer half their features (SPLIT, `_split_step`). Warpgroup 0 computes S^T and P^T,
warpgroup 1 dP^T and dS^T (from P^T in 16 bits, as the dV matmul takes it), each handing its
result to the other through shared memory, so that no matmul runs twice; then each computes
dV, dK^ and dQ^ of its features. Shared memory holds K^, V and two stages of Q^ and dO (192
KB), P^T and dS^T (16 KB, whose bytes then stage warpgroup 0's dQ^ columns) and warpgroup 1's
staging (16 KB). The keys come rotated from the rope pass. The dQ^ staging and reduce-adds,
four times D = 128's per key, took 27-31% of the time when both warpgroups computed S^T and
dP^T (bench/RESULTS.md).
"""

from typing import NamedTuple

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .. import device
from ..attention_bwd import preprocess
from ..launch import Descriptor, cdiv, dot_pad, launch, scratch
from ..documents import document_bounds, document_tiles
from ..rope import row_strides
from .attention_fwd import (document_tile, increments, load_rows, mma_layout, mma_tile, pair_layout, rotate_rows,
                           sequence_row, shared_layout, sincos)
from .compat import reinterpret, thread_barrier, tma_atomic_add, tma_load

DQ_CHUNK = gl.constexpr(32)  # float32 columns of one TMA reduce: 128 bytes, the swizzle width
WG_KEYS = gl.constexpr(64)  # keys of one consumer warpgroup (the wgmma M atom)
BLOCK_M = gl.constexpr(64)  # queries per step
DQ_SPLIT_COLS = gl.constexpr(64)  # dQ^ columns of one matmul where the consumers split the features
LN2 = gl.constexpr(0.6931471805599453)


@gluon.constexpr_function
def _dq_columns(d_pad, split):
    """Columns of one dQ^ matmul: 64 where the warpgroups split the features (the width of
    its staging buffer), else each warpgroup's half of D_PAD from 128 on, or all of it below."""
    if split:
        return DQ_SPLIT_COLS.value
    return d_pad // 2 if d_pad >= 128 else d_pad


@gluon.jit
def _program_item(item, N_ITEMS, NQ, NK, HKV, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, TAIL_SEQUENCES,
                  CAUSAL: gl.constexpr, VARLEN: gl.constexpr, BLOCK_N: gl.constexpr):
    """Work item (of N_ITEMS) -> (batch row, KV head, row of its sequence's first query tile,
    rows of that tile before the sequence, query count, first key row, key count, first key
    of the block within the sequence, first query tile, first unmasked query tile, first
    masked query tile after those, query tiles in all).

    A sequence is a batch row, or (VARLEN) a document of the one packed row: items are
    (key block of the TILES table, KV head), head fastest, and the table's entries past the
    last block are items of no keys. A document's query tiles start at a multiple of
    BLOCK_M in the packed row (its first one may begin in the document before: those rows
    are masked), since TMA reads the 1-D lse2 and delta tiles from 16-byte aligned starts
    only. The key blocks of one batch row's head run together: they stream the same Q^ and
    dO, which then come from L2. (Causal programs ordered by key block instead, the longest
    first across all heads, streamed every head's Q^ and dO at once: on an H100 the causal
    backward at N = 4k took 0.84x the full one's time; bench/RESULTS.md.) Within a head,
    causal blocks come longest first, except in the last TAIL_SEQUENCES sequences (about a
    wave's worth of programs), whose blocks come longest first across them: otherwise the
    last sequences' longest blocks start last and run on alone (a model of the SMs taking
    programs in order, `python -m bench.grid_model`, put a causal GQA 4:1 grid at N = 4k at
    1.28x its work spread evenly, 1.06x with the tail reordered; the kernel ran 1.08-1.13x
    faster, bench/RESULTS.md)."""
    if VARLEN:
        off_b = 0
        off_hk = item % HKV
        doc, block = document_tile(TILES, item // HKV)
        q_begin, nq = document_bounds(CU_SEQLENS_Q, gl.maximum(doc, 0), NQ)
        k_begin, nk = document_bounds(CU_SEQLENS_K, gl.maximum(doc, 0), NK)
        nq = gl.where(doc >= 0, nq, 0)
        nk = gl.where(doc >= 0, nk, 0)
        shift = gl.where(nq > 0, q_begin % BLOCK_M, 0)
    else:
        n_blocks = gl.cdiv(NK, BLOCK_N)
        bh = item // n_blocks
        block = item % n_blocks
        if CAUSAL:  # the last sequences' blocks, longest first across them
            tail_rank = item - (N_ITEMS - TAIL_SEQUENCES * n_blocks)
            first_tail = N_ITEMS // n_blocks - TAIL_SEQUENCES
            bh = gl.where(tail_rank >= 0, first_tail + tail_rank % TAIL_SEQUENCES, bh)
            block = gl.where(tail_rank >= 0, tail_rank // TAIL_SEQUENCES, block)
        off_b = bh // HKV
        off_hk = bh % HKV
        q_begin = 0
        k_begin = 0
        nq = NQ
        nk = NK
        shift = 0
    start_n = block * BLOCK_N
    m_tiles = gl.cdiv(shift + nq, BLOCK_M)
    # Causal: query i sees key j iff j <= i + (nk - nq); tile m holds queries from
    # m BLOCK_M - shift on. Tiles before m_lo see none of these keys, tiles [m_lo, m_full)
    # some (masked), the rest all of them. Rows before the sequence mask tile 0, and rows
    # past nq (another head's or document's) a partial last tile, [m_end, m_tiles); a block
    # reaching past nk masks every step.
    if CAUSAL:
        m_lo = gl.minimum(gl.maximum(start_n - (nk - nq) + shift, 0) // BLOCK_M, m_tiles)
        m_full = gl.minimum(gl.cdiv(gl.maximum(start_n + BLOCK_N - 1 - (nk - nq) + shift, 0), BLOCK_M), m_tiles)
    else:
        m_lo = 0
        m_full = 0
    if shift > 0:
        m_full = gl.maximum(m_full, 1)
    m_end = m_tiles
    if (shift + nq) % BLOCK_M != 0:
        m_end = gl.maximum(m_tiles - 1, m_full)
    if start_n + BLOCK_N > nk:
        m_full = m_tiles
        m_end = m_tiles
    return off_b, off_hk, q_begin - shift, shift, nq, k_begin, nk, start_n, m_lo, m_full, m_end, m_tiles


@gluon.jit
def _laps(N_ITEMS, PERSISTENT: gl.constexpr):
    """Items this program runs: items p, p + programs, ... of N_ITEMS where PERSISTENT, else
    item p alone (a constant trip count: the loop folds away)."""
    if PERSISTENT:
        return gl.cdiv(N_ITEMS - gl.program_id(0), gl.num_programs(0))
    else:
        return 1


@gluon.jit
def _query_tile(lo, hi, i, DESCENDING: gl.constexpr):
    """The i-th query tile of [lo, hi): from the last down where DESCENDING."""
    if DESCENDING:
        return hi - 1 - i
    return lo + i


@gluon.jit
def _producer(q_desc, k_desc, v_desc, do_desc, lse2_desc, delta_desc, q_smem, do_smem, lse2_smem, delta_smem, k_smem,
              v_smem, kv_ready, kv_empty, q_ready, q_empty, NQ, NK, HQ, GROUP, N_ITEMS, CU_SEQLENS_Q, CU_SEQLENS_K,
              TILES, TAIL_SEQUENCES, CAUSAL: gl.constexpr, VARLEN: gl.constexpr, ROTATE_K: gl.constexpr,
              DESCENDING: gl.constexpr, PERSISTENT: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    """TMA loads, item by item: its block's V and (unless the consumers rotate the keys) K^
    once both consumers are done with the last item's, then Q^, dO, lse2 and delta of each
    step into the ring."""
    HKV = HQ // GROUP
    count = 0  # steps loaded so far: the ring position
    for lap in range(_laps(N_ITEMS, PERSISTENT)):
        item = gl.program_id(0) + lap * gl.num_programs(0)
        off_b, off_hk, q_base, _, _, k_begin, _, start_n, m_lo, _, _, m_tiles = _program_item(
            item, N_ITEMS, NQ, NK, HKV, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, TAIL_SEQUENCES, CAUSAL, VARLEN, BLOCK_N)
        if PERSISTENT:  # (an mbarrier starts as if its phase 1 had completed: the first item passes)
            mbarrier.wait(kv_empty, (lap & 1) ^ 1)
        if ROTATE_K:
            mbarrier.expect(kv_ready, v_desc.block_type.nbytes)
        else:
            mbarrier.expect(kv_ready, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma_load(k_desc, [(off_b * HKV + off_hk) * NK + k_begin + start_n, 0], kv_ready, k_smem)
        tma_load(v_desc, [off_b, k_begin + start_n, off_hk, 0], kv_ready, v_smem)
        for g in range(GROUP):
            off_h = off_hk * GROUP + g
            for i in range(m_tiles - m_lo):
                m = _query_tile(m_lo, m_tiles, i, DESCENDING)
                stage = count % STAGES
                mbarrier.wait(q_empty.index(stage), ((count // STAGES) & 1) ^ 1)
                ready = q_ready.index(stage)
                mbarrier.expect(ready, q_desc.block_type.nbytes + do_desc.block_type.nbytes
                                + 2 * lse2_desc.block_type.nbytes)
                first = q_base + m * BLOCK_M
                tma_load(q_desc, [(off_b * HQ + off_h) * NQ + first, 0], ready, q_smem.index(stage))
                tma_load(do_desc, [off_b, first, off_h, 0], ready, do_smem.index(stage))
                # lse2 and delta: each head's rows padded to whole tiles, so a tile starts 16-byte aligned
                row = (off_b * HQ + off_h) * gl.cdiv(NQ, BLOCK_M) * BLOCK_M + first
                tma_load(lse2_desc, [row], ready, lse2_smem.index(stage))
                tma_load(delta_desc, [row], ready, delta_smem.index(stage))
                count += 1


@gluon.jit
def _add_dq(dq, staging, dq_desc, row, first_col):
    """Add dq (64 queries x its columns, float32) into dQ^ at (row, first_col) through the
    staging buffer, with TMA reduce-adds of 128-byte rows: the TMA unit does the reads and
    adds (per-thread atomics took 40% of the kernel's time); the buffer has rows up to a
    multiple of BLOCK_M, so nothing is masked."""
    tma.store_wait(0)  # this warpgroup's previous reduces have left the staging buffer
    staging.store(dq)
    fence_async_shared()
    for c in gl.static_range(staging.shape[1] // DQ_CHUNK):
        tma_atomic_add(dq_desc, [row, first_col + c * DQ_CHUNK], staging.slice(c * DQ_CHUNK, DQ_CHUNK, dim=1))


@gluon.jit
def _probabilities(st, lse2_tile, m, shift, keys, NQ, NK, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
                   MASKED: gl.constexpr, S_L: gl.constexpr):
    """P^T = exp2(S^T - lse2) of a step, zero where query and key do not see each other
    (MASKED: also rows past NQ, another head's rows of Q^, lse2 and delta)."""
    # lse2 is read from shared memory where it is used: held in registers across the step
    # it would take 16 per thread (each thread holds 16 query columns)
    pt = gl.exp2(st - gl.expand_dims(lse2_tile.load(gl.SliceLayout(0, S_L)), 0))
    if MASKED:
        # the tile's own query index i against per-step scalars: comparisons with the
        # constants i stay immediates (against m * BLOCK_M + i, the compiler keeps 16
        # 64-bit bounds per thread alive across the loop)
        i = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, S_L)), 0)
        first = m * BLOCK_M - shift
        visible = gl.expand_dims(keys < NK, 1) & (i < NQ - first)
        if VARLEN:  # a document's tile 0 may begin in the document before
            visible = visible & (i >= -first)
        if CAUSAL:  # key j visible to query q iff j <= q + NK - NQ
            visible = visible & (gl.expand_dims(keys - (first + NK - NQ), 1) <= i)
        pt = gl.where(visible, pt, 0.0)
    return pt


@gluon.jit
def _keys_step(count, m, shift, dq_row, dk, dv, k_mine, v_mine, k_smem, q_smem, do_smem, lse2_smem, delta_smem,
               ds_smem, dq_smem, q_ready, q_empty, handoff, dq_desc, keys, NQ, NK, CID: gl.constexpr,
               D_PAD: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr, MASKED: gl.constexpr,
               STAGES: gl.constexpr, S_L: gl.constexpr, O_L: gl.constexpr, DQ_L: gl.constexpr):
    """One query tile's share of this warpgroup's dK^ and dV (its 64 keys), and of dQ^
    (module docstring): tile m holds the sequence's queries from m BLOCK_M - shift on (NQ,
    NK: its counts)."""
    dtype: gl.constexpr = k_smem.dtype
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
    stage = count % STAGES
    mbarrier.wait(q_ready.index(stage), (count // STAGES) & 1)
    q_tile = q_smem.index(stage)
    do_tile = do_smem.index(stage).reshape([BLOCK_M, D_PAD])
    zeros = gl.zeros([WG_KEYS, BLOCK_M], gl.float32, S_L)
    st_token = warpgroup_mma(k_mine, q_tile.permute((1, 0)), zeros, use_acc=False, is_async=True)
    dpt_token = warpgroup_mma(v_mine, do_tile.permute((1, 0)), zeros, use_acc=False, is_async=True)
    st = warpgroup_mma_wait(1, deps=[st_token])
    pt = _probabilities(st, lse2_smem.index(stage), m, shift, keys, NQ, NK, CAUSAL, VARLEN, MASKED, S_L)
    dpt = warpgroup_mma_wait(0, deps=[dpt_token])
    dst = (pt * (dpt - gl.expand_dims(delta_smem.index(stage).load(gl.SliceLayout(0, S_L)), 0)) * LN2).to(dtype)
    dv_token = warpgroup_mma(gl.convert_layout(pt.to(dtype), A_L), do_tile, dv, is_async=True)
    dk_token = warpgroup_mma(gl.convert_layout(dst, A_L), q_tile, dk, is_async=True)
    # dS^T to shared memory; dQ^ = dS K^ once both warpgroups' halves are there
    ds_buffer = ds_smem.index(count % 2)
    ds_buffer.slice(CID * WG_KEYS, WG_KEYS, dim=0).store(dst)
    fence_async_shared()  # generic-proxy stores, read next by wgmma (async proxy)
    thread_barrier()  # every thread of this warpgroup stored before it arrives
    mbarrier.arrive(handoff.index(count % 2), count=1)
    # the tensor cores run one warpgroup's matmuls in order: waiting for dV and dK here costs
    # nothing, and frees the registers of their P^T and dS^T operands before dQ^'s
    dv, dk = warpgroup_mma_wait(0, deps=[dv_token, dk_token])
    mbarrier.arrive(q_empty.index(stage), count=1)  # the dQ^ matmul reads dS^T and K^ only
    mbarrier.wait(handoff.index(count % 2), (count // 2) & 1)
    DQ_COLS: gl.constexpr = _dq_columns(D_PAD, False)
    if DQ_COLS < D_PAD:
        k_cols = k_smem.slice(CID * DQ_COLS, DQ_COLS, dim=1)
        first_col = CID * DQ_COLS
        mine = True
    else:  # narrow head dims: the warpgroups take turns with the whole width
        k_cols = k_smem
        first_col = 0
        mine = count % 2 == CID
    if mine:
        dq_token = warpgroup_mma(ds_buffer.permute((1, 0)), k_cols,
                                 gl.zeros([BLOCK_M, DQ_COLS], gl.float32, DQ_L), use_acc=False, is_async=True)
        dq = warpgroup_mma_wait(0, deps=[dq_token])
        _add_dq(dq, dq_smem.index(CID), dq_desc, dq_row + m * BLOCK_M, first_col)
    return dk, dv


# the mbarriers between the warpgroups of a split step (SPLIT)
P_READY = gl.constexpr(0)  # warpgroup 0 stored P^T
DS_READY = gl.constexpr(1)  # warpgroup 1 stored dS^T
DS_FREE = gl.constexpr(2)  # warpgroup 1 loaded P^T and its matmuls read dS^T


@gluon.jit
def _split_step(count, m, shift, dq_row, dk, dv, k_smem, v_smem, q_smem, do_smem, lse2_smem, delta_smem, pds_smem,
                dq_smem, q_ready, q_empty, sync, dq_desc, keys, NQ, NK, CID: gl.constexpr, D_PAD: gl.constexpr,
                CAUSAL: gl.constexpr, VARLEN: gl.constexpr, MASKED: gl.constexpr, STAGES: gl.constexpr,
                S_L: gl.constexpr, O_L: gl.constexpr, DQ_L: gl.constexpr):
    """One query tile's share of this warpgroup's features of dK^, dV and dQ^ over the
    program's 64 keys (SPLIT, D = 256): warpgroup 0 computes S^T and P^T, warpgroup 1 dP^T
    and dS^T, each handing its result to the other through shared memory (pds_smem: P^T,
    dS^T), so no matmul runs twice (module docstring)."""
    dtype: gl.constexpr = k_smem.dtype
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
    COLS: gl.constexpr = D_PAD // 2  # this warpgroup's features
    stage = count % STAGES
    parity = count & 1
    mbarrier.wait(q_ready.index(stage), (count // STAGES) & 1)
    q_tile = q_smem.index(stage)
    do_tile = do_smem.index(stage).reshape([BLOCK_M, D_PAD])
    zeros = gl.zeros([WG_KEYS, BLOCK_M], gl.float32, S_L)
    p_buffer = pds_smem.index(0)
    ds_buffer = pds_smem.index(1)
    if CID == 0:
        st_token = warpgroup_mma(k_smem, q_tile.permute((1, 0)), zeros, use_acc=False, is_async=True)
        st = warpgroup_mma_wait(0, deps=[st_token])
        pt = _probabilities(st, lse2_smem.index(stage), m, shift, keys, NQ, NK, CAUSAL, VARLEN, MASKED,
                            S_L).to(dtype)
        # P^T's bytes staged this warpgroup's dQ^ of the step before: its reduce-adds have read them
        tma.store_wait(0)
        p_buffer.store(pt)
        thread_barrier()  # every thread of this warpgroup stored before it arrives
        mbarrier.arrive(sync.index(P_READY), count=1)
        dv_token = warpgroup_mma(gl.convert_layout(pt, A_L), do_tile.slice(0, COLS, dim=1), dv, is_async=True)
        mbarrier.wait(sync.index(DS_READY), parity)
        dk_token = warpgroup_mma(ds_buffer, q_tile.slice(0, COLS, dim=1), dk, is_async=True)
    else:
        dpt_token = warpgroup_mma(v_smem, do_tile.permute((1, 0)), zeros, use_acc=False, is_async=True)
        dpt = warpgroup_mma_wait(0, deps=[dpt_token])
        dpt = dpt - gl.expand_dims(delta_smem.index(stage).load(gl.SliceLayout(0, S_L)), 0)
        mbarrier.wait(sync.index(P_READY), parity)
        pt = p_buffer.load(S_L)
        # dS^T from P^T as the dV matmul takes it (16 bits), where the other kernels take P^T
        # in float32: one more rounding, the size of dS^T's own to 16 bits
        dst = (pt.to(gl.float32) * dpt * LN2).to(dtype)
        ds_buffer.store(dst)
        fence_async_shared()  # generic-proxy stores, read next by wgmma (async proxy)
        thread_barrier()
        mbarrier.arrive(sync.index(DS_READY), count=1)
        dv_token = warpgroup_mma(gl.convert_layout(pt, A_L), do_tile.slice(COLS, COLS, dim=1), dv, is_async=True)
        dk_token = warpgroup_mma(gl.convert_layout(dst, A_L), q_tile.slice(COLS, COLS, dim=1), dk, is_async=True)
    # dQ^ = dS K^ of this warpgroup's columns, in two matmuls of 64 (the staging buffer's width)
    dq_zeros = gl.zeros([BLOCK_M, DQ_SPLIT_COLS], gl.float32, DQ_L)
    lo_token = warpgroup_mma(ds_buffer.permute((1, 0)), k_smem.slice(CID * COLS, DQ_SPLIT_COLS, dim=1), dq_zeros,
                             use_acc=False, is_async=True)
    hi_token = warpgroup_mma(ds_buffer.permute((1, 0)), k_smem.slice(CID * COLS + DQ_SPLIT_COLS, DQ_SPLIT_COLS, dim=1),
                             dq_zeros, use_acc=False, is_async=True)
    dv, dk = warpgroup_mma_wait(2, deps=[dv_token, dk_token])
    mbarrier.arrive(q_empty.index(stage), count=1)  # the dQ^ matmuls read dS^T and K^ only
    dq_lo, dq_hi = warpgroup_mma_wait(0, deps=[lo_token, hi_token])
    row = dq_row + m * BLOCK_M
    if CID == 0:
        # warpgroup 0 stages its dQ^ in the bytes of P^T and dS^T, once warpgroup 1 loaded
        # P^T and both warpgroups' matmuls read dS^T; the reduce-adds read them before its
        # next P^T (above), which warpgroup 1 waits for before its next dS^T
        mbarrier.wait(sync.index(DS_FREE), parity)
        staging = reinterpret(pds_smem, gl.float32, [BLOCK_M, DQ_SPLIT_COLS], dq_desc.layout)
    else:
        mbarrier.arrive(sync.index(DS_FREE), count=1)
        staging = dq_smem.index(0)
    _add_dq(dq_lo, staging, dq_desc, row, CID * COLS)
    _add_dq(dq_hi, staging, dq_desc, row, CID * COLS + DQ_SPLIT_COLS)
    return dk, dv


@gluon.jit
def _step(count, m, shift, dq_row, dk, dv, k_mine, v_mine, k_smem, v_smem, q_smem, do_smem, lse2_smem, delta_smem,
          ds_smem, dq_smem, q_ready, q_empty, handoff, dq_desc, keys, NQ, NK, CID: gl.constexpr, D_PAD: gl.constexpr,
          CAUSAL: gl.constexpr, VARLEN: gl.constexpr, MASKED: gl.constexpr, STAGES: gl.constexpr,
          SPLIT: gl.constexpr, S_L: gl.constexpr, O_L: gl.constexpr, DQ_L: gl.constexpr):
    """One query tile's step of this warpgroup: `_split_step` where the warpgroups split the
    features (SPLIT), else `_keys_step`."""
    if SPLIT:
        dk, dv = _split_step(count, m, shift, dq_row, dk, dv, k_smem, v_smem, q_smem, do_smem, lse2_smem, delta_smem,
                             ds_smem, dq_smem, q_ready, q_empty, handoff, dq_desc, keys, NQ, NK, CID, D_PAD, CAUSAL,
                             VARLEN, MASKED, STAGES, S_L, O_L, DQ_L)
    else:
        dk, dv = _keys_step(count, m, shift, dq_row, dk, dv, k_mine, v_mine, k_smem, q_smem, do_smem, lse2_smem,
                            delta_smem, ds_smem, dq_smem, q_ready, q_empty, handoff, dq_desc, keys, NQ, NK, CID, D_PAD,
                            CAUSAL, VARLEN, MASKED, STAGES, S_L, O_L, DQ_L)
    return dk, dv


@gluon.jit
def _rotate_back(dk, INV_FREQ, K_POS, stride_pos_n, row0, NK, D_PAD: gl.constexpr, PAIRS: gl.constexpr,
                 INTERLEAVED: gl.constexpr, HAS_POS: gl.constexpr, O_L: gl.constexpr):
    """R^T dK^ of keys [row0, row0 + 64) (K_POS points at the sequence's row 0), in the
    accumulator's layout O_L, where both features of each rotation pair lie in one thread's
    registers. The frequencies' float64 increments are computed for the HALF slots, a few per
    thread in every warp, then converted to the pair tile's slices: per element of the tile
    (32 a thread at D = 128) they cost this epilogue as much as an inverse rope pass, and converted from
    one slot per thread (across warps) they made ptxas keep more of the step loops' values in
    local memory (bench/RESULTS.md)."""
    HALF: gl.constexpr = D_PAD // 2
    if INTERLEAVED:  # pairs (2i, 2i + 1)
        pairs = gl.reshape(dk, [WG_KEYS, HALF, 2])
    else:  # pairs (i, i + HALF)
        pairs = gl.permute(gl.reshape(dk, [WG_KEYS, 2, HALF]), (0, 2, 1))
    a, b = gl.split(pairs)
    PL: gl.constexpr = a.type.layout
    inc_hi, inc_lo = increments(INV_FREQ, PAIRS, HALF, gl.BlockedLayout([HALF // 32], [32], [gl.num_warps()], [0]))
    inc_hi = gl.convert_layout(inc_hi, gl.SliceLayout(0, PL))
    inc_lo = gl.convert_layout(inc_lo, gl.SliceLayout(0, PL))
    rows = row0 + gl.arange(0, WG_KEYS, layout=gl.SliceLayout(1, PL))
    if HAS_POS:
        pos = gl.load(K_POS + rows.to(gl.int64) * stride_pos_n, mask=rows < NK, other=0).to(gl.int32)
    else:
        pos = rows
    cos, sin = sincos(pos, inc_hi, inc_lo)
    rotated = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(0, PL)) < PAIRS, 0)
    cos = gl.where(rotated, cos, 1.0)
    sin = gl.where(rotated, sin, 0.0)
    unrotated = gl.join(a * cos + b * sin, b * cos - a * sin)
    return gl.convert_layout(mma_tile(unrotated, D_PAD, INTERLEAVED), O_L, assert_trivial=True)


@gluon.jit
def _consumer(k_smem, v_smem, q_smem, do_smem, lse2_smem, delta_smem, ds_smem, dq_smem, kv_ready, kv_empty, q_ready,
              q_empty, handoff, dq_desc, DK, stride_dkb, stride_dkn, stride_dkh, DV, stride_dvb, stride_dvn, stride_dvh,
              K, stride_kb, stride_kn, stride_kh, INV_FREQ, K_POS, stride_pos_b, stride_pos_n, NQ, NK, HQ, GROUP,
              N_ITEMS, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, TAIL_SEQUENCES, CID: gl.constexpr, HEAD_DIM: gl.constexpr,
              D_PAD: gl.constexpr, PAIRS: gl.constexpr, INTERLEAVED: gl.constexpr, HAS_POS: gl.constexpr,
              CAUSAL: gl.constexpr, VARLEN: gl.constexpr, ROTATE_K: gl.constexpr, DESCENDING: gl.constexpr,
              PERSISTENT: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    """One consumer warpgroup: keys [start_n + 64 CID, + 64) of the program's block, or
    (SPLIT: BLOCK_N = 64) features [D_PAD / 2 CID, + D_PAD / 2) of all its keys and its part
    of each step (`_split_step`)."""
    NW: gl.constexpr = gl.num_warps()
    SPLIT: gl.constexpr = BLOCK_N == WG_KEYS
    gl.static_assert(not SPLIT or D_PAD == 256, "the features split in two halves of 128 at D = 256 only")
    COLS: gl.constexpr = D_PAD // 2 if SPLIT else D_PAD  # of dK^ and dV
    FIRST_KEY: gl.constexpr = 0 if SPLIT else CID * WG_KEYS  # within the block
    FIRST_COL: gl.constexpr = CID * COLS if SPLIT else 0
    DQ_COLS: gl.constexpr = _dq_columns(D_PAD, SPLIT)
    S_L: gl.constexpr = mma_layout(BLOCK_M, NW)
    O_L: gl.constexpr = mma_layout(COLS, NW)
    DQ_L: gl.constexpr = mma_layout(DQ_COLS, NW)
    HKV = HQ // GROUP
    k_block = k_smem
    v_block = v_smem.reshape([BLOCK_N, D_PAD])
    k_mine = k_block.slice(FIRST_KEY, WG_KEYS, dim=0)
    v_mine = v_block.slice(FIRST_KEY, WG_KEYS, dim=0)
    count = 0  # steps consumed so far: the ring position, as the producer's
    for lap in range(_laps(N_ITEMS, PERSISTENT)):
        item = gl.program_id(0) + lap * gl.num_programs(0)
        off_b, off_hk, q_base, shift, nq, k_begin, nk, start_n, m_lo, m_full, m_end, m_tiles = _program_item(
            item, N_ITEMS, NQ, NK, HKV, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, TAIL_SEQUENCES, CAUSAL, VARLEN, BLOCK_N)
        keys = start_n + FIRST_KEY + gl.arange(0, WG_KEYS, layout=gl.SliceLayout(1, S_L))
        if ROTATE_K:  # K^ = R k of this warpgroup's keys, as the forward rotates its queries (not SPLIT)
            L3: gl.constexpr = pair_layout(D_PAD // 2, INTERLEAVED, NW)
            row0 = start_n + FIRST_KEY
            x = load_rows(K + off_b.to(gl.int64) * stride_kb + k_begin.to(gl.int64) * stride_kn
                          + off_hk.to(gl.int64) * stride_kh, stride_kn, row0, nk, HEAD_DIM, D_PAD, PAIRS, INTERLEAVED,
                          L3)
            pos_ptr = sequence_row(K_POS, off_b, k_begin, stride_pos_b, stride_pos_n, HAS_POS)
            inc_hi, inc_lo = increments(INV_FREQ, PAIRS, D_PAD // 2, gl.SliceLayout(0, gl.SliceLayout(2, L3)))
            k_rot = mma_tile(rotate_rows(x, pos_ptr, stride_pos_n, pos_ptr, 0, inc_hi, inc_lo, row0, nk, 0, 1.0, 1.0,
                                         D_PAD, PAIRS, INTERLEAVED, HAS_POS, False, L3), D_PAD, INTERLEAVED)
            if PERSISTENT:  # the other warpgroup's dQ^ matmuls of the last item have read these rows
                mbarrier.wait(kv_empty, (lap & 1) ^ 1)
            k_mine.store(k_rot)
            # generic-proxy stores, read next by this warpgroup's wgmma; the other warpgroup's
            # dQ^ matmuls read them after the first step's handoff, which this one arrives at
            # after a fence of its own
            fence_async_shared()
            thread_barrier()
        dk = gl.zeros([WG_KEYS, COLS], gl.float32, O_L)
        dv = gl.zeros([WG_KEYS, COLS], gl.float32, O_L)
        mbarrier.wait(kv_ready, lap & 1)
        # the masked runs: the diagonal's tiles and the tail's, in the order of the query tiles
        if DESCENDING:
            first_lo, first_hi, last_lo, last_hi = m_end, m_tiles, m_lo, m_full
        else:
            first_lo, first_hi, last_lo, last_hi = m_lo, m_full, m_end, m_tiles
        for g in range(GROUP):
            dq_row = (off_b * HQ + off_hk * GROUP + g) * gl.cdiv(NQ, BLOCK_M) * BLOCK_M + q_base  # tile 0's row
            for run in gl.static_range(3):  # a masked run, the unmasked tiles, a masked run
                lo, hi = (first_lo, first_hi) if run == 0 else ((m_full, m_end) if run == 1 else (last_lo, last_hi))
                for i in range(hi - lo):
                    dk, dv = _step(count, _query_tile(lo, hi, i, DESCENDING), shift, dq_row, dk, dv, k_mine, v_mine,
                                   k_block, v_block, q_smem, do_smem, lse2_smem, delta_smem, ds_smem, dq_smem, q_ready,
                                   q_empty, handoff, dq_desc, keys, nq, nk, CID, D_PAD, CAUSAL, VARLEN, run != 1,
                                   STAGES, SPLIT, S_L, O_L, DQ_L)
                    count += 1
        if PERSISTENT:  # every matmul of this item that reads K^ or V has been waited for: the
            # producer may load the next item's, and the other warpgroup rotate its keys into K^
            mbarrier.arrive(kv_empty, count=1)

        tma.store_wait(0)
        out_keys = start_n + FIRST_KEY + gl.arange(0, WG_KEYS, layout=gl.SliceLayout(1, O_L))
        cols = FIRST_COL + gl.expand_dims(gl.arange(0, COLS, layout=gl.SliceLayout(0, O_L)), 0)
        mask = gl.expand_dims(out_keys < nk, 1) & (cols < HEAD_DIM)
        rows = gl.expand_dims((k_begin + out_keys).to(gl.int64), 1)
        dv_ptr = DV + off_b.to(gl.int64) * stride_dvb + off_hk.to(gl.int64) * stride_dvh
        gl.store(dv_ptr + rows * stride_dvn + cols, dv.to(DV.dtype.element_ty), mask=mask)
        if ROTATE_K:  # dk = R^T dK^, the gradient of k
            # the positions' pointer again: kept from the prologue, it took two registers through the loops
            pos_ptr = sequence_row(K_POS, off_b, k_begin, stride_pos_b, stride_pos_n, HAS_POS)
            dk = _rotate_back(dk, INV_FREQ, pos_ptr, stride_pos_n, start_n + FIRST_KEY, nk, D_PAD, PAIRS,
                              INTERLEAVED, HAS_POS, O_L)
        dk_ptr = DK + off_b.to(gl.int64) * stride_dkb + off_hk.to(gl.int64) * stride_dkh
        gl.store(dk_ptr + rows * stride_dkn + cols, dk.to(DK.dtype.element_ty), mask=mask)


@gluon.jit
def rope_attention_bwd_hopper_kernel(
    q_desc, k_desc, v_desc, do_desc, lse2_desc, delta_desc, dq_desc, DK, stride_dkb, stride_dkn, stride_dkh, DV,
    stride_dvb, stride_dvn, stride_dvh, K, stride_kb, stride_kn, stride_kh, INV_FREQ, K_POS, stride_pos_b,
    stride_pos_n, NQ, NK, HQ, GROUP, N_ITEMS, CU_SEQLENS_Q, CU_SEQLENS_K, TILES, TAIL_SEQUENCES,
    HEAD_DIM: gl.constexpr, D_PAD: gl.constexpr, PAIRS: gl.constexpr, INTERLEAVED: gl.constexpr,
    HAS_POS: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr, ROTATE_K: gl.constexpr,
    DESCENDING: gl.constexpr, PERSISTENT: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):
    """Q^ and K^ sequence-major (2-D descriptors over [rows, D]), V and dO through 4-D
    descriptors over their [B, N, H, D] strides; lse2 (base 2, +inf for rows that saw no
    key) and delta [B, Hq, Nq rounded up to BLOCK_M] through 1-D descriptors; dq_desc over
    the float32 dQ^ accumulator [B, Hq, Nq rounded up to BLOCK_M, D_PAD], zeroed.
    ROTATE_K: the consumers rotate the keys k (unrotated, any strides; K^ = R k in the
    natural feature order, `kernels.rope.slot_order`) at positions K_POS ([B or 1, Nk], or
    arange) themselves, k_desc is not read, and DK gets dk = R^T dK^; otherwise k_desc
    holds K^ and DK gets dK^ (DK may be the K^ buffer: an item reads its rows once, before
    its steps). Writes dV. VARLEN: B = 1, documents bounded by cu_seqlens (int32 [documents + 1]),
    and TILES their key blocks (`kernels.documents.document_tiles`). N_ITEMS work items
    (`_program_item`): program p runs item p, or (PERSISTENT) items p, p + programs, ..."""
    dtype: gl.constexpr = k_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D_PAD], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, 1, D_PAD], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D_PAD], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, 1, D_PAD], do_desc.layout)
    lse2_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], lse2_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], delta_desc.layout)
    SPLIT: gl.constexpr = BLOCK_N == WG_KEYS  # the warpgroups split the features of 64 keys
    if SPLIT:  # P^T and dS^T, whose bytes then stage warpgroup 0's dQ^ columns; warpgroup 1's staging
        ds_smem = gl.allocate_shared_memory(dtype, [2, WG_KEYS, BLOCK_M],
                                            gl.NVMMASharedLayout.get_default_for([WG_KEYS, BLOCK_M], dtype))
        dq_smem = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M, DQ_SPLIT_COLS], dq_desc.layout)
    else:  # dS^T: two buffers of both warpgroups' keys; dQ^ staging, one per consumer
        ds_smem = gl.allocate_shared_memory(dtype, [2, 2 * WG_KEYS, BLOCK_M],
                                            gl.NVMMASharedLayout.get_default_for([2 * WG_KEYS, BLOCK_M], dtype))
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, _dq_columns(D_PAD, False)], dq_desc.layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # between the consumers: `_split_step`'s three, or both halves of dS^T stored (two buffers)
    handoff = gl.allocate_shared_memory(gl.int64, [3 if SPLIT else 2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    mbarrier.init(kv_empty, count=2)  # both consumers are done with an item's K^ and V
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # both consumers release a buffer
    for i in gl.static_range(3 if SPLIT else 2):
        mbarrier.init(handoff.index(i), count=1 if SPLIT else 2)
    fence_async_shared()

    # warp_specialize takes no None: dense calls pass a pointer they never read
    cu_q = CU_SEQLENS_Q if VARLEN else DK
    cu_k = CU_SEQLENS_K if VARLEN else DK
    tiles = TILES if VARLEN else DK
    k_pos = K_POS if HAS_POS else DK
    gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, do_desc, lse2_desc, delta_desc, q_smem, do_smem, lse2_smem, delta_smem,
                     k_smem, v_smem, kv_ready, kv_empty, q_ready, q_empty, NQ, NK, HQ, GROUP, N_ITEMS, cu_q, cu_k,
                     tiles, TAIL_SEQUENCES, CAUSAL, VARLEN, ROTATE_K, DESCENDING, PERSISTENT, STAGES, BLOCK_N)),
        (_consumer, (k_smem, v_smem, q_smem, do_smem, lse2_smem, delta_smem, ds_smem, dq_smem, kv_ready, kv_empty,
                     q_ready, q_empty, handoff, dq_desc, DK, stride_dkb, stride_dkn, stride_dkh, DV, stride_dvb,
                     stride_dvn, stride_dvh, K, stride_kb, stride_kn, stride_kh, INV_FREQ, k_pos, stride_pos_b,
                     stride_pos_n, NQ, NK, HQ, GROUP, N_ITEMS, cu_q, cu_k, tiles, TAIL_SEQUENCES, 0, HEAD_DIM, D_PAD,
                     PAIRS, INTERLEAVED, HAS_POS, CAUSAL, VARLEN, ROTATE_K, DESCENDING, PERSISTENT, STAGES, BLOCK_N)),
        (_consumer, (k_smem, v_smem, q_smem, do_smem, lse2_smem, delta_smem, ds_smem, dq_smem, kv_ready, kv_empty,
                     q_ready, q_empty, handoff, dq_desc, DK, stride_dkb, stride_dkn, stride_dkh, DV, stride_dvb,
                     stride_dvn, stride_dvh, K, stride_kb, stride_kn, stride_kh, INV_FREQ, k_pos, stride_pos_b,
                     stride_pos_n, NQ, NK, HQ, GROUP, N_ITEMS, cu_q, cu_k, tiles, TAIL_SEQUENCES, 1, HEAD_DIM, D_PAD,
                     PAIRS, INTERLEAVED, HAS_POS, CAUSAL, VARLEN, ROTATE_K, DESCENDING, PERSISTENT, STAGES, BLOCK_N)),
    ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


# ---- launcher ----

ROW_STATS_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)  # lse2, delta tiles
DQ_LAYOUT = gl.NVMMASharedLayout.get_default_for([BLOCK_M.value, DQ_CHUNK.value], gl.float32)  # dQ^ reduce tiles


class HopperBwdConfig(NamedTuple):
    """Launch configuration of `rope_attention_bwd_hopper_kernel`."""

    stages: int
    consumer_regs: int
    maxnreg: int
    block_n: int  # keys per program: 128, a warpgroup's 64 each; 64, each warpgroup half the features


# Per padded head dim. Three stages ran 8-9% slower than two at D = 128 (bench/RESULTS.md). At
# D = 256 a warpgroup's dK^ and dV over all features would fill its registers, and two stages
# of Q^ and dO take 128 KB of shared memory: the warpgroups split the features of 64 keys.
HOPPER_BWD_CONFIGS = {64: HopperBwdConfig(2, 240, 168, 128), 128: HopperBwdConfig(2, 240, 168, 128),
                      256: HopperBwdConfig(2, 240, 168, 64)}


# Causal GQA calls of up to this many keys per sequence (per padded head dim) run each program's
# query tiles from the last down (DESCENDING): the programs of a KV head (its key blocks) then
# read the same Q^ and dO tiles at about the same time, where from the diagonal up each reads its
# own and a wave's groups hold about 64 MB of Q^, dO and dQ^ against the 50 MB L2 (half that at
# D = 64). The gradient kernel on an H100 (2026-11-27), new / old: D = 128 H32/8 causal 1k
# 1.05-1.09x, 2k 1.03-1.05x, 4k 1.02-1.05x, H16/4 4k 1.03-1.04x, 16k 0.97x (a wave holds about
# one group, all of whose programs then add into the same dQ^ tiles at once); D = 256 H8/2 1k
# 1.05-1.08x, 4k level; D = 64 H32/8 1k-2k 1.01-1.02x, 4k 0.98-0.99x; MHA level (bench/RESULTS.md).
DESCENDING_MAX_KEYS = {64: 2048, 128: 4096, 256: 1024}


def bwd_config(head_dim):
    """The `HopperBwdConfig` for padded head dim 64, 128 or 256."""
    return HOPPER_BWD_CONFIGS[head_dim]


def persistent(causal, varlen, d_pad):
    """Whether a call's items run in turn on one program per SM (PERSISTENT): full attention's
    items, all of equal work, do, so that a program starts once and its producer loads the
    next item's V and first tiles while the consumers finish one (gradient kernel on an H100,
    new / old: 1k 1.02-1.05x, 4k 1.00-1.08x, 16k 1.05-1.08x; GQA 4:1 and D = 64 level; at
    D = 256 0.98x, so not there). Causal and packed items run one program each, as SMs free
    up: a fixed share per program would end unevenly."""
    return not causal and not varlen and d_pad <= 128


def tail_sequences(sequences, key_blocks, sms):
    """TAIL_SEQUENCES of a dense causal call: about a wave's worth of its last sequences,
    whose key blocks run longest first across them (`_program_item`)."""
    return min(sequences, cdiv(sms, key_blocks))


def rope_attention_bwd_hopper(do, out, lse, dlse, q_rot, k_rot, v, dk, *, causal, cu_seqlens_q=None,
                              cu_seqlens_k=None, keys, config=None):
    """The gradient kernel of `kernels.attention_bwd.rope_attention_bwd` on Hopper: from dO,
    the forward's out and lse, dlse ([B, Hq, Nq] or None) and the rope passes' Q^ and K^
    (sequence-major [B, N, H, D] views), dK^ into dk (like k, sequence-major); returns dQ^
    (a float32 [B, Nq, Hq, D] view) and dv (like v). keys = (k, inv_freq, k_positions,
    rotary_dim, interleaved): with k_rot None the kernel rotates the keys itself (K^ in the
    natural feature order: not `kernels.rope.slot_order`) and writes their gradient
    dk = R^T dK^ into dk (shaped like k, any strides). The preprocess
    (`kernels.attention_bwd.preprocess`) pads each head's lse2 and delta to whole query tiles
    and zeroes the dQ^ sums. q_rot,
    k_rot, v and do 16-bit, head dim 64, 128 or 256 (`HOPPER_BWD_CONFIGS`; at 256 the keys
    come rotated: k_rot given). Varlen: B = 1 and cu_seqlens_q / cu_seqlens_k int32
    [documents + 1]."""
    batch, nq, hq, head_dim = q_rot.shape
    _, nk, hkv, _ = dk.shape
    d_pad = dot_pad(head_dim)
    stages, consumer_regs, maxnreg, block_n = config or bwd_config(d_pad)
    if k_rot is None and block_n == WG_KEYS.value:
        raise ValueError("the Hopper backward rotates the keys itself only where a warpgroup holds whole keys "
                         f"(head dim <= 128, not {head_dim}): pass K^")
    nq_tiles = cdiv(nq, BLOCK_M.value) * BLOCK_M.value
    dq_acc = scratch("dq_acc", torch.empty(batch, hq, nq_tiles, d_pad, device=q_rot.device, dtype=torch.float32))
    delta, lse2 = preprocess(out, do, lse, dlse, rows=nq_tiles, dq_acc=dq_acc)
    dv = scratch("dv", torch.empty_like(v))
    q_block, k_block = [BLOCK_M.value, d_pad], [block_n, d_pad]
    v_block, do_block = [1, block_n, 1, d_pad], [1, BLOCK_M.value, 1, d_pad]
    q_desc = Descriptor(q_rot.transpose(1, 2), [batch * hq * nq, head_dim], [head_dim, 1], q_block,
                        shared_layout(q_block, q_rot.dtype))
    # rotating the keys itself, the kernel reads no K^: its descriptor points at Q^'s rows then
    k_rows = (q_rot if k_rot is None else k_rot).transpose(1, 2)
    k_desc = Descriptor(k_rows, [k_rows.numel() // head_dim, head_dim], [head_dim, 1], k_block,
                        shared_layout(k_block, k_rows.dtype))
    v_desc = Descriptor(v, list(v.shape), [*v.stride()[:3], 1], v_block, shared_layout(v_block, v.dtype))
    do_desc = Descriptor(do, list(do.shape), [*do.stride()[:3], 1], do_block, shared_layout(do_block, do.dtype))
    dq_block = [BLOCK_M.value, DQ_CHUNK.value]
    # A packed document's first and last query tiles add zeros (their rows outside it are
    # masked) into the neighbours' rows of dQ^, or past the end, where TMA clips.
    dq_desc = Descriptor(dq_acc, [dq_acc.numel() // d_pad, d_pad], [d_pad, 1], dq_block, DQ_LAYOUT)
    row_block = [BLOCK_M.value]
    lse2_desc, delta_desc = (Descriptor(x, [x.numel()], [1], row_block, ROW_STATS_LAYOUT)
                             for x in (lse2, delta))
    sms = device.multiprocessors(q_rot.device)
    if cu_seqlens_q is None:
        tiles, items = None, cdiv(nk, block_n) * batch * hkv
        # (read by causal calls only: 0 elsewhere, one compiled variant)
        tail = tail_sequences(batch * hkv, cdiv(nk, block_n), sms) if causal else 0
    else:  # (key block, KV head) of the document tiles' table
        tiles = document_tiles(cu_seqlens_k, nk, block_n)
        items = tiles.shape[0] * hkv
        tail = 0
    on_sms = persistent(causal, cu_seqlens_q is not None, d_pad)
    k, inv_freq, k_positions, rotary_dim, interleaved = keys
    descending = causal and hq > hkv and cu_seqlens_q is None and nk <= DESCENDING_MAX_KEYS[d_pad]
    if k_rot is not None:  # the rotation's constexprs are unused: one compiled variant for all
        k_positions, rotary_dim, interleaved = None, 0, False
    launch(
        rope_attention_bwd_hopper_kernel, (min(items, sms) if on_sms else items,),
        q_desc, k_desc, v_desc, do_desc, lse2_desc, delta_desc, dq_desc, dk, *dk.stride()[:3], dv,
        *dv.stride()[:3], k, *k.stride()[:3], inv_freq, k_positions, *row_strides(k_positions), nq, nk, hq,
        hq // hkv, items, cu_seqlens_q, cu_seqlens_k, tiles, tail, HEAD_DIM=head_dim, D_PAD=d_pad,
        PAIRS=rotary_dim // 2, INTERLEAVED=interleaved, HAS_POS=k_positions is not None, CAUSAL=causal,
        VARLEN=cu_seqlens_q is not None, ROTATE_K=k_rot is None, DESCENDING=descending, PERSISTENT=on_sms,
        STAGES=stages, BLOCK_N=block_n, CONSUMER_REGS=consumer_regs, num_warps=4, maxnreg=maxnreg,
    )
    return dq_acc[:, :, :nq, :head_dim].transpose(1, 2), dv
