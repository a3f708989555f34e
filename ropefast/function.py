"""Thin autograd Function around the fused kernels: the API has validated everything and
chosen the path; this prepares kernel inputs, launches, and saves only q, k, v (unrotated),
O, LSE, inv_freq, positions and temperature. The backward recomputes every rotation."""

import torch
from torch.autograd.function import once_differentiable

from ropefast.kernels.attention_bwd import rope_attention_bwd
from ropefast.kernels.attention_fwd import rope_attention_fwd
from ropefast.kernels.hopper import compat as hopper_compat

if hopper_compat.SUPPORTED:
    from ropefast.kernels.hopper.attention_fwd import rope_attention_fwd_hopper


def _as_batched(t):
    """[N] -> [1, N] view (shared by the batch); [B, N] as is; None stays None."""
    return None if t is None else (t[None] if t.dim() == 1 else t)


class ScaledRopeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, inv_freq, q_temperature, q_positions, k_positions,
                rotary_dim, interleaved, causal, softmax_scale, rotary_scale, layout, hopper):
        batch = q.shape[0]
        nq = q.shape[1] if layout == "bshd" else q.shape[2]
        q_pos = None if q_positions is None else _as_batched(q_positions).expand(batch, nq)
        k_pos = _as_batched(k_positions)
        temperature = None if q_temperature is None else _as_batched(q_temperature.float()).expand(batch, nq)
        forward = rope_attention_fwd_hopper if hopper else rope_attention_fwd
        out, lse = forward(
            q, k, v, inv_freq.detach(), q_pos, k_pos, temperature, rotary_dim=rotary_dim, interleaved=interleaved,
            causal=causal, softmax_scale=softmax_scale, rotary_scale=rotary_scale, layout=layout)
        ctx.save_for_backward(q, k, v, out, lse, inv_freq, q_pos, k_pos, temperature)
        ctx.args = dict(rotary_dim=rotary_dim, interleaved=interleaved, causal=causal, softmax_scale=softmax_scale,
                        rotary_scale=rotary_scale, layout=layout)
        ctx.temperature_shape = None if q_temperature is None else q_temperature.shape
        ctx.temperature_dtype = None if q_temperature is None else q_temperature.dtype
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, inv_freq, q_pos, k_pos, temperature = ctx.saved_tensors
        need_dfreq, need_dtemp = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv, dfreq, dtemp = rope_attention_bwd(
            grad_out, q, k, v, out, lse, None if grad_lse is None else grad_lse.contiguous(),
            inv_freq, q_pos, k_pos, temperature, need_dfreq=need_dfreq, need_dtemp=need_dtemp,
            **ctx.args)
        if need_dfreq:
            dfreq = dfreq.to(inv_freq.dtype)
        if need_dtemp:  # per (batch, head, query) -> the temperature's own shape
            dtemp = dtemp.sum(1)
            if len(ctx.temperature_shape) == 1:
                dtemp = dtemp.sum(0)
            dtemp = dtemp.to(ctx.temperature_dtype)
        return dq, dk, dv, dfreq, dtemp, None, None, None, None, None, None, None, None, None
