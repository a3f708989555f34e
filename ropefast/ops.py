"""The kernel paths of both public ops as `torch.library` custom ops (`ropefast::*`), with
fake implementations (shapes only) and autograd formulas, so torch.compile traces them
without graph breaks and CUDA graphs capture them. The API (attention.py, rope.py) has
validated every argument, resolved the schedule and turned the layout into [B, N, H, D]
views: these take tensors and plain numbers only, and pick the kernels by `dispatch`
when they run. The reference path (plain PyTorch) does not come through here.

The API calls `attention` and `rotary`: the custom ops while torch.compile traces, and in
eager the same implementations and autograd formulas as `torch.autograd.Function`s. A
recorded attention call saves the rotated queries Q^ in q's place (`save_q`), so that its
backward runs no query rope pass. A call that the API keyed (`ropefast.repeat`) may repeat
recorded launches: the forward in the implementation's place (`attention`'s `repeat`), the
eager backward its own (`_attention_backward`). The dispatcher's boxing of a custom op's arguments and its
Python wrappers cost about 80 us a call on an H100 host, three times the whole of a cuDNN
SDPA call (bench/RESULTS.md)."""

from typing import Callable, Optional

import torch
from torch import Tensor

from . import dispatch
from ._validate import check_tma_aligned
from .kernels.attention_bwd import rope_attention_bwd
from .kernels.attention_fwd import rope_attention_fwd
from .kernels.hopper import compat as hopper_compat
from .kernels.launch import dot_pad
from .kernels.rope import frequency_grad, rope, slot_order
from .repeat import Repeats, first_names, tensor_key

if hopper_compat.SUPPORTED:
    from .kernels.hopper import attention_bwd as hopper_bwd
    from .kernels.hopper.attention_fwd import rope_attention_fwd_hopper


def _eager(implementation, setup_context, backward, gradients, tensors):
    """The autograd.Function of a custom op's eager calls: `implementation`, and the op's
    autograd formula with `gradients` (the backward's implementation) in place of the backward
    op. The forward takes ctx itself: with a separate setup_context, `apply` binds its
    arguments through `inspect.signature` on every call (tens of microseconds). `apply` takes
    the op's first `tensors` inputs (every differentiable one among them) one by one, the rest
    as one tuple: its cost grows with its arguments' count."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):  # then `implementation` or a repeat of its launches, and a key (`_call`)
            *head, tail, run, ctx.repeat_key = args
            inputs = (*head, *tail)
            output = run(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return *backward(ctx, *grads, gradients=gradients)[:tensors], None, None, None

    Eager.implementation = staticmethod(implementation)
    Eager.tensors = tensors
    return Eager


def _records(differentiable):
    """Whether autograd records a call on `differentiable` (tensors or None): one of them
    requires grad, and grad mode is on."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)


def _call(op, eager, args, records, run=None, key=None):
    """op(*args) while torch.compile traces; in eager `eager.apply` when autograd records the
    call (`_records`), the bare implementation otherwise; `run` (eager only) in the
    implementation's place. `key`: the API's `ropefast.repeat` key of the call, kept on the
    Function's ctx as `repeat_key` (None: the call has none)."""
    if torch.compiler.is_compiling():
        return op(*args)
    if records:
        return eager.apply(*args[:eager.tensors], args[eager.tensors:], run or eager.implementation, key)
    return (run or eager.implementation)(*args)


# ---- scaled rotary attention ----

