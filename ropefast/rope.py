"""`apply_scaled_rope`: the standalone scaled-RoPE op (Triton forward and backward), for
users who keep another attention backend, and the "best unfused pipeline" of the benchmarks."""

import torch
from torch.autograd.function import once_differentiable

from . import dispatch
from ._validate import check_head_tensor, check_layout, check_positions, resolve_rotary, warn_if_layout_swapped
from .kernels.rope import bnhd, frequency_grad, rope
from .reference import default_positions, rotate

__all__ = ["apply_scaled_rope"]


class ScaledRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inv_freq, positions, rotary_dim, interleaved, rotary_scale, layout):
        out = rope(x, inv_freq, positions, 0, rotary_dim=rotary_dim, interleaved=interleaved,
                   scale=rotary_scale, layout=layout)
        ctx.save_for_backward(inv_freq, positions, out if ctx.needs_input_grad[1] else None)
        ctx.args = dict(rotary_dim=rotary_dim, interleaved=interleaved, rotary_scale=rotary_scale, layout=layout)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        inv_freq, positions, out = ctx.saved_tensors
        a = ctx.args
        grad = grad.contiguous()
        dx = dfreq = None
        if ctx.needs_input_grad[0]:  # d(m R x) = m R^T g; pass-through features pass the gradient on
            dx = rope(grad, inv_freq, positions, 0, rotary_dim=a["rotary_dim"],
                      interleaved=a["interleaved"], scale=a["rotary_scale"], layout=a["layout"], inverse=True)
        if ctx.needs_input_grad[1]:
            dfreq = frequency_grad(grad, out, positions, rotary_dim=a["rotary_dim"], interleaved=a["interleaved"],
                                   layout=a["layout"]).to(inv_freq.dtype)
        return dx, dfreq, None, None, None, None, None


def apply_scaled_rope(x, *, schedule=None, inv_freq=None, positions=None, rotary_dim=None, interleaved=None,
                      rotary_scale=None, layout="bshd"):
    """Rotate x [B, N, H, D] (layout "bshd") or [B, H, N, D] ("bhsd") with scaled RoPE:
    for each pair (a, b) of the first rotary_dim features, frequency f, position p,
    a' = m (a cos pf - b sin pf), b' = m (b cos pf + a sin pf); the other features pass.

    Arguments as `scaled_rope_attention` (schedule or inv_freq, rotary_dim, interleaved,
    rotary_scale m); positions: integer [B, N] or [N], default arange(N). Returns a new
    tensor of x's shape and dtype. Differentiable in x and inv_freq (Triton backward: the
    transposed rotation; d inv_freq = sum over positions of p * d theta). Angles are exact
    (fixed-point phases) for |p| < 2**31. Runs the Triton kernel or `reference.rotate`, as
    `ropefast.dispatch.path(x)` says (as `scaled_rope_attention`).

    Example:
        >>> yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=4096)
        >>> q_rot = apply_scaled_rope(q, schedule=yarn)
    """
    check_head_tensor("x", x)
    check_layout(layout)
    batch, n, heads, head_dim = bnhd(x, layout)
    warn_if_layout_swapped(layout, (n,), (heads,))
    positions = check_positions("positions", positions, batch, n, x.device)
    inv_freq, rotary_dim, interleaved, rotary_scale = resolve_rotary(
        schedule, inv_freq, rotary_dim, interleaved, rotary_scale, head_dim=head_dim, seq_len=n, positions=positions,
        like=x, like_name="x")
    positions = default_positions(1, n, 0, x.device) if positions is None else positions
    positions = positions[None] if positions.dim() == 1 else positions

    if dispatch.path(x) != "reference":
        return ScaledRope.apply(x, inv_freq, positions, rotary_dim, interleaved, rotary_scale, layout)
    x_bshd = x if layout == "bshd" else x.transpose(1, 2)
    out = rotate(x_bshd, positions.expand(batch, n), inv_freq, rotary_dim=rotary_dim, interleaved=interleaved,
                 rotary_scale=rotary_scale).to(x.dtype)
    return out if layout == "bshd" else out.transpose(1, 2)
