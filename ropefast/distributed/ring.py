"""Context-parallel scaled rotary attention: ring attention over torch.distributed.

Each of P ranks holds its part of the sequence (chunks r and 2P-1-r, `layout.py`) of the
unrotated q, k, v, and their global positions. Keys, values and key positions travel
around the ring (rank r sends to r+1); at each step a rank runs the dense kernels on its
queries and the keys it holds, rotating both inside the kernel from their global positions
(so rotation is exact on every rank), and merges the partial (out, lse) in float32. The
next step's send/recv is posted before the current block runs, so the transfer overlaps the
compute. The backward runs the ring again with the merged out and lse (each block's share
of the softmax gradient, delta = rowsum(dO * out) - dlse, is then exact): dq sums locally,
dk and dv (float32) travel with their keys and arrive home after the last step.

Causal blocks, for the queries of rank r and the keys of source rank s (chunks s and
2P-1-s): s == r is the diagonal (causal, equal lengths); s < r: every query sees the first
key chunk and none of the second; s > r: the second query chunk sees both key chunks, the
first none. Every step but the first is half a full block, and all ranks do equal work.
"""

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .. import dispatch, ops
from .._validate import (FLOAT_DTYPES, as_batched, check_flags, check_layout, check_positions, check_positive,
                         check_q_temperature, check_qkv, resolve_rotary)
from ..reference import scaled_rope_attention_reference, scaled_rope_attention_reference_bwd
from ..schedules.base import RopeSchedule
from .layout import _group_rank_size, context_parallel_positions

__all__ = ["ring_scaled_rope_attention"]


