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

    Solver: classic RK4 with the fixed step `time_dt` (0.01), the method and step of the
    released code (which calls torchdiffeq's fixed-step rk4). It is written out here so the
    GPU image needs no extra package; autograd through the steps gives the exact gradient
    of the discrete solution, which is what the released training differentiates too.

    Use: one module shared by all layers, trained with the model (its parameters get
    gradients through `scaled_rope_attention`'s inv_freq gradient).
      - training (`.train()`): call `sample_t()` once per step: t is drawn uniformly from
        the integers {1, ..., max_factor}; then `freqs = clex.inv_freq()` once (one ODE
        solve per step) and `scaled_rope_attention(..., inv_freq=freqs)` in every layer. `training_positions(n)` gives the step's key
        positions: n sorted distinct integers spanning [0, L t) (the released code's
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
        """z(t) = log inv_freq(t), by RK4 from z(1) = log theta with step time_dt (float32)."""
        if not 1 <= t <= self.max_factor:
            raise ValueError(f"t must be in [1, max_factor={self.max_factor}], got {t!r}")
        device = self.w_up.device if device is None else device
        log_theta, exponent = self._log_theta(device), self._ntk_exponent(device)
        z, time = log_theta, 1.0
        steps = round((t - 1) / self.time_dt)
        for _ in range(steps):
            h = self.time_dt
            k1 = self.derivative(time, z, log_theta, exponent)
            k2 = self.derivative(time + h / 2, z + h / 2 * k1, log_theta, exponent)
            k3 = self.derivative(time + h / 2, z + h / 2 * k2, log_theta, exponent)
            k4 = self.derivative(time + h, z + h * k3, log_theta, exponent)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            time += h
        return z

    def sample_t(self, generator=None):
        """Training: draw this step's t uniformly from {1, ..., max_factor}; returns it."""
        self.t = int(torch.randint(1, self.max_factor + 1, (1,), generator=generator))
        self._solutions.clear()
        return self.t

    def training_positions(self, n, generator=None):
        """n sorted distinct integer positions spanning [0, L t) for this step's t."""
        span = self.original_max_position_embeddings * (self.t or 1)
        if n > span:
            raise ValueError(f"cannot draw {n} distinct positions below L * t = {span}")
        return torch.randperm(span, generator=generator)[:n].sort().values

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
