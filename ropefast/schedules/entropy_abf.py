"""Entropy-ABF ("Extending LLMs' Context Window with 100 Samples", GAIR-NLP/Entropy-ABF)."""

import math

import torch

from .base import RopeSchedule, _check_positive

__all__ = ["EntropyABF"]


class EntropyABF(RopeSchedule):
    """Adjusted base frequency plus entropy-aware logit scaling.

    inv_freq_i = b^(-2i/d) with the adjusted base b (500000 in the paper, against Llama-2's
    10000; a scaling `factor` plays no part). After RoPE each query at absolute position p
    is multiplied by
        g(p) = max(1, ln(p + 1) / ln(L)),   L = the pre-training length (4096 for Llama-2),
    so queries past L get logits scaled by log_L(p + 1), which keeps the attention entropy
    from growing with the context. Keys and the softmax scale are untouched. g is served as
    `q_temperature`.

    Layers: the authors' README applies the scaling from the third layer on (layers 0 and 1
    unscaled; the released patch appears to scale every layer). Build one schedule per layer
    with `layer_idx`, or call `at_layer(i)`: a layer in `skip_layers` gets no temperature.
    With layer_idx=None (the default) every layer is scaled.

    Args:
        rotary_dim, interleaved: as `DefaultRope`.
        base: the adjusted base (default 500000).
        original_max_position_embeddings: L (default 4096).
        skip_layers: layer indices left unscaled (default (0, 1)).
        layer_idx: the layer this schedule serves, or None.
    """

    def __init__(self, rotary_dim, base=500000.0, *, original_max_position_embeddings=4096, skip_layers=(0, 1),
                 layer_idx=None, interleaved=False):
        super().__init__(rotary_dim, base, interleaved=interleaved)
        length = _check_positive("original_max_position_embeddings", original_max_position_embeddings)
        if length < 2:
            raise ValueError(f"original_max_position_embeddings must be >= 2 (ln L divides), got {length!r}")
        self.original_max_position_embeddings = int(length)
        if isinstance(skip_layers, (str, bytes)) or not all(isinstance(i, int) and i >= 0 for i in skip_layers):
            raise ValueError(f"skip_layers must be non-negative layer indices, got {skip_layers!r}")
        self.skip_layers = tuple(skip_layers)
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0):
            raise ValueError(f"layer_idx must be a non-negative int or None, got {layer_idx!r}")
        self.layer_idx = layer_idx

    def at_layer(self, layer_idx):
        """The same schedule for layer `layer_idx`."""
        return EntropyABF(self.rotary_dim, self.base,
                          original_max_position_embeddings=self.original_max_position_embeddings,
                          skip_layers=self.skip_layers, layer_idx=layer_idx, interleaved=self.interleaved)

    def q_temperature(self, q_positions):
        if self.layer_idx is not None and self.layer_idx in self.skip_layers:
            return None
        ratio = torch.log1p(q_positions.double().clamp(min=0)) / math.log(self.original_max_position_embeddings)
        return ratio.clamp(min=1.0).float()
