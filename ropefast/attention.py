"""Public entry point: `scaled_rope_attention`, its argument checks and its dispatch."""

import math
import numbers
import os

import torch

from .function import ScaledRopeAttention
from .kernels.attention_fwd import tma_readable
from .reference import default_positions, scaled_rope_attention_reference
from .schedules.base import RopeSchedule

__all__ = ["scaled_rope_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_tensor(name, x, ndim=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {tuple(x.shape)}")


def _check_tma_aligned(name, x):
    """The kernels load tiles through TMA descriptors: 16-byte aligned data and strides."""
    if not tma_readable(x):
        size = x.element_size()
        raise ValueError(f"{name} needs a 16-byte aligned data pointer and strides for the Triton kernels (TMA), "
                         f"got strides {x.stride()} of {size}-byte elements and pointer offset {x.data_ptr() % 16}; "
                         "head dims that are multiples of 8 (16-bit) or 4 (float32) in a dense tensor satisfy it")


def _check_positions(name, pos, batch, seq_len, device):
    if pos is None:
        return None
    _check_tensor(name, pos, ndim=(1, 2))
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {pos.dtype}")
    if pos.shape[-1] != seq_len or (pos.dim() == 2 and pos.shape[0] != batch):
        raise ValueError(f"{name} must be [{batch}, {seq_len}] or [{seq_len}], got {tuple(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device}, q is on {device}")
    return pos


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def resolve_rotary(schedule, inv_freq, rotary_dim, interleaved, rotary_scale, *, head_dim, seq_len, positions,
                   like, like_name):
    """The rotary arguments of both public ops: take what the schedule supplies unless given
    explicitly, check it all, and return (inv_freq, rotary_dim, interleaved, rotary_scale).
    A schedule that depends on the length sees HF's max(positions) + 1 (a host sync only
    then), or seq_len without positions. `like` is the tensor inv_freq must match."""
    if (schedule is None) == (inv_freq is None):
        raise ValueError("give exactly one of schedule= or inv_freq=")
    if schedule is not None:
        if not isinstance(schedule, RopeSchedule):
            raise TypeError(f"schedule must be a ropefast.schedules.RopeSchedule, got {type(schedule).__name__}")
        length = None
        if schedule.depends_on_seq_len:
            length = seq_len if positions is None else int(positions.max()) + 1
        inv_freq = schedule.inv_freq(length, device=like.device)
        rotary_dim = schedule.rotary_dim if rotary_dim is None else rotary_dim
        interleaved = schedule.interleaved if interleaved is None else interleaved
        rotary_scale = schedule.rotary_scale(length) if rotary_scale is None else rotary_scale

    _check_tensor("inv_freq", inv_freq, ndim=(1,))
    allowed_freq = (torch.float32, torch.float64) if like.dtype == torch.float64 else (torch.float32,)
    if inv_freq.dtype not in allowed_freq:
        raise TypeError(f"inv_freq must be float32, got {inv_freq.dtype}")
    if inv_freq.device != like.device:
        raise ValueError(f"inv_freq is on {inv_freq.device}, {like_name} is on {like.device}")
    if rotary_dim is None:
        rotary_dim = 2 * inv_freq.shape[0]
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even integer >= 2, got {rotary_dim!r}")
    if rotary_dim > head_dim:
        raise ValueError(f"rotary_dim ({rotary_dim}) must be <= the head dim ({head_dim})")
    if inv_freq.shape[0] != rotary_dim // 2:
        raise ValueError(f"inv_freq must have rotary_dim/2 = {rotary_dim // 2} entries, got {inv_freq.shape[0]}")
    interleaved = False if interleaved is None else interleaved
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    rotary_scale = 1.0 if rotary_scale is None else _check_positive("rotary_scale", rotary_scale)
    return inv_freq, rotary_dim, interleaved, rotary_scale


