"""Packed sequences: `scaled_rope_attention_varlen` attends within each document of tokens
packed into one row ([total_tokens, H, D] with cu_seqlens offsets, as flash-attn's
`flash_attn_varlen_func`), and `from_position_ids` finds those documents in positions that
restart, as HF's flash path does. The kernels are the dense op's with document bounds (their
`VARLEN` flag): one launch per pass over every document, no padding, and no host sync, since
positions are computed on the device from cu_seqlens and the grids from ints the host holds
(max_seqlen, or the token and document counts).
"""

import os
from typing import Optional, Union

import torch
from torch import Tensor

from . import dispatch, ops
from .kernels.documents import document_positions as kernel_document_positions
from ._validate import (as_batched, check_cu_seqlens, check_cu_seqlens_values, check_flags, check_max_seqlen,
                        check_positions, check_positive, check_q_temperature, check_qkv, check_tensor, resolve_rotary)
from .reference import scaled_rope_attention_varlen_reference
from .schedules.base import RopeSchedule

__all__ = ["scaled_rope_attention_varlen", "from_position_ids", "document_positions"]

# Set to 1 to check cu_seqlens' values on CUDA tensors too (each check reads them: a sync).
CHECK_VALUES_ENV = "ROPEFAST_CHECK_CU_SEQLENS"


