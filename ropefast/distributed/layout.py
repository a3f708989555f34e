"""The load-balanced sequence layout of context parallelism, and the functions that shard a
batch that way and gather it back.

The sequence is cut into 2P equal chunks; rank r of P holds chunks r and 2P-1-r, in that
order. Under causal attention every rank then has the same work (an early chunk sees few
keys, its partner many), and every block of the ring is full, causal-diagonal, or skipped
(`ring.py`). Global positions follow from the layout, so rotation stays exact on any rank.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["context_parallel_positions", "gather_from_context_parallel", "shard_for_context_parallel"]


def _group_rank_size(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context parallelism needs torch.distributed initialized (dist.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_dim(x, dim, name="x"):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [-{x.dim()}, {x.dim()}) for {name} of shape {tuple(x.shape)}, got {dim}")
    return dim % x.dim()


def context_parallel_positions(local_len: int, rank: int, world_size: int,
                               device: Optional[torch.device] = None) -> Tensor:
    """Global positions [local_len] (int64) of the tokens rank `rank` of `world_size` holds:
    chunks rank and 2 * world_size - 1 - rank, each local_len / 2 long (one rank: arange).

    Example:
        >>> context_parallel_positions(4, 0, 2)
        tensor([0, 1, 6, 7])
    """
    if world_size == 1:
        return torch.arange(local_len, device=device)
    if local_len % 2:
        raise ValueError(f"a rank holds two equal chunks: its local length must be even, got {local_len}")
    chunk = local_len // 2
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    return torch.cat((first, first + (2 * world_size - 1 - 2 * rank) * chunk))


def shard_for_context_parallel(x: Tensor, group: Optional[dist.ProcessGroup] = None,
                               dim: int = 1) -> tuple[Tensor, Tensor]:
    """This rank's load-balanced shard of the whole sequence x (along `dim`, default 1:
    [B, N, ...]) and its global positions [N / P] int64 on x's device. N must be a multiple
    of 2P. The shard is a new tensor (two chunks concatenated); call it on q, k, v, labels,
    anything laid out along the sequence.

    Example:
        >>> q_local, positions = shard_for_context_parallel(q)           # q [B, N, Hq, D]
        >>> out = ring_scaled_rope_attention(q_local, k_local, v_local, q_positions=positions,
        ...                                  k_positions=positions, schedule=yarn, causal=True)
    """
    dim = _check_dim(x, dim)
    rank, world_size = _group_rank_size(group)
    length = x.shape[dim]
    if length % (2 * world_size):
        raise ValueError(f"x has {length} tokens along dim {dim}: context parallelism over {world_size} ranks needs "
                         f"a multiple of {2 * world_size} (two equal chunks per rank)")
    chunks = x.chunk(2 * world_size, dim)
    shard = torch.cat((chunks[rank], chunks[2 * world_size - 1 - rank]), dim)
    return shard, context_parallel_positions(length // world_size, rank, world_size, x.device)


def gather_from_context_parallel(x: Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 1) -> Tensor:
    """The whole sequence from every rank's load-balanced shard x (along `dim`), in order:
    the inverse of `shard_for_context_parallel`, on every rank. One all_gather; every rank's
    shard must have x's shape. Not differentiable (for outputs, logging and tests).

    Example:
        >>> out = gather_from_context_parallel(out_local)                 # [B, N, Hq, D] on every rank
    """
    dim = _check_dim(x, dim)
    _, world_size = _group_rank_size(group)
    if x.shape[dim] % 2 and world_size > 1:
        raise ValueError(f"a rank's shard holds two equal chunks: its length along dim {dim} must be even, "
                         f"got {x.shape[dim]}")
    shards = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world_size)]
    dist.all_gather(shards, x.contiguous(), group=group)
    if world_size == 1:
        return shards[0]
    halves = [shard.chunk(2, dim) for shard in shards]
    ordered = [halves[r][0] for r in range(world_size)] + [halves[r][1] for r in reversed(range(world_size))]
    return torch.cat(ordered, dim)