def scaled_rope_attention(
    q,
    k,
    v,
    *,
    schedule=None,
    inv_freq=None,
    rotary_dim=None,
    interleaved=None,
    q_positions=None,
    k_positions=None,
    causal=False,
    softmax_scale=None,
    rotary_scale=None,
    q_temperature=None,
    layout="bshd",
    return_lse=False,
):
    """Attention over RoPE-rotated queries and keys with scaled frequencies, in one pass.

    Args:
        q: [B, Nq, Hq, D] (layout "bshd", as flash-attn) or [B, Hq, Nq, D] ("bhsd", as
            torch SDPA); float16, bfloat16 or float32 (float64 runs the reference).
        k, v: [B, Nk, Hkv, D] (or [B, Hkv, Nk, D]); same dtype and device; Hq % Hkv == 0.
            The last dimension must be contiguous (stride 1); other strides are free but,
            for the kernels, 16-byte aligned (TMA), as is the data pointer.
        schedule: a `ropefast.schedules.RopeSchedule`; supplies inv_freq, rotary_dim,
            interleaved, rotary_scale and q_temperature unless passed here explicitly.
        inv_freq: float32 tensor [rotary_dim / 2] (may require grad), instead of a schedule.
        rotary_dim: even R <= D; the first R features are rotated (default: schedule's,
            else 2 * len(inv_freq)).
        interleaved: pairs (2i, 2i+1) if True, (i, i + R/2) if False (default: schedule's,
            else False).
        q_positions, k_positions: integer [B, N] or [N]; default arange, with queries offset
            by Nk - Nq so the last query aligns with the last key. Positions drive rotation only.
        causal: key j visible to query i iff j <= i + (Nk - Nq) (bottom-right, as flash-attn).
        softmax_scale: default D ** -0.5.
        rotary_scale: amplitude on cos/sin (YaRN/LongRoPE attention factor); logits scale by
            its square (default: schedule's, else 1.0).
        q_temperature: float tensor [Nq] or [B, Nq] multiplying each query's logits
            (default: schedule's, else none).
        layout: "bshd" or "bhsd"; the output has the same layout.
        return_lse: also return the log-sum-exp of the scaled logits, [B, Hq, Nq] float32
            (differentiable).

    Returns:
        out (q's shape and dtype), or (out, lse) if return_lse. Differentiable in q, k, v,
        inv_freq and q_temperature (the backward kernels recompute every rotation and are
        deterministic: no atomics). Positions must satisfy |p| < 2**31.

    Dispatch: CUDA tensors run the fused Triton kernel; CPU tensors run it through the
    Triton interpreter when TRITON_INTERPRET=1, otherwise `ropefast.reference` (pure
    PyTorch, float32 math). float64 inputs always take the reference.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, ndim=(4,))
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {x.stride()}; "
                             "call .contiguous() first")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    if layout == "bshd":
        (batch, nq, hq, head_dim), (_, nk, hkv, _) = q.shape, k.shape
    else:
        (batch, hq, nq, head_dim), (_, hkv, nk, _) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must agree with q in batch and head dim ({layout}), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the KV heads ({hkv})")
    if nq == 0 or nk == 0 or batch == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    q_positions = _check_positions("q_positions", q_positions, batch, nq, q.device)
    k_positions = _check_positions("k_positions", k_positions, batch, nk, q.device)

    inv_freq, rotary_dim, interleaved, rotary_scale = resolve_rotary(
        schedule, inv_freq, rotary_dim, interleaved, rotary_scale, head_dim=head_dim, seq_len=nk,
        positions=k_positions, like=q, like_name="q")
    if schedule is not None and q_temperature is None and schedule.has_q_temperature:
        pos = q_positions if q_positions is not None else default_positions(batch, nq, nk - nq, q.device)
        q_temperature = schedule.q_temperature(pos.expand(batch, nq))
    softmax_scale = head_dim**-0.5 if softmax_scale is None else _check_positive("softmax_scale", softmax_scale)
    if q_temperature is not None:
        _check_tensor("q_temperature", q_temperature, ndim=(1, 2))
        if not q_temperature.dtype.is_floating_point:
            raise TypeError(f"q_temperature must be a floating tensor, got {q_temperature.dtype}")
        if q_temperature.shape[-1] != nq or (q_temperature.dim() == 2 and q_temperature.shape[0] != batch):
            raise ValueError(f"q_temperature must be [{nq}] or [{batch}, {nq}], got {tuple(q_temperature.shape)}")
        if q_temperature.device != q.device:
            raise ValueError(f"q_temperature is on {q_temperature.device}, q is on {q.device}")

    if q.dtype != torch.float64 and (q.is_cuda or (q.device.type == "cpu" and _interpreting())):
        for name, x in (("q", q), ("k", k), ("v", v)):
            _check_tma_aligned(name, x)
        out, lse = ScaledRopeAttention.apply(q, k, v, inv_freq, q_temperature, q_positions, k_positions,
                                             rotary_dim, interleaved, causal, softmax_scale, rotary_scale, layout)
        return (out, lse) if return_lse else out
    return scaled_rope_attention_reference(
        q, k, v, inv_freq=inv_freq, rotary_dim=rotary_dim, interleaved=interleaved,
        q_positions=q_positions, k_positions=k_positions, causal=causal, softmax_scale=softmax_scale,
        rotary_scale=rotary_scale, q_temperature=q_temperature, layout=layout, return_lse=return_lse,
    )
