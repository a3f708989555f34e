"""Which implementation runs a call, decided once, at import.

Triton reads TRITON_INTERPRET when it compiles a kernel's decorator, which happens when
ropefast imports its kernels: from then on every kernel launch is interpreted (set) or
compiled for a GPU (unset). So the path is fixed at `import ropefast`:

  "hopper"       CUDA float16 / bfloat16 on a Hopper GPU (sm_90) with a Triton whose Gluon
                 has what the kernels need (`kernels.hopper.compat`): the warp-specialized
                 Gluon forward and, at head dims 64, 128 and 256, the Gluon backward
                 (`deterministic=True` keeps the portable backward kernels). Below head dim
                 128 the portable forward runs where it is as fast or the Gluon one is
                 unmeasured (`forward_path`: head dims under 64, and at 64 slot-order
                 tiles); `backward_path` says
                 which backward runs. Packed documents (varlen) too: the Gluon kernels take
                 document bounds.
  "kernel"       other CUDA tensors, TRITON_INTERPRET unset: the portable `tl.*` kernels.
  "interpreter"  TRITON_INTERPRET set, float16 / float32: the same kernels, run by Triton's
                 interpreter on the CPU (slow; for tests).
  "reference"    everything else: `ropefast.reference` in plain PyTorch (float32 math, float64
                 for float64 inputs). CPU tensors without the interpreter, float64, and
                 bfloat16 under the interpreter, whose bfloat16 arithmetic and `tl.dot` are
                 wrong (max error ~1e9 against float64; the reference is within 1e-2); all
                 of it under Triton < 3.7, whose interpreter cannot run the kernels (loop
                 bounds read from program ids fail there).

Decode over a KV cache (`scaled_rope_attention_with_kvcache`) has one kernel family
(kernels/decode.py, plain pointer loads, any GPU): "hopper" and "kernel" both run it.

Changing TRITON_INTERPRET after the import breaks Triton's launches of kernels built the
other way (interpreted kernels assert at launch once it is unset, compiled ones look for a
GPU driver on CPU tensors once it is set): while it differs from its value at import, every
call takes the reference, and the first such call warns once.
"""

import contextlib
import os
import warnings

import torch

from .kernels import device
from .kernels.hopper import compat as hopper_compat

__all__ = ["INTERPRETER", "PATHS", "backward_path", "env_changed", "forward_path", "path", "portable_kernels",
           "portable_only"]

PATHS = ("hopper", "kernel", "interpreter", "reference")
# At this head dim a step's softmax costs as much as its two matmuls: the Gluon forward runs
# three consumer warpgroups (192-query items) where items are long (non-causal calls: 1.02-1.15x
# the portable forward on H100; causal ones from 8k queries: 1.01-1.13x; at 3k-6k on persistent
# pair units, 1.02-1.05x one program per tile, which was level with the portable forward at 4k), and
# two on pair units on causal calls up to 2k queries (1k: 1.04-1.07x, 2k: 1.02x;
# `kernels.hopper.attention_fwd.fwd_config`, bench/RESULTS.md, 2026-11-27), and causal packed
# documents since their programs are persistent (the kernel 1.007-1.05x the portable one in five
# processes on the bench's documents, the op's forward 1.002-1.008x; H100, 2026-11-27). Tiles in
# the slot order (`kernels.rope.slot_order`) and smaller head dims run portable.
HOPPER_SMALL_HEAD_DIM = 64
# The head dims of the Gluon backward (kernels/hopper/attention_bwd.py): its Q^ and K^ tiles
# are head_dim wide; at D = 256 its warpgroups split the features of 64 keys.
HOPPER_BACKWARD_HEAD_DIMS = (64, 128, 256)


def _interpret_env():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRETER = _interpret_env()
INTERPRETER_MIN_TRITON = (3, 7)
_interpreter_runs = INTERPRETER and hopper_compat.triton_version() >= INTERPRETER_MIN_TRITON
if INTERPRETER and not _interpreter_runs:
    warnings.warn(f"TRITON_INTERPRET is set, but the interpreter of Triton {hopper_compat.triton_version()} cannot run "
                  f"ropefast's kernels (it needs {INTERPRETER_MIN_TRITON} or newer): ropefast runs its PyTorch "
                  "reference instead.", RuntimeWarning, stacklevel=2)
