"""Schedules: inv_freq and attention factor equal to transformers' own rope init functions
(relative error < 1e-6), and the methods HF lacks against an independent float64 formula."""

import math
import random

import pytest
import torch

from ropefast import schedules

transformers = pytest.importorskip("transformers")
from transformers import PretrainedConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


def _hf_config(head_dim, rope, heads=4, max_pos=4096, partial=None, **extra):
    kwargs = dict(hidden_size=head_dim * heads, num_attention_heads=heads, head_dim=head_dim,
                  max_position_embeddings=max_pos, rope_parameters=dict(rope), **extra)
    if partial is not None:
        kwargs["partial_rotary_factor"] = partial
    return PretrainedConfig(**kwargs)


def _max_rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs() / b.abs()).max().item()


_rng = random.Random(0)
_PHI3_SHORT = [round(_rng.uniform(1.0, 3.0), 4) for _ in range(48)]
_PHI3_LONG = [round(_rng.uniform(1.0, 60.0), 4) for _ in range(48)]
_PHI4_SHORT = [round(_rng.uniform(1.0, 3.0), 4) for _ in range(48)]
_PHI4_LONG = [round(_rng.uniform(1.0, 60.0), 4) for _ in range(48)]

# (id, head_dim, rope parameters, config extras, sequence lengths to probe)
HF_CASES = [
    ("linear-2", 64, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, {}, [None]),
    ("linear-4-partial", 128, {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}, {"partial": 0.5}, [None]),
    ("linear-legacy-type", 80, {"type": "linear", "factor": 3.0, "rope_theta": 10000.0}, {}, [None]),
    ("dynamic-2", 64, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
     {"max_pos": 2048}, [None, 1000, 2048, 4096, 10000]),
    ("dynamic-8-partial", 128, {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 500000.0},
     {"max_pos": 8192, "partial": 0.25}, [None, 8193, 65536]),
    ("yarn-4", 64, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                    "original_max_position_embeddings": 2048}, {"max_pos": 8192}, [None]),
    ("yarn-16-betas", 128, {"rope_type": "yarn", "factor": 16.0, "rope_theta": 10000.0, "beta_fast": 16,
                            "beta_slow": 2, "original_max_position_embeddings": 4096}, {}, [None]),
    ("yarn-deepseek-mscale", 64, {"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0, "mscale": 0.707,
                                  "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
     {"max_pos": 163840}, [None]),
    ("yarn-no-truncate", 128, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "truncate": False,
                               "original_max_position_embeddings": 32768}, {"max_pos": 131072}, [None]),
    ("yarn-attention-factor-partial", 128, {"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0,
                                            "attention_factor": 1.25, "original_max_position_embeddings": 2048},
     {"partial": 0.5}, [None]),
    ("llama3.1", 128, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "rope_theta": 500000.0, "original_max_position_embeddings": 8192},
     {"max_pos": 131072}, [None]),
    ("llama3.2", 64, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "rope_theta": 500000.0, "original_max_position_embeddings": 8192},
     {"max_pos": 131072}, [None]),
    ("llama3-custom-partial", 128, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                                    "high_freq_factor": 8.0, "rope_theta": 10000.0,
                                    "original_max_position_embeddings": 2048}, {"partial": 0.5}, [None]),
    ("longrope-phi3", 96, {"rope_type": "longrope", "short_factor": _PHI3_SHORT, "long_factor": _PHI3_LONG,
                           "rope_theta": 10000.0, "original_max_position_embeddings": 4096},
     {"max_pos": 131072}, [None, 4096, 4097, 100000]),
    ("longrope-su-attention-factor", 96, {"type": "su", "short_factor": _PHI3_SHORT, "long_factor": _PHI3_LONG,
                                          "rope_theta": 10000.0, "attention_factor": 1.1,
                                          "original_max_position_embeddings": 4096},
     {"max_pos": 131072}, [None, 8000]),
    ("longrope-phi4-partial", 128, {"rope_type": "longrope", "short_factor": _PHI4_SHORT, "long_factor": _PHI4_LONG,
                                    "rope_theta": 10000.0, "original_max_position_embeddings": 4096},
     {"max_pos": 131072, "partial": 0.75}, [None, 50000]),
]


@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_schedule_matches_transformers(case):
    _, head_dim, rope, extra, seq_lens = case
    extra = dict(extra)
    make = lambda: _hf_config(head_dim, rope, max_pos=extra.get("max_pos", 4096), partial=extra.get("partial"))  # noqa
    rope_type = {"su": "longrope"}.get(rope.get("rope_type", rope.get("type")), rope.get("rope_type", rope.get("type")))
    schedule = schedules.from_hf_config(make())
    assert schedule.rotary_dim == int(head_dim * extra.get("partial", 1.0))
    for seq_len in seq_lens:
        hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[rope_type](make(), "cpu", seq_len=seq_len)
        inv = schedule.inv_freq(seq_len)
        assert inv.dtype == torch.float32 and inv.shape == hf_inv.shape
        assert _max_rel(inv, hf_inv) < 1e-6, (seq_len, _max_rel(inv, hf_inv))
        assert abs(schedule.rotary_scale(seq_len) - hf_factor) <= 1e-6 * abs(hf_factor)