def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, inv_freq: Tensor, q_positions: Optional[Tensor],
                  k_positions: Optional[Tensor], q_temperature: Optional[Tensor], rotary_dim: int, interleaved: bool,
                  causal: bool, softmax_scale: float, rotary_scale: float, cu_seqlens_q: Optional[Tensor] = None,
                  cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                  deterministic: bool = False, save_q: bool = False,
                  need_lse: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """out (like q), lse [B, Hq, Nq] float32 (empty unless `need_lse`: an inference call
    allocates and writes none) and, with `save_q`, the rotated and scaled
    queries Q^ ([B, Nq, Hq, D], stored [B, Hq, Nq, D]; empty otherwise), which the backward
    reads in q's place: a training step runs no query rope pass in its backward, and holds Q^
    instead of q. q [B, Nq, Hq, D], k and v [B, Nk, Hkv, D] (any strides), q_positions
    [B, Nq] / k_positions [B or 1, Nk] ints or None, q_temperature [B, Nq] float32 or None.
    Varlen (`ropefast.varlen`): B = 1 and cu_seqlens_q / cu_seqlens_k int32 [documents + 1]
    with the longest document's lengths; packed documents are the dense op with document
    bounds, so they share its fake shapes and autograd formula (`dispatch.forward_path` says which
    kernels run). `deterministic` only reaches the backward (`attention_bwd`)."""
    for name, x in (("q", q), ("k", k), ("v", v)):  # here, not at the API: data pointers exist at run time only
        check_tma_aligned(name, x)
    hopper = dispatch.forward_path(q, slot_order(dot_pad(q.shape[-1]), rotary_dim, interleaved)) == "hopper"
    forward = rope_attention_fwd_hopper if hopper else rope_attention_fwd
    out, lse, q_rot = forward(q, k, v, inv_freq, q_positions, k_positions, q_temperature, rotary_dim=rotary_dim,
                              interleaved=interleaved, causal=causal, softmax_scale=softmax_scale,
                              rotary_scale=rotary_scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                              max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, save_q=save_q,
                              store_lse=need_lse)
    return out, lse, q.new_empty(0) if q_rot is None else q_rot


attention_fwd = torch.library.custom_op("ropefast::attention_fwd", _attention_fwd, mutates_args=())


@attention_fwd.register_fake
def _(q, k, v, inv_freq, q_positions, k_positions, q_temperature, rotary_dim, interleaved, causal, softmax_scale,
      rotary_scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, deterministic=False,
      save_q=False, need_lse=True):
    batch, nq, hq, head_dim = q.shape
    q_rot = q.new_empty(batch, hq, nq, head_dim).transpose(1, 2) if save_q else q.new_empty(0)
    lse = q.new_empty((batch, hq, nq) if need_lse else (0,), dtype=torch.float32)
    return torch.empty_like(q), lse, q_rot


