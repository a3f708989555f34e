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
def test_dcis_reaches_the_optimum_in_fewer_evaluations_than_the_longrope_search(d):
    start = schedules.DCIS(d, factor=4.0, original_max_position_embeddings=64)
    objective = _distance_to(_target(d, 4.0))
    tolerance = 1e-2  # mean squared factor error: within ~0.1 of the optimum (factors span 1..5)
    dcis_result = search.dcis(objective, start)
    evo_result = search.evolutionary(objective, start, seed=0)  # the released sizes: 2,560 evaluations

    def first_within(trace):
        return next((j + 1 for j, best in enumerate(trace) if best <= tolerance), math.inf)

    dcis_evals, evo_evals = first_within(dcis_result.trace), first_within(evo_result.trace)
    assert evo_result.evaluations == 2560
    assert dcis_evals < math.inf and dcis_evals < evo_evals, (dcis_evals, evo_evals)
    assert objective(dcis_result.schedule) == dcis_result.score <= tolerance


def test_dcis_finds_non_monotone_factors_the_baseline_cannot_express():
    target = _target(16, 4.0)
    target[5] = 0.6  # a dip below 1
    start = schedules.DCIS(16, factor=4.0, original_max_position_embeddings=64)
    dcis_result = search.dcis(_distance_to(target), start)
    evo_result = search.evolutionary(_distance_to(target), start)
    assert dcis_result.score < 1e-2 < evo_result.score
    assert dcis_result.schedule.scaling_factors[5] < 1


def test_dcis_discards_candidates_over_the_cut():
    start = schedules.DCIS(8, factor=2.0, scaling_factors=[1.0] * 4)
    result = search.dcis(lambda sched: 1e6, start)  # nothing survives: factors stay, ranges stay
    assert result.evaluations == (2 + 4) * 10 and result.best_score == 1e6
    assert result.factors == (1.0,) * 4 and result.score == math.inf  # the start itself was never evaluated


def test_dcis_keeps_the_factors_unclamped_and_clamps_only_what_it_evaluates():
    # Level 1 (groups of 2): every increment <= -0.67 takes factors 2 and 3 to the clamp and
    # ties; the smallest, -5, wins, so they are kept at 1 - 5 = -4 and the next range is
    # [-1.11, 3.33]. Level 2: from -4 no increment lifts factor 3 off the clamp, so it stays
    # there (clamping the kept factor to 1e-4 instead would let it climb to ~1.85, near 2).
    def objective(sched):
        lam = sched.scaling_factors
        return lam[2] + 0.1 * abs(lam[3] - 2.0)

    start = schedules.DCIS(8, factor=2.0, scaling_factors=[1.0] * 4)
    seen = []
    result = search.dcis(lambda sched: seen.append(sched.scaling_factors) or objective(sched), start)
    assert all(min(lam) >= 1e-4 for lam in seen)  # every evaluated copy is clamped
    assert result.factors[3] == pytest.approx(-4 - 10 / 9) and result.factors[2] < 0  # the kept ones are not
    assert result.schedule.scaling_factors[3] == 1e-4 and result.schedule.scaling_factors[2] == 1e-4
    assert result.score == objective(result.schedule)


def test_dcis_returns_its_final_factors_not_the_best_seen():
    # Two factors, groups of 1: factor 1 reaches 2.67 (score 1/3); then every increment tried
    # on factor 0 (the grid -5..5 skips 0) moves it off its optimum 1: the final score is worse.
    def objective(sched):
        lam = sched.scaling_factors
        return abs(lam[0] - 1.0) + abs(lam[1] - 3.0)

    start = schedules.DCIS(4, factor=2.0, scaling_factors=[1.0, 1.0])
    result = search.dcis(objective, start)
    assert result.evaluations == 20
    assert result.best_score == pytest.approx(1 / 3) and result.best_schedule.scaling_factors[0] == 1.0
    assert result.score == objective(result.schedule) == pytest.approx(5 / 9 + 1 / 3)
    assert result.schedule.scaling_factors == pytest.approx((1 - 5 / 9, 3 - 1 / 3))


