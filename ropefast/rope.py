"""`apply_scaled_rope`: the standalone scaled-RoPE op (Triton forward and backward, the
`torch.library` ops `ropefast::rope` / `ropefast::rope_bwd`), for users who keep another
attention backend, and the "best unfused pipeline" of the benchmarks."""

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, ops
from ._validate import (as_batched, check_head_tensor, check_layout, check_positions, resolve_rotary,
                        warn_if_layout_swapped)
from .reference import default_positions, rotate
from .repeat import Repeats, schedule_key, tensor_key
from .schedules.base import RopeSchedule

__all__ = ["apply_scaled_rope"]

_REPEATS = Repeats()  # `ropefast.repeat`: `_repeat_key` -> the launch recorded for that key


def apply_scaled_rope(x: Tensor, *, schedule: Optional[RopeSchedule] = None, inv_freq: Optional[Tensor] = None,
                      positions: Optional[Tensor] = None, rotary_dim: Optional[int] = None,
                      interleaved: Optional[bool] = None, rotary_scale: Optional[float] = None, layout: str = "bshd",
                      seq_len: Optional[int] = None) -> Tensor:
    """Rotate x [B, N, H, D] (layout "bshd") or [B, H, N, D] ("bhsd") with scaled RoPE:
    for each pair (a, b) of the first rotary_dim features, frequency f, position p,
    a' = m (a cos pf - b sin pf), b' = m (b cos pf + a sin pf); the other features pass.

    Arguments as `scaled_rope_attention` (schedule and/or inv_freq, rotary_dim, interleaved,
    rotary_scale m, seq_len: the length a length-dependent schedule sees, default N);
    positions: integer [B, N] or [N], default arange(N). Returns a new tensor of x's shape
    and dtype. Differentiable in x and inv_freq (Triton backward: the transposed rotation;
    d inv_freq = sum over positions of p * d theta). Angles are exact (fixed-point phases)
    for |p| < 2**31. Runs the Triton kernel or `reference.rotate`, as
    `ropefast.dispatch.path(x)` says (as `scaled_rope_attention`); an eager call that autograd
    does not record repeats the launch recorded for its key (`ropefast.repeat`, as there).

    Example:
        >>> yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=4096)
        >>> q_rot = apply_scaled_rope(q, schedule=yarn)
    """
    key = _repeat_key(x, schedule, inv_freq, positions, rotary_dim, interleaved, rotary_scale, layout, seq_len)
    repeat = _REPEATS.get(key)
    if repeat is not None:
        out = repeat(dict(x=x if layout == "bshd" else x.transpose(1, 2), positions=as_batched(positions),
                          inv_freq=inv_freq))["out"]
        return out if layout == "bshd" else out.transpose(1, 2)
    given_freq = inv_freq

    check_head_tensor("x", x)
    check_layout(layout)
    if layout == "bhsd":  # below here x is a [B, N, H, D] view
        x = x.transpose(1, 2)
    batch, n, heads, head_dim = x.shape
    warn_if_layout_swapped(layout, (n,), (heads,))
    positions = check_positions("positions", positions, batch, n, x.device)
    inv_freq, rotary_dim, interleaved, rotary_scale = resolve_rotary(
        schedule, inv_freq, rotary_dim, interleaved, rotary_scale, head_dim=head_dim,
        seq_len=n if seq_len is None else seq_len, like=x, like_name="x")
    positions = as_batched(positions)

    if dispatch.path(x) != "reference":
        with _REPEATS.recording(key) as record:
            out = ops.rotary(x, inv_freq, positions, rotary_dim, interleaved, rotary_scale)
        # the schedule's frequencies are fixed by the key; given ones are the call's
        _REPEATS.keep(key, record, dict(x=x, positions=positions, inv_freq=given_freq), ("out",),
                      constants=(inv_freq,), held=schedule)
    else:
        _REPEATS.never(key)
        positions = default_positions(1, n, 0, x.device) if positions is None else positions
        out = rotate(x, positions.expand(batch, n), inv_freq, rotary_dim=rotary_dim, interleaved=interleaved,
                     rotary_scale=rotary_scale).to(x.dtype)
    return out if layout == "bshd" else out.transpose(1, 2)


def _repeat_key(x, schedule, inv_freq, positions, rotary_dim, interleaved, rotary_scale, layout, seq_len):
    """The `ropefast.repeat` key of a call, or None for a call that runs in full: one that
    torch.compile traces or autograd records, on other than a CUDA tensor, or with arguments a
    key cannot hold (the checks then say what is wrong with them)."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or not x.is_cuda or dispatch.env_changed():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or getattr(inv_freq, "requires_grad", False)):
        return None
    try:
        # the scalars with their types: a call with 1 for True, or 64.0 for 64, must meet the checks
        return (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16, schedule_key(schedule),
                None if inv_freq is None else tensor_key(inv_freq),
                None if positions is None else tensor_key(positions), type(rotary_dim), rotary_dim, type(interleaved),
                interleaved, type(rotary_scale), rotary_scale, layout, type(seq_len), seq_len)
    except TypeError:  # a non-tensor where a tensor goes
        return None
