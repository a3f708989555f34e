"""DCIS (arXiv 2412.18811, YL-9/dcis): searched per-dimension scaling factors."""

import math

import torch

from .base import RopeSchedule, _check_positive
from .yarn import YaRN, yarn_get_mscale

__all__ = ["DCIS", "dcis_initial_factors"]


def dcis_initial_factors(rotary_dim, base, factor, original_max_position_embeddings, init="yarn"):
    """The search's starting factors lambda [d/2], float64.

    "yarn": lambda_i = s / ((1 - E_i) + s E_i), E_i = 1 - rho_i with YaRN's ramp rho (the
    same frequencies as YaRN); "ntk": lambda_i = s^(2i / (d - 2)); "pi": lambda_i = s.
    """
    half = rotary_dim // 2
    if init == "yarn":
        yarn = YaRN(rotary_dim, base, factor=factor, original_max_position_embeddings=original_max_position_embeddings)
        lo, hi = yarn.correction_range()
        if lo == hi:
            hi += 0.001
        rho = ((torch.arange(half, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - rho
        return factor / ((1 - keep) + factor * keep)
    if init == "ntk":
        return factor ** (2 * torch.arange(half, dtype=torch.float64) / (rotary_dim - 2))
    if init == "pi":
        return torch.full((half,), float(factor), dtype=torch.float64)
    raise ValueError(f"init must be 'yarn', 'ntk' or 'pi', got {init!r}")


class DCIS(RopeSchedule):
    """Per-dimension scaling factors, as found by `ropefast.search.dcis`.

    inv_freq_i = theta_i / lambda_i with theta_i = b^(-2i/d), and cos/sin times
    m = 0.1 ln(s) + 1 (s > 1; else 1) at every length. The factors need not increase with i
    and may fall below 1 (DCIS's "non-strictly increasing" factors); each must be > 0.

    Args:
        rotary_dim, base, interleaved: as `DefaultRope`.
        factor: s, the target length over the pre-training length.
        scaling_factors: lambda, d/2 positive numbers; default: the YaRN-equivalent start
            (`dcis_initial_factors(..., init="yarn")`).
        original_max_position_embeddings: L (needed for the default factors).
        attention_factor: m instead of 0.1 ln(s) + 1.
    """

    def __init__(self, rotary_dim, base=10000.0, *, factor, scaling_factors=None,
                 original_max_position_embeddings=None, attention_factor=None, interleaved=False):
        super().__init__(rotary_dim, base, interleaved=interleaved)
        self.factor = float(_check_positive("factor", factor))
        if scaling_factors is None:
            if original_max_position_embeddings is None:
                raise ValueError("give scaling_factors, or original_max_position_embeddings for the YaRN start")
            scaling_factors = dcis_initial_factors(rotary_dim, base, self.factor,
                                                   int(original_max_position_embeddings))
        factors = [float(x) for x in (scaling_factors.tolist() if torch.is_tensor(scaling_factors)
                                      else scaling_factors)]
        if len(factors) != rotary_dim // 2:
            raise ValueError(f"scaling_factors must have rotary_dim/2 = {rotary_dim // 2} entries, got {len(factors)}")
        if not all(math.isfinite(x) and x > 0 for x in factors):
            raise ValueError("scaling_factors must be positive and finite")
        self.scaling_factors = tuple(factors)  # immutable: the frequencies are cached until a field is set
        self.original_max_position_embeddings = original_max_position_embeddings
        if attention_factor is not None:
            _check_positive("attention_factor", attention_factor)
        self.attention_factor = attention_factor

    def _inv_freq64(self, seq_len):
        return super()._inv_freq64(seq_len) / torch.tensor(self.scaling_factors, dtype=torch.float64)

    def rotary_scale(self, seq_len=None):
        return float(self.attention_factor) if self.attention_factor is not None else yarn_get_mscale(self.factor)

    def with_factors(self, scaling_factors):
        """The same schedule with other factors (what the search evaluates)."""
        return DCIS(self.rotary_dim, self.base, factor=self.factor, scaling_factors=scaling_factors,
                    original_max_position_embeddings=self.original_max_position_embeddings,
                    attention_factor=self.attention_factor, interleaved=self.interleaved)