def test_evolutionary_is_the_released_longrope_search():
    d, s = 16, 4.0
    start = schedules.DCIS(d, factor=s, original_max_position_embeddings=64)
    seen = []
    target = _target(d, s)

    def distance(lam):
        return float(((torch.tensor(lam, dtype=torch.float64) - target) ** 2).mean())

    objective = lambda sched: distance(sched.scaling_factors)  # noqa: E731
    result = search.evolutionary(lambda sched: seen.append(sched.scaling_factors) or objective(sched), start, seed=1)
    assert result.evaluations == len(seen) == 40 * 64
    yarn = schedules.dcis_initial_factors(d, 10000.0, s, 64, init="yarn")
    assert seen[0] == pytest.approx(tuple(yarn.tolist()))  # seeded with YaRN
    for lam in seen:  # non-decreasing, in [1, 1 + s]
        assert all(1.0 <= a <= b <= 1 + s + 1e-12 for a, b in zip(lam, lam[1:]))
    for g in range(1, 40):  # each generation re-evaluates the 32 best of the last, best first
        last, now = seen[64 * (g - 1): 64 * g], seen[64 * g: 64 * g + 32]
        assert sorted(last, key=distance)[:32] == now
    assert result.score == distance(result.schedule.scaling_factors) == min(map(distance, seen)) == result.best_score
    with pytest.raises(ValueError):
        search.evolutionary(objective, start, population=60)  # != parents + mutations + crossovers
    with pytest.raises(ValueError):
        search.evolutionary(objective, schedules.DCIS(8, factor=2.0, scaling_factors=[1.0] * 4))  # no YaRN seed


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


@pytest.mark.parametrize("seed", range(4))
def test_clex_training_positions_pin_the_first_and_last(seed):
    clex = schedules.CLEX(16, original_max_position_embeddings=32, max_factor=4).train()
    clex.t = 3
    pos = clex.training_positions(10, torch.Generator().manual_seed(seed))
    assert pos[0] == 0 and pos[-1] == 32 * 3 - 1 and pos.shape == (10,) and torch.all(pos[1:] > pos[:-1])
    # the middle: n - 2 distinct draws from [1, L t - 2], as the released code draws them
    draws = torch.randperm(32 * 3 - 2, generator=torch.Generator().manual_seed(seed))[:8]
    assert torch.equal(pos[1:-1], draws.sort().values + 1)
    assert torch.equal(clex.training_positions(96), torch.arange(96))  # n = L t: every position
    for n in (1, 97):
        with pytest.raises(ValueError):
            clex.training_positions(n)


def _rk4_38_step(clex, t0, h, z, *consts):
    """One step of Kutta's 3/8 rule (torchdiffeq's rk4), written out here."""
    f = lambda t, y: clex.derivative(t, y, *consts)  # noqa: E731
    k1 = f(t0, z)
    k2 = f(t0 + h / 3, z + h * k1 / 3)
    k3 = f(t0 + 2 * h / 3, z + h * (k2 - k1 / 3))
    k4 = f(t0 + h, z + h * (k1 - k2 + k3))
    return z + h * (k1 + 3 * k2 + 3 * k3 + k4) / 8


@pytest.mark.parametrize("time_dt, grid", [(0.5, [1.0, 1.5, 2.0]), (0.3, [1.0, 1.3, 1.6, 1.9, 2.0])])
def test_clex_solves_with_torchdiffeqs_rk4(time_dt, grid):
    clex = schedules.CLEX(16, original_max_position_embeddings=16, max_factor=4, time_dt=time_dt)
    with torch.no_grad():
        clex.w_down.copy_(0.5 * torch.randn(clex.w_down.shape, generator=torch.Generator().manual_seed(0)))
        consts = (clex._log_theta("cpu"), clex._ntk_exponent("cpu"))
        z = consts[0]
        for t0, t1 in zip(grid, grid[1:]):  # the step grid 1, 1 + h, ..., its last point clamped to t = 2
            z = _rk4_38_step(clex, t0, t1 - t0, z, *consts)
        assert torch.allclose(clex.solve(2), z, rtol=0, atol=1e-6)
        # the classic 1/6 rule on the same grid lands elsewhere: the test tells the two apart
        z = consts[0]
        for t0, t1 in zip(grid, grid[1:]):
            h = t1 - t0
            k1 = clex.derivative(t0, z, *consts)
            k2 = clex.derivative(t0 + h / 2, z + h / 2 * k1, *consts)
            k3 = clex.derivative(t0 + h / 2, z + h / 2 * k2, *consts)
            k4 = clex.derivative(t0 + h, z + h * k3, *consts)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        assert (clex.solve(2) - z).abs().max() > 1e-5


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


