"""scaled_rope_attention: schedule resolution and argument validation."""

import warnings

import pytest
import torch

from ropefast import apply_scaled_rope, scaled_rope_attention, schedules
from ropefast.reference import scaled_rope_attention_reference

from conftest import rel_err


def qkv(B=2, Nq=5, Nk=7, Hq=4, Hkv=2, D=16, dtype=torch.float32, layout="bshd"):
    q, k, v = torch.randn(B, Nq, Hq, D), torch.randn(B, Nk, Hkv, D), torch.randn(B, Nk, Hkv, D)
    if layout == "bhsd":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return q.to(dtype), k.to(dtype), v.to(dtype)


class _Temperature(schedules.YaRN):
    """A schedule with a per-query temperature, to test that the API forwards it."""

    def q_temperature(self, q_positions):
        return 1.0 + 0.1 * torch.log1p(q_positions.float())


def test_schedule_values_are_used_unless_overridden():
    q, k, v = (x.double() for x in qkv(D=16))
    s = _Temperature(8, factor=4.0, original_max_position_embeddings=4, interleaved=True)
    out = scaled_rope_attention(q, k, v, schedule=s, causal=True)
    pos = torch.arange(5)[None].expand(2, 5) + 2
    expect = scaled_rope_attention_reference(
        q, k, v, inv_freq=s.inv_freq(), rotary_dim=8, interleaved=True, causal=True,
        rotary_scale=s.rotary_scale(), q_temperature=s.q_temperature(pos))
    assert rel_err(out, expect) < 1e-14
    # Explicit arguments win over the schedule's.
    out2 = scaled_rope_attention(q, k, v, schedule=s, interleaved=False, rotary_scale=1.0,
                                 q_temperature=torch.ones(5, dtype=torch.float64))
    expect2 = scaled_rope_attention_reference(q, k, v, inv_freq=s.inv_freq(), rotary_dim=8)
    assert rel_err(out2, expect2) < 1e-14


