"""Which implementation runs a call, decided once, at import.

Triton reads TRITON_INTERPRET when it compiles a kernel's decorator, which happens when
ropefast imports its kernels: from then on every kernel launch is interpreted (set) or
compiled for a GPU (unset). So the path is fixed at `import ropefast`:

  "kernel"       CUDA tensors, TRITON_INTERPRET unset: the compiled Triton kernels.
  "interpreter"  TRITON_INTERPRET set, float16 / float32: the same kernels, run by Triton's
                 interpreter on the CPU (slow; for tests).
  "reference"    everything else: `ropefast.reference` in plain PyTorch (float32 math, float64
                 for float64 inputs). CPU tensors without the interpreter, float64, and
                 bfloat16 under the interpreter, whose bfloat16 arithmetic and `tl.dot` are
                 wrong (max error ~1e9 against float64; the reference is within 1e-2).

Changing TRITON_INTERPRET after the import breaks Triton's launches of kernels built the
other way (interpreted kernels assert at launch once it is unset, compiled ones look for a
GPU driver on CPU tensors once it is set): while it differs from its value at import, every
call takes the reference, and the first such call warns once.
"""

import os
import warnings

import torch

__all__ = ["INTERPRETER", "PATHS", "path"]

PATHS = ("kernel", "interpreter", "reference")


def _interpret_env():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRETER = _interpret_env()
_warned_env_change = False


def _env_changed():
    """Whether TRITON_INTERPRET differs from its value at import; warns the first time."""
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
    """The path ("kernel", "interpreter" or "reference") a call on tensors like x takes."""
    if x.dtype == torch.float64 or _env_changed():
        return "reference"
    if INTERPRETER:
        return "reference" if x.dtype == torch.bfloat16 else "interpreter"
    return "kernel" if x.is_cuda else "reference"