_warned_env_change = False
_portable_only = False


def env_changed():
    """Whether TRITON_INTERPRET differs from its value at import; warns the first time (calls
    then run the reference, and none repeats a recorded launch: `ropefast.repeat`)."""
    global _warned_env_change
    if _interpret_env() == INTERPRETER:
        return False
    if not _warned_env_change:
        _warned_env_change = True
        now, then = ("set", "unset") if not INTERPRETER else ("unset", "set")
        warnings.warn(f"TRITON_INTERPRET is {now} now but was {then} when ropefast was imported, and Triton cannot "
                      "launch kernels built the other way: ropefast runs its PyTorch reference (correct, slow) "
                      "while the two differ. Set TRITON_INTERPRET before the first `import ropefast` (or triton).",
                      RuntimeWarning, stacklevel=4)
    return True


def path(x: torch.Tensor) -> str:
    """The path ("hopper", "kernel", "interpreter" or "reference") a call on tensors like x
    takes, on packed documents (`scaled_rope_attention_varlen`) too."""
    if x.dtype == torch.float64 or env_changed():
        return "reference"
    if INTERPRETER:
        return "interpreter" if _interpreter_runs and x.dtype != torch.bfloat16 else "reference"
    if not x.is_cuda:
        return "reference"
    if _gluon_serves(x):
        return "hopper"
    return "kernel"


def forward_path(q: torch.Tensor, slot_order: bool = False) -> str:
    """The path of the attention forward on q [B, Nq, Hq, D] or packed documents' [1, N, Hq, D]
    (`slot_order`: the kernels' tiles are in `kernels.rope.slot_order`): `path(q)`, with
    "kernel" for "hopper" below head dim 64, and at 64 in the slot order, where the portable
    forward is as fast or the Gluon one unmeasured.

        >>> dispatch.forward_path(torch.empty(1, 4096, 8, 64, device="cuda", dtype=torch.bfloat16))
        'hopper'   # on an H100 / H200 ('kernel' with slot_order=True)
    """
    kind = path(q)
    head_dim = q.shape[-1]
    if kind == "hopper" and (head_dim < HOPPER_SMALL_HEAD_DIM or head_dim == HOPPER_SMALL_HEAD_DIM and slot_order):
        return "kernel"
    return kind


def backward_path(x: torch.Tensor, deterministic: bool = False) -> str:
    """The path of the backward of a call on tensors like x: "hopper" where the Gluon backward
    serves (its head dims, HOPPER_BACKWARD_HEAD_DIMS, D = 64 included, where it beats the
    portable kernels on H200, also where the portable forward runs; bench/RESULTS.md), and
    not for `deterministic` calls; otherwise the forward's path, with "kernel" for "hopper".

        >>> dispatch.backward_path(torch.empty(1, 8, 4, 64, device="cuda", dtype=torch.bfloat16))
        'hopper'   # on an H100 / H200
    """
    kind = path(x)
    if kind not in ("hopper", "kernel"):  # the interpreter or the reference: the forward's
        return kind
    if not deterministic and x.shape[-1] in HOPPER_BACKWARD_HEAD_DIMS and _gluon_serves(x):
        return "hopper"
    return "kernel"


def _gluon_serves(x):
    return (not _portable_only and x.dtype in (torch.float16, torch.bfloat16)
            and hopper_compat.SUPPORTED and device.capability(x.device) == (9, 0))


def portable_only():
    """Whether `portable_kernels` is in force (calls that repeat an earlier call's launches
    key on it, `ropefast.repeat`)."""
    return _portable_only


@contextlib.contextmanager
def portable_kernels():
    """Within this block, CUDA calls run the portable `tl.*` kernels even where the Hopper
    path would (tests and benchmarks compare the two). Not thread-safe: it sets a flag."""
    global _portable_only
    before, _portable_only = _portable_only, True
    try:
        yield
    finally:
        _portable_only = before