def _document_of_each_token(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(token index [total] int32, its document's index [total] int64), on the device."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
    # clamped: offsets that break the contract (unchecked on a GPU) must not index out of bounds
    doc = (torch.searchsorted(cu_seqlens, tokens, right=True) - 1).clamp_(0, cu_seqlens.shape[0] - 2)
    return tokens, doc


def document_positions(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_q: int,
                       total_k: int) -> tuple[Tensor, Tensor]:
    """The default positions of a varlen call, int32 [total_q] and [total_k], computed on the
    device (no sync): each document's keys at 0..len_k - 1, its queries at len_k - len_q +
    0..len_q - 1 (the dense op's default, document by document; 0..len - 1 when the two
    agree, as in training). In PyTorch; the kernel paths compute the same in one launch
    (`kernels.documents.document_positions`).

    Example:
        >>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        >>> document_positions(cu, cu, 5, 5)[0]
        tensor([0, 1, 0, 1, 2], dtype=torch.int32)
    """
    keys, doc_k = _document_of_each_token(cu_seqlens_k, total_k)
    queries, doc_q = _document_of_each_token(cu_seqlens_q, total_q)
    k_positions = keys - cu_seqlens_k[doc_k]
    # query t of document d: t - cu_q[d + 1] + len_k(d), so the last query sits at len_k - 1
    q_positions = queries - cu_seqlens_q[doc_q + 1] + (cu_seqlens_k[doc_q + 1] - cu_seqlens_k[doc_q])
    return q_positions, k_positions


def from_position_ids(position_ids: Tensor) -> tuple[Tensor, int]:
    """Documents from positions that restart, as HF's flash-attention path derives them:
    a document starts at every token whose position is the smallest one (0, or RoBERTa's
    padding_idx + 1), and, beyond HF's rule, at every row's first token (so cu_seqlens
    starts at 0 and rows never merge). position_ids: integer [T], [1, T] or [B, T] (rows
    flattened in order, as q, k, v are packed).

    Returns (cu_seqlens int32 [documents + 1] on position_ids' device, max_seqlen int).
    This synchronizes with the device (it finds the starts and reads the longest length):
    call it once per batch, where the data is prepared. `scaled_rope_attention_varlen`
    itself never syncs.

    Example:
        >>> from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
        (tensor([0, 3, 5, 9], dtype=torch.int32), 4)
    """
    check_tensor("position_ids", position_ids, ndim=(1, 2))
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if position_ids.numel() == 0:
        raise ValueError(f"position_ids is empty, shape {tuple(position_ids.shape)}")
    rows = position_ids.reshape(-1, position_ids.shape[-1])
    starts = rows == rows.min()
    starts[:, 0] = True
    offsets = starts.reshape(-1).nonzero().reshape(-1).to(torch.int32)
    cu_seqlens = torch.cat((offsets, offsets.new_tensor([rows.numel()])))
    return cu_seqlens, int(cu_seqlens.diff().max())


def scaled_rope_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
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
    return_lse: bool = False,
    seq_len: Optional[int] = None,
    deterministic: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """`scaled_rope_attention` on packed documents: each document's queries attend to its
    own keys only, as `scaled_rope_attention` would on that document alone.

    Args:
        q: [total_q, Hq, D], documents packed one after another (flash-attn's varlen layout);
            k, v: [total_k, Hkv, D]. Dtypes, devices, strides and Hq % Hkv as the dense op.
        cu_seqlens_q, cu_seqlens_k: int32 [documents + 1] on q's device: document i is rows
            cu_seqlens[i] to cu_seqlens[i + 1] (0 first, the token count last, never
            decreasing; a document may be empty). Both count the same documents.
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest document (the portable
            kernels' grid; a smaller value may leave the tail of longer documents unwritten).
        q_positions, k_positions: integer [total] (or [1, total]) per token; default: each
            document's keys at 0..len_k - 1 and its queries at len_k - len_q + 0..len_q - 1
            (`document_positions`: the dense default per document), computed on the device.
        causal: bottom-right aligned per document: key j of a document is visible to its
            query i iff j <= i + (len_k - len_q).
        q_temperature: float tensor [total_q] (or [1, total_q]), per query token.
        seq_len: the length a length-dependent schedule (dynamic NTK, CLEX) sees; default
            max_seqlen_k (an int the caller holds: no host sync).
        schedule, inv_freq, rotary_dim, interleaved, softmax_scale, rotary_scale,
        return_lse, deterministic: as `scaled_rope_attention`.

    Returns:
        out [total_q, Hq, D] (q's dtype), or (out, lse) with lse [Hq, total_q] float32 (as
        flash-attn's varlen lse; -inf for a query that sees no key). Differentiable in q,
        k, v, inv_freq and q_temperature.

    cu_seqlens values are checked (starts at 0, never decreases, ends at the token count,
    no document past max_seqlen) on CPU tensors, and on CUDA tensors only when the
    environment variable ROPEFAST_CHECK_CU_SEQLENS=1 is set: reading them costs a host
    sync, which a training step must not pay (flash-attn checks none). Unchecked bad
    offsets give wrong results, never memory accesses out of bounds (the kernels clamp
    them into the packed row). Shapes, dtypes, devices and document counts are always
    checked. Under torch.compile no values are read.

    Dispatch as the dense op (`ropefast.dispatch`): the Gluon kernels on Hopper, the portable
    Triton kernels on other GPUs, the interpreter, or the reference (a loop over documents).
    The kernels take every document in one launch: their work items map to documents by a
    binary search over cu_seqlens on the device. The kernel path is the
    `ropefast::attention_fwd` op with cu_seqlens arguments.

    Example:
        >>> cu = torch.tensor([0, 100, 300], dtype=torch.int32)            # two documents
        >>> q = torch.randn(300, 8, 64); k, v = torch.randn(2, 300, 2, 64)
        >>> out = scaled_rope_attention_varlen(q, k, v, cu, cu, 200, 200, schedule=schedules.DefaultRope(64),
        ...                                    causal=True)
    """
    check_qkv(q, k, v, ndim=3)
    (total_q, hq, head_dim), (total_k, hkv, _) = q.shape, k.shape
    if k.shape[2] != head_dim:
        raise ValueError(f"k must agree with q in head dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the KV heads ({hkv}) "
                         "(q [total_q, Hq, D], k [total_k, Hkv, D])")
    if total_q == 0 or total_k == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must count the same documents, got "
                         f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1}")
    check_max_seqlen("max_seqlen_q", max_seqlen_q)
    check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if not torch.compiler.is_compiling() and (not q.is_cuda or os.environ.get(CHECK_VALUES_ENV, "0") not in ("", "0")):
        check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
        check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k")
    check_flags(causal=causal, return_lse=return_lse, deterministic=deterministic)
    q_positions = as_batched(check_positions("q_positions", q_positions, 1, total_q, q.device))
    k_positions = as_batched(check_positions("k_positions", k_positions, 1, total_k, q.device))
    path = dispatch.path(q)
    if q_positions is None or k_positions is None:
        # the kernel outside torch.compile, which traces the PyTorch ops instead
        traced = path == "reference" or torch.compiler.is_compiling()
        default_positions = document_positions if traced else kernel_document_positions
        default_q, default_k = default_positions(cu_seqlens_q, cu_seqlens_k, total_q, total_k)
        q_positions = default_q[None] if q_positions is None else q_positions
        k_positions = default_k[None] if k_positions is None else k_positions

    inv_freq, rotary_dim, interleaved, rotary_scale = resolve_rotary(
        schedule, inv_freq, rotary_dim, interleaved, rotary_scale, head_dim=head_dim,
        seq_len=max_seqlen_k if seq_len is None else seq_len, like=q, like_name="q")
    if schedule is not None and q_temperature is None and schedule.has_q_temperature:
        q_temperature = schedule.q_temperature(q_positions)
    softmax_scale = head_dim**-0.5 if softmax_scale is None else check_positive("softmax_scale", softmax_scale)
    check_q_temperature(q_temperature, 1, total_q, q.device)  # one per query token

    if path == "reference":
        out, lse = scaled_rope_attention_varlen_reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, inv_freq=inv_freq, rotary_dim=rotary_dim, interleaved=interleaved,
            q_positions=q_positions[0], k_positions=k_positions[0], causal=causal, softmax_scale=softmax_scale,
            rotary_scale=rotary_scale, q_temperature=None if q_temperature is None else q_temperature.reshape(-1),
            return_lse=True)
    else:
        # one packed row: [1, total, H, D] views, lse [1, Hq, total_q]
        temperature = None if q_temperature is None else as_batched(q_temperature.float())
        out, lse = ops.attention(q[None], k[None], v[None], inv_freq, q_positions, k_positions, temperature,
                                 rotary_dim, interleaved, causal, softmax_scale, rotary_scale, cu_seqlens_q,
                                 cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic, need_lse=return_lse)
        # squeeze, not [0]: its backward is a view too, where select's fills a zero tensor of
        # out's size and copies the gradient into it (on an H100 8% of a training step at 16k
        # tokens: bench/RESULTS.md)
        if return_lse:
            lse = lse.squeeze(0)
        out = out.squeeze(0)
    return (out, lse) if return_lse else out
