"""The pipelines a user would build instead of ropefast, and the shared timing helpers.

All take q [B, N, Hq, D] and k, v [B, N, Hkv, D] in flash-attn's layout, like ropefast;
the SDPA peers get transposed views, as HF's attention modules hand them over.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ropefast import apply_scaled_rope, scaled_rope_attention

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_flops(batch, heads, nq, nk, head_dim, causal, backward=False):
    """4*B*H*Nq*Nk*D (half when causal and Nq == Nk); forward+backward is 3.5x forward."""
    flops = 4 * batch * heads * nq * nk * head_dim
    if causal and nq == nk:
        flops //= 2
    return flops * 3.5 if backward else flops


def sdpa(q, k, v, causal, backend):
    """SDPA without any RoPE: the speed ceiling a user knows."""
    with sdpa_kernel([SDPA_BACKENDS[backend]]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def rope_cos_sin(schedule, seq_len, device, dtype):
    """HF's cos/sin cache [N, D]: computed once per model forward, shared by every layer."""
    inv_freq = schedule.inv_freq(device=device)
    freqs = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    m = schedule.rotary_scale()
    return (emb.cos() * m).to(dtype), (emb.sin() * m).to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_rope_sdpa(q, k, v, causal, cos, sin, backend="cudnn"):
    """HF Llama: transpose to [B, H, N, D], x * cos + rotate_half(x) * sin, then SDPA."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    with sdpa_kernel([SDPA_BACKENDS[backend]]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def ropefast_attention(q, k, v, causal, schedule):
    return scaled_rope_attention(q, k, v, schedule=schedule, causal=causal)


def triton_rope_sdpa(q, k, v, causal, schedule, backend="cudnn"):
    """The best unfused pipeline: ropefast's standalone rope kernel on q and k, then SDPA."""
    q, k = (apply_scaled_rope(x, schedule=schedule) for x in (q, k))
    return sdpa(q, k, v, causal, backend)
