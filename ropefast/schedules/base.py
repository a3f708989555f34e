"""The schedule protocol: what a context-extension method hands to the kernel.

A schedule is a small Python object with
  rotary_dim   (int, even)  how many leading features of a head are rotated;
  interleaved  (bool)       pairs (2i, 2i+1) if true, else (i, i + rotary_dim/2);
  inv_freq(seq_len=None, device=None)  -> float32 tensor [rotary_dim / 2];
  rotary_scale(seq_len=None)           -> float, the amplitude on cos/sin (logits scale by its square);
  q_temperature(q_positions)           -> float32 tensor shaped like q_positions, or None.
`seq_len` is the current sequence length (HF: max(position_ids) + 1); schedules whose
output depends on it set `depends_on_seq_len = True` so that callers compute it only then.
Nothing in the kernels knows which schedule produced its inputs.
"""

import math

import torch

__all__ = ["RopeSchedule", "default_inv_freq"]


def default_inv_freq(rotary_dim, base):
    """theta_i = base^(-2i/d), i = 0 .. d/2 - 1, in float64 (callers round once, at the end)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return 1.0 / (float(base) ** exponent)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


class RopeSchedule:
    """Base class of every schedule; on its own it is plain RoPE (`DefaultRope`).

    Args:
        rotary_dim: number of rotated features (even, >= 2).
        base: rope_theta, the base of the geometric frequency ladder.
        interleaved: GPT-J pairs (2i, 2i+1) instead of GPT-NeoX/Llama halves.
    """

    depends_on_seq_len = False

    def __init__(self, rotary_dim, base=10000.0, *, interleaved=False):
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be an even integer >= 2, got {rotary_dim!r}")
        self.rotary_dim = rotary_dim
        self.base = float(_check_positive("base", base))
        self.interleaved = bool(interleaved)

    def _inv_freq64(self, seq_len):
        """float64 [rotary_dim/2]; subclasses override this, not inv_freq."""
        return default_inv_freq(self.rotary_dim, self.base)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if not name.startswith("_"):  # a changed field changes the frequencies
            super().__setattr__("_inv_freq_cache", {})
            # counts field changes: calls that repeat an earlier call's launches key on it (`ropefast.repeat`)
            super().__setattr__("_version", getattr(self, "_version", 0) + 1)

    def cached_inv_freq(self, seq_len=None, device=None):
        """float32 [rotary_dim / 2] on `device`, cached per (seq_len, device) until a field
        is set (fields are immutable values: sequences are stored as tuples): a model asks
        once per layer and step, and each host->device copy would synchronize the stream.
        The cached tensor itself: do not modify it (`inv_freq` returns a copy)."""
        key = (seq_len, None if device is None else torch.device(device))
        cache = self._inv_freq_cache  # a plain attribute: torch.compile traces it
        if key not in cache:
            if len(cache) >= 64:  # dynamic schedules see many lengths; keep the cache small
                cache.clear()
            cache[key] = self._inv_freq64(seq_len).to(device=device, dtype=torch.float32)
        return cache[key]

    def inv_freq(self, seq_len=None, device=None):
        """float32 [rotary_dim / 2] on `device`: a fresh copy of `cached_inv_freq` (an
        on-device clone, no sync), so callers may modify it or make it require grad."""
        return self.cached_inv_freq(seq_len, device).clone()

    def rotary_scale(self, seq_len=None):
        return 1.0

    def q_temperature(self, q_positions):
        return None

    @property
    def has_q_temperature(self):
        """Whether q_temperature is overridden (the API builds query positions only then)."""
        return type(self).q_temperature is not RopeSchedule.q_temperature

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
