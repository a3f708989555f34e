"""Searches over per-dimension RoPE scaling factors against a user's objective.

`evaluate(schedule) -> float` is the caller's objective, lower is better (the papers use the
model's perplexity at the target length). Both searches count every call to it.

- `dcis`: DCIS's divide-and-conquer incremental search (arXiv 2412.18811).
- `evolutionary`: the baseline DCIS compares against, a LongRoPE-style evolutionary search
  over non-decreasing factors.
"""

import dataclasses
import math

import torch

from .schedules.dcis import DCIS, dcis_initial_factors

__all__ = ["SearchResult", "dcis", "evolutionary"]


@dataclasses.dataclass
class SearchResult:
    """The best schedule seen, its score, how many times `evaluate` ran, and the best score
    after each evaluation (`trace[j]` is the best of the first j + 1 evaluations)."""

    schedule: DCIS
    score: float
    evaluations: int
    trace: list


class _Counter:
    """Wraps `evaluate`: counts calls and keeps the best schedule seen."""

    def __init__(self, evaluate):
        self.evaluate, self.best, self.score, self.trace = evaluate, None, math.inf, []

    def __call__(self, schedule):
        score = float(self.evaluate(schedule))
        if score < self.score:
            self.best, self.score = schedule, score
        self.trace.append(self.score)
        return score

    def result(self):
        return SearchResult(self.best, self.score, len(self.trace), self.trace)


def _check_schedule(schedule):
    if not isinstance(schedule, DCIS):
        raise TypeError(f"schedule must be a ropefast.schedules.DCIS (the starting factors), got "
                        f"{type(schedule).__name__}")


def dcis(evaluate, schedule, *, candidates=10, initial_range=(-5.0, 5.0), initial_group_size=None,
         min_factor=1e-4, discard_at=100.0, top=3):
    """Divide-and-conquer incremental search (DCIS) from `schedule`'s factors.

    Group size n starts at d/4 (`initial_group_size`); while n >= 1, the d/2 factors are cut
    into contiguous groups of n and visited from the highest index (lowest frequency) down.
    For each group, `candidates` evenly spaced increments k over the group's range are tried
    (lambda[group] += k, clamped to >= min_factor), each scored by `evaluate`; scores
    >= `discard_at` are discarded (the paper's PPL cut of 100) and the best increment is
    applied. The group's halves then search [min(top k) - step - best, max(top k) + step -
    best] (the `top` best increments, step = the spacing), or the old range if nothing
    survived; n halves. No monotonicity is imposed, so factors may decrease with i or drop
    below 1. For d = 128: 126 group searches x 10 = 1,260 evaluations.
    Returns the best schedule seen (`SearchResult`).
    """
    _check_schedule(schedule)
    if candidates < 2 or top < 1:
        raise ValueError(f"need candidates >= 2 and top >= 1, got {candidates}, {top}")
    lo, hi = map(float, initial_range)
    if not lo < hi:
        raise ValueError(f"initial_range must be (low, high) with low < high, got {initial_range!r}")
    count = _Counter(evaluate)
    factors = torch.tensor(schedule.scaling_factors, dtype=torch.float64)
    half = factors.shape[0]
    size = initial_group_size or max(1, schedule.rotary_dim // 4)
    ranges = [(0, half, (lo, hi))]  # (start, end, increment range) of the previous level's groups
    while size >= 1:
        next_ranges = []
        for start in reversed(range(0, half, size)):
            end = min(start + size, half)
            k_lo, k_hi = next(r for a, b, r in ranges if a <= start < b)
            step = (k_hi - k_lo) / (candidates - 1)
            survivors = []
            for k in torch.linspace(k_lo, k_hi, candidates, dtype=torch.float64).tolist():
                trial = factors.clone()
                trial[start:end] = (trial[start:end] + k).clamp(min=min_factor)
                score = count(schedule.with_factors(trial))
                if score < discard_at:
                    survivors.append((score, k))
            if survivors:
                survivors.sort()
                best_k = survivors[0][1]
                factors[start:end] = (factors[start:end] + best_k).clamp(min=min_factor)
                kept = [k for _, k in survivors[:top]]
                next_ranges.append((start, end, (min(kept) - step - best_k, max(kept) + step - best_k)))
            else:
                next_ranges.append((start, end, (k_lo, k_hi)))
        ranges = next_ranges
        size //= 2
    return count.result()


def evolutionary(evaluate, schedule, *, max_evaluations=2000, population=64, parents=16, mutation_prob=0.3,
                 mutation_scale=None, step=0.01, seed=0):
    """LongRoPE-style evolutionary search: the baseline of the DCIS paper.

    Factors are non-decreasing in i and lie in [1, 1 + s] on a grid of `step`. The first
    population is PI (lambda = s), NTK (s^(2i/(d-2))), YaRN (DCIS's YaRN start), and
    `schedule`'s own factors, filled with mutations of them. Each generation keeps the
    `parents` best, and breeds the rest by mutation (each factor moves by a Gaussian step
    of `mutation_scale`, default s/10, with probability `mutation_prob`) and by uniform
    crossover of two parents, half each; children are projected back onto the constraints
    (cumulative max, clamp, grid) and never evaluated twice. Stops after `max_evaluations`.
    """
    _check_schedule(schedule)
    gen = torch.Generator().manual_seed(seed)
    s, d = schedule.factor, schedule.rotary_dim
    low, high = 1.0, 1.0 + s
    scale = s / 10 if mutation_scale is None else mutation_scale
    count = _Counter(evaluate)
    seen = {}

    def project(x):
        x = torch.cummax(x.clamp(low, high), 0).values
        return torch.round(x / step) * step

    def score(x):
        key = tuple(torch.round(x / step).long().tolist())
        if key not in seen and len(count.trace) < max_evaluations:
            seen[key] = count(schedule.with_factors(x))
        return seen.get(key, math.inf)

    def mutate(x):
        moved = torch.rand(x.shape, generator=gen) < mutation_prob
        return project(x + moved * torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale)

    original = schedule.original_max_position_embeddings
    seeds = [torch.tensor(schedule.scaling_factors, dtype=torch.float64),
             dcis_initial_factors(d, schedule.base, s, 1, init="pi"),
             dcis_initial_factors(d, schedule.base, s, 1, init="ntk")]
    if original is not None:
        seeds.append(dcis_initial_factors(d, schedule.base, s, int(original), init="yarn"))
    pool = [project(x) for x in seeds]
    while len(pool) < population:
        pool.append(mutate(seeds[len(pool) % len(seeds)]))
    scored = [(score(x), i, x) for i, x in enumerate(pool)]
    stale = 0  # generations in a row that bred nothing new
    while len(count.trace) < max_evaluations and stale < 100:
        scored.sort(key=lambda t: t[:2])
        best = [x for _, _, x in scored[:parents]]
        children = []
        for j in range(population - parents):
            a = best[int(torch.randint(parents, (1,), generator=gen))]
            if j % 2:
                b = best[int(torch.randint(parents, (1,), generator=gen))]
                children.append(project(torch.where(torch.rand(a.shape, generator=gen) < 0.5, a, b)))
            else:
                children.append(mutate(a))
        before = len(count.trace)
        scored = scored[:parents] + [(score(x), parents + j, x) for j, x in enumerate(children)]
        stale = stale + 1 if len(count.trace) == before else 0
    return count.result()