def ring_scaled_rope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    schedule: Optional[RopeSchedule] = None,
    inv_freq: Optional[Tensor] = None,
    rotary_dim: Optional[int] = None,
    interleaved: Optional[bool] = None,
    q_positions: Optional[Tensor] = None,
    k_positions: Optional[Tensor] = None,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    rotary_scale: Optional[float] = None,
    q_temperature: Optional[Tensor] = None,
    layout: str = "bshd",
    return_lse: bool = False,
    seq_len: Optional[int] = None,
    deterministic: bool = False,
    check_shapes: bool = True,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """`scaled_rope_attention` over a sequence split across the ranks of `group` (context
    parallelism): every rank passes its local chunk and gets its local output.

    Args:
        q, k, v: this rank's unrotated shard, [B, N/P, Hq, D] and [B, N/P, Hkv, D] ("bshd";
            [B, H, N/P, D] with layout="bhsd"), in the load-balanced layout of
            `shard_for_context_parallel` (chunks r and 2P-1-r of the sequence: N/P even when
            P > 1). q and k hold the same tokens. Every rank passes the same shapes and dtype.
        group: the context-parallel process group (default: the world). NCCL needs CUDA
            tensors, gloo CPU tensors. A group of one rank runs the dense op, no ring.
        q_positions, k_positions: global integer positions [B, N/P] or [N/P]; default the
            layout's (`shard_for_context_parallel`'s second result). They drive rotation only.
        causal: key j visible to query i iff j <= i in the global order of the layout above
            (whatever the positions say).
        schedule, inv_freq, rotary_dim, interleaved, softmax_scale, rotary_scale, layout,
            return_lse: as `scaled_rope_attention`. q_temperature: this rank's [N/P] or
            [B, N/P]; a schedule's temperature is computed from the global positions.
        seq_len: the length a length-dependent schedule sees; default the global N.
        deterministic: every block's backward on the bitwise-repeatable kernels (as
            `scaled_rope_attention`'s; the ring itself sums in a fixed order).
        check_shapes: compare every rank's shapes first (one small all_gather and a host
            sync per call), so a mismatch raises ValueError on every rank instead of hanging
            or computing garbage. Pass False in a loop whose shapes are known to agree.

    Returns:
        this rank's out (q's shape and dtype), and lse [B, Hq, N/P] float32 if return_lse.
        Gradients flow to q, k, v (this rank's tokens, exact), q_temperature, and inv_freq:
        each rank's inv_freq.grad is the share of its attention blocks; the sum over the
        group is the whole gradient (what DDP/FSDP's reduction over the context-parallel
        ranks adds up, as for every other weight).

    Each block runs the dense op's implementation (`ropefast.dispatch.path(q)`: the kernels
    on CUDA or under the interpreter, `ropefast.reference` elsewhere); K/V move with
    batch_isend_irecv, overlapped with the previous block.

    Example:
        >>> q_local, pos = shard_for_context_parallel(q)      # q [B, N, Hq, D], the whole sequence
        >>> k_local, _ = shard_for_context_parallel(k)
        >>> v_local, _ = shard_for_context_parallel(v)
        >>> out_local = ring_scaled_rope_attention(q_local, k_local, v_local, schedule=yarn, causal=True)
        >>> out = gather_from_context_parallel(out_local)     # == scaled_rope_attention(q, k, v, ...)
    """
    check_qkv(q, k, v)
    check_layout(layout)
    check_flags(causal=causal, return_lse=return_lse, deterministic=deterministic, check_shapes=check_shapes)
    if layout == "bhsd":  # below here everything is a [B, N, H, D] view
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    (batch, n_local, hq, head_dim), (_, _, hkv, _) = q.shape, k.shape
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != head_dim:
        raise ValueError(f"k and v must be [B, N, Hkv, D] with q's B, N and D (q and k hold the same tokens), "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (read as bshd)")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the KV heads ({hkv})")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")

    rank, world_size = _group_rank_size(group)
    backend = str(dist.get_backend(group))
    if backend == "nccl" and not q.is_cuda:
        raise ValueError(f"the group's backend is NCCL, which needs CUDA tensors; q is on {q.device}")
    if backend == "gloo" and q.is_cuda:
        raise ValueError("the group's backend is gloo, whose send/recv take CPU tensors; q is on CUDA: use NCCL")
    if check_shapes and world_size > 1:  # first: a rank that raised alone would leave the others waiting
        _check_same_shapes(group, q, hkv, causal)
    if world_size > 1 and n_local % 2:
        raise ValueError(f"each rank holds two equal chunks of the sequence: its length must be even, got {n_local}")
    q_positions = check_positions("q_positions", q_positions, batch, n_local, q.device)
    k_positions = check_positions("k_positions", k_positions, batch, n_local, q.device)

    inv_freq, rotary_dim, interleaved, rotary_scale = resolve_rotary(
        schedule, inv_freq, rotary_dim, interleaved, rotary_scale, head_dim=head_dim,
        seq_len=world_size * n_local if seq_len is None else seq_len, like=q, like_name="q")
    layout_positions = context_parallel_positions(n_local, rank, world_size, q.device)[None]
    q_positions = layout_positions if q_positions is None else as_batched(q_positions)
    # the keys travel: one [B, N/P] int64 buffer, alike on every rank
    k_positions = (layout_positions if k_positions is None else as_batched(k_positions)).expand(batch, n_local)
    k_positions = k_positions.to(torch.int64).contiguous()
    if schedule is not None and q_temperature is None and schedule.has_q_temperature:
        q_temperature = schedule.q_temperature(q_positions.expand(batch, n_local))
    softmax_scale = head_dim**-0.5 if softmax_scale is None else check_positive("softmax_scale", softmax_scale)
    path = dispatch.path(q)
    check_q_temperature(q_temperature, batch, n_local, q.device)
    if q_temperature is not None:
        # [B, N/P] (float32 for the kernels): autograd sums its gradient into the caller's shape
        q_temperature = as_batched(q_temperature if path == "reference" else q_temperature.float())
        q_temperature = q_temperature.expand(batch, n_local)

    out, lse = _RingAttention.apply(q, k, v, inv_freq, q_positions.expand(batch, n_local), k_positions,
                                    q_temperature, group, path, rotary_dim, interleaved, causal, softmax_scale,
                                    rotary_scale, deterministic)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def _check_same_shapes(group, q, hkv, causal):
    """Every rank's (B, N/P, Hq, D, Hkv, dtype, causal), compared on every rank."""
    mine = torch.tensor([*q.shape, hkv, FLOAT_DTYPES.index(q.dtype), causal], device=q.device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every).tolist()  # the host sync `check_shapes` documents
    if any(row != every[0] for row in every):
        fields = "(B, N/P, Hq, D, Hkv, dtype index, causal)"
        ranks = ", ".join(f"rank {r}: {tuple(row)}" for r, row in enumerate(every))
        raise ValueError(f"every rank of the group must pass q, k, v of the same shapes and dtype, and the same "
                         f"causal; got {fields} = {ranks}")


