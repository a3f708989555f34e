"""Kernel launches that cost what the launch costs.

`kernel[grid](*args, **kwargs)` makes Triton bind and specialize every argument in Python on
each call, and Triton's own host TMA descriptors check their fields when built: on an H100
host 34 us for the Gluon forward's launch, of which 14 are the compiled kernel's launcher
(bench/RESULTS.md, "Host time"). Here:
- `launch` does Triton's work once per specialization: it keys a call on what Triton
  specializes a kernel on (each tensor's dtype and 16-byte alignment; each integer's width,
  whether it is 1 and whether 16 divides it; each descriptor's dtype, block, layout and
  padding; the keyword arguments, constexprs and launch options) and, on a key it has seen,
  launches the compiled kernel directly. With Triton 3.6 it calls the compiled launcher's C
  function itself (`compat.raw_launcher`), expanding the descriptors into CUtensorMaps as
  Triton's Python wrapper would, without its per-argument loop; other versions go through
  `CompiledKernel.run`. The first call of a key, every call under the interpreter and a
  call while Triton's launch hooks are set (profilers) take the full route.
- `recording` collects the launches a block of code makes and the buffers it allocates for
  them (`scratch`); `direct_stream` and `direct` make such a launch again with other
  tensors: a public op's call repeats an earlier call's launches where all that its checks
  and schedule read is the same (`ropefast.repeat`).
- `Descriptor` carries a host TMA descriptor's fields; Triton's own class (tl's, or
  Gluon's when it has a layout) is built from it on the full route only. The callers pass
  16-byte aligned tensors (the API checks q, k, v; scratch comes from the allocator).
`cdiv`, `next_power_of_2` and `dot_pad` are the host's: `triton.cdiv` and
`triton.next_power_of_2` are constexpr functions, a few microseconds a call outside a kernel.
"""

import contextlib
import threading
from typing import Any, NamedTuple, Optional

import torch
import triton
from triton.runtime import driver
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from .hopper import compat

_LAUNCH_API = hasattr(triton, "knobs") and hasattr(triton.compiler.CompiledKernel, "launch_metadata")
# (kernel id, device, argument keys, keyword items) -> (kernel, compiled kernel, trailing arguments, raw launch or None)
_compiled = {}


