"""YaRN: NTK-by-parts frequency interpolation plus an attention factor on cos/sin."""

import math

import torch

from .base import RopeSchedule, _check_positive

__all__ = ["YaRN", "yarn_get_mscale"]


def yarn_get_mscale(scale, mscale=1.0):
    """g(s, mu) = 1 if s <= 1 else 0.1 * mu * ln(s) + 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class YaRN(RopeSchedule):
    """YaRN (HF "yarn").

    corr(r) = d ln(L / (2 pi r)) / (2 ln b); lo = max(0, floor(corr(beta_fast))),
    hi = min(d - 1, ceil(corr(beta_slow))) (no floor/ceil if not `truncate`); if lo == hi,
    hi += 0.001. rho_i = clamp((i - lo) / (hi - lo), 0, 1);
    inv_freq_i = (1 - rho_i) theta_i + rho_i theta_i / s.
    Amplitude m (rotary_scale): attention_factor if given; else g(s, mscale) /
    g(s, mscale_all_dim) if both are nonzero; else g(s, 1) = 0.1 ln(s) + 1.

    Args:
        rotary_dim, base, interleaved: as `DefaultRope`.
        factor: s (> 0).
        original_max_position_embeddings: L, the pre-training context length.
        beta_fast, beta_slow: ramp bounds in rotations (32 and 1).
        mscale, mscale_all_dim, attention_factor: see above (DeepSeek-style configs).
        truncate: floor/ceil the correction range (HF default True).
    """

    def __init__(
        self,
        rotary_dim,
        base=10000.0,
        *,
        factor,
        original_max_position_embeddings,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=None,
        mscale_all_dim=None,
        attention_factor=None,
        truncate=True,
        interleaved=False,
    ):
        super().__init__(rotary_dim, base, interleaved=interleaved)
        self.factor = float(_check_positive("factor", factor))
        self.original_max_position_embeddings = int(
            _check_positive("original_max_position_embeddings", original_max_position_embeddings)
        )
        self.beta_fast = float(_check_positive("beta_fast", beta_fast))
        self.beta_slow = float(_check_positive("beta_slow", beta_slow))
        self.mscale = mscale
        self.mscale_all_dim = mscale_all_dim
        if attention_factor is not None:
            _check_positive("attention_factor", attention_factor)
        self.attention_factor = attention_factor
        self.truncate = bool(truncate)

    def correction_range(self):
        d, b, L = self.rotary_dim, self.base, self.original_max_position_embeddings

        def corr(rotations):
            return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(b))

        lo, hi = corr(self.beta_fast), corr(self.beta_slow)
        if self.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        return max(lo, 0), min(hi, d - 1)

    def _inv_freq64(self, seq_len):
        theta = super()._inv_freq64(seq_len)
        lo, hi = self.correction_range()
        if lo == hi:
            hi += 0.001
        i = torch.arange(self.rotary_dim // 2, dtype=torch.float64)
        rho = ((i - lo) / (hi - lo)).clamp(0, 1)
        return (1 - rho) * theta + rho * theta / self.factor

    def rotary_scale(self, seq_len=None):
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(self.factor, self.mscale_all_dim)
        return yarn_get_mscale(self.factor)
