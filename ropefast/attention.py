"""Public entry point: `scaled_rope_attention`: checks, schedule resolution, the layout
turned into [B, N, H, D] views (strides carry it below here), dispatch; calls repeat the
launches recorded for their key (`ropefast.repeat`)."""

from typing import Optional, Union

import torch
from torch import Tensor

from . import dispatch, ops
from ._validate import (as_batched, check_flags, check_layout, check_positions, check_positive, check_qkv, check_tensor,
                        other_layout, resolve_rotary, warn_if_layout_swapped)
from .reference import default_positions, scaled_rope_attention_reference
from .repeat import Repeats, schedule_key, tensor_key
from .schedules.base import RopeSchedule

__all__ = ["scaled_rope_attention"]

_REPEATS = Repeats()  # `ropefast.repeat`: `_repeat_key` -> the launches recorded for that key


def scaled_rope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
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
    layout: str = "bshd",
    return_lse: bool = False,
    seq_len: Optional[int] = None,
    deterministic: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over RoPE-rotated queries and keys with scaled frequencies, in one pass.

    Args:
        q: [B, Nq, Hq, D] (layout "bshd", as flash-attn) or [B, Hq, Nq, D] ("bhsd", as
            torch SDPA); float16, bfloat16 or float32 (float64 runs the reference).
        k, v: [B, Nk, Hkv, D] (or [B, Hkv, Nk, D]); same dtype and device; Hq % Hkv == 0.
            The last dimension must be contiguous (stride 1); other strides are free but,
            for the kernels, 16-byte aligned (TMA), as is the data pointer.
        schedule: a `ropefast.schedules.RopeSchedule`; supplies inv_freq, rotary_dim,
            interleaved, rotary_scale and q_temperature unless passed here explicitly.
        inv_freq: float32 tensor [rotary_dim / 2] (may require grad): instead of a schedule,
            or beside one to override only its frequencies (learnable frequencies keep the
            schedule's rotary_scale and temperature).
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
        layout: "bshd" or "bhsd"; the output has the same layout. Shapes that almost surely
            come in the other layout (a heads axis over 256 long, with fewer tokens than
            heads) raise a warning naming `layout`. Both are read through strides, no copy.
        seq_len: the length a length-dependent schedule (dynamic NTK, CLEX) sees; default
            Nk. Taken from the shapes, never from the positions: no host sync.
        return_lse: also return the log-sum-exp of the scaled logits, [B, Hq, Nq] float32
            (differentiable). Without it an inference call computes and allocates none.
        deterministic: make the backward bitwise repeatable. By default the Hopper backward
            sums dq over key blocks with float32 TMA reduce-adds, whose order varies from run
            to run (as FlashAttention-3's default); with True it runs the portable backward
            kernels, where every sum has a fixed order (0.84-0.97x the default's speed from
            N = 4k on an H200, 0.82-0.95x on an H100; bench/RESULTS.md). Every other path is
            deterministic either way.

    Returns:
        out (q's shape and dtype), or (out, lse) if return_lse. Differentiable in q, k, v,
        inv_freq and q_temperature (the forward saves the rotated queries in q's place where
        that costs no memory, `ops.attention`; the backward rotates the keys again). Positions must
        satisfy |p| < 2**31.

    Padding: nothing is masked but what `causal` hides; positions only rotate. Right-padded
    batches are exact for causal attention (real queries see no padded key); left padding,
    and any padding without causal, let real queries attend to the padded keys. For padded
    batches rotate with `apply_scaled_rope` and pass SDPA a mask (README, "Padded batches").

    Dispatch (`ropefast.dispatch`, fixed at import): CUDA tensors run the fused kernels (on
    Hopper the Gluon forward from head dim 64 up, at 64 where it is faster, and the Gluon
    backward at head dims 64, 128 and 256; the portable Triton kernels elsewhere);
    with TRITON_INTERPRET=1 set before the import, float16/float32 run them through the
    Triton interpreter; everything else (CPU tensors without it, bfloat16 under the
    interpreter, float64) runs `ropefast.reference` (plain PyTorch, float32 math, float64
    for float64 inputs). The kernel paths are the `torch.library` ops `ropefast::attention_fwd`
    and `ropefast::attention_bwd` (`ropefast.ops`): torch.compile traces them whole, and CUDA
    graphs capture them.

    Host time: an eager call on CUDA tensors repeats the launches of an earlier call whose
    arguments agreed with its own in all but the tensors' data (shapes, strides, dtypes,
    devices, alignment, the schedule object and its fields, every other argument): checks,
    schedule and dispatch run twice per such key (the second call is recorded,
    `ropefast.repeat`). In training the backward repeats its launches too, unless it takes the
    gradient of inv_freq or q_temperature. Calls with a schedule's q_temperature (computed
    from the positions) or a temperature other than float32 run in full.

    Example:
        >>> yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=4096)
        >>> out = scaled_rope_attention(q, k, v, schedule=yarn, causal=True)
    """
    key, records, save_q = _repeat_key(q, k, v, schedule, inv_freq, rotary_dim, interleaved, q_positions, k_positions,
                                       causal, softmax_scale, rotary_scale, q_temperature, layout, return_lse, seq_len,
                                       deterministic)
    repeat = _REPEATS.get(key)
    if repeat is not None:
        if layout == "bhsd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        temperature = None if q_temperature is None else as_batched(q_temperature).expand(q.shape[0], q.shape[1])
        q_positions, k_positions = as_batched(q_positions), as_batched(k_positions)
        named = dict(q=q, k=k, v=v, inv_freq=inv_freq, q_positions=q_positions, k_positions=k_positions,
                     temperature=temperature)
        schedule_freq, rotary_dim, interleaved, softmax_scale, rotary_scale = repeat.held[1]
        out, lse = ops.attention(q, k, v, schedule_freq if inv_freq is None else inv_freq, q_positions, k_positions,
                                 temperature, rotary_dim, interleaved, causal, softmax_scale, rotary_scale,
                                 deterministic=deterministic, repeat=lambda: repeat(named), repeat_key=key,
                                 records=records, save_q=save_q, need_lse=return_lse)
        out = out if layout == "bshd" else out.transpose(1, 2)
        return (out, lse) if return_lse else out
    given_freq = inv_freq

    check_qkv(q, k, v)
    check_layout(layout)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must agree with q in batch and head dim ({layout}), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if layout == "bhsd":  # below here everything is a [B, N, H, D] view
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    (batch, nq, hq, head_dim), (_, nk, hkv, _) = q.shape, k.shape
    if hkv == 0 or hq % hkv:
        hint = ""
        if nk and nq % nk == 0:  # the other layout's head counts
            hint = (f"; read with layout={other_layout(layout)!r} they would be {nq} and {nk} heads: pass "
                    f"layout={other_layout(layout)!r} if q, k, v are laid out that way")
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the KV heads ({hkv}), read with "
                         f"layout={layout!r}{hint}")
    if nq == 0 or nk == 0 or batch == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_flags(causal=causal, return_lse=return_lse, deterministic=deterministic)
    warn_if_layout_swapped(layout, (nq, nk), (hq, hkv))
    q_positions = check_positions("q_positions", q_positions, batch, nq, q.device)
    k_positions = check_positions("k_positions", k_positions, batch, nk, q.device)

    inv_freq, rotary_dim, interleaved, rotary_scale = resolve_rotary(
        schedule, inv_freq, rotary_dim, interleaved, rotary_scale, head_dim=head_dim,
        seq_len=nk if seq_len is None else seq_len, like=q, like_name="q")
    if schedule is not None and q_temperature is None and schedule.has_q_temperature:
        pos = q_positions if q_positions is not None else default_positions(batch, nq, nk - nq, q.device)
        q_temperature = schedule.q_temperature(pos.expand(batch, nq))
    softmax_scale = head_dim**-0.5 if softmax_scale is None else check_positive("softmax_scale", softmax_scale)
    if q_temperature is not None:
        check_tensor("q_temperature", q_temperature, ndim=(1, 2))
        if not q_temperature.dtype.is_floating_point:
            raise TypeError(f"q_temperature must be a floating tensor, got {q_temperature.dtype}")
        if q_temperature.shape[-1] != nq or (q_temperature.dim() == 2 and q_temperature.shape[0] != batch):
            raise ValueError(f"q_temperature must be [{nq}] or [{batch}, {nq}], got {tuple(q_temperature.shape)}")
        if q_temperature.device != q.device:
            raise ValueError(f"q_temperature is on {q_temperature.device}, q is on {q.device}")

    if dispatch.path(q) == "reference":
        _REPEATS.never(key)
        out, lse = scaled_rope_attention_reference(
            q, k, v, inv_freq=inv_freq, rotary_dim=rotary_dim, interleaved=interleaved, q_positions=q_positions,
            k_positions=k_positions, causal=causal, softmax_scale=softmax_scale, rotary_scale=rotary_scale,
            q_temperature=q_temperature, return_lse=True)
    else:
        # the temperature as [B, Nq]: its gradient comes back per batch row, and autograd
        # sums it into the caller's shape
        temperature = None if q_temperature is None else as_batched(q_temperature.float()).expand(batch, nq)
        q_positions, k_positions = as_batched(q_positions), as_batched(k_positions)
        with _REPEATS.recording(key) as record:
            out, lse = ops.attention(q, k, v, inv_freq, q_positions, k_positions, temperature, rotary_dim, interleaved,
                                     causal, softmax_scale, rotary_scale, deterministic=deterministic, repeat_key=key,
                                     records=records, save_q=save_q, need_lse=return_lse)
        if record is not None:  # the schedule's frequencies are fixed by the key; given ones are the call's
            named = dict(q=q, inv_freq=given_freq, q_positions=q_positions, temperature=temperature)
            # a tensor passed twice goes by its first name (the key says which were one object)
            named.update({name: x for name, x, earlier in (("k", k, (q,)), ("v", v, (q, k)),
                                                           ("k_positions", k_positions, (q_positions,)))
                          if x is None or all(x is not e for e in earlier)})
            # a repeat passes ops.attention what this call resolved (the schedule's frequencies
            # only: given ones are the call's, and an entry must not keep them alive)
            resolved = (None if given_freq is not None else inv_freq, rotary_dim, interleaved, softmax_scale,
                        rotary_scale)
            _REPEATS.keep(key, record, named, ("out", "lse", "q_rot"), constants=(inv_freq,),
                          held=(schedule, resolved))
    if layout == "bhsd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def _repeat_key(q, k, v, schedule, inv_freq, rotary_dim, interleaved, q_positions, k_positions, causal,
                softmax_scale, rotary_scale, q_temperature, layout, return_lse, seq_len, deterministic):
    """(key, records, save_q): the `ropefast.repeat` key of a call, whether autograd records
    the call and whether its forward saves Q^ (`ops.saves_queries`; the key holds it), for
    `ops.attention`, which then need not find them again (a keyed call's inv_freq is the given
    one or the schedule's cached frequencies, which require no grad, and its temperature is
    float32: it would find the same). (None, None, None) for a call that runs in full: one
    that torch.compile traces, on other than CUDA tensors, after TRITON_INTERPRET changed
    (`dispatch.env_changed`: the reference runs), with a schedule's temperatures (computed
    from the positions) or one that `schedule_key` refuses, a temperature other than float32,
    or arguments a key cannot hold (the checks then say what is wrong with them)."""
    if (torch.compiler.is_compiling() or not (type(q) is type(k) is type(v) is torch.Tensor) or not q.is_cuda
            or dispatch.env_changed()):
        return None, None, None
    records = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                           or getattr(inv_freq, "requires_grad", False)
                                           or getattr(q_temperature, "requires_grad", False))
    if schedule is not None and getattr(schedule, "has_q_temperature", False):
        return None, None, None
    if q_temperature is not None and getattr(q_temperature, "dtype", None) != torch.float32:
        return None, None, None
    save_q = records and ops.saves_queries(q, k, v, records)
    try:
        # q, k, v flat (one tuple hashes faster than nested ones); their pointers' alignment as
        # one value: a call where any is not 16-byte aligned fails the checks and records nothing.
        # The scalars with their types: a call with 1 for True, or 64.0 for 64, must meet the checks.
        key = (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device, v.shape, v.stride(),
               v.dtype, v.device, (q.data_ptr() | k.data_ptr() | v.data_ptr()) % 16, schedule_key(schedule),
               None if inv_freq is None else tensor_key(inv_freq),
               type(rotary_dim), rotary_dim, type(interleaved), interleaved,
               None if q_positions is None else tensor_key(q_positions),
               None if k_positions is None else tensor_key(k_positions), type(causal), causal,
               type(softmax_scale), softmax_scale, type(rotary_scale), rotary_scale,
               None if q_temperature is None else tensor_key(q_temperature), layout, type(return_lse), return_lse,
               type(seq_len), seq_len, type(deterministic), deterministic, dispatch.portable_only(),
               # one tensor passed twice (self-attention on x): the record passes it twice
               q is k, k is v, q is v, q_positions is k_positions, save_q)
    except TypeError:  # a non-tensor where a tensor goes
        return None, None, None
    return key, records, save_q