def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (as `triton.next_power_of_2`, 0 for n = 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def dot_pad(n):
    """A tile width for n features: a power of two >= 16 (tl.dot's and wgmma's smallest
    reduction size), which head dims are padded to in every kernel."""
    return max(16, next_power_of_2(n))


class Descriptor(NamedTuple):
    """A host TMA descriptor: `base` read as a `shape` / `strides` tensor in `block_shape`
    tiles; `layout` is a Gluon kernel's shared-memory layout, None for a tl kernel's."""

    base: torch.Tensor
    shape: list
    strides: list
    block_shape: list
    layout: Optional[Any] = None
    padding: str = "zero"

    def triton(self):
        """Triton's descriptor of the same fields (it checks them)."""
        if self.layout is None:
            return TensorDescriptor(self.base, self.shape, self.strides, self.block_shape, padding=self.padding)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
        return GluonDescriptor(self.base, self.shape, self.strides, self.block_shape, self.layout, padding=self.padding)


def _arg_key(arg):
    """What Triton's specialization reads from one runtime argument. `_args_key` inlines the
    common cases (exact ints and floats, tensors, None) and must agree with this."""
    kind = type(arg)
    if arg is None or kind is bool:
        return arg
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31, arg < 2**63
    if kind is float:
        return float
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if kind is Descriptor:
        return arg.base.dtype, tuple(arg.block_shape), arg.layout, arg.padding
    raise TypeError(f"launch: unsupported argument type {kind.__name__}")


def _args_key(args):
    """`_arg_key` of every argument, the common types inline: a function call per argument
    cost about as much as the key itself (2.5 of 6.4 us for 30 arguments)."""
    return tuple([(int, a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63) if type(a) is int
                  else (a.dtype, a.data_ptr() % 16 == 0) if type(a) is torch.Tensor
                  else None if a is None
                  else float if type(a) is float
                  else _arg_key(a) for a in args])


def _hooked(hook):
    """Whether a launch hook of `triton.knobs.runtime` is set: Triton 3.6 keeps each as a
    `HookChain`, empty when none is."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _triton_args(args):
    return [arg.triton() if type(arg) is Descriptor else arg for arg in args]


class Recorded(NamedTuple):
    """A launch as `launch` made it (`recording`): enough to make it again (`direct`, or `launch`)."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict
    entry: Optional[tuple]  # `_compiled`'s entry of its key; None where there is none (the interpreter)
    device: int


class Recording(NamedTuple):
    """What a block of code under `recording` launched (`Recorded`s), and the buffers it
    allocated for them, as (name, tensor) in order (`scratch`)."""

    launches: list
    scratch: list


_recording = threading.local()


@contextlib.contextmanager
def recording():
    """Collect the launches this thread makes inside the block, and its `scratch` buffers."""
    record = Recording([], [])
    _recording.record = record
    try:
        yield record
    finally:
        _recording.record = None


def scratch(name, tensor):
    """tensor, a buffer just allocated for this call's launches (their output, or scratch
    between them); under `recording`, noted by name: a repeat allocates it again."""
    record = getattr(_recording, "record", None)
    if record is not None:
        record.scratch.append((name, tensor))
    return tensor


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), with args positional (every runtime argument, in order)
    and constexprs and options by keyword."""
    record = getattr(_recording, "record", None)
    if not (_LAUNCH_API and isinstance(kernel, JITFunction)):
        kernel[grid](*_triton_args(args), **kwargs)
        if record is not None:
            record.launches.append(Recorded(kernel, grid, args, kwargs, None, -1))
        return
    device = driver.active.get_current_device()
    # a JITFunction hashes its source's hash under a lock: key on its id, check it on a hit
    key = (id(kernel), device, _args_key(args), tuple(kwargs.items()))
    entry = _compiled.get(key)
    if entry is not None and entry[0] is not kernel:  # a freed kernel's id, reused
        entry = None
    if entry is None or _hooks_set():
        if any(p.is_constexpr for p in kernel.params[:len(args)]):  # its value would be missing from the key
            raise TypeError(f"launch({kernel.fn.__name__}): pass constexprs by keyword")
        compiled = kernel[grid](*_triton_args(args), **kwargs)
        if entry is None:
            trailing = tuple(kwargs.get(p.name, p.default) for p in kernel.params[len(args):])
            entry = _compiled[key] = (kernel, compiled, trailing, compat.raw_launcher(compiled))
    else:
        direct(entry, grid, args, driver.active.get_current_stream(device))
    if record is not None:
        record.launches.append(Recorded(kernel, grid, args, kwargs, entry, device))


def direct_stream(device):
    """The current stream, where a launch recorded on `device` may take the direct route now
    (the same current device, no launch hooks set: `launch` would take it too); None where
    it must take Triton's (`launch`)."""
    if _hooks_set() or driver.active.get_current_device() != device:
        return None
    return driver.active.get_current_stream(device)


def _hooks_set():
    """Whether a launch hook of `triton.knobs.runtime` is set (profilers): launches then take
    Triton's route, which calls them."""
    hooks = triton.knobs.runtime
    return _hooked(hooks.launch_enter_hook) or _hooked(hooks.launch_exit_hook)


def direct(entry, grid, args, stream):
    """A launch of the compiled kernel of a `_compiled` entry (the direct route). Where the
    entry has Triton 3.6's C launcher (`entry[3]`), a pointer argument may be an int: the
    launcher then skips asking the driver about it."""
    _, compiled, trailing, raw = entry
    grid_y, grid_z = grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
    if raw is None:
        compiled.run(grid[0], grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *_triton_args(args), *trailing)
        return
    c_launch, leading, descriptors = raw
    final = [*args, *trailing]
    for index, expand in descriptors:  # last first: each expansion shifts what follows it
        final[index:index + 1] = expand(final[index])
    c_launch(grid[0], grid_y, grid_z, stream, compiled.function, *leading, *final)