def _block(rank, source, causal, half):
    """(query rows, key rows, causal) of the block that `rank`'s queries attend in the keys
    of rank `source` (module docstring). Step 0 (source == rank) covers every query row."""
    every = slice(None)
    if not causal:
        return every, every, False
    if source == rank:
        return every, every, True
    if source < rank:
        return every, slice(0, half), False
    return slice(half, None), every, False


def _exchange(tensors, group, rank, world_size):
    """Post sends of `tensors` to the next rank and receives of like tensors from the previous
    one; returns (received, requests). Tags keep the tensors apart on backends that match by tag."""
    group_or_world = dist.group.WORLD if group is None else group
    peer_next = dist.get_global_rank(group_or_world, (rank + 1) % world_size)
    peer_prev = dist.get_global_rank(group_or_world, (rank - 1) % world_size)
    received = [torch.empty_like(t) for t in tensors]
    p2p = [dist.P2POp(dist.isend, t, peer_next, group, tag) for tag, t in enumerate(tensors)]
    p2p += [dist.P2POp(dist.irecv, t, peer_prev, group, tag) for tag, t in enumerate(received)]
    return received, dist.batch_isend_irecv(p2p)


def _wait(requests):
    for request in requests:
        request.wait()


def _attend(path, q, k, v, q_positions, k_positions, q_temperature, rotary, causal):
    """One block's (out, lse [B, Hq, Nq] float32) on the dense op's path."""
    if path == "reference":
        return scaled_rope_attention_reference(q, k, v, q_positions=q_positions, k_positions=k_positions,
                                               q_temperature=q_temperature, causal=causal, return_lse=True, **rotary)
    out, lse, _ = ops.attention_fwd(q, k, v, rotary["inv_freq"], q_positions, k_positions, q_temperature,
                                    rotary["rotary_dim"], rotary["interleaved"], causal, rotary["softmax_scale"],
                                    rotary["rotary_scale"])
    return out, lse


def _attend_backward(path, grad_out, grad_lse, q, k, v, out, lse, q_positions, k_positions, q_temperature, rotary,
                     causal, need_dfreq, need_dtemp, deterministic):
    """One block's (dq, dk, dv, d inv_freq, d temperature [B, Nq]) given the merged out and lse."""
    if path == "reference":
        return scaled_rope_attention_reference_bwd(grad_out, grad_lse, q, k, v, out, lse, q_positions=q_positions,
                                                   k_positions=k_positions, q_temperature=q_temperature,
                                                   causal=causal, **rotary)
    return ops.attention_bwd(grad_out, grad_lse, q, k, v, out, lse, rotary["inv_freq"], q_positions, k_positions,
                             q_temperature, rotary["rotary_dim"], rotary["interleaved"], causal,
                             rotary["softmax_scale"], rotary["rotary_scale"], need_dfreq, need_dtemp,
                             deterministic=deterministic)


def _merge(out, lse, block_out, block_lse, rows):
    """Fold a block's (out, lse) into the running ones, in place on their `rows`; the running
    out becomes float32 (float64 for float64 inputs) at the first merge. Rows of both have
    seen a key here (finite lse): a share w = sigmoid(lse_b - lse) of the new block."""
    if out is None:
        return block_out, block_lse
    out = _wide(out)
    out_rows, lse_rows = out[:, rows], lse[:, :, rows]
    weight = torch.sigmoid(block_lse - lse_rows)  # e^b / (e^a + e^b)
    out_rows.lerp_(block_out.to(out.dtype), weight.transpose(1, 2)[..., None].to(out.dtype))
    lse_rows.sub_(torch.nn.functional.logsigmoid(lse_rows - block_lse))  # log(e^a + e^b)
    return out, lse


