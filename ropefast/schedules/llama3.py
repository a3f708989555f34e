"""Llama-3.1 frequency scaling: keep high frequencies, divide low ones, blend between."""

import math

import torch

from .base import RopeSchedule, _check_positive

__all__ = ["Llama3Scaling"]


class Llama3Scaling(RopeSchedule):
    """Llama 3.1 (HF "llama3").

    wavelen_i = 2 pi / theta_i; short = L / high_freq_factor; long = L / low_freq_factor.
    wavelen < short: theta_i; wavelen > long: theta_i / s; otherwise, with
    gamma = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor),
    (1 - gamma) theta_i / s + gamma theta_i. Amplitude 1.

    Args:
        rotary_dim, base, interleaved: as `DefaultRope`.
        factor: s (Llama 3.1: 8).
        low_freq_factor, high_freq_factor: (1, 4 in Llama 3.1), low < high.
        original_max_position_embeddings: L (8192 in Llama 3.1).
    """

    def __init__(
        self,
        rotary_dim,
        base=500000.0,
        *,
        factor,
        original_max_position_embeddings,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        interleaved=False,
    ):
        super().__init__(rotary_dim, base, interleaved=interleaved)
        self.factor = float(_check_positive("factor", factor))
        self.low_freq_factor = float(_check_positive("low_freq_factor", low_freq_factor))
        self.high_freq_factor = float(_check_positive("high_freq_factor", high_freq_factor))
        if self.low_freq_factor >= self.high_freq_factor:
            raise ValueError(
                f"low_freq_factor must be < high_freq_factor, got {low_freq_factor} >= {high_freq_factor}"
            )
        self.original_max_position_embeddings = int(
            _check_positive("original_max_position_embeddings", original_max_position_embeddings)
        )

    def _inv_freq64(self, seq_len):
        theta = super()._inv_freq64(seq_len)
        L, s = self.original_max_position_embeddings, self.factor
        low, high = self.low_freq_factor, self.high_freq_factor
        wavelen = 2 * math.pi / theta
        gamma = (L / wavelen - low) / (high - low)
        blended = (1 - gamma) * theta / s + gamma * theta
        out = torch.where(wavelen > L / low, theta / s, blended)
        return torch.where(wavelen < L / high, theta, out)