@pytest.mark.parametrize("head_dim,base", [(64, 10000.0), (128, 500000.0), (96, 1e6)])
def test_default_matches_transformers_llama(head_dim, base):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      rope_parameters={"rope_type": "default", "rope_theta": base})
    hf_inv, hf_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    schedule = schedules.from_hf_config(cfg)
    assert isinstance(schedule, schedules.DefaultRope)
    assert _max_rel(schedule.inv_freq(), hf_inv) < 1e-6 and schedule.rotary_scale() == hf_factor


def test_from_hf_config_accepts_v4_dicts_and_bare_rope_dicts():
    full = {"hidden_size": 512, "num_attention_heads": 4, "rope_theta": 10000.0, "max_position_embeddings": 8192,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}}
    from_dict = schedules.from_hf_config(full)
    bare = schedules.from_hf_config({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                     "original_max_position_embeddings": 2048}, head_dim=128)
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](
        _hf_config(128, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 2048}, max_pos=8192), "cpu")
    for s in (from_dict, bare):
        assert isinstance(s, schedules.YaRN)
        assert _max_rel(s.inv_freq(), hf_inv) < 1e-6 and abs(s.rotary_scale() - hf_factor) < 1e-9


def test_from_hf_config_errors():
    with pytest.raises(ValueError, match="unsupported rope type 'mrope'"):
        schedules.from_hf_config({"rope_type": "mrope"}, head_dim=64)
    with pytest.raises(ValueError, match="head_dim"):
        schedules.from_hf_config({"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="needs factor"):
        schedules.from_hf_config({"rope_type": "linear"}, head_dim=64)
    with pytest.raises(TypeError, match="config must be"):
        schedules.from_hf_config("llama")


# Methods transformers has no init function for: an independent float64 evaluation.
def _theta64(d, base):
    return torch.tensor([base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)


@pytest.mark.parametrize("d,base,factor", [(64, 10000.0, 2.0), (128, 10000.0, 8.0), (96, 5e5, 4.0)])
def test_ntk_aware_fixed(d, base, factor):
    s = schedules.NTKScaling(d, base, factor=factor)
    new_base = base * factor ** (d / (d - 2))
    assert _max_rel(s.inv_freq(), _theta64(d, new_base)) < 1e-6
    # NTK-aware keeps the highest frequency and divides the lowest by the factor.
    assert s.inv_freq()[0] == 1.0
    assert abs(s.inv_freq()[-1].item() / _theta64(d, base)[-1].item() - 1 / factor) < 1e-6
    assert s.rotary_scale() == 1.0 and s.q_temperature(torch.arange(4)) is None


@pytest.mark.parametrize("d,base", [(128, 500000.0), (64, 1e6)])
def test_abf(d, base):
    s = schedules.ABF(d, base)
    assert _max_rel(s.inv_freq(), _theta64(d, base)) < 1e-6
    assert schedules.ABF(d).base == 500000.0


def test_schedules_move_to_device_and_repr():
    s = schedules.LinearScaling(8, factor=2.0, interleaved=True)
    assert s.inv_freq(device="cpu").device.type == "cpu"
    assert "LinearScaling(" in repr(s) and "factor=2.0" in repr(s)
    assert s.interleaved is True


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: schedules.DefaultRope(7), "rotary_dim"),
        (lambda: schedules.DefaultRope(64, base=-1.0), "base"),
        (lambda: schedules.LinearScaling(64, factor=0.0), "factor"),
        (lambda: schedules.NTKScaling(2, factor=2.0), "rotary_dim"),
        (lambda: schedules.DynamicNTKScaling(64, factor=2.0, max_position_embeddings=0), "max_position_embeddings"),
        (lambda: schedules.YaRN(64, factor=4.0, original_max_position_embeddings=-5), "original_max"),
        (lambda: schedules.Llama3Scaling(64, factor=8.0, original_max_position_embeddings=8192,
                                         low_freq_factor=4.0, high_freq_factor=1.0), "low_freq_factor"),
        (lambda: schedules.LongRoPE(8, short_factor=[1.0] * 3, long_factor=[1.0] * 4,
                                    original_max_position_embeddings=4096, factor=2.0), "short_factor"),
        (lambda: schedules.LongRoPE(8, short_factor=[1.0] * 4, long_factor=[1.0, 2.0, -1.0, 1.0],
                                    original_max_position_embeddings=4096, factor=2.0), "long_factor"),
        (lambda: schedules.LongRoPE(8, short_factor=[1.0] * 4, long_factor=[1.0] * 4,
                                    original_max_position_embeddings=4096), "factor or max_position"),
    ],
)
def test_schedule_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_longrope_attention_factor_formula():
    s = schedules.LongRoPE(8, short_factor=[1.0] * 4, long_factor=[2.0] * 4,
                           original_max_position_embeddings=4096, max_position_embeddings=131072)
    assert abs(s.rotary_scale() - math.sqrt(1 + math.log(32) / math.log(4096))) < 1e-12
