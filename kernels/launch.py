"""Kernel launches that cost what the launch costs.

`kernel[grid](*args, **kwargs)` makes Triton bind and specialize every argument in Python on
each call: on an H100 host 37 us for the Gluon forward's 30 arguments, of which 17 are the
launch itself (bench/RESULTS.md, "Host time"). `launch` does Triton's work once per
specialization: it keys a call on what Triton specializes a kernel on (each tensor's dtype
and 16-byte alignment; each integer's width, whether it is 1 and whether 16 divides it;
each TMA descriptor's dtype, block, layout and padding; the keyword arguments, constexprs
and launch options) and, on a key it has seen, launches the compiled kernel directly, as
Triton's own `run` does after its lookup. The first call of a key, every call under the
interpreter and every call of a Triton without this launch API go through `kernel[grid]`.
`cdiv` and `next_power_of_2` are the host's: `triton.cdiv` and `triton.next_power_of_2` are
constexpr functions, a few microseconds a call outside a kernel.
"""

import torch
import triton
from triton.runtime import driver
from triton.runtime.jit import JITFunction

_LAUNCH_API = hasattr(triton, "knobs") and hasattr(triton.compiler.CompiledKernel, "launch_metadata")
_compiled = {}  # (kernel, device, argument keys, keyword items) -> (compiled kernel, trailing arguments)


def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (as `triton.next_power_of_2`, 0 for n = 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _arg_key(arg):
    """What Triton's specialization reads from one runtime argument (the common types first:
    this runs for every argument of every launch)."""
    kind = type(arg)
    if kind is int or (kind is not bool and isinstance(arg, int)):
        return int, arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31, arg < 2**63
    if kind is torch.Tensor or isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if kind is float:
        return float
    if arg is None or kind is bool:
        return arg
    if hasattr(arg, "block_shape"):  # a host TMA descriptor (tl or Gluon)
        return arg.base.dtype, tuple(arg.block_shape), getattr(arg, "layout", None), arg.padding
    return arg


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), with args positional (every runtime argument, in order)
    and constexprs and options by keyword."""
    if not (_LAUNCH_API and isinstance(kernel, JITFunction)):
        kernel[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    key = (kernel, device, tuple(map(_arg_key, args)), tuple(kwargs.items()))
    entry = _compiled.get(key)
    if entry is None:
        if any(p.is_constexpr for p in kernel.params[:len(args)]):  # its value would be missing from the key
            raise TypeError(f"launch({kernel.fn.__name__}): pass constexprs by keyword")
        compiled = kernel[grid](*args, **kwargs)
        trailing = tuple(kwargs.get(p.name, p.default) for p in kernel.params[len(args):])
        _compiled[key] = (compiled, trailing)
        return
    compiled, trailing = entry
    stream = driver.active.get_current_stream(device)
    hooks = triton.knobs.runtime
    metadata = compiled.launch_metadata(grid, stream, *args, *trailing)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, metadata, hooks.launch_enter_hook,
                 hooks.launch_exit_hook, *args, *trailing)
