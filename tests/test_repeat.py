"""Calls that repeat an earlier call's launches (`ropefast.repeat`): the same results as a
call in full, for every argument a key holds, and never where the first call could not."""

import gc
import weakref

import pytest
import torch

from ropefast import apply_scaled_rope, attention, dispatch, ops, repeat, rope, scaled_rope_attention, schedules
from ropefast.kernels.launch import Descriptor, Recorded, Recording

from conftest import requires_cuda


def _recorded(*args, raw=None):
    return Recorded(kernel=None, grid=(1,), args=args, kwargs={}, entry=("kernel", "compiled", (), raw), device=0)


@pytest.mark.parametrize("c_launcher", [False, True])
def test_plan_finds_each_tensor_and_keeps_none_of_the_calls(monkeypatch, c_launcher):
    # A launch's tensors are the call's own (by identity), its buffers or their views, or
    # constants; a repeat allocates the buffers again and passes the new call's tensors (to
    # Triton 3.6's C launcher, a plain pointer as an int).
    x, freq = torch.randn(2, 8, 3, 4), torch.randn(2)
    out = torch.empty(2, 3, 8, 4)
    view = out.transpose(1, 2)
    raw = "C launcher" if c_launcher else None
    record = Recording([_recorded(x, view, freq, 7, raw=raw),
                        _recorded(Descriptor(out, [6, 4], [4, 1], [2, 4]), 1.5, raw=raw)], [("out", out)])
    planned = repeat.plan(record, dict(x=x), ("out",), constants=(freq,))
    assert planned.slots == (((0, "x", None), (1, "out", (0, (2, 8, 3, 4), (96, 4, 32, 1)))), ((0, "out", None),))
    assert planned.launches[0].args == (None, None, freq, 7) and planned.launches[1].args[0].base is None

    launched = []
    monkeypatch.setattr(repeat, "direct_stream", lambda device: "stream")
    monkeypatch.setattr(repeat, "direct", lambda entry, grid, args, stream: launched.append(args))
    new_x = torch.randn(2, 8, 3, 4)
    tensors = planned(dict(x=new_x))
    first, second = launched
    assert first[2] is freq and first[3] == 7
    if c_launcher:
        assert first[:2] == [new_x.data_ptr(), tensors["out"].data_ptr()]
    else:
        assert first[0] is new_x and first[1].stride() == view.stride()
        assert first[1].data_ptr() == tensors["out"].data_ptr()
    assert second[0].base is tensors["out"] and second[0].block_shape == [2, 4]
    assert tensors["out"].shape == out.shape and tensors["out"].data_ptr() != out.data_ptr()


def test_buffers_live_from_their_first_launch_to_their_last_unless_the_caller_reads_them(monkeypatch):
    # as in the full call, where a launcher's Python names held them: a repeat's peak memory
    x, a, b, out = (torch.empty(4) for _ in range(4))
    record = Recording([_recorded(x, a), _recorded(a, b), _recorded(b, out)], [("a", a), ("out", out), ("b", b)])
    planned = repeat.plan(record, dict(x=x), ("out",))
    assert planned.releases == ((), ("a",), ("b",))
    tensors, live = dict(x=torch.empty(4)), []
    monkeypatch.setattr(repeat, "direct_stream", lambda device: "stream")
    monkeypatch.setattr(repeat, "direct", lambda entry, grid, args, stream: live.append(sorted(tensors)))
    planned(tensors)
    assert live == [["a", "x"], ["a", "b", "x"], ["b", "out", "x"]] and sorted(tensors) == ["out", "x"]


def test_plan_refuses_what_a_repeat_cannot_make():
    x, other = torch.randn(4), torch.randn(4)
    assert repeat.plan(Recording([_recorded(x, other)], []), dict(x=x)) is repeat.NEVER
    assert repeat.plan(Recording([], []), dict(x=x)) is repeat.NEVER
    no_entry = _recorded(x)._replace(entry=None)  # the interpreter's launches
    assert repeat.plan(Recording([no_entry], []), dict(x=x)) is repeat.NEVER
    twice = Recording([_recorded(x, other)], [("out", other), ("out", torch.randn(4))])  # a buffer's name came twice
    assert repeat.plan(twice, dict(x=x)) is repeat.NEVER