def test_rotary_angle_distribution_threshold_and_interpolated_dims():
    """Eq. 9 of the paper: interpolate pair i iff D_i(1) > D_i(s) + t; n^ fixes t by count."""
    d, s, L = 16, 4.0, 256
    kwargs = dict(factor=s, original_max_position_embeddings=L)
    dist = schedules.RotaryAngleDistribution(d, **kwargs).disturbances()
    gain = dist[0] - dist[1]  # what interpolating saves
    argmin = schedules.RotaryAngleDistribution(d, **kwargs).scaling_factors()
    assert torch.equal(argmin, schedules.RotaryAngleDistribution(d, threshold=0.0, **kwargs).scaling_factors())
    assert torch.equal(argmin, torch.where(gain > 0, s, 1.0).double())
    t = gain[gain > 0].median().item()
    lam = schedules.RotaryAngleDistribution(d, threshold=t, **kwargs).scaling_factors()
    assert torch.equal(lam, torch.where(gain > t, s, 1.0).double())
    assert 0 < int((lam > 1).sum()) < int((argmin > 1).sum())
    for n_hat in (0, 4, 10, 16):
        lam = schedules.RotaryAngleDistribution(d, interpolated_dims=n_hat, **kwargs).scaling_factors()
        assert int((lam == s).sum()) == n_hat // 2 and int((lam == 1).sum()) == d // 2 - n_hat // 2
        if 0 < n_hat < d:  # the interpolated pairs are those that gain the most
            assert gain[lam == s].min() >= gain[lam == 1].max()
    sched = schedules.RotaryAngleDistribution(d, **kwargs)
    sched.interpolated_dims = 2  # fields are live: the chosen factors follow
    assert int((sched.scaling_factors() > 1).sum()) == 1
    assert rel_err(sched.inv_freq(), theta(d, 10000.0) / sched.scaling_factors()) < 1e-7


@pytest.mark.parametrize("kwargs", [dict(interpolated_dims=3), dict(interpolated_dims=18), dict(interpolated_dims=-2),
                                    dict(interpolated_dims="paper"), dict(threshold=float("nan")),
                                    dict(threshold=0.1, interpolated_dims=4)])
def test_rotary_angle_distribution_rejects_bad_selection(kwargs):
    with pytest.raises(ValueError):
        schedules.RotaryAngleDistribution(16, factor=4.0, original_max_position_embeddings=256, **kwargs)


# The paper's Table 3 (disturbance x 1e-3, LLaMA2: d = 128, L = 4k): PI, YaRN and its method at
# 8k and 16k. Its numbers are the released code's KL(P_pre || P_new) summed over the 360 bins
# (eq. 8 prints the sum, with the arguments the other way round) and averaged over the pairs;
# "ours" is the argmin (n^ = 80 / 64 score 6.74 / 23.06).
TABLE_3 = {2.0: {"PI": 24.08, "YaRN": 25.55, "ours": 6.71}, 4.0: {"PI": 33.67, "YaRN": 35.44, "ours": 22.92}}


@pytest.mark.parametrize("s", [2.0, 4.0])
def test_rotary_angle_distribution_reproduces_the_papers_table_3(s):
    d, L = 128, 4096
    pre = schedules.DefaultRope(d).inv_freq()

    def disturbance(sched):
        per_pair = schedules.rotary_angle_disturbance(sched.inv_freq(), int(s * L), original_inv_freq=pre,
                                                      original_length=L)
        return per_pair.mean().item() * 360 * 1e3

    ours = schedules.RotaryAngleDistribution(d, factor=s, original_max_position_embeddings=L)
    got = {"PI": disturbance(schedules.LinearScaling(d, factor=s)), "ours": disturbance(ours),
           "YaRN": disturbance(schedules.YaRN(d, factor=s, original_max_position_embeddings=L))}
    for name, paper in TABLE_3[s].items():
        assert got[name] == pytest.approx(paper, rel=5e-3), (name, got[name], paper)
    # the headline: up to 72% (8k) and 32% (16k) less disturbance than PI
    assert round(100 * (1 - got["ours"] / got["PI"])) == {2.0: 72, 4.0: 32}[s]
    # the paper's experiments: n^ = 80 interpolated features at 8k, 64 at 16k
    paper = schedules.RotaryAngleDistribution(d, factor=s, original_max_position_embeddings=L,
                                              interpolated_dims="paper")
    assert 2 * int((paper.scaling_factors() > 1).sum()) == {2.0: 80, 4.0: 64}[s]
    assert 2 * int((ours.scaling_factors() > 1).sum()) == {2.0: 92, 4.0: 84}[s]
