"""The rotary-angle distribution method ("Extending Context Window of Large Language Models
from a Distributional Perspective", arXiv 2410.01490, code 1180301012/DPRoPE)."""

import math

import torch

from .base import RopeSchedule, _check_positive, default_inv_freq

__all__ = ["RotaryAngleDistribution", "rotary_angle_histogram", "rotary_angle_disturbance"]


def rotary_angle_histogram(inv_freq, length, bins=360, eps=1e-10):
    """P [d/2, bins], float64: per frequency, the share of positions m < length whose angle
    phi = (m * f) mod 2 pi falls in each of `bins` equal bins of [0, 2 pi). Counts start at
    `eps` (so no bin is empty) and are divided by `length`."""
    freqs = torch.as_tensor(inv_freq, dtype=torch.float64).cpu()
    positions = torch.arange(int(length), dtype=torch.float64)
    angles = torch.remainder(freqs[:, None] * positions[None, :], 2 * math.pi)
    index = (angles * (bins / (2 * math.pi))).long().clamp_(max=bins - 1)
    counts = torch.full((freqs.shape[0], bins), float(eps), dtype=torch.float64)
    counts.scatter_add_(1, index, torch.ones_like(angles))
    return counts / length


def rotary_angle_disturbance(inv_freq, target_length, *, original_inv_freq, original_length, bins=360, eps=1e-10):
    """Per-frequency disturbance D [d/2], float64: KL(P_pre || P_new) averaged over the bins,
    where P_pre is the angle distribution of the pre-training frequencies over positions
    m < original_length and P_new that of `inv_freq` over m < target_length.

    Compare schedules with it: `rotary_angle_disturbance(sched.inv_freq(n), n,
    original_inv_freq=DefaultRope(d, b).inv_freq(), original_length=L).mean()`."""
    pre = rotary_angle_histogram(original_inv_freq, original_length, bins, eps)
    new = rotary_angle_histogram(inv_freq, target_length, bins, eps)
    return (pre * torch.log(pre / new)).mean(dim=1)


class RotaryAngleDistribution(RopeSchedule):
    """Per dimension, the scaling that least disturbs the rotary-angle distribution.

    With theta_i = b^(-2i/d), s = factor and L the pre-training length, each pair i chooses
    lambda_i among the candidates (extrapolation 1 and interpolation s, plus any
    `extra_candidates`) minimising D_i(lambda) = mean over 360 bins of
    KL(P_pre,i || P_lambda,i), where P_pre,i is the distribution of (m theta_i) mod 2 pi over
    m < L and P_lambda,i that of (m theta_i / lambda) mod 2 pi over m < s L (histograms with
    counts starting at eps, divided by the number of positions). Ties go to extrapolation.
    inv_freq_i = theta_i / lambda_i; no attention scaling. No model or data is needed.

    Args:
        rotary_dim, base, interleaved: as `DefaultRope`.
        factor: s (target length = s L).
        original_max_position_embeddings: L.
        extra_candidates: more factors to consider for every dimension.
        bins, eps: histogram resolution and starting count.
    """

    def __init__(self, rotary_dim, base=10000.0, *, factor, original_max_position_embeddings, extra_candidates=(),
                 bins=360, eps=1e-10, interleaved=False):
        super().__init__(rotary_dim, base, interleaved=interleaved)
        self.factor = float(_check_positive("factor", factor))
        length = original_max_position_embeddings
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"original_max_position_embeddings must be a positive int, got {length!r}")
        self.original_max_position_embeddings = length
        self.extra_candidates = tuple(float(_check_positive("extra_candidates", c)) for c in extra_candidates)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins!r}")
        self.bins, self.eps = bins, float(_check_positive("eps", eps))
        self._factors = None

    def candidates(self):
        return (1.0, self.factor) + self.extra_candidates

    def disturbances(self):
        """D [len(candidates), d/2] float64: each candidate's disturbance per dimension."""
        theta = default_inv_freq(self.rotary_dim, self.base)
        target = math.ceil(self.factor * self.original_max_position_embeddings)
        return torch.stack([
            rotary_angle_disturbance(theta / lam, target, original_inv_freq=theta,
                                     original_length=self.original_max_position_embeddings, bins=self.bins,
                                     eps=self.eps)
            for lam in self.candidates()])

    def scaling_factors(self):
        """The chosen lambda [d/2] (computed once)."""
        if self._factors is None:
            choice = self.disturbances().argmin(dim=0)  # argmin keeps the first minimum: extrapolation
            self._factors = torch.tensor(self.candidates(), dtype=torch.float64)[choice]
        return self._factors

    def _inv_freq64(self, seq_len):
        return default_inv_freq(self.rotary_dim, self.base) / self.scaling_factors()