def _cases():
    """Calls that repeat, for inference and training: `grads` names the keyword tensors that
    learn (their backward runs in full), `fused` slices q, k and v from one tensor."""
    yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=256)
    return {
        "hopper-gqa-causal": dict(shape=(2, 300, 8, 2, 128), kwargs=dict(schedule=yarn, causal=True)),
        "deterministic-bhsd-positions-temperature-lse": dict(
            shape=(1, 200, 4, 4, 128), layout="bhsd",
            kwargs=dict(schedule=yarn, q_positions=torch.arange(5, 205), k_positions=torch.arange(200),
                        q_temperature=torch.linspace(0.8, 1.2, 200), return_lse=True, deterministic=True)),
        "d64-causal": dict(shape=(2, 256, 4, 4, 64), kwargs=dict(schedule=schedules.DefaultRope(64), causal=True)),
        "d256": dict(shape=(1, 160, 2, 2, 256), kwargs=dict(schedule=schedules.DefaultRope(256))),
        "learned-temperature": dict(shape=(1, 130, 4, 1, 128), grads=("q_temperature",),
                                    kwargs=dict(schedule=yarn, q_temperature=torch.linspace(0.8, 1.2, 130))),
        "learned-frequencies-partial": dict(shape=(1, 130, 4, 1, 128), grads=("inv_freq",),
                                            kwargs=dict(inv_freq=schedules.DefaultRope(64).inv_freq(), rotary_dim=64,
                                                        interleaved=True, softmax_scale=0.1)),
        "fused-qkv": dict(shape=(2, 96, 4, 4, 128), fused=True, kwargs=dict(schedule=yarn, causal=True)),
    }


def _inputs(shape, layout, seed):
    batch, n, hq, hkv, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, n, h, head_dim) if layout == "bshd" else (batch, h, n, head_dim) for h in (hq, hkv, hkv)]
    return [torch.randn(s, generator=gen).to("cuda", torch.bfloat16) for s in shapes]


def _case_inputs(spec, layout, seed, train):
    """q, k, v of a `_cases` entry, and the leaves that learn: q, k and v (or, fused, the one
    tensor they are sliced from: the forward then saves no Q^); none unless train."""
    q, k, v = _inputs(spec["shape"], layout, seed)
    if spec.get("fused"):
        qkv = torch.cat([q, k, v], dim=2).requires_grad_(train)
        return *qkv.split([q.shape[2], k.shape[2], v.shape[2]], dim=2), (qkv,)
    return q.requires_grad_(train), k.requires_grad_(train), v.requires_grad_(train), (q, k, v)


def _to_cuda(kwargs):
    return {name: value.cuda() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}


@requires_cuda
@pytest.mark.parametrize("case", list(_cases()))
def test_repeated_attention_calls_equal_full_calls(case):
    spec = _cases()[case]
    layout, kwargs = spec.get("layout", "bshd"), _to_cuda(spec["kwargs"])
    first, second = (_case_inputs(spec, layout, seed, train=False)[:3] for seed in (0, 1))
    with torch.no_grad():
        for _ in range(2):  # the key's second call is recorded
            scaled_rope_attention(*first, layout=layout, **kwargs)
        assert all(isinstance(entry, repeat.Repeat) for entry in attention._REPEATS.entries.values())
        repeated = scaled_rope_attention(*second, layout=layout, **kwargs)
        repeat.clear()
        full = scaled_rope_attention(*second, layout=layout, **kwargs)
    for got, want in zip(*((r if isinstance(r, tuple) else (r,)) for r in (repeated, full))):
        assert got.stride() == want.stride() and torch.equal(got, want)


