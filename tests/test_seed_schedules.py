"""The seed papers' methods: Entropy-ABF, DCIS (+ its search and the evolutionary baseline),
CLEX, and the rotary-angle distribution method, each against an independent float64
computation of its formula."""

import math
import warnings

import pytest
import torch

from ropefast import dispatch, scaled_rope_attention, schedules, search
from ropefast.reference import scaled_rope_attention_reference

from conftest import rel_err


def theta(d, base):
    return torch.tensor([base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)


# ---- Entropy-ABF ---------------------------------------------------------------------------

def test_entropy_abf_frequencies_and_query_scaling():
    s = schedules.EntropyABF(64)
    assert rel_err(s.inv_freq(), theta(64, 500000.0)) < 1e-7
    pos = torch.tensor([[0, 1, 4094, 4095, 4096, 10000, 16383]])
    expect = [max(1.0, math.log(p + 1) / math.log(4096)) for p in pos[0].tolist()]
    assert torch.allclose(s.q_temperature(pos)[0].double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-6)
    assert s.q_temperature(pos)[0, :4].eq(1).all() and s.q_temperature(pos)[0, 4] > 1


def test_entropy_abf_skips_the_first_two_layers():
    s = schedules.EntropyABF(64, original_max_position_embeddings=2048)
    pos = torch.arange(5000)[None]
    assert s.at_layer(0).q_temperature(pos) is None and s.at_layer(1).q_temperature(pos) is None
    assert torch.equal(s.at_layer(2).q_temperature(pos), s.q_temperature(pos))
    assert schedules.EntropyABF(64, skip_layers=(), layer_idx=0).q_temperature(pos) is not None


def test_entropy_abf_temperature_reaches_the_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    s = schedules.EntropyABF(16, original_max_position_embeddings=8)
    out = scaled_rope_attention(q, k, v, schedule=s, causal=True)
    temp = torch.tensor([max(1.0, math.log(p + 1) / math.log(8)) for p in range(40)], dtype=torch.float64)
    expect = scaled_rope_attention_reference(q, k, v, inv_freq=theta(16, 500000.0), causal=True, q_temperature=temp)
    assert rel_err(out, expect) < 1e-7


@pytest.mark.parametrize("kwargs", [dict(original_max_position_embeddings=1), dict(skip_layers=(-1,)),
                                    dict(layer_idx=1.5), dict(base=0.0)])
def test_entropy_abf_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        schedules.EntropyABF(64, **kwargs)


# ---- DCIS ----------------------------------------------------------------------------------

def test_dcis_schedule_formula():
    lam = [0.5, 1.0, 3.0, 2.0, 4.0, 4.5, 1.5, 6.0]  # not monotone, one below 1
    s = schedules.DCIS(16, 10000.0, factor=4.0, scaling_factors=lam)
    assert rel_err(s.inv_freq(), theta(16, 10000.0) / torch.tensor(lam, dtype=torch.float64)) < 1e-7
    assert s.rotary_scale() == pytest.approx(0.1 * math.log(4.0) + 1)
    assert schedules.DCIS(16, factor=1.0, scaling_factors=lam).rotary_scale() == 1.0


def test_dcis_starting_points():
    d, s, L = 64, 8.0, 4096
    yarn = schedules.YaRN(d, factor=s, original_max_position_embeddings=L)
    start = schedules.DCIS(d, factor=s, original_max_position_embeddings=L)
    assert rel_err(start.inv_freq(), yarn.inv_freq()) < 1e-6  # the YaRN start is YaRN
    ntk = schedules.dcis_initial_factors(d, 10000.0, s, L, init="ntk")
    assert rel_err(ntk, torch.tensor([s ** (2 * i / (d - 2)) for i in range(d // 2)], dtype=torch.float64)) < 1e-12


@pytest.mark.parametrize("kwargs", [dict(scaling_factors=[1.0] * 7), dict(scaling_factors=[1.0] * 7 + [0.0]),
                                    dict(scaling_factors=[1.0] * 7 + [float("nan")]), dict()])
def test_dcis_rejects_bad_factors(kwargs):
    with pytest.raises(ValueError):
        schedules.DCIS(16, factor=4.0, **kwargs)


def _distance_to(target):
    return lambda sched: float(((torch.tensor(sched.scaling_factors, dtype=torch.float64) - target) ** 2).mean())


def test_dcis_visits_126_groups_of_10_at_d128():
    start = schedules.DCIS(128, factor=4.0, original_max_position_embeddings=4096)
    result = search.dcis(lambda sched: 1.0, start)
    assert result.evaluations == 1260


def _target(d, s):
    i = torch.arange(d // 2, dtype=torch.float64)
    return 1 + s * (i / (d // 2 - 1)) ** 1.5  # non-decreasing, inside the baseline's [1, 1 + s]


@pytest.mark.parametrize("d", [16, 32])
def test_dcis_reaches_the_optimum_in_fewer_evaluations_than_the_evolutionary_baseline(d):
    start = schedules.DCIS(d, factor=4.0, original_max_position_embeddings=64)
    objective = _distance_to(_target(d, 4.0))
    tolerance = 1e-2  # mean squared factor error: within ~0.1 of the optimum (factors span 1..5)
    dcis_result = search.dcis(objective, start)
    evo_result = search.evolutionary(objective, start, max_evaluations=3000, seed=0)

    def first_within(trace):
        return next((j + 1 for j, best in enumerate(trace) if best <= tolerance), math.inf)

    dcis_evals, evo_evals = first_within(dcis_result.trace), first_within(evo_result.trace)
    assert dcis_evals < math.inf and dcis_evals < evo_evals, (dcis_evals, evo_evals)
    assert objective(dcis_result.schedule) == dcis_result.score <= tolerance


def test_dcis_finds_non_monotone_factors_the_baseline_cannot_express():
    target = _target(16, 4.0)
    target[5] = 0.6  # a dip below 1
    start = schedules.DCIS(16, factor=4.0, original_max_position_embeddings=64)
    dcis_result = search.dcis(_distance_to(target), start)
    evo_result = search.evolutionary(_distance_to(target), start, max_evaluations=1500)
    assert dcis_result.score < 1e-2 < evo_result.score
    assert dcis_result.schedule.scaling_factors[5] < 1


def test_dcis_discards_candidates_over_the_cut():
    start = schedules.DCIS(8, factor=2.0, scaling_factors=[1.0] * 4)
    result = search.dcis(lambda sched: 1e6, start)  # nothing survives: factors stay, ranges stay
    assert result.evaluations == (2 + 4) * 10 and result.score == 1e6


# ---- CLEX ----------------------------------------------------------------------------------

def ntk_alpha(d, base, alpha):
    return theta(d, base) * torch.tensor([alpha ** (-2 * i / (d - 2)) for i in range(d // 2)], dtype=torch.float64)


def test_untrained_clex_is_ntk_with_alpha_2t_minus_1():
    clex = schedules.CLEX(32, original_max_position_embeddings=64).eval()
    for n, t in ((10, 1), (64, 1), (65, 2), (256, 4), (10**6, 16)):
        assert clex.scaling_t(n) == t
        assert rel_err(clex.inv_freq(n).double(), ntk_alpha(32, 10000.0, 2 * t - 1)) < 2e-5


def test_clex_training_uses_the_sampled_t():
    clex = schedules.CLEX(16, original_max_position_embeddings=32, max_factor=4).train()
    t = clex.sample_t(torch.Generator().manual_seed(3))
    assert 1 <= t <= 4 and clex.scaling_t(10) == t
    pos = clex.training_positions(32, torch.Generator().manual_seed(0))
    assert pos.shape == (32,) and torch.all(pos[1:] > pos[:-1]) and pos.max() < 32 * t
    with pytest.raises(ValueError):
        clex.solve(5)


def _clex_with_nonzero_down(seed=0):
    clex = schedules.CLEX(16, original_max_position_embeddings=16, max_factor=4)
    with torch.no_grad():
        clex.w_down.copy_(0.05 * torch.randn(clex.w_down.shape, generator=torch.Generator().manual_seed(seed)))
    return clex


def _clex_grads(clex, q, k, v):
    clex.zero_grad()
    freqs = clex.inv_freq()  # one solve per step, shared by every layer (here one)
    out = scaled_rope_attention(q, k, v, inv_freq=freqs, causal=True)
    (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
    return clex.w_up.grad.clone(), clex.w_down.grad.clone()


@pytest.mark.skipif(dispatch.path(torch.empty(0)) != "interpreter",
                    reason="the kernel path on CPU needs TRITON_INTERPRET=1")
def test_clex_training_step_through_the_kernel_matches_the_reference():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=gen) for _ in range(3))
    clex = _clex_with_nonzero_down().train()
    assert clex.sample_t(torch.Generator().manual_seed(3)) == 3
    up_kernel, down_kernel = _clex_grads(clex, q, k, v)  # float32 through the Triton kernels
    up_ref, down_ref = _clex_grads(clex, q.double(), k.double(), v.double())  # float64 reference
    assert down_kernel.abs().max() > 0 and up_kernel.abs().max() > 0
    assert rel_err(down_kernel, down_ref) < 1e-4 and rel_err(up_kernel, up_ref) < 1e-4
    # An optimizer step moves the ODE parameters and the next solve sees them.
    before = clex.inv_freq(40).detach().clone()
    torch.optim.SGD(clex.parameters(), lr=10.0).step()
    assert not torch.equal(clex.inv_freq(40).detach(), before)


def test_clex_training_without_sample_t_warns_once():
    clex = schedules.CLEX(16, original_max_position_embeddings=16).train()
    with pytest.warns(UserWarning, match=r"sample_t\(\) was never called"):
        clex.inv_freq(32)
    fresh = schedules.CLEX(16, original_max_position_embeddings=16).train()
    fresh.sample_t()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clex.inv_freq(32)  # once per module
        fresh.inv_freq(32)
        with torch.no_grad():
            schedules.CLEX(16, original_max_position_embeddings=16).train().inv_freq(32)  # nothing trains here


def test_clex_rejects_bad_arguments():
    for kwargs in (dict(act="relu"), dict(time_dt=0.0), dict(max_factor=0), dict(original_max_position_embeddings=2.5)):
        with pytest.raises(ValueError):
            schedules.CLEX(16, **{"original_max_position_embeddings": 16, **kwargs})


def test_clex_from_hf_config():
    clex = schedules.from_hf_config({"rope_scaling": {"type": "clex", "max_factor": 8, "param_factor": 1,
                                                      "act": "silu", "time_dt": 0.01},
                                     "max_position_embeddings": 4096, "head_dim": 128})
    assert isinstance(clex, schedules.CLEX) and clex.max_factor == 8 and clex.act == "silu"
    assert clex.original_max_position_embeddings == 4096 and clex.rotary_dim == 128


# ---- Rotary-angle distribution -------------------------------------------------------------

def _histogram_loop(freq, length, bins, eps):
    counts = [eps] * bins
    for m in range(length):
        phi = math.fmod(m * freq, 2 * math.pi)
        counts[min(int(phi / (2 * math.pi) * bins), bins - 1)] += 1
    return [c / length for c in counts]


def test_angle_histogram_and_disturbance_match_a_loop():
    freqs = [1.0, 0.3, 0.01]
    got = schedules.rotary_angle_histogram(torch.tensor(freqs), 200, bins=36, eps=1e-10)
    for i, f in enumerate(freqs):
        assert torch.allclose(got[i], torch.tensor(_histogram_loop(f, 200, 36, 1e-10), dtype=torch.float64))
    d = schedules.rotary_angle_disturbance(torch.tensor([0.5]), 400, original_inv_freq=torch.tensor([0.7]),
                                           original_length=100, bins=36)
    pre, new = _histogram_loop(0.7, 100, 36, 1e-10), _histogram_loop(0.5, 400, 36, 1e-10)
    expect = sum(p * math.log(p / q) for p, q in zip(pre, new)) / 36
    assert d.item() == pytest.approx(expect, rel=1e-9)


def test_rotary_angle_distribution_picks_the_least_disturbing_factor():
    d, s, L = 16, 4.0, 256
    sched = schedules.RotaryAngleDistribution(d, factor=s, original_max_position_embeddings=L)
    th = theta(d, 10000.0)
    for i in range(d // 2):
        dist = {}
        for lam in (1.0, s):
            pre = _histogram_loop(th[i].item(), L, 360, 1e-10)
            new = _histogram_loop(th[i].item() / lam, int(s * L), 360, 1e-10)
            dist[lam] = sum(p * math.log(p / q) for p, q in zip(pre, new)) / 360
        choice = 1.0 if dist[1.0] <= dist[s] else s
        assert sched.scaling_factors()[i].item() == choice
    assert rel_err(sched.inv_freq(), th / sched.scaling_factors()) < 1e-7


def test_disturbance_compares_schedules():
    d, s, L = 64, 4.0, 1024
    pre = schedules.DefaultRope(d).inv_freq()

    def total(sched):
        return schedules.rotary_angle_disturbance(sched.inv_freq(), int(s * L), original_inv_freq=pre,
                                                  original_length=L).sum().item()

    ours = total(schedules.RotaryAngleDistribution(d, factor=s, original_max_position_embeddings=L))
    for other in (schedules.DefaultRope(d), schedules.LinearScaling(d, factor=s), schedules.NTKScaling(d, factor=s),
                  schedules.YaRN(d, factor=s, original_max_position_embeddings=L)):
        assert ours <= total(other) + 1e-12, type(other).__name__
