"""Plain-PyTorch reference of scaled rotary attention: the ground truth of every test.

Written for clarity, not speed: it materializes the rotated q and k and the full score
matrix. Given float64 inputs it computes everything in float64 (exact up to float64
rounding); given float16/bfloat16/float32 inputs it computes in float32 and returns the
input dtype. It is also the path `scaled_rope_attention` takes where no kernel can run
(CPU tensors without ``TRITON_INTERPRET=1``).

Inputs are taken as already validated by `ropefast.attention.scaled_rope_attention`
(which calls this with fully resolved arguments); the shapes are those of DESIGN.md.

The operation, for each rotated pair (a, b) with frequency f at position p:
    theta = p * f
    a' = rotary_scale * (a cos theta - b sin theta)
    b' = rotary_scale * (b cos theta + a sin theta)
    s[i, j] = softmax_scale * t_i * <q'_i, k'_j>, -inf where key j is not visible to query i
    out_i = softmax_j(s[i, :]) @ v,  lse_i = logsumexp_j s[i, j]
A query that sees no key at all (possible only with causal and Nq > Nk) gets out = 0 and
lse = -inf, as flash-attn does.
"""

import torch

__all__ = ["default_positions", "rotate", "scaled_rope_attention_reference", "scaled_rope_attention_reference_bwd",
           "scaled_rope_attention_varlen_reference", "scaled_rope_attention_with_kvcache_reference"]


def default_positions(batch, seq_len, offset, device):
    """Positions [batch, seq_len] = offset + arange(seq_len) (int64)."""
    return (torch.arange(seq_len, device=device) + offset).expand(batch, seq_len)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate(x, positions, inv_freq, *, rotary_dim=None, interleaved=False, rotary_scale=1.0):
    """Apply scaled RoPE to x [B, N, H, D] (bshd) at positions [B, N].

    The first `rotary_dim` features are rotated in pairs (2i, 2i+1) if `interleaved`,
    else (i, i + rotary_dim/2); the remaining features pass through unchanged.
    Angles are computed in float64 from the float32 frequencies, so they are exact for
    any position the caller can pass. Returns x's compute dtype (float64 or float32).
    """
    dtype = _compute_dtype(x.dtype)
    x = x.to(dtype)
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    theta = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)  # [B, N, R/2]
    cos = (torch.cos(theta) * rotary_scale).to(dtype)[:, :, None, :]  # broadcast over heads
    sin = (torch.sin(theta) * rotary_scale).to(dtype)[:, :, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:
        a, b = rot[..., :half], rot[..., half:]
    a_rot = a * cos - b * sin
    b_rot = b * cos + a * sin
    if interleaved:
        rot = torch.stack((a_rot, b_rot), dim=-1).flatten(-2)
    else:
        rot = torch.cat((a_rot, b_rot), dim=-1)
    return torch.cat((rot, rest), dim=-1)


def scaled_rope_attention_reference(
    q,
    k,
    v,
    *,
    inv_freq,
    rotary_dim=None,
    interleaved=False,
    q_positions=None,
    k_positions=None,
    causal=False,
    softmax_scale=None,
    rotary_scale=1.0,
    q_temperature=None,
    layout="bshd",
    return_lse=False,
):
    """Reference scaled rotary attention; same arguments and results as
    `ropefast.scaled_rope_attention` (with `inv_freq` given explicitly).

    q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D] for layout "bshd" ([B, H, N, D] for "bhsd").
    q_positions [B, Nq] / k_positions [B, Nk] (or [N], shared by the batch) default to
    arange, with queries offset by Nk - Nq. q_temperature is [Nq] or [B, Nq].
    Returns out (input dtype, input layout), and lse [B, Hq, Nq] float32 if asked.
    Gradients flow to q, k, v, inv_freq and q_temperature through autograd.
    """
    out_dtype = q.dtype
    dtype = _compute_dtype(q.dtype)
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    hq, hkv = q.shape[2], k.shape[2]
    scores = _logits(q, k, inv_freq=inv_freq, rotary_dim=rotary_dim, interleaved=interleaved, q_positions=q_positions,
                     k_positions=k_positions, causal=causal, softmax_scale=softmax_scale, rotary_scale=rotary_scale,
                     q_temperature=q_temperature)
    # GQA: query head h reads KV head h // (Hq / Hkv).
    v_rep = v.to(dtype).repeat_interleave(hq // hkv, dim=2)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Nq]; -inf for a row that sees nothing
    out = torch.einsum("bhij,bjhd->bihd", _probs(scores, lse), v_rep).to(out_dtype)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    return (out, lse.float()) if return_lse else out


def _logits(q, k, *, inv_freq, rotary_dim, interleaved, q_positions, k_positions, causal, softmax_scale,
            rotary_scale, q_temperature):
    """The scaled logits s [B, Hq, Nq, Nk] in the compute dtype, -inf where a key is hidden,
    for q [B, Nq, Hq, D] and k [B, Nk, Hkv, D]."""
    dtype = _compute_dtype(q.dtype)
    batch, nq, hq, head_dim = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    device = q.device
    if q_positions is None:
        q_positions = default_positions(batch, nq, nk - nq, device)
    if k_positions is None:
        k_positions = default_positions(batch, nk, 0, device)
    q_positions = q_positions.expand(batch, nq)
    k_positions = k_positions.expand(batch, nk)
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5

    rope = dict(rotary_dim=rotary_dim, interleaved=interleaved, rotary_scale=rotary_scale)
    q_rot = rotate(q, q_positions, inv_freq, **rope)
    k_rot = rotate(k, k_positions, inv_freq, **rope).repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q_rot, k_rot) * softmax_scale
    if q_temperature is not None:
        scores = scores * q_temperature.to(dtype).expand(batch, nq)[:, None, :, None]
    if causal:
        # Bottom-right aligned: key j is visible to query i iff j <= i + (Nk - Nq).
        i = torch.arange(nq, device=device)[:, None]
        j = torch.arange(nk, device=device)[None, :]
        scores = scores.masked_fill(j > i + (nk - nq), float("-inf"))
    return scores


def _probs(scores, lse):
    """exp(s - lse); 0 on rows that see no key (lse = -inf)."""
    lse = lse[..., None].to(scores.dtype)
    return torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0))