def test_dynamic_schedule_sees_the_length_from_shapes_or_seq_len_never_positions():
    # The length comes from the key count or seq_len=, not from max(positions) + 1: reading
    # a device tensor would synchronize the host every call.
    q, k, v = (x.double() for x in qkv(Nq=4, Nk=4, D=8))
    s = schedules.DynamicNTKScaling(8, factor=4.0, max_position_embeddings=2)
    pos = torch.tensor([0, 1, 2, 9])
    for seq_len, seen in ((None, 4), (10, 10)):
        out = scaled_rope_attention(q, k, v, schedule=s, q_positions=pos, k_positions=pos, seq_len=seq_len)
        expect = scaled_rope_attention_reference(q, k, v, inv_freq=s.inv_freq(seen), q_positions=pos,
                                                 k_positions=pos)
        assert rel_err(out, expect) < 1e-14
    assert not torch.equal(s.inv_freq(4), s.inv_freq(10))
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        scaled_rope_attention(q, k, v, schedule=s, seq_len=0)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_lse_and_layout(layout):
    q, k, v = qkv(layout=layout)
    f = schedules.DefaultRope(16).inv_freq()
    out, lse = scaled_rope_attention(q, k, v, inv_freq=f, layout=layout, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32


F = schedules.DefaultRope(16).inv_freq()
BAD_CALLS = [
    # (description, q/k/v modifier, kwargs, error type, message fragment)
    ("q not a tensor", lambda q, k, v: ([1.0], k, v), {}, TypeError, "q must be a torch.Tensor"),
    ("q 3-D", lambda q, k, v: (q[0], k, v), {}, ValueError, "q must have 4 dimensions"),
    ("int dtype", lambda q, k, v: (q.int(), k, v), {}, TypeError, "q must be float16"),
    ("dtype mismatch", lambda q, k, v: (q, k.double(), v), {}, TypeError, "share one dtype"),
    ("strided last dim", lambda q, k, v: (q, k, torch.randn(2, 7, 2, 32)[..., ::2]), {}, ValueError,
     "v must have a contiguous last dimension"),
    ("k/v shape", lambda q, k, v: (q, k, v[:, :6]), {}, ValueError, "k and v must have the same shape"),
    ("head dim", lambda q, k, v: (q, torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)), {}, ValueError,
     "head dim"),
    ("batch", lambda q, k, v: (q, k[:1], v[:1]), {}, ValueError, "batch"),
    ("head ratio", lambda q, k, v: (q, torch.randn(2, 7, 3, 16), torch.randn(2, 7, 3, 16)), {}, ValueError,
     "multiple of the KV heads"),
    ("head ratio, other layout", lambda q, k, v: (torch.randn(2, 4, 6, 16), torch.randn(2, 2, 9, 16),
                                                  torch.randn(2, 2, 9, 16)), {}, ValueError,
     "read with layout='bhsd' they would be 4 and 2 heads: pass layout='bhsd'"),
    ("layout", None, {"layout": "sbhd"}, ValueError, "layout must be"),
    ("inv_freq vs schedule", None, {"schedule": schedules.DefaultRope(16), "inv_freq": F[:4]}, ValueError,
     r"inv_freq must have rotary_dim/2 = 8 entries \(rotary_dim = 16, the schedule's\)"),
    ("no freq source", None, {"inv_freq": None}, ValueError, "give schedule= or inv_freq="),
    ("schedule type", None, {"inv_freq": None, "schedule": "yarn"}, TypeError, "schedule must be"),
    ("inv_freq dtype", None, {"inv_freq": F.half()}, TypeError, "inv_freq must be float32"),
    ("inv_freq 2-D", None, {"inv_freq": F[None]}, ValueError, "inv_freq must have 1 dimensions"),
    ("inv_freq length", None, {"inv_freq": F[:5], "rotary_dim": 16}, ValueError, "inv_freq must have rotary_dim/2 = 8"),
    ("rotary_dim odd", None, {"rotary_dim": 7}, ValueError, "rotary_dim must be an even integer"),
    ("rotary_dim > D", None, {"rotary_dim": 32, "inv_freq": torch.ones(16)}, ValueError, "must be <= the head dim"),
    ("rotary_dim vs inv_freq", None, {"rotary_dim": 8}, ValueError, "inv_freq must have rotary_dim/2 = 4"),
    ("q_positions shape", None, {"q_positions": torch.arange(6)}, ValueError, "q_positions must be"),
    ("k_positions batch", None, {"k_positions": torch.zeros(3, 7, dtype=torch.long)}, ValueError,
     "k_positions must be"),
    ("positions float", None, {"q_positions": torch.zeros(5)}, TypeError, "q_positions must be an integer"),
    ("causal type", None, {"causal": 1}, TypeError, "causal must be a bool"),
    ("interleaved type", None, {"interleaved": "yes"}, TypeError, "interleaved must be a bool"),
    ("softmax_scale", None, {"softmax_scale": -1.0}, ValueError, "softmax_scale must be a positive"),
    ("softmax_scale type", None, {"softmax_scale": "1"}, TypeError, "softmax_scale must be a real"),
    ("rotary_scale", None, {"rotary_scale": float("nan")}, ValueError, "rotary_scale must be a positive"),
    ("temperature shape", None, {"q_temperature": torch.ones(4)}, ValueError, "q_temperature must be"),
    ("temperature dtype", None, {"q_temperature": torch.ones(5, dtype=torch.long)}, TypeError,
     "q_temperature must be a floating"),
    ("return_lse type", None, {"return_lse": None}, TypeError, "return_lse must be a bool"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises(case):
    _, modify, kwargs, error, match = case
    q, k, v = qkv()
    if modify is not None:
        q, k, v = modify(q, k, v)
    kwargs = {"inv_freq": F, **kwargs}
    with pytest.raises(error, match=match):
        scaled_rope_attention(q, k, v, **kwargs)


def test_schedule_inv_freq_is_cached_but_returned_as_a_copy():
    s = schedules.YaRN(16, factor=4.0, original_max_position_embeddings=8)
    first = s.inv_freq()
    first.mul_(2).requires_grad_()
    again = s.inv_freq()
    assert not again.requires_grad and torch.equal(again, schedules.YaRN(16, factor=4.0,
                                                                        original_max_position_embeddings=8).inv_freq())
    s.factor = 2.0  # a changed field is a new cache entry
    assert torch.equal(s.inv_freq(), schedules.YaRN(16, factor=2.0, original_max_position_embeddings=8).inv_freq())


def test_an_explicit_inv_freq_overrides_only_the_schedules_frequencies():
    q, k, v = (x.double() for x in qkv(D=16))
    s = _Temperature(16, factor=4.0, original_max_position_embeddings=4)
    learned = (s.inv_freq() * 0.9).double().requires_grad_()
    out = scaled_rope_attention(q, k, v, schedule=s, inv_freq=learned, causal=True)
    pos = torch.arange(5)[None].expand(2, 5) + 2
    expect = scaled_rope_attention_reference(q, k, v, inv_freq=learned, causal=True, rotary_scale=s.rotary_scale(),
                                             q_temperature=s.q_temperature(pos))
    assert s.rotary_scale() > 1.1 and rel_err(out, expect) < 1e-14
    out.sum().backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0


@pytest.mark.parametrize("op", ["attention", "rope"])
def test_shapes_that_look_like_the_other_layout_warn(op):
    # SDPA's [B, H, N, D] passed as the default bshd: 600 "heads" of 8 / 2 "tokens".
    q, k, v = (x.double() for x in qkv(Nq=600, Nk=600, Hq=8, Hkv=2, layout="bhsd"))
    f = F.double()
    call = (lambda: scaled_rope_attention(q, k, v, inv_freq=f)) if op == "attention" else \
        (lambda: apply_scaled_rope(q, inv_freq=f))
    with pytest.warns(UserWarning, match="pass layout='bhsd'"):
        call()
    # The same tensors with the right layout, and a plain decode step (one token, 32 heads), say nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if op == "attention":
            scaled_rope_attention(q, k, v, inv_freq=f, layout="bhsd")
            scaled_rope_attention(q[:, :, :1].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), inv_freq=f)
        else:
            apply_scaled_rope(q, inv_freq=f, layout="bhsd")


def test_schedule_cache_follows_field_changes_and_factors_are_immutable():
    s = schedules.DCIS(8, factor=4.0, scaling_factors=[1.0, 2.0, 3.0, 4.0])
    before = s.cached_inv_freq()
    with pytest.raises(TypeError):
        s.scaling_factors[0] = 2.0  # a tuple: an in-place change could not reach the cache
    s.scaling_factors = (2.0, 2.0, 3.0, 4.0)
    assert s.cached_inv_freq()[0].item() == pytest.approx(before[0].item() / 2)