def _attention_bwd(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                  lse: Tensor, inv_freq: Tensor, q_positions: Optional[Tensor], k_positions: Optional[Tensor],
                  q_temperature: Optional[Tensor], rotary_dim: int, interleaved: bool, causal: bool,
                  softmax_scale: float, rotary_scale: float, need_dfreq: bool, need_dtemp: bool,
                  cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0,
                  max_seqlen_k: int = 0, deterministic: bool = False, q_stride: Optional[list[int]] = None,
                  dq_into_q: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (like q, k, v), d inv_freq (float32 [R/2], or empty unless need_dfreq) and
    d temperature ([B, Nq] float32, or empty unless need_dtemp); varlen as attention_fwd.
    With q_stride, q is the forward's Q^ (`save_q`) and q_stride the strides of the q it
    came from, which dq takes; with `dq_into_q` too, dq is written into Q^'s storage (its
    last use: the caller must hold no other reference that reads it later), one q-sized
    buffer less at the backward's peak. Eager calls only: a custom op's output may not alias
    its input, so `attention_bwd` is never called with it. On the Hopper path the Gluon backward computes the gradients
    in the rotated frame (dQ^ summed with float32 atomics: not bitwise repeatable) unless
    `deterministic`, which keeps the portable kernels (every sum in a fixed order)."""
    gradient_kernel = None
    if dispatch.backward_path(q, deterministic=deterministic) == "hopper":
        gradient_kernel = hopper_bwd.rope_attention_bwd_hopper
    dq, dk, dv, dfreq, dtemp = rope_attention_bwd(
        grad_out, q, k, v, out, lse, grad_lse, inv_freq, q_positions, k_positions, q_temperature,
        rotary_dim=rotary_dim, interleaved=interleaved, causal=causal, softmax_scale=softmax_scale,
        rotary_scale=rotary_scale, need_dfreq=need_dfreq, need_dtemp=need_dtemp, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        q_rotated=q_stride is not None, dq_stride=q_stride,
        dq_out=q.as_strided(q.shape, q_stride) if dq_into_q else None, gradient_kernel=gradient_kernel)
    dfreq = dfreq if need_dfreq else inv_freq.new_empty(0, dtype=torch.float32)
    dtemp = dtemp.sum(1) if need_dtemp else q.new_empty(0, dtype=torch.float32)  # heads summed: [B, Nq]
    return dq, dk, dv, dfreq, dtemp


attention_bwd = torch.library.custom_op("ropefast::attention_bwd", _attention_bwd, mutates_args=())


@attention_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, inv_freq, q_positions, k_positions, q_temperature, rotary_dim,
      interleaved, causal, softmax_scale, rotary_scale, need_dfreq, need_dtemp, cu_seqlens_q=None, cu_seqlens_k=None,
      max_seqlen_q=0, max_seqlen_k=0, deterministic=False, q_stride=None, dq_into_q=False):
    batch, nq = q.shape[:2]
    dfreq = inv_freq.new_empty(inv_freq.shape[0] if need_dfreq else 0, dtype=torch.float32)
    dtemp = q.new_empty((batch, nq) if need_dtemp else (0,), dtype=torch.float32)
    dq = torch.empty_like(q) if q_stride is None else q.new_empty_strided(q.shape, q_stride)
    return dq, torch.empty_like(k), torch.empty_like(v), dfreq, dtemp


def _graph_kept():
    """Whether the running backward keeps the graph's saved tensors (retain_graph or
    create_graph); True where torch cannot say."""
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return kept is None or kept()


def _attention_setup(ctx, inputs, output):
    (q, k, v, inv_freq, q_positions, k_positions, q_temperature, *args, cu_seqlens_q, cu_seqlens_k, max_q, max_k,
     deterministic, save_q, _) = inputs
    out, lse, q_rot = output
    ctx.save_for_backward(q_rot if save_q else q, k, v, out, lse, inv_freq, q_positions, k_positions, q_temperature,
                          cu_seqlens_q, cu_seqlens_k)
    ctx.args, ctx.max_seqlens, ctx.deterministic = tuple(args), (max_q, max_k), deterministic
    ctx.q_stride = list(q.stride()) if save_q else None
    ctx.mark_non_differentiable(q_rot)
    ctx.set_materialize_grads(False)  # no zeros of Q^'s size (or lse's) for outputs the loss never read


_BACKWARD_REPEATS = Repeats()  # `_attention_backward`'s keys -> the launches recorded for them
_SAVED_TENSORS = ("q", "k", "v", "out", "lse", "inv_freq", "q_positions", "k_positions", "q_temperature",
                  "cu_seqlens_q", "cu_seqlens_k")


def _attention_backward(ctx, grad_out, grad_lse, grad_q_rot=None, gradients=attention_bwd):
    saved = ctx.saved_tensors
    q, k, v, out, lse, inv_freq, q_positions, k_positions, q_temperature, cu_seqlens_q, cu_seqlens_k = saved
    need_dfreq, need_dtemp = ctx.needs_input_grad[3], ctx.needs_input_grad[6]
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    if grad_lse is not None:
        grad_lse = grad_lse.contiguous()
    # In eager, dq takes the saved Q^'s storage unless the graph (and Q^) must outlive this
    # backward (retain_graph, create_graph).
    dq_into_q = gradients is not attention_bwd and ctx.q_stride is not None and not _graph_kept()
    args = (grad_out, grad_lse, *saved[:9], *ctx.args, need_dfreq, need_dtemp, cu_seqlens_q, cu_seqlens_k,
            *ctx.max_seqlens, ctx.deterministic, ctx.q_stride, dq_into_q)
    # An eager backward of a call that the API keyed (`ropefast.repeat`) repeats its launches
    # too, keyed on that key, the numbers the schedule resolved to (this entry does not hold
    # the schedule, whose id the key holds), every tensor's layout and which are one object
    # (gradients and saved tensors as they come here), and whether dq takes Q^'s place.
    # Frequency and temperature gradients take torch operations a repeat cannot make: in full.
    if gradients is attention_bwd or getattr(ctx, "repeat_key", None) is None or need_dfreq or need_dtemp:
        dq, dk, dv, dfreq, dtemp = gradients(*args)
    else:
        tensors = (grad_out, grad_lse, *saved)
        named, same = first_names(("grad_out", "grad_lse", *_SAVED_TENSORS), tensors)
        try:  # saved-tensor hooks may hand back other layouts, or a gradient may be a saved tensor
            key = (ctx.repeat_key, ctx.args, tuple([tensor_key(t) for t in tensors]), same, dq_into_q,
                   dispatch.portable_only())
        except TypeError:  # a tensor subclass: in full
            key = None
        repeat = _BACKWARD_REPEATS.get(key)
        if repeat is not None:
            buffers = repeat(named)
            dq = q.as_strided(q.shape, ctx.q_stride) if dq_into_q else buffers["dq"]
            return dq, buffers["dk"], buffers["dv"], *[None] * 16
        with _BACKWARD_REPEATS.recording(key) as record:
            dq, dk, dv, dfreq, dtemp = gradients(*args)
        _BACKWARD_REPEATS.keep(key, record, named, ("dq", "dk", "dv"))
    return (dq, dk, dv, dfreq.to(inv_freq.dtype) if need_dfreq else None, None, None, dtemp if need_dtemp else None,
            *[None] * 12)


torch.library.register_autograd("ropefast::attention_fwd", _attention_backward, setup_context=_attention_setup)


_EAGER_ATTENTION = _eager(_attention_fwd, _attention_setup, _attention_backward, _attention_bwd, tensors=7)


def _dense(x):
    """Whether x's elements cover the span of its storage exactly once (no gaps between rows,
    no broadcast dimension), in any order of dimensions."""
    if x.is_contiguous():
        return True
    span = 1
    for stride, size in sorted((stride, size) for size, stride in zip(x.shape, x.stride()) if size != 1):
        if stride != span:
            return False
        span *= size
    return True


def _root(x):
    """The tensor that owns x's storage: x, or the base of the view x (for a view of a view,
    PyTorch records the tensor at the root of the chain)."""
    return x if x._base is None else x._base


def attention(q: Tensor, k: Tensor, v: Tensor, inv_freq: Tensor, q_positions: Optional[Tensor],
              k_positions: Optional[Tensor], q_temperature: Optional[Tensor], rotary_dim: int, interleaved: bool,
              causal: bool, softmax_scale: float, rotary_scale: float, cu_seqlens_q: Optional[Tensor] = None,
              cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
              deterministic: bool = False, repeat: Optional[Callable[[], dict]] = None,
              repeat_key: Optional[tuple] = None, records: Optional[bool] = None,
              save_q: Optional[bool] = None, need_lse: bool = True) -> tuple[Tensor, Tensor]:
    """(out, lse) of `attention_fwd`, differentiable: the custom op under torch.compile, the
    autograd.Function in eager (module docstring). Where autograd records the call, the
    forward saves Q^ for the backward (`save_q`, `saves_queries`). `repeat_key` (eager): the
    API's `ropefast.repeat` key of the call, on which its backward keys its own; `repeat`:
    returns the buffers of a repeat of the launches recorded for that key, which then run in
    the implementation's place. `records` and `save_q`: whether autograd records the call
    (`_records`) and whether its forward saves Q^, where the caller has them (the API computes
    both for its key); None: computed here. `need_lse` False: the caller reads no lse (an empty
    tensor comes back) unless autograd records the call, whose backward reads it."""
    if records is None:
        records = _records((q, k, v, inv_freq, q_temperature))
    if save_q is None:
        save_q = saves_queries(q, k, v, records)
    need_lse = need_lse or records
    args = (q, k, v, inv_freq, q_positions, k_positions, q_temperature, rotary_dim, interleaved, causal,
            softmax_scale, rotary_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic, save_q,
            need_lse)
    run = None
    if repeat is not None:
        def run(*_):
            buffers = repeat()
            return (buffers["out"], buffers["lse"] if need_lse else q.new_empty(0, dtype=torch.float32),
                    buffers["q_rot"] if save_q else q.new_empty(0))
    out, lse, _ = _call(attention_fwd, _EAGER_ATTENTION, args, records, run, repeat_key)
    return out, lse


def saves_queries(q: Tensor, k: Tensor, v: Tensor, records: bool) -> bool:
    """Whether a call's forward saves Q^ for the backward in q's place (`save_q`): autograd
    records it, and Q^ holds no more memory than q would: q is dense (no gaps, no broadcast
    dimension: Q^ as large as q's storage, and dq may take q's strides) and is not a view of
    the tensor that k or v view (one fused QKV projection's output, which k and v keep
    alive; under torch.compile, which traces no such question, only the density counts)."""
    return records and _dense(q) and (torch.compiler.is_compiling() or all(_root(q) is not _root(x) for x in (k, v)))


# ---- the standalone rope pass ----

def _rope_fwd(x: Tensor, inv_freq: Tensor, positions: Optional[Tensor], rotary_dim: int, interleaved: bool,
             rotary_scale: float) -> Tensor:
    """x [B, N, H, D] rotated at positions [B or 1, N] (None: arange(N)), amplitude
    rotary_scale on the rotated features."""
    return rope(x, inv_freq, positions, 0, rotary_dim=rotary_dim, interleaved=interleaved, scale=rotary_scale)


rope_fwd = torch.library.custom_op("ropefast::rope", _rope_fwd, mutates_args=())


@rope_fwd.register_fake
def _(x, inv_freq, positions, rotary_dim, interleaved, rotary_scale):
    return torch.empty_like(x)


def _rope_bwd(grad: Tensor, out: Tensor, inv_freq: Tensor, positions: Optional[Tensor], rotary_dim: int,
             interleaved: bool, rotary_scale: float, need_dfreq: bool) -> tuple[Tensor, Tensor]:
    """dx = m R^T grad (the pass-through features pass the gradient on) and d inv_freq
    (float32 [R/2], or empty unless need_dfreq) from the rotated output."""
    grad = grad.contiguous()
    dx = rope(grad, inv_freq, positions, 0, rotary_dim=rotary_dim, interleaved=interleaved, scale=rotary_scale,
              inverse=True)
    dfreq = inv_freq.new_empty(0, dtype=torch.float32)
    if need_dfreq:
        if positions is None:
            positions = torch.arange(grad.shape[1], device=grad.device)[None]
        dfreq = frequency_grad(grad, out, positions, rotary_dim=rotary_dim, interleaved=interleaved).float()
    return dx, dfreq


rope_bwd = torch.library.custom_op("ropefast::rope_bwd", _rope_bwd, mutates_args=())


@rope_bwd.register_fake
def _(grad, out, inv_freq, positions, rotary_dim, interleaved, rotary_scale, need_dfreq):
    return torch.empty_like(grad, memory_format=torch.contiguous_format), inv_freq.new_empty(
        inv_freq.shape[0] if need_dfreq else 0, dtype=torch.float32)


def _rope_setup(ctx, inputs, output):
    x, inv_freq, positions, rotary_dim, interleaved, rotary_scale = inputs
    ctx.save_for_backward(inv_freq, positions, output if ctx.needs_input_grad[1] else None)
    ctx.args = (rotary_dim, interleaved, rotary_scale)


def _rope_backward(ctx, grad, gradients=rope_bwd):
    inv_freq, positions, out = ctx.saved_tensors
    need_dfreq = ctx.needs_input_grad[1]
    dx, dfreq = gradients(grad, out, inv_freq, positions, *ctx.args, need_dfreq)
    return dx, dfreq.to(inv_freq.dtype) if need_dfreq else None, None, None, None, None


torch.library.register_autograd("ropefast::rope", _rope_backward, setup_context=_rope_setup)


_EAGER_ROPE = _eager(_rope_fwd, _rope_setup, _rope_backward, _rope_bwd, tensors=3)


def rotary(x: Tensor, inv_freq: Tensor, positions: Optional[Tensor], rotary_dim: int, interleaved: bool,
           rotary_scale: float) -> Tensor:
    """`rope_fwd`, differentiable: the custom op under torch.compile, the autograd.Function in
    eager (module docstring)."""
    args = (x, inv_freq, positions, rotary_dim, interleaved, rotary_scale)
    return _call(rope_fwd, _EAGER_ROPE, args, _records((x, inv_freq)))
