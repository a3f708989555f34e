"""Plain RoPE and ABF (adjusted base frequency): only the base of the frequency ladder."""

from .base import RopeSchedule

__all__ = ["DefaultRope", "ABF"]


class DefaultRope(RopeSchedule):
    """Unscaled RoPE: inv_freq_i = base^(-2i/d), amplitude 1, no temperature.

    Args:
        rotary_dim: number of rotated features d (even).
        base: rope_theta.
        interleaved: GPT-J pairs (2i, 2i+1) instead of halves (i, i + d/2).
    """


class ABF(DefaultRope):
    """Adjusted base frequency (Llama-2-Long, Code Llama, Entropy-ABF's base): plain RoPE
    with a larger base, inv_freq_i = base^(-2i/d). Default base 500000 (10k -> 500k).
    """

    def __init__(self, rotary_dim, base=500000.0, *, interleaved=False):
        super().__init__(rotary_dim, base, interleaved=interleaved)
