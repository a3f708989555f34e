"""Position interpolation (PI, HF "linear"): every frequency divided by the factor."""

from .base import RopeSchedule, _check_positive

__all__ = ["LinearScaling"]


class LinearScaling(RopeSchedule):
    """PI: inv_freq_i = base^(-2i/d) / factor (positions squeezed by `factor`).

    Args:
        rotary_dim, base, interleaved: as `DefaultRope`.
        factor: s, the context extension ratio (> 0).
    """

    def __init__(self, rotary_dim, base=10000.0, *, factor, interleaved=False):
        super().__init__(rotary_dim, base, interleaved=interleaved)
        self.factor = float(_check_positive("factor", factor))

    def _inv_freq64(self, seq_len):
        return super()._inv_freq64(seq_len) / self.factor
