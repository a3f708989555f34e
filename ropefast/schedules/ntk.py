"""NTK-aware base scaling, fixed and dynamic (HF "dynamic")."""

from .base import RopeSchedule, _check_positive, default_inv_freq

__all__ = ["NTKScaling", "DynamicNTKScaling"]


class NTKScaling(RopeSchedule):
    """Fixed NTK-aware scaling: the base becomes b' = b * s^(d/(d-2)), so the lowest
    frequency is divided by s and the highest is kept.

    Args:
        rotary_dim, base, interleaved: as `DefaultRope` (rotary_dim >= 4).
        factor: s (> 0).
    """

    def __init__(self, rotary_dim, base=10000.0, *, factor, interleaved=False):
        super().__init__(rotary_dim, base, interleaved=interleaved)
        if rotary_dim < 4:
            raise ValueError(f"rotary_dim must be >= 4 for NTK scaling (d/(d-2)), got {rotary_dim}")
        self.factor = float(_check_positive("factor", factor))

    def scaled_base(self, seq_len=None):
        d = self.rotary_dim
        return self.base * self.factor ** (d / (d - 2))

    def _inv_freq64(self, seq_len):
        return default_inv_freq(self.rotary_dim, self.scaled_base(seq_len))


class DynamicNTKScaling(NTKScaling):
    """Dynamic NTK (HF "dynamic"): with Lc = max(seq_len, max_position_embeddings),
    b' = b * (s * Lc / max_position_embeddings - (s - 1))^(d/(d-2)); plain RoPE up to
    max_position_embeddings. `seq_len=None` means max_position_embeddings (HF at init).

    Args:
        rotary_dim, base, interleaved, factor: as `NTKScaling`.
        max_position_embeddings: the config's max_position_embeddings (HF uses it, not the
            original pre-training length).
    """

    depends_on_seq_len = True

    def __init__(self, rotary_dim, base=10000.0, *, factor, max_position_embeddings, interleaved=False):
        super().__init__(rotary_dim, base, factor=factor, interleaved=interleaved)
        self.max_position_embeddings = int(_check_positive("max_position_embeddings", max_position_embeddings))

    def scaled_base(self, seq_len=None):
        d, s, lmax = self.rotary_dim, self.factor, self.max_position_embeddings
        lc = lmax if seq_len is None else max(int(seq_len), lmax)
        return self.base * (s * lc / lmax - (s - 1)) ** (d / (d - 2))
