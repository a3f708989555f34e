"""Searches over per-dimension RoPE scaling factors against a user's objective.

`evaluate(schedule) -> float` is the caller's objective, lower is better (the papers use the
model's perplexity at the target length). Both searches count every call to it and follow
the DCIS authors' released code (YL-9/dcis: dcis.py, and longrope.py for the baseline, which
has the sizes and operators of LongRoPE's own microsoft/LongRoPE evolution search):

- `dcis`: DCIS's divide-and-conquer incremental search (arXiv 2412.18811).
- `evolutionary`: the LongRoPE evolutionary search (arXiv 2402.13753), DCIS's baseline.
"""

import dataclasses
import math
import random

import torch

from .schedules.dcis import DCIS, dcis_initial_factors

__all__ = ["SearchResult", "dcis", "evolutionary"]


@dataclasses.dataclass
class SearchResult:
    """What a search returns.

    schedule, score: the search's answer, as the released code returns it, and its score:
        `dcis`: the final factors (clamped as they were evaluated; score inf if no candidate
        ever survived the cut, so the start was never evaluated); `evolutionary`: the best
        individual of the last evaluated generation.
    evaluations: how many times `evaluate` ran; `trace[j]` is the best score of the first
        j + 1 evaluations.
    best_schedule, best_score: the best of all evaluations. DCIS's answer can be worse than
        it: each group applies its best increment even when that scores worse than the
        factors before it (the increments tried need not include 0).
    factors: the answer's factors as the search keeps them (`dcis`: unclamped, so entries may
        be <= 0; the released code saves these).
    """

    schedule: DCIS
    score: float
    evaluations: int
    trace: list
    best_schedule: DCIS
    best_score: float
    factors: tuple


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

    def result(self, schedule, score, factors):
        return SearchResult(schedule, score, len(self.trace), self.trace, self.best, self.score, tuple(factors))


def _check_schedule(schedule):
    if not isinstance(schedule, DCIS):
        raise TypeError(f"schedule must be a ropefast.schedules.DCIS (the starting factors), got "
                        f"{type(schedule).__name__}")


def dcis(evaluate, schedule: DCIS, *, candidates: int = 10, initial_range=(-5.0, 5.0), initial_group_size=None,
         min_factor: float = 1e-4, discard_at: float = 100.0, top: int = 3) -> SearchResult:
    """Divide-and-conquer incremental search (DCIS) from `schedule`'s factors.

    Group size n starts at d/4 (`initial_group_size`); while n >= 1, the d/2 factors are cut
    into contiguous groups of n and visited from the highest index (lowest frequency) down.
    For each group, `candidates` evenly spaced increments k over the group's range are tried:
    lambda[group] + k, clamped to >= min_factor, is scored by `evaluate`. Scores >=
    `discard_at` are discarded (the paper's PPL cut of 100) and the best increment is added
    to the kept factors, which stay unclamped (only the evaluated copy is clamped, as in the
    released code: a factor pushed below the clamp must climb back before it moves again).
    The group's halves then search [min(top k) - step - best, max(top k) + step - best] (the
    `top` best increments, step = the spacing), or the old range if nothing survived; n
    halves. No monotonicity is imposed, so factors may decrease with i or drop below 1.
    For d = 128: 126 group searches x 10 = 1,260 evaluations.

    Returns the final factors, as the released search does (`SearchResult`; the best seen
    is `best_schedule`).

    Example:
        >>> start = DCIS(16, factor=4.0, original_max_position_embeddings=64)
        >>> target = torch.linspace(1, 5, 8, dtype=torch.float64)
        >>> result = dcis(lambda s: float(((torch.tensor(s.scaling_factors) - target) ** 2).mean()), start)
        >>> result.evaluations, result.score < 1e-2
        (140, True)
    """
    _check_schedule(schedule)
    if candidates < 2 or top < 1:
        raise ValueError(f"need candidates >= 2 and top >= 1, got {candidates}, {top}")
    lo, hi = map(float, initial_range)
    if not lo < hi:
        raise ValueError(f"initial_range must be (low, high) with low < high, got {initial_range!r}")
    count = _Counter(evaluate)
    factors = torch.tensor(schedule.scaling_factors, dtype=torch.float64)
    final_score = math.inf  # the kept factors' score: that of the last increment applied
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
                trial[start:end] += k
                score = count(schedule.with_factors(trial.clamp(min=min_factor)))
                if score < discard_at:
                    survivors.append((score, k))
            if survivors:
                survivors.sort()  # by score, ties to the smaller increment (the released code's stable sort)
                final_score, best_k = survivors[0]
                factors[start:end] += best_k
                kept = [k for _, k in survivors[:top]]
                next_ranges.append((start, end, (min(kept) - step - best_k, max(kept) + step - best_k)))
            else:
                next_ranges.append((start, end, (k_lo, k_hi)))
        ranges = next_ranges
        size //= 2
    return count.result(schedule.with_factors(factors.clamp(min=min_factor)), final_score, factors.tolist())