@requires_cuda
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("given", [False, True])
def test_repeated_rotations_equal_full_calls(layout, given):
    yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=64)
    kwargs = dict(inv_freq=yarn.inv_freq(device="cuda"), rotary_scale=1.3) if given else dict(schedule=yarn)
    kwargs["positions"] = torch.arange(7, 107, device="cuda")
    shape = (2, 100, 4, 128) if layout == "bshd" else (2, 4, 100, 128)
    x, y = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(2):  # the key's second call is recorded
        apply_scaled_rope(x, layout=layout, **kwargs)
    assert isinstance(next(iter(rope._REPEATS.entries.values())), repeat.Repeat)
    repeated = apply_scaled_rope(y, layout=layout, **kwargs)
    repeat.clear()
    assert torch.equal(repeated, apply_scaled_rope(y, layout=layout, **kwargs))


@requires_cuda
def test_a_changed_schedule_or_bad_argument_is_never_repeated():
    yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=64)
    q, k, v = _inputs((1, 100, 4, 4, 128), "bshd", 0)
    for _ in range(2):
        scaled_rope_attention(q, k, v, schedule=yarn)
    yarn.factor = 8.0  # a field: new frequencies, and a new key
    repeated = scaled_rope_attention(q, k, v, schedule=yarn)
    fresh = schedules.YaRN(128, factor=8.0, original_max_position_embeddings=64)
    assert torch.equal(repeated, scaled_rope_attention(q, k, v, schedule=fresh))
    x = q.clone()
    for _ in range(2):
        apply_scaled_rope(x, schedule=yarn, interleaved=True)
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        apply_scaled_rope(x, schedule=yarn, interleaved=1)  # equal to True, and hashed alike


@requires_cuda
@pytest.mark.parametrize("train", [False, True])
def test_recorded_calls_keep_no_tensors_alive(train):
    yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=64)
    q, k, v = (x.requires_grad_(train) for x in _inputs((1, 100, 4, 4, 128), "bshd", 0))
    for _ in range(2):  # the second call (and backward) is recorded
        out = scaled_rope_attention(q, k, v, schedule=yarn, causal=True)
        if train:
            out.backward(torch.ones_like(out))
    assert isinstance(next(iter(attention._REPEATS.entries.values())), repeat.Repeat)
    assert not train or isinstance(next(iter(ops._BACKWARD_REPEATS.entries.values())), repeat.Repeat)
    refs = [weakref.ref(t) for t in (q, k, v, out)]
    del q, k, v, out
    gc.collect()
    assert all(ref() is None for ref in refs)


def _step(q, k, v, leaves, layout, kwargs, retain_graph):
    """Outputs and gradients (leaves and the kwargs' tensors that require grad) of one step."""
    result = scaled_rope_attention(q, k, v, layout=layout, **kwargs)
    outputs = result if isinstance(result, tuple) else (result,)
    leaves = [*leaves, *(x for x in kwargs.values() if isinstance(x, torch.Tensor) and x.requires_grad)]
    gen = torch.Generator().manual_seed(2)
    grad_outputs = [torch.randn(o.shape, generator=gen).to(o) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves, grad_outputs, retain_graph=retain_graph)
    return [o.detach() for o in outputs], list(grads)


@requires_cuda
@pytest.mark.parametrize("retain_graph", [False, True])
@pytest.mark.parametrize("case", list(_cases()))
def test_repeated_training_steps_equal_full_steps(case, retain_graph):
    # a recorded step's forward and backward repeat (the backward in full where it takes the
    # frequencies' or temperature's gradient); dQ^ of the Hopper backward sums with atomics
    # in a varying order, so dq matches closely, everything else bitwise
    spec = _cases()[case]
    layout, kwargs = spec.get("layout", "bshd"), _to_cuda(spec["kwargs"])
    for name in spec.get("grads", ()):
        kwargs[name] = kwargs[name].float().requires_grad_()
    first, second = (_case_inputs(spec, layout, seed, train=True) for seed in (0, 1))
    for _ in range(3):  # seen, recorded, repeated
        _step(*first, layout, kwargs, retain_graph)
    assert any(isinstance(entry, repeat.Repeat) for entry in attention._REPEATS.entries.values())
    backward_repeats = any(isinstance(entry, repeat.Repeat) for entry in ops._BACKWARD_REPEATS.entries.values())
    assert backward_repeats == (not spec.get("grads"))
    repeated = _step(*second, layout, kwargs, retain_graph)
    repeat.clear()
    full = _step(*second, layout, kwargs, retain_graph)
    atomic_dq = dispatch.backward_path(second[0], deterministic=kwargs.get("deterministic", False)) == "hopper"
    for index, (got, want) in enumerate(zip(repeated[0] + repeated[1], full[0] + full[1])):
        assert got.shape == want.shape and got.stride() == want.stride()
        if atomic_dq and index == len(repeated[0]):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
        else:
            assert torch.equal(got, want), index