def scaled_rope_attention_reference_bwd(grad_out, grad_lse, q, k, v, out, lse, *, inv_freq, rotary_dim=None,
                                        interleaved=False, q_positions=None, k_positions=None, causal=False,
                                        softmax_scale=None, rotary_scale=1.0, q_temperature=None):
    """Gradients of `scaled_rope_attention_reference` (layout "bshd") from its out and lse,
    the way the backward kernels take them: P = exp(s - lse), dS = P (dP - delta) with
    delta = rowsum(dO * out) - dlse, dv = P^T dO, and dS carried back through the rotations.

    Given the out and lse of a softmax over more keys than k holds (ring attention merges
    blocks of keys), the results are these keys' share of dq, d inv_freq and d q_temperature,
    and the whole dk, dv of these keys. grad_lse: [B, Hq, Nq] or None.
    Returns dq, dk, dv (dtypes of q, k, v), d inv_freq and d q_temperature (shaped like the
    argument; None without one), the last two in the compute dtype.

    Example:
        >>> out, lse = scaled_rope_attention_reference(q, k, v, inv_freq=f, causal=True, return_lse=True)
        >>> dq, dk, dv, dfreq, _ = scaled_rope_attention_reference_bwd(torch.ones_like(out), None, q, k, v, out,
        ...                                                             lse, inv_freq=f, causal=True)
    """
    dtype = _compute_dtype(q.dtype)
    hq, hkv = q.shape[2], k.shape[2]
    with torch.enable_grad():  # autograd carries dS back through the rotations and the temperature
        leaves = [q.detach().to(dtype).requires_grad_(), k.detach().to(dtype).requires_grad_(),
                  inv_freq.detach().requires_grad_()]
        if q_temperature is not None:
            leaves.append(q_temperature.detach().to(dtype).requires_grad_())
        scores = _logits(leaves[0], leaves[1], inv_freq=leaves[2], rotary_dim=rotary_dim, interleaved=interleaved,
                         q_positions=q_positions, k_positions=k_positions, causal=causal,
                         softmax_scale=softmax_scale, rotary_scale=rotary_scale,
                         q_temperature=leaves[3] if q_temperature is not None else None)
    probs = _probs(scores.detach(), lse)
    grad_out = grad_out.to(dtype)
    dp = torch.einsum("bihd,bjhd->bhij", grad_out, v.to(dtype).repeat_interleave(hq // hkv, dim=2))
    delta = torch.einsum("bihd,bihd->bhi", grad_out, out.to(dtype))
    if grad_lse is not None:
        delta = delta - grad_lse.to(dtype)
    dv = torch.einsum("bhij,bihd->bjhd", probs, grad_out).unflatten(2, (hkv, hq // hkv)).sum(3)
    dq, dk, dfreq, *dtemp = torch.autograd.grad(scores, leaves, probs * (dp - delta[..., None]))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dfreq, dtemp[0] if dtemp else None


def scaled_rope_attention_with_kvcache_reference(
    q,
    k_cache,
    v_cache,
    *,
    cache_seqlens,
    inv_freq,
    block_table=None,
    k_new=None,
    v_new=None,
    rotary_dim=None,
    interleaved=False,
    causal=True,
    softmax_scale=None,
    rotary_scale=1.0,
    q_temperature=None,
    return_lse=False,
):
    """Reference of `ropefast.scaled_rope_attention_with_kvcache`: append, gather, rotate,
    attend. Writes k_new / v_new [B, Nq, Hkv, D] (if given) into the caches at rows
    cache_seqlens[b] + i, in place; then, for each sequence b, gathers the first
    cache_seqlens[b] + (Nq if k_new is given else 0) cache rows (dense [B, max_len, Hkv, D],
    or paged [num_pages, page_size, Hkv, D] through block_table [B, max_pages]) and runs
    `scaled_rope_attention_reference` on them: keys at their cache index, queries at the
    last Nq positions, causal bottom-right. Reads the lengths on the host (one sync).
    Returns out (q's dtype) and, if asked, lse [B, Hq, Nq] float32."""
    batch, nq = q.shape[:2]
    device = q.device
    n_new = 0
    if k_new is not None:
        n_new = nq
        rows = cache_seqlens.long()[:, None] + torch.arange(nq, device=device)  # [B, Nq] cache indices
        if block_table is None:
            index = (torch.arange(batch, device=device)[:, None].expand(batch, nq), rows)
        else:
            page_size = k_cache.shape[1]
            index = (block_table.long().gather(1, rows // page_size), rows % page_size)
        k_cache[index] = k_new.to(k_cache.dtype)
        v_cache[index] = v_new.to(v_cache.dtype)
    if q_temperature is not None:
        q_temperature = q_temperature.expand(batch, nq)
    outs, lses = [], []
    for b, length in enumerate((cache_seqlens.long() + n_new).tolist()):
        if block_table is None:
            k, v = k_cache[b, :length], v_cache[b, :length]
        else:
            page_size = k_cache.shape[1]
            pages = block_table[b, :-(-length // page_size)].long()
            k, v = (cache[pages].flatten(0, 1)[:length] for cache in (k_cache, v_cache))
        out, lse = scaled_rope_attention_reference(
            q[b:b + 1], k[None].to(q.dtype), v[None].to(q.dtype), inv_freq=inv_freq, rotary_dim=rotary_dim,
            interleaved=interleaved, causal=causal, softmax_scale=softmax_scale, rotary_scale=rotary_scale,
            q_temperature=None if q_temperature is None else q_temperature[b:b + 1], return_lse=True)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_lse else out


def scaled_rope_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, inv_freq, q_positions=None,
                                           k_positions=None, q_temperature=None, return_lse=False, **kwargs):
    """Reference of `ropefast.scaled_rope_attention_varlen`: `scaled_rope_attention_reference`
    on each document alone, in a host loop (it reads cu_seqlens: a sync).

    q [total_q, Hq, D], k/v [total_k, Hkv, D] packed; document i is rows cu_seqlens[i] to
    cu_seqlens[i + 1]. q_positions [total_q] / k_positions [total_k] and q_temperature
    [total_q] are per token (positions default per document, as the dense op's do). kwargs:
    the dense reference's other arguments (rotary_dim, interleaved, causal, ...). Returns
    out like q, and lse [Hq, total_q] float32 if asked."""
    outs, lses = [], []
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for q_start, q_end, k_start, k_end in zip(starts_q, starts_q[1:], starts_k, starts_k[1:]):
        doc_q, doc_k = slice(q_start, q_end), slice(k_start, k_end)
        out, lse = scaled_rope_attention_reference(
            q[None, doc_q], k[None, doc_k], v[None, doc_k], inv_freq=inv_freq,
            q_positions=None if q_positions is None else q_positions[None, doc_q],
            k_positions=None if k_positions is None else k_positions[None, doc_k],
            q_temperature=None if q_temperature is None else q_temperature[None, doc_q], return_lse=True, **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=-1)
    return (out, lse) if return_lse else out
