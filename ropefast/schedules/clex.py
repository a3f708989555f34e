"""CLEX (Continuous Length EXtrapolation, arXiv 2310.16450, DAMO-NLP-SG/CLEX)."""

import math
import warnings

import torch
from torch import nn

from .base import RopeSchedule

__all__ = ["CLEX"]

_ACTIVATIONS = {"tanh": torch.tanh, "silu": nn.functional.silu}


class CLEX(nn.Module, RopeSchedule):
    """Frequencies as the solution of a learned ODE over the length scaling factor t.

    State z(t) = log inv_freq(t) in R^(d/2), z(1) = log theta (theta_i = b^(-2i/d)), and
        dz/dt = W_down act(W_up^T (z + log xi_t)) + d/dt log xi_t,
    where xi_t is the NTK frequency with alpha = max(1, 2t - 1):
        log xi_{t,i} = log theta_i - (2i/(d-2)) log alpha,
        d/dt log xi_{t,i} = -(2i/(d-2)) * 2/alpha  (t >= 1; the solve starts at t = 1).
    W_up is (d/2) x (param_factor * d), Kaiming-initialised; W_down is zero-initialised, so
    an untrained CLEX is NTK with alpha = 2t - 1. No biases. inv_freq(t) = exp(z(t)).

    Solver: fixed-step RK4 as torchdiffeq's `rk4` does it (the released code's method, step
    `time_dt` = 0.01): Kutta's 3/8 rule, k1 = f(t, z), k2 = f(t + h/3, z + h k1/3),
    k3 = f(t + 2h/3, z + h (k2 - k1/3)), k4 = f(t + h, z + h (k1 - k2 + k3)),
    z += h (k1 + 3 k2 + 3 k3 + k4) / 8, on the grid 1, 1 + h, 1 + 2h, ... whose last point
    is clamped to t (a shorter last step when h does not divide t - 1). It is written out
    here so the GPU image needs no extra package; autograd through the steps gives the exact
    gradient of the discrete solution, which is what the released training differentiates.

    Use: one module shared by all layers, trained with the model (its parameters get
    gradients through `scaled_rope_attention`'s inv_freq gradient).
      - training (`.train()`): call `sample_t()` once per step: t is drawn uniformly from
        the integers {1, ..., max_factor}; then `freqs = clex.inv_freq()` once (one ODE
        solve per step) and `scaled_rope_attention(..., inv_freq=freqs)` in every layer.
        `training_positions(n)` gives the step's positions: 0, L t - 1, and n - 2 sorted
        distinct integers drawn from [1, L t - 2] between them (the released code's
        positions for train_len = L; it divides by r = train_len // L when longer, which
        needs fractional positions the integer-position kernel does not take).
      - inference (`.eval()`, under no_grad): t = ceil(n / L) clamped to [1, max_factor]
        from the current length n; pass the module as `schedule=`; the solution per integer
        t is cached until a parameter changes.
    Keys must be cached unrotated at decode time (ropefast rotates them in the kernel), so a
    change of t re-rotates all of them exactly. rotary_scale is 1, no temperature.

    Args:
        rotary_dim, base, interleaved: as `DefaultRope`.
        original_max_position_embeddings: L, the training length.
        max_factor: the largest t (16).
        param_factor: width of W_up in units of d (1).
        act: "tanh" or "silu".
        time_dt: the RK4 step (0.01).
    """

    depends_on_seq_len = True

    def __init__(self, rotary_dim, base=10000.0, *, original_max_position_embeddings, max_factor=16, param_factor=1,
                 act="tanh", time_dt=0.01, interleaved=False):
        nn.Module.__init__(self)
        RopeSchedule.__init__(self, rotary_dim, base, interleaved=interleaved)
        for name, value in (("original_max_position_embeddings", original_max_position_embeddings),
                            ("max_factor", max_factor), ("param_factor", param_factor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if act not in _ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        if isinstance(time_dt, bool) or not isinstance(time_dt, (int, float)) or not 0 < time_dt <= 1:
            raise ValueError(f"time_dt must be in (0, 1], got {time_dt!r}")
        if rotary_dim < 4:
            raise ValueError(f"CLEX needs rotary_dim >= 4 (the NTK exponent divides by d - 2), got {rotary_dim}")
        self.original_max_position_embeddings = original_max_position_embeddings
        self.max_factor, self.param_factor, self.act, self.time_dt = max_factor, param_factor, act, float(time_dt)
        half = rotary_dim // 2
        self.w_up = nn.Parameter(torch.empty(half, param_factor * rotary_dim))
        nn.init.kaiming_uniform_(self.w_up, a=math.sqrt(5))
        self.w_down = nn.Parameter(torch.zeros(half, param_factor * rotary_dim))
        self.t = None
        self._solutions = {}
        self._warned_no_t = False

    def _log_theta(self, device):
        return torch.log(super()._inv_freq64(None)).to(device=device, dtype=self.w_up.dtype)

    def _ntk_exponent(self, device):
        return 2 * torch.arange(self.rotary_dim // 2, device=device, dtype=self.w_up.dtype) / (self.rotary_dim - 2)

    def derivative(self, t, z, log_theta, exponent):
        """dz/dt at time t (a float) and state z [d/2]."""
        alpha = max(1.0, 2 * t - 1)
        log_xi = log_theta - exponent * math.log(alpha)
        dlog_xi = -exponent * (2 / alpha) if t >= 1 else torch.zeros_like(exponent)
        hidden = _ACTIVATIONS[self.act]((z + log_xi) @ self.w_up)
        return hidden @ self.w_down.T + dlog_xi

    def solve(self, t, device=None):
        """z(t) = log inv_freq(t), by torchdiffeq's fixed-grid RK4 (the 3/8 rule) from
        z(1) = log theta with step time_dt (float32 state, float64 times)."""
        if not 1 <= t <= self.max_factor:
            raise ValueError(f"t must be in [1, max_factor={self.max_factor}], got {t!r}")
        device = self.w_up.device if device is None else device
        log_theta, exponent = self._log_theta(device), self._ntk_exponent(device)
        z = log_theta
        steps = math.ceil((t - 1) / self.time_dt - 1e-9)  # the grid 1 + k h, its last point clamped to t
        times = [1 + k * self.time_dt for k in range(steps)] + [float(t)]
        for t0, t1 in zip(times, times[1:]):
            h = t1 - t0
            k1 = self.derivative(t0, z, log_theta, exponent)
            k2 = self.derivative(t0 + h / 3, z + h / 3 * k1, log_theta, exponent)
            k3 = self.derivative(t0 + 2 * h / 3, z + h * (k2 - k1 / 3), log_theta, exponent)
            k4 = self.derivative(t1, z + h * (k1 - k2 + k3), log_theta, exponent)
            z = z + h / 8 * (k1 + 3 * (k2 + k3) + k4)
        return z

    def sample_t(self, generator=None):
        """Training: draw this step's t uniformly from {1, ..., max_factor}; returns it."""
        self.t = int(torch.randint(1, self.max_factor + 1, (1,), generator=generator))
        self._solutions.clear()
        return self.t

    def training_positions(self, n, generator=None):
        """n sorted distinct integer positions for this step's t: 0 and L t - 1 always (as the
        released code pins them), and n - 2 drawn uniformly without replacement from
        [1, L t - 2].

        Example:
            >>> clex = CLEX(16, original_max_position_embeddings=8, max_factor=4).train()
            >>> clex.t = 3
            >>> pos = clex.training_positions(5)
            >>> pos[0].item(), pos[-1].item(), pos.shape
            (0, 23, torch.Size([5]))
        """
        span = self.original_max_position_embeddings * (self.t or 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= span:
            raise ValueError(f"n must be an int in [2, L * t = {span}] (0 and L t - 1 are always drawn), got {n!r}")
        middle = torch.randperm(span - 2, generator=generator)[: n - 2].sort().values + 1
        return torch.cat([torch.zeros(1, dtype=middle.dtype), middle, torch.full((1,), span - 1, dtype=middle.dtype)])

    def scaling_t(self, seq_len):
        """The t used for sequence length seq_len: the sampled t while training, else
        ceil(seq_len / L) clamped to [1, max_factor]."""
        if self.training and self.t is not None:
            return self.t
        if seq_len is None:
            return 1
        return min(self.max_factor, max(1, math.ceil(seq_len / self.original_max_position_embeddings)))

    def inv_freq(self, seq_len=None, device=None):
        """exp(z(t)) float32 [d/2] at t = scaling_t(seq_len). With autograd on, every call
        solves anew (a result carrying a graph cannot be reused across backward passes):
        in training, call it once per step and pass the result as `inv_freq=` to every
        layer's `scaled_rope_attention`. Under no_grad the solution per t is cached until a
        parameter changes."""
        t = self.scaling_t(seq_len)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            if self.training and self.t is None and not self._warned_no_t:
                self._warned_no_t = True  # once per module: a training loop calls this every step
                warnings.warn(f"CLEX is training but sample_t() was never called: t = {t} comes from the length, "
                              "so the ODE is solved over a fixed span (none at t = 1) and the scale it is trained on "
                              "never varies. Call clex.sample_t() once per training step.", UserWarning, stacklevel=2)
            return torch.exp(self.solve(t, device)).float()
        key = (t, str(device), tuple(p._version for p in self.parameters()))
        if key not in self._solutions:
            if len(self._solutions) > 2 * self.max_factor:
                self._solutions.clear()
            self._solutions[key] = torch.exp(self.solve(t, device)).float()
        return self._solutions[key]

    def cached_inv_freq(self, seq_len=None, device=None):
        """`inv_freq` itself: it caches its solutions already (and must not under autograd)."""
        return self.inv_freq(seq_len, device)

    def __repr__(self):
        return (f"CLEX(rotary_dim={self.rotary_dim}, base={self.base}, original_max_position_embeddings="
                f"{self.original_max_position_embeddings}, max_factor={self.max_factor}, act={self.act!r}, "
                f"time_dt={self.time_dt})")
