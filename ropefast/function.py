"""Thin autograd Function around the fused kernels: validate nothing (the API did),
prepare the kernel inputs, launch, save what backward needs."""

import torch

from ropefast.kernels.attention_fwd import rope_attention_fwd
from ropefast.kernels.rotary import turn_increments


def _as_batched(t, batch):
    """[N] -> [1, N] view (shared by the batch); [B, N] as is; None stays None."""
    return None if t is None else (t[None] if t.dim() == 1 else t)


class ScaledRopeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, inv_freq, q_temperature, q_positions, k_positions,
                rotary_dim, interleaved, causal, softmax_scale, rotary_scale, layout):
        batch = q.shape[0]
        nq = q.shape[1] if layout == "bshd" else q.shape[2]
        increments = turn_increments(inv_freq)
        q_positions, k_positions = _as_batched(q_positions, batch), _as_batched(k_positions, batch)
        if q_temperature is not None:
            q_temperature = _as_batched(q_temperature.float(), batch).expand(batch, nq)
        out, lse = rope_attention_fwd(
            q, k, v, increments, None if q_positions is None else q_positions.expand(batch, nq), k_positions,
            q_temperature,
            rotary_dim=rotary_dim, interleaved=interleaved, causal=causal, softmax_scale=softmax_scale,
            rotary_scale=rotary_scale, layout=layout)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        raise NotImplementedError("the fused backward is not built yet")
