"""`apply_scaled_rope`: the standalone scaled-RoPE op (Triton forward and backward, the
`torch.library` ops `ropefast::rope` / `ropefast::rope_bwd`), for users who keep another
attention backend, and the "best unfused pipeline" of the benchmarks."""

from typing import Optional

from torch import Tensor

from . import dispatch, ops
from ._validate import (as_batched, check_head_tensor, check_layout, check_positions, resolve_rotary,
                        warn_if_layout_swapped)
from .reference import default_positions, rotate
from .schedules.base import RopeSchedule

__all__ = ["apply_scaled_rope"]


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
    `ropefast.dispatch.path(x)` says (as `scaled_rope_attention`).

    Example:
        >>> yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=4096)
        >>> q_rot = apply_scaled_rope(q, schedule=yarn)
    """
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
        out = ops.rotary(x, inv_freq, positions, rotary_dim, interleaved, rotary_scale)
    else:
        positions = default_positions(1, n, 0, x.device) if positions is None else positions
        out = rotate(x, positions.expand(batch, n), inv_freq, rotary_dim=rotary_dim, interleaved=interleaved,
                     rotary_scale=rotary_scale).to(x.dtype)
    return out if layout == "bshd" else out.transpose(1, 2)
