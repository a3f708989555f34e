"""The Triton-version differences of the Gluon API that the Hopper kernels use, in one place.

Gluon (`triton.experimental.gluon`) is experimental and moves between releases:
- async `warpgroup_mma(..., is_async=True)` and `warpgroup_mma_wait(n, deps=...)` arrive in
  3.5; `gl.warp_specialize` takes a list of (function, args) pairs from 3.6 on (3.4 and 3.5
  had other signatures). The kernels here need 3.6 or newer (`MIN_TRITON`).
- The TMA copies are `tma.async_copy_global_to_shared` / `async_copy_shared_to_global` up to
  3.7, `tma.async_load` / `async_store` from 3.8 (the old names are gone in 3.9); likewise the
  per-thread asynchronous copy (cp.async) `async_copy.async_copy_global_to_shared`, `async_load`
  in 3.9 (`cp_async_load` here).
- The barrier of a warpgroup's threads is `gl.thread_barrier` up to 3.8, `gl.barrier` in 3.9.
- The TMA reduce-add (`cp.reduce.async.bulk.tensor`) is `tma.async_atomic_add` from 3.8; 3.6
  and 3.7 build the same operation, without a Python wrapper: `tma_atomic_add` adds one.
- A shared-memory buffer read as another dtype and shape is the method `_reinterpret` in 3.6,
  `reinterpret` in 3.9: `reinterpret` here builds the operation under both.
- Launching (all kernels, not only Gluon's): `raw_launcher` takes Triton 3.6's CUDA launcher
  apart for `kernels.launch`; other versions launch through `CompiledKernel.run`.
"""

import torch
import triton

MIN_TRITON = (3, 6)


def triton_version():
    return tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2])


SUPPORTED = triton_version() >= MIN_TRITON

if SUPPORTED:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import builtin
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import tma

    thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    cp_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

    @builtin
    def reinterpret(smem, dtype, shape, layout, _semantic=None):
        """The shared-memory buffer smem read as a `dtype` tensor of `shape` in `layout`."""
        return _semantic.memdesc_reinterpret(smem, gl._unwrap_if_constexpr(dtype),
                                             [gl._unwrap_if_constexpr(n) for n in shape],
                                             gl._unwrap_if_constexpr(layout))

    if hasattr(tma, "async_atomic_add"):
        tma_atomic_add = tma.async_atomic_add
    else:
        from triton._C.libtriton import ir

        @builtin
        def tma_atomic_add(tensor_desc, coord, src, _semantic=None):
            """Add the shared-memory tile src into the tensor at coord (TMA reduce-add)."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)


def raw_launcher(compiled):
    """Triton 3.6's launcher of a compiled CUDA kernel, taken apart so that `launch` can call
    its C function: (C launch, its arguments between the function handle and the kernel's,
    ((argument index, expansion of that host TMA descriptor), ...) last first); None for
    other versions, for kernels that need scratch memory, and on ROCm (a kernel compiled
    here ran on a GPU, so the only other backend; its launcher is built otherwise). The
    launcher's `launch` is the C function itself, or, when the kernel takes host
    descriptors, Triton's wrapper (`wrap_handle_tensordesc`) that expands each into a
    CUtensorMap, its shape and strides in a loop over every argument: the expansion is its
    `make_tensordesc_arg`."""
    if triton_version() != (3, 6) or torch.version.hip is not None:
        return None
    from triton.backends.nvidia.driver import make_tensordesc_arg

    run = compiled.run
    if run.global_scratch_size or run.profile_scratch_size:
        return None
    c_launch, descriptors = run.launch, ()
    if getattr(c_launch, "__closure__", None):  # the wrapper: its cells hold the C function and the metadata
        cells = dict(zip(c_launch.__code__.co_freevars, (cell.cell_contents for cell in c_launch.__closure__)))
        c_launch = cells["launcher"]
        metas = cells["tensordesc_meta"] or [None] * len(cells["tensordesc_indices"])
        descriptors = tuple((index, _expansion(make_tensordesc_arg, meta) if meta is not None
                             else lambda arg: make_tensordesc_arg(arg, None))
                            for index, meta in reversed(list(zip(sorted(cells["tensordesc_indices"]), metas))))
    # cooperative grid, PDL, global and profile scratch, the kernel's metadata, launch
    # metadata and the enter / exit hooks (none: `launch` takes the full route under hooks)
    leading = (run.launch_cooperative_grid, run.launch_pdl, None, None, compiled.packed_metadata, None, None, None)
    return c_launch, leading, descriptors


def _expansion(make_tensordesc_arg, meta):
    """Triton's expansion of a host descriptor into a CUtensorMap, its shape and strides, kept
    for the last few (address, shape, strides, padding): the caching allocator hands a call's
    buffers back at the same addresses, and the CUtensorMap is passed by value. (Without TMA
    metadata the expansion holds the tensor itself: not kept, `raw_launcher`.)"""
    expansions = {}

    def expand(arg):
        key = (arg.base.data_ptr(), *arg.shape, *arg.strides, arg.padding)
        expanded = expansions.get(key)
        if expanded is None:
            if len(expansions) >= 16:
                expansions.clear()
            expanded = expansions[key] = make_tensordesc_arg(arg, meta)
        return expanded
    return expand
