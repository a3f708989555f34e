"""Build a schedule from a HuggingFace config (transformers v4 `rope_scaling` or v5 `rope_parameters`)."""

from .clex import CLEX
from .default import DefaultRope
from .linear import LinearScaling
from .llama3 import Llama3Scaling
from .longrope import LongRoPE
from .ntk import DynamicNTKScaling
from .yarn import YaRN

__all__ = ["from_hf_config"]

_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "clex")


def _get(config, key, default=None):
    if isinstance(config, dict):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def from_hf_config(config, *, head_dim=None, interleaved=False):
    """Return the schedule a HuggingFace model config describes.

    `config` is a `transformers.PretrainedConfig`, its `to_dict()`, or a bare
    `rope_scaling` / `rope_parameters` dict (then pass `head_dim`, and put rope_theta,
    max_position_embeddings and original_max_position_embeddings in the dict where the
    type needs them). Honours `partial_rotary_factor` (rotary_dim = int(head_dim * factor)),
    the legacy key `type`, and Phi-3's alias "su" for "longrope". Supported rope types:
    default, linear, dynamic, yarn, llama3, longrope, and CLEX's "clex" (max_factor,
    param_factor, act, time_dt; the module comes back untrained: load its weights from the
    checkpoint); others raise ValueError.
    HF's rotate_half layout is the default; pass interleaved=True for GPT-J-style models.
    """
    if not isinstance(config, dict) and not hasattr(config, "to_dict"):
        raise TypeError(f"config must be a transformers config or a dict, got {type(config).__name__}")
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling")
    if params is None and isinstance(config, dict) and ("rope_type" in config or "type" in config):
        params = config  # a bare rope dict
    params = dict(params or {})

    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = {"su": "longrope"}.get(rope_type, rope_type)
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")

    if head_dim is None:
        head_dim = _get(config, "head_dim")
    if head_dim is None and _get(config, "hidden_size") and _get(config, "num_attention_heads"):
        head_dim = _get(config, "hidden_size") // _get(config, "num_attention_heads")
    if head_dim is None:
        raise ValueError("cannot tell the head dimension: the config has neither head_dim nor "
                         "hidden_size/num_attention_heads; pass head_dim=")
    partial = float(params.get("partial_rotary_factor") or _get(config, "partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    base = float(params.get("rope_theta") or _get(config, "rope_theta", 10000.0))
    max_pos = params.get("max_position_embeddings") or _get(config, "max_position_embeddings")
    # Phi-3 keeps the pre-training length next to the rope dict, and HF prefers that copy.
    original = (_get(config, "original_max_position_embeddings")
                or params.get("original_max_position_embeddings") or max_pos)
    common = dict(interleaved=interleaved)

    def need(value, key):
        if value is None:
            raise ValueError(f"rope type {rope_type!r} needs {key} in the config")
        return value

    if rope_type == "default":
        return DefaultRope(rotary_dim, base, **common)
    if rope_type == "linear":
        return LinearScaling(rotary_dim, base, factor=need(params.get("factor"), "factor"), **common)
    if rope_type == "dynamic":
        return DynamicNTKScaling(rotary_dim, base, factor=need(params.get("factor"), "factor"),
                                 max_position_embeddings=need(max_pos, "max_position_embeddings"), **common)
    if rope_type == "yarn":
        factor = params.get("factor")
        if factor is None:  # DeepSeek-V3 style: the ratio of the two lengths
            factor = need(max_pos, "max_position_embeddings") / need(original, "original_max_position_embeddings")
        return YaRN(rotary_dim, base, factor=factor,
                    original_max_position_embeddings=need(original, "original_max_position_embeddings"),
                    beta_fast=params.get("beta_fast") or 32, beta_slow=params.get("beta_slow") or 1,
                    mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                    attention_factor=params.get("attention_factor"), truncate=params.get("truncate", True),
                    **common)
    if rope_type == "clex":
        return CLEX(rotary_dim, base, original_max_position_embeddings=int(need(original, "max_position_embeddings")),
                    max_factor=int(params.get("max_factor", 16)), param_factor=int(params.get("param_factor", 1)),
                    act=params.get("act", "tanh"), time_dt=float(params.get("time_dt", 0.01)), **common)
    if rope_type == "llama3":
        return Llama3Scaling(rotary_dim, base, factor=need(params.get("factor"), "factor"),
                             low_freq_factor=need(params.get("low_freq_factor"), "low_freq_factor"),
                             high_freq_factor=need(params.get("high_freq_factor"), "high_freq_factor"),
                             original_max_position_embeddings=need(original, "original_max_position_embeddings"),
                             **common)
    return LongRoPE(rotary_dim, base, short_factor=need(params.get("short_factor"), "short_factor"),
                    long_factor=need(params.get("long_factor"), "long_factor"),
                    original_max_position_embeddings=need(original, "original_max_position_embeddings"),
                    max_position_embeddings=max_pos, factor=params.get("factor"),
                    attention_factor=params.get("attention_factor"), **common)
