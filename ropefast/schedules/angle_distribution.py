"""The rotary-angle distribution method ("Extending Context Window of Large Language Models
from a Distributional Perspective", arXiv 2410.01490, code 1180301012/DPRoPE)."""

import math

import torch

from .base import RopeSchedule, _check_positive, default_inv_freq

__all__ = ["RotaryAngleDistribution", "rotary_angle_histogram", "rotary_angle_disturbance",
           "PAPER_INTERPOLATED_DIMS"]


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


# eq. 9's number of interpolated dimensions n^ in the paper's LLaMA2 runs (d = 128, L = 4096):
# 80 at 8k (s = 2) and 64 at 16k (s = 4) (Section 4.1; Table 4 sweeps 56..96 at 8k).
PAPER_INTERPOLATED_DIMS = {2.0: 80, 4.0: 64}


class RotaryAngleDistribution(RopeSchedule):
    """Per dimension, the scaling that least disturbs the rotary-angle distribution.

    With theta_i = b^(-2i/d), s = factor and L the pre-training length, each pair i scores
    each candidate lambda (extrapolation 1 and interpolation s, plus any `extra_candidates`)
    by D_i(lambda) = mean over 360 bins of KL(P_pre,i || P_lambda,i), where P_pre,i is the
    distribution of (m theta_i) mod 2 pi over m < L and P_lambda,i that of
    (m theta_i / lambda) mod 2 pi over m < s L (histograms with counts starting at eps,
    divided by the number of positions), as the released code computes it. Then, by the
    paper's eq. 9, pair i is interpolated (takes its least-disturbing candidate other than 1)
    when D_i(1) > D_i(interpolated) + t, and extrapolated (lambda_i = 1) otherwise:
      - threshold t (default 0): t = 0 is the released code's argmin (ties to extrapolation);
        t is in units of D_i as defined here (the paper's eq. 8 sums over bins: 360 times
        larger).
      - interpolated_dims n^: t set so that exactly n^ / 2 pairs (n^ counts features, two per
        pair, 0 <= n^ <= d) are interpolated: those with the largest D_i(1) - D_i(interpolated)
        (ties to the lower index). "paper" takes the paper's LLaMA2 values
        (`PAPER_INTERPOLATED_DIMS`: 80 at s = 2, 64 at s = 4; d = 128 only).
    inv_freq_i = theta_i / lambda_i; no attention scaling. No model or data is needed. The
    argmin interpolates 92 of LLaMA2's 128 features at 8k and 84 at 16k; the paper's
    experiments used n^ = 80 and 64 (its Table 3 disturbances match the argmin).

    Args:
        rotary_dim, base, interleaved: as `DefaultRope`.
        factor: s (target length = s L).
        original_max_position_embeddings: L.
        extra_candidates: more factors to consider for every dimension.
        bins, eps: histogram resolution and starting count.
        threshold: t of eq. 9 (float; default 0.0, the argmin).
        interpolated_dims: n^ (even int in [0, d], or "paper"); excludes `threshold`.

    Example:
        >>> sched = RotaryAngleDistribution(128, factor=2.0, original_max_position_embeddings=4096,
        ...                                 interpolated_dims="paper")
        >>> int((sched.scaling_factors() > 1).sum())  # 80 features = 40 pairs interpolated
        40
    """

    def __init__(self, rotary_dim, base=10000.0, *, factor, original_max_position_embeddings, extra_candidates=(),
                 bins=360, eps=1e-10, threshold=None, interpolated_dims=None, interleaved=False):
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
        if threshold is not None and interpolated_dims is not None:
            raise ValueError("give threshold or interpolated_dims, not both (n^ sets the threshold)")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.threshold = 0.0 if threshold is None and interpolated_dims is None else threshold
        self.interpolated_dims = self._check_interpolated_dims(interpolated_dims)

    def _check_interpolated_dims(self, n):
        if n is None:
            return None
        if n == "paper":
            if self.rotary_dim != 128 or self.factor not in PAPER_INTERPOLATED_DIMS:
                raise ValueError(f"interpolated_dims='paper' is defined for rotary_dim 128 and factor 2 or 4 (the "
                                 f"paper's LLaMA2 runs), got rotary_dim {self.rotary_dim}, factor {self.factor}")
            return PAPER_INTERPOLATED_DIMS[self.factor]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.rotary_dim or n % 2:
            raise ValueError(f"interpolated_dims must be an even int in [0, rotary_dim={self.rotary_dim}] or "
                             f"'paper', got {n!r}")
        return n

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if not name.startswith("_"):  # a changed field changes the chosen factors too
            super().__setattr__("_factors", None)

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
        """The chosen lambda [d/2] (computed once per setting of the fields)."""
        if self._factors is None:
            dist = self.disturbances()
            best, choice = dist[1:].min(dim=0)  # the least-disturbing interpolation (first on ties)
            gain = dist[0] - best  # what interpolating saves over extrapolating
            if self.interpolated_dims is None:
                interpolate = gain > (self.threshold or 0.0)
            else:
                order = torch.sort(-gain, stable=True).indices
                interpolate = torch.zeros_like(gain, dtype=torch.bool)
                interpolate[order[: self.interpolated_dims // 2]] = True
            lam = torch.tensor(self.candidates()[1:], dtype=torch.float64)[choice]
            self._factors = torch.where(interpolate, lam, torch.ones_like(lam))
        return self._factors

    def _inv_freq64(self, seq_len):
        return default_inv_freq(self.rotary_dim, self.base) / self.scaling_factors()