def test_only_schedules_whose_fields_fix_their_frequencies_have_a_key():
    yarn = schedules.YaRN(64, factor=4.0, original_max_position_embeddings=64)
    before = repeat.schedule_key(yarn)
    yarn.beta_fast = 16.0
    assert repeat.schedule_key(yarn) != before and repeat.schedule_key(None) is None
    with pytest.raises(TypeError):  # its parameters train in place, no field set
        repeat.schedule_key(schedules.CLEX(64, original_max_position_embeddings=64))


@requires_cuda
def test_one_tensor_passed_twice_repeats_only_as_such():
    # self-attention on one tensor is recorded with that tensor in three places; a later call
    # with three tensors of the same layout has another key (and the full path's result)
    yarn = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=64)
    x, = _inputs((1, 100, 4, 4, 128), "bshd", 0)[:1]
    q, k, v = _inputs((1, 100, 4, 4, 128), "bshd", 1)
    positions = torch.arange(100, device="cuda")[None]
    with torch.no_grad():
        for _ in range(3):
            self_attention = scaled_rope_attention(x, x, x, schedule=yarn, q_positions=positions,
                                                   k_positions=positions)
        assert any(isinstance(entry, repeat.Repeat) for entry in attention._REPEATS.entries.values())
        separate = [scaled_rope_attention(q, k, v, schedule=yarn, q_positions=positions, k_positions=positions + 1)
                    for _ in range(3)]
        repeat.clear()
        assert torch.equal(self_attention, scaled_rope_attention(x, x, x, schedule=yarn, q_positions=positions,
                                                                 k_positions=positions))
        full = scaled_rope_attention(q, k, v, schedule=yarn, q_positions=positions, k_positions=positions + 1)
    assert all(torch.equal(out, full) for out in separate)


def test_plan_refuses_one_object_under_two_names():
    x = torch.randn(4)
    assert repeat.plan(Recording([_recorded(x)], []), dict(q=x, k=x)) is repeat.NEVER


def test_plan_places_views_of_the_calls_tensors_and_refuses_ambiguous_ones(monkeypatch):
    base = torch.randn(3, 8, 4)
    x = base[1]  # storage offset 32: a view's offset is kept from x's
    planned = repeat.plan(Recording([_recorded(x[2:].t())], []), dict(x=x))
    assert planned.slots == (((0, "x", (8, (4, 6), (1, 4))),),)
    launched = []
    monkeypatch.setattr(repeat, "direct_stream", lambda device: "stream")
    monkeypatch.setattr(repeat, "direct", lambda entry, grid, args, stream: launched.append(args))
    y = torch.randn(2, 8, 4)[0]
    planned(dict(x=y))
    assert torch.equal(launched[0][0], y[2:].t()) and launched[0][0].data_ptr() == y[2:].data_ptr()
    # x and k slices of one buffer (fused q, k, v): a view of one could be of the other
    assert repeat.plan(Recording([_recorded(x[2:])], []), dict(x=x, k=base[2])) is repeat.NEVER


def test_first_names_name_each_tensor_object_once():
    x = torch.randn(4)
    y = torch.randn(4)
    assert repeat.first_names("abcde", (x, None, x, 3, y)) == (dict(a=x, e=y), (0, None, 0, None, 4))