def _wide(x):
    """x as a float32 accumulator (float64 stays float64); x itself if it is one already."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _RingAttention(torch.autograd.Function):
    """The ring forward and backward on [B, N/P, H, D] views with resolved arguments."""

    @staticmethod
    def forward(ctx, q, k, v, inv_freq, q_positions, k_positions, q_temperature, group, path, rotary_dim,
                interleaved, causal, softmax_scale, rotary_scale, deterministic):
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if world_size > 1:  # sent and received whole
            k, v = k.contiguous(), v.contiguous()
        scalars = dict(rotary_dim=rotary_dim, interleaved=interleaved, softmax_scale=softmax_scale,
                       rotary_scale=rotary_scale)
        rotary = dict(scalars, inv_freq=inv_freq)
        half = q.shape[1] // 2
        keys, out, lse = (k, v, k_positions), None, None
        for step in range(world_size):
            if step + 1 < world_size:  # the next keys move while this block runs
                next_keys, requests = _exchange(keys, group, rank, world_size)
            rows, cols, block_causal = _block(rank, (rank - step) % world_size, causal, half)
            temperature = None if q_temperature is None else q_temperature[:, rows]
            block_out, block_lse = _attend(path, q[:, rows], keys[0][:, cols], keys[1][:, cols],
                                           q_positions[:, rows], keys[2][:, cols], temperature, rotary, block_causal)
            out, lse = _merge(out, lse, block_out, block_lse, rows)
            if step + 1 < world_size:
                _wait(requests)
                keys = next_keys
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, inv_freq, q_positions, k_positions, q_temperature)
        ctx.group, ctx.path, ctx.scalars, ctx.causal, ctx.deterministic = group, path, scalars, causal, deterministic
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, inv_freq, q_positions, k_positions, q_temperature = ctx.saved_tensors
        group, path, causal = ctx.group, ctx.path, ctx.causal
        rotary = dict(ctx.scalars, inv_freq=inv_freq)
        need_dfreq, need_dtemp = ctx.needs_input_grad[3], ctx.needs_input_grad[6]
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if grad_out is None:  # only lse was used
            grad_out = torch.zeros_like(out)
        half = q.shape[1] // 2
        keys, dfreq = (k, v, k_positions), 0
        travelling = grad_requests = None  # dk, dv on their way to the next rank, from step 0 on
        for step in range(world_size):
            if step + 1 < world_size:
                next_keys, key_requests = _exchange(keys, group, rank, world_size)
            rows, cols, block_causal = _block(rank, (rank - step) % world_size, causal, half)
            rows_lse = None if grad_lse is None else grad_lse[:, :, rows].contiguous()
            temperature = None if q_temperature is None else q_temperature[:, rows]
            block_dq, block_dk, block_dv, block_dfreq, block_dtemp = _attend_backward(
                path, grad_out[:, rows], rows_lse, q[:, rows], keys[0][:, cols], keys[1][:, cols], out[:, rows],
                lse[:, :, rows].contiguous(), q_positions[:, rows], keys[2][:, cols], temperature, rotary,
                block_causal, need_dfreq, need_dtemp, ctx.deterministic)
            if step == 0:  # every query row, every key row
                dq, dk, dv = _wide(block_dq), _wide(block_dk), _wide(block_dv)
                dtemp = block_dtemp if need_dtemp else None
            else:
                dq[:, rows] += block_dq
                if need_dtemp:
                    dtemp[:, rows] += block_dtemp
                _wait(grad_requests)  # dk, dv so far of the keys this rank now holds
                dk, dv = travelling
                dk[:, cols] += block_dk
                dv[:, cols] += block_dv
            if need_dfreq:
                dfreq = dfreq + block_dfreq
            if step + 1 < world_size:
                _wait(key_requests)
                keys = next_keys
            if world_size > 1:  # to the rank that holds these keys next; after the last step, home
                travelling, grad_requests = _exchange((dk, dv), group, rank, world_size)
        if world_size > 1:
            _wait(grad_requests)
            dk, dv = travelling
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dfreq.to(inv_freq.dtype) if need_dfreq else None,
                None, None, dtemp.to(q_temperature.dtype) if need_dtemp else None,
                None, None, None, None, None, None, None, None)
