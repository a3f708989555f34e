"""LongRoPE (Phi-3 "longrope", legacy "su"): searched per-dimension factors, short and long."""

import math

import torch

from .base import RopeSchedule, _check_positive, default_inv_freq

__all__ = ["LongRoPE"]


class LongRoPE(RopeSchedule):
    """LongRoPE: inv_freq_i = 1 / (f_i * base^(2i/d)) with f = long_factor when
    seq_len > L (original_max_position_embeddings), else short_factor (also for
    seq_len=None). Amplitude m: attention_factor if given; else with
    s = factor (default max_position_embeddings / L): 1 if s <= 1 else
    sqrt(1 + ln(s) / ln(L)), in both regimes.

    Args:
        rotary_dim, base, interleaved: as `DefaultRope`.
        short_factor, long_factor: sequences of rotary_dim/2 positive numbers.
        original_max_position_embeddings: L.
        max_position_embeddings: the extended length (used for the default factor).
        factor, attention_factor: optional overrides.
    """

    depends_on_seq_len = True

    def __init__(
        self,
        rotary_dim,
        base=10000.0,
        *,
        short_factor,
        long_factor,
        original_max_position_embeddings,
        max_position_embeddings=None,
        factor=None,
        attention_factor=None,
        interleaved=False,
    ):
        super().__init__(rotary_dim, base, interleaved=interleaved)
        self.short_factor = self._check_factors("short_factor", short_factor)
        self.long_factor = self._check_factors("long_factor", long_factor)
        self.original_max_position_embeddings = int(
            _check_positive("original_max_position_embeddings", original_max_position_embeddings)
        )
        if factor is None:
            if max_position_embeddings is None:
                raise ValueError("LongRoPE needs factor or max_position_embeddings")
            factor = _check_positive("max_position_embeddings", max_position_embeddings) / (
                self.original_max_position_embeddings
            )
        self.factor = float(_check_positive("factor", factor))
        if attention_factor is not None:
            _check_positive("attention_factor", attention_factor)
        self.attention_factor = attention_factor

    def _check_factors(self, name, values):
        values = tuple(float(x) for x in values)  # immutable: the frequencies are cached until a field is set
        if len(values) != self.rotary_dim // 2:
            raise ValueError(f"{name} must have rotary_dim/2 = {self.rotary_dim // 2} entries, got {len(values)}")
        for x in values:
            _check_positive(name + " entries", x)
        return values

    def _inv_freq64(self, seq_len):
        long = seq_len is not None and seq_len > self.original_max_position_embeddings
        factors = torch.tensor(self.long_factor if long else self.short_factor, dtype=torch.float64)
        return default_inv_freq(self.rotary_dim, self.base) / factors

    def rotary_scale(self, seq_len=None):
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))
