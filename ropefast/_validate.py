"""The argument checks and defaults that every public op shares: tensors, positions,
positive scalars, the rotary arguments a schedule supplies, and the layout sanity check.
Each check raises TypeError/ValueError naming the argument and what was expected."""

import math
import numbers
import warnings

import torch

from .kernels.attention_fwd import tma_readable
from .schedules.base import RopeSchedule

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("bshd", "bhsd")
# More heads than any released model has: a longer "heads" axis with fewer tokens than heads
# is almost surely the sequence, read in the wrong layout.
LONGEST_HEAD_AXIS = 256


def check_tensor(name, x, ndim=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {tuple(x.shape)}")


def check_head_tensor(name, x, ndim=4):
    """A q, k, v or x argument: 4-D (3-D packed, for varlen), a float dtype, the last
    dimension contiguous."""
    check_tensor(name, x, ndim=(ndim,))
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {x.stride()}; "
                         "call .contiguous() first")


def check_qkv(q, k, v, names=("q", "k", "v"), ndim=4):
    """q, k, v (or q and a cache's keys and values): `check_head_tensor` each, one dtype, one
    device, k and v of one shape. The shapes' other agreements are each op's."""
    for name, x in zip(names, (q, k, v)):
        check_head_tensor(name, x, ndim=ndim)
    joined = ", ".join(names)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{joined} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{joined} must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{names[1]} and {names[2]} must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")


def check_flags(**flags):
    """Each keyword a bool (TypeError naming it otherwise)."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")


def check_tma_aligned(name, x):
    """The kernels load tiles through TMA descriptors: 16-byte aligned data and strides."""
    if not tma_readable(x):
        size = x.element_size()
        raise ValueError(f"{name} needs a 16-byte aligned data pointer and strides for the Triton kernels (TMA), "
                         f"got strides {x.stride()} of {size}-byte elements and pointer offset {x.data_ptr() % 16}; "
                         "head dims that are multiples of 8 (16-bit) or 4 (float32) in a dense tensor satisfy it")


def check_positions(name, pos, batch, seq_len, device):
    if pos is None:
        return None
    check_tensor(name, pos, ndim=(1, 2))
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {pos.dtype}")
    if pos.shape[-1] != seq_len or (pos.dim() == 2 and pos.shape[0] != batch):
        raise ValueError(f"{name} must be [{batch}, {seq_len}] or [{seq_len}], got {tuple(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device}, q is on {device}")
    return pos


def check_int32(name, x, shape, device):
    """An int32 index tensor (cache_seqlens, block_table) of `shape` (None: any size) on
    `device`, its last dimension contiguous."""
    check_tensor(name, x, ndim=(len(shape),))
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}")
    if any(want is not None and got != want for got, want in zip(x.shape, shape)):
        raise ValueError(f"{name} must be {['*' if s is None else s for s in shape]}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, q is on {device}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {x.stride()}")


def check_q_temperature(q_temperature, batch, nq, device):
    """None, or a float tensor [Nq] or [B, Nq] on q's device."""
    if q_temperature is None:
        return
    check_tensor("q_temperature", q_temperature, ndim=(1, 2))
    if not q_temperature.dtype.is_floating_point:
        raise TypeError(f"q_temperature must be a floating tensor, got {q_temperature.dtype}")
    if q_temperature.shape[-1] != nq or (q_temperature.dim() == 2 and q_temperature.shape[0] != batch):
        raise ValueError(f"q_temperature must be [{nq}] or [{batch}, {nq}], got {tuple(q_temperature.shape)}")
    if q_temperature.device != device:
        raise ValueError(f"q_temperature is on {q_temperature.device}, q is on {device}")


def check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def as_batched(t):
    """Per-position [N] -> a [1, N] view (shared by the batch); [B, N] as is; None stays None."""
    return None if t is None else (t[None] if t.dim() == 1 else t)


def other_layout(layout):
    return "bhsd" if layout == "bshd" else "bshd"


def warn_if_layout_swapped(layout, lengths, heads):
    """Warn when the sequence lengths and head counts read in `layout` look swapped: a heads
    axis longer than any model's with fewer tokens than heads (SDPA's [B, H, N, D] passed
    as the default "bshd", say). Nothing can catch every swap; this catches the likely ones."""
    if max(heads) > LONGEST_HEAD_AXIS and min(lengths) < max(heads):
        warnings.warn(f"read with layout={layout!r}, these tensors have {'/'.join(map(str, heads))} heads of "
                      f"{'/'.join(map(str, lengths))} tokens: a heads axis that long, with fewer tokens than heads, "
                      f"is almost surely the sequence. If they are laid out the other way, pass "
                      f"layout={other_layout(layout)!r}.", UserWarning, stacklevel=3)


def resolve_rotary(schedule, inv_freq, rotary_dim, interleaved, rotary_scale, *, head_dim, seq_len, like,
                   like_name):
    """The rotary arguments of every public op: take what the schedule supplies unless given
    explicitly (an explicit inv_freq, e.g. learnable frequencies, overrides only the
    schedule's frequencies), check it all, and return (inv_freq, rotary_dim, interleaved,
    rotary_scale). A schedule that depends on the length sees seq_len (an int the caller
    takes from the shapes or its own argument: never read off a device tensor, so no host
    sync). `like` is the tensor inv_freq must match."""
    if schedule is None and inv_freq is None:
        raise ValueError("give schedule= or inv_freq= (or both: inv_freq then overrides the schedule's frequencies)")
    if schedule is not None:
        if not isinstance(schedule, RopeSchedule):
            raise TypeError(f"schedule must be a ropefast.schedules.RopeSchedule, got {type(schedule).__name__}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        length = seq_len if schedule.depends_on_seq_len else None
        if inv_freq is None:
            inv_freq = schedule.cached_inv_freq(length, device=like.device)
        rotary_dim_source = ", the schedule's" if rotary_dim is None else ""
        rotary_dim = schedule.rotary_dim if rotary_dim is None else rotary_dim
        interleaved = schedule.interleaved if interleaved is None else interleaved
        rotary_scale = schedule.rotary_scale(length) if rotary_scale is None else rotary_scale
    else:
        rotary_dim_source = ""
    check_tensor("inv_freq", inv_freq, ndim=(1,))
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
        raise ValueError(f"inv_freq must have rotary_dim/2 = {rotary_dim // 2} entries (rotary_dim = {rotary_dim}"
                         f"{rotary_dim_source}), got {inv_freq.shape[0]}")
    interleaved = False if interleaved is None else interleaved
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    rotary_scale = 1.0 if rotary_scale is None else check_positive("rotary_scale", rotary_scale)
    return inv_freq, rotary_dim, interleaved, rotary_scale


def check_cu_seqlens(name, cu_seqlens, device):
    """A varlen op's cu_seqlens: int32 [documents + 1] on q's device (its values: see
    `check_cu_seqlens_values`)."""
    check_tensor(name, cu_seqlens, ndim=(1,))
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (flash-attn's convention), got {cu_seqlens.dtype}")
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"{name} must hold documents + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device}, q is on {device}")


def check_max_seqlen(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int (the kernels' grid, never read off the device), got "
                        f"{type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")


def check_cu_seqlens_values(name, cu_seqlens, total, max_seqlen, max_name):
    """The checks that read cu_seqlens' values (a host sync on a GPU): offsets start at 0,
    never decrease, end at the token count, and no document is longer than max_seqlen."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    if min(lengths) < 0:
        raise ValueError(f"{name} must not decrease, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at the packed token count {total}, got {offsets[-1]}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is less than the longest document in {name} ({max(lengths)})")