def _non_decreasing(x):
    return all(a <= b for a, b in zip(x, x[1:]))


def evolutionary(evaluate, schedule: DCIS, *, generations: int = 40, population: int = 64, parents: int = 32,
                 mutations: int = 16, crossovers: int = 16, mutation_prob: float = 0.3, crossover_tries: int = 20,
                 step: float = 0.01, seed: int = 0, max_evaluations=None) -> SearchResult:
    """The LongRoPE evolutionary search: DCIS's baseline, as the released code runs it.

    Factors are non-decreasing in i and lie in [1, 1 + s]. The first population is YaRN's
    factors (`dcis_initial_factors(..., "yarn")`, so `schedule` needs
    original_max_position_embeddings) and `population - 1` mutations of them. Each
    generation evaluates the whole population (the kept parents again: 64 x 40 = 2,560
    evaluations by default), keeps the `parents` best, and refills with `mutations` children
    (the j-th best parent mutated, j < mutations) and `crossovers` children of two distinct
    random parents. Mutation: each factor, with probability `mutation_prob`, is redrawn
    uniformly from the `step` grid between its neighbours (1 below the first, 1 + s above
    the last). Crossover: from parent 1, up to `crossover_tries` passes over the factors;
    each is considered with probability 0.3 and then takes parent 2's value with probability
    0.5; a pass ends at the first considered factor that leaves the child non-decreasing (a
    value that would break the order is not taken). The answer is the best individual of the
    last generation (the parents survive, so it is the best seen for a deterministic
    objective). `max_evaluations` stops the search early; the answer is then the best seen.

    Example:
        >>> start = DCIS(16, factor=4.0, original_max_position_embeddings=64)
        >>> evolutionary(lambda s: sum(s.scaling_factors), start, generations=2).evaluations
        128
    """
    _check_schedule(schedule)
    if schedule.original_max_position_embeddings is None:
        raise ValueError("schedule needs original_max_position_embeddings: the search starts from YaRN's factors")
    for name, value, least in (("generations", generations, 1), ("parents", parents, 2), ("mutations", mutations, 0),
                               ("crossovers", crossovers, 0), ("crossover_tries", crossover_tries, 1),
                               ("max_evaluations", 1 if max_evaluations is None else max_evaluations, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if mutations > parents or population != parents + mutations + crossovers:
        raise ValueError(f"need mutations <= parents and population = parents + mutations + "
                         f"crossovers, got population={population}, parents={parents}, mutations={mutations}, "
                         f"crossovers={crossovers}")
    if not 0 < step or not 0 <= mutation_prob <= 1:
        raise ValueError(f"need step > 0 and mutation_prob in [0, 1], got {step}, {mutation_prob}")
    rng = random.Random(seed)
    high = 1.0 + schedule.factor
    count = _Counter(evaluate)

    def mutate(parent):
        child = list(parent)
        for i in range(len(child)):
            if rng.random() < mutation_prob:
                lo = child[i - 1] if i else 1.0
                hi = child[i + 1] if i + 1 < len(child) else high
                points = math.floor((hi - lo) / step + 1e-9) + 1
                child[i] = min(lo + step * rng.randrange(points), hi)
        return child

    def crossover(first, second):
        child = list(first)
        for _ in range(crossover_tries):
            for i in range(len(child)):
                if rng.random() < 0.3:
                    old = child[i]
                    if rng.random() < 0.5:
                        child[i] = second[i]
                    if _non_decreasing(child):
                        break
                    child[i] = old
        return child

    start = dcis_initial_factors(schedule.rotary_dim, schedule.base, schedule.factor,
                                 int(schedule.original_max_position_embeddings), init="yarn").tolist()
    pool = [start] + [mutate(start) for _ in range(population - 1)]
    for generation in range(generations):
        scored = []
        for x in pool:
            if max_evaluations is not None and len(count.trace) >= max_evaluations:
                return count.result(count.best, count.score, count.best.scaling_factors)
            scored.append((count(schedule.with_factors(x)), len(scored), x))
        scored.sort(key=lambda t: t[:2])  # stable: ties keep the population's order
        elite = [x for _, _, x in scored[:parents]]
        answer = (scored[0][2], scored[0][0])
        if generation + 1 < generations:  # the released code also breeds after the last evaluation, unused
            pairs = [rng.sample(range(parents), 2) for _ in range(crossovers)]
            pool = elite + [mutate(elite[j]) for j in range(mutations)] + [crossover(elite[a], elite[b])
                                                                           for a, b in pairs]
    return count.result(schedule.with_factors(answer[0]), answer[1], answer[0])
