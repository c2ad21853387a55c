"""The statistics behind the eval rollout gate: may a candidate model replace the baseline?

Both models answer the same eval items, so the comparison is *paired*: per item i the baseline scores
b_i and the candidate c_i (in [0, 1]; 1/0 for exact match), and d_i = c_i - b_i. Pairing removes
the item-difficulty variance that dominates an unpaired comparison of two accuracies, which is
what lets a suite of about a thousand items tell a 5-point drop from noise.

The decision rule for one task, with delta = mean(d) (negative: the candidate is worse), a "drop"
= -delta, `max_drop` the drop we tolerate (0.02 = 2 points) and `confidence` (0.95):

- ``incomplete`` when the two runs do not cover the same item ids, or when fewer than `min_items`
  items are paired. Too little evidence is never a pass: a tiny suite cannot see a real drop.
- ``fail`` when the drop is *significantly* larger than `max_drop`: the one-sided upper
  confidence bound of delta (`bound`) lies below -max_drop, i.e. the one-sided lower bound of
  the drop exceeds max_drop. This is a one-sided test of H0: drop <= max_drop at level
  1 - confidence, so a candidate that is truly within the margin fails at most ~5% of the time.
- ``pass`` otherwise. A pass means "no evidence of a drop beyond max_drop"; `min_items` is chosen
  so that the gate also has the power to catch a real drop (see gate.yaml).

Two methods estimate the uncertainty of delta:

- ``bootstrap`` (default, any scores in [0, 1]): the paired bootstrap. Resample items (whole
  pairs) with replacement, `resamples` times, and take percentiles of the resampled deltas.
- ``mcnemar`` (0/1 scores only): a closed form that needs no resampling. See `_mcnemar`.

Everything is deterministic: the same inputs and seed give identical numbers (for one numpy
version), because a gate decision must be reproducible when someone asks why it failed.
Nothing here does I/O; `policy.py` reads gate.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from statistics import NormalDist
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

Method = Literal["bootstrap", "mcnemar"]
METHODS: tuple[Method, ...] = ("bootstrap", "mcnemar")

# The shipped policy (gate.yaml) states these again, explaining each; they are the values a
# caller gets without a policy.
DEFAULT_CONFIDENCE = 0.95
DEFAULT_MAX_DROP = 0.02
DEFAULT_MIN_ITEMS = 1000
DEFAULT_RESAMPLES = 10_000
DEFAULT_MAX_P95_LATENCY_INCREASE = 0.10
DEFAULT_MAX_COST_PER_REQUEST_INCREASE = 0.05

# The bootstrap draws its index matrix in blocks of about this many entries (int32), so 10,000
# resamples of a 10,000-item suite need ~24 MB at a time rather than 800 MB.
_BLOCK_ENTRIES = 1 << 21
# Relative increases are compared with this slack, so +10% measured as 0.10000000000000009
# (1.1 / 1.0 - 1 in floating point) is still "at the limit", which passes.
_FLOAT_SLACK = 1e-12


class Verdict(StrEnum):
    """A str, so verdicts compare with and serialize as "pass" / "fail" / "incomplete"."""

    PASS = "pass"
    FAIL = "fail"
    INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class PairedScores:
    """Two runs' scores aligned by item id (sorted, so dict order never changes a result)."""

    item_ids: tuple[str, ...]
    baseline: tuple[float, ...]
    candidate: tuple[float, ...]
    only_baseline: tuple[str, ...]  # ids the candidate run lacks
    only_candidate: tuple[str, ...]  # ids the baseline run lacks

    @property
    def unpaired(self) -> tuple[str, ...]:
        return tuple(sorted(self.only_baseline + self.only_candidate))


@dataclass(frozen=True)
class TaskVerdict:
    """The gate's judgement of one eval task. Fractions, not points (0.02 = 2 points).

    `ci_low`/`ci_high` is the two-sided interval for delta at `confidence`; `bound` is the
    one-sided upper confidence bound of delta that the decision uses (fail when bound < -max_drop).
    The numbers are None when there are no paired items. `p_value` is McNemar's exact two-sided
    p-value for "no difference at all" (method mcnemar only), reported for context.
    """

    task: str
    verdict: Verdict
    n: int
    baseline_mean: float | None
    candidate_mean: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    bound: float | None
    method: Method
    reason: str
    max_drop: float
    confidence: float
    p_value: float | None = None
    unpaired: tuple[str, ...] = ()


@dataclass(frozen=True)
class BudgetVerdict:
    """A latency or cost check: the candidate may be at most `max_increase` (relative) above baseline."""

    check: str
    verdict: Verdict
    baseline: float | None
    candidate: float | None
    increase: float | None
    max_increase: float
    reason: str
    # From samples (judge_increase_samples): the two-sided CI of the relative increase and n per side.
    ci_low: float | None = None
    ci_high: float | None = None
    samples: tuple[int, int] = (0, 0)


class _Estimate(NamedTuple):
    ci_low: float
    ci_high: float
    bound: float
    p_value: float | None = None
    p_worse: float | None = None  # mcnemar: exact one-sided p for "candidate worse"


# --------------------------------------------------------------------------- pairing


def pair_scores(baseline: Mapping[str, float], candidate: Mapping[str, float]) -> PairedScores:
    """Align two `{item_id: score}` runs; ids present in only one run are reported, not dropped silently."""
    common = sorted(baseline.keys() & candidate.keys())
    return PairedScores(
        item_ids=tuple(common),
        baseline=tuple(float(baseline[i]) for i in common),
        candidate=tuple(float(candidate[i]) for i in common),
        only_baseline=tuple(sorted(baseline.keys() - candidate.keys())),
        only_candidate=tuple(sorted(candidate.keys() - baseline.keys())),
    )


# --------------------------------------------------------------------------- judging a task


def judge_task(
    task: str,
    baseline: Mapping[str, float],
    candidate: Mapping[str, float],
    *,
    max_drop: float = DEFAULT_MAX_DROP,
    min_items: int = DEFAULT_MIN_ITEMS,
    confidence: float = DEFAULT_CONFIDENCE,
    method: Method = "bootstrap",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> TaskVerdict:
    """Judge one task from two `{item_id: score}` runs.

    Runs that cover different items are `incomplete`: comparing the items both happened to finish
    would hide exactly the items a broken candidate skipped (timeouts, crashes). The statistics on
    the paired part are still reported, for context.
    """
    paired = pair_scores(baseline, candidate)
    verdict = judge_paired(task, paired.baseline, paired.candidate, max_drop=max_drop, min_items=min_items,
                           confidence=confidence, method=method, resamples=resamples, seed=seed)
    if not paired.unpaired:
        return verdict
    shown = ", ".join(map(str, paired.unpaired[:5])) + (", ..." if len(paired.unpaired) > 5 else "")
    reason = (f"{task}: the runs cover different items ({len(paired.only_baseline)} only in the baseline, "
              f"{len(paired.only_candidate)} only in the candidate: {shown}); rerun both on the same items. "
              f"On the {verdict.n} paired items: {verdict.reason.removeprefix(task + ': ')}")
    return replace(verdict, verdict=Verdict.INCOMPLETE, reason=reason, unpaired=paired.unpaired)


def judge_paired(
    task: str,
    baseline: ArrayLike,
    candidate: ArrayLike,
    *,
    max_drop: float = DEFAULT_MAX_DROP,
    min_items: int = DEFAULT_MIN_ITEMS,
    confidence: float = DEFAULT_CONFIDENCE,
    method: Method = "bootstrap",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> TaskVerdict:
    """Judge one task from two score vectors already aligned item by item (see `pair_scores`)."""
    _check_parameters(max_drop, min_items, confidence, method, resamples)
    b, c = _scores(baseline, "baseline"), _scores(candidate, "candidate")
    if b.shape != c.shape:
        raise ValueError(f"baseline has {b.size} scores, candidate {c.size}: paired scores must align")
    n = b.size
    common = dict(task=task, n=n, method=method, max_drop=max_drop, confidence=confidence)
    if n == 0:
        return TaskVerdict(verdict=Verdict.INCOMPLETE, baseline_mean=None, candidate_mean=None, delta=None,
                           ci_low=None, ci_high=None, bound=None,
                           reason=f"{task}: no paired items (the gate needs {min_items})", **common)

    d = c - b
    delta = float(d.mean())
    if method == "bootstrap":
        estimate = _bootstrap(d, confidence, resamples, seed)
    else:
        estimate = _mcnemar(b, c, confidence)

    level = f"{confidence:.0%}"
    summary = (f"{task}: delta {_pts(delta)} on {n} items ({level} CI {_pts(estimate.ci_low)} to "
               f"{_pts(estimate.ci_high)}; one-sided {level} bound {_pts(estimate.bound)})")
    significant = estimate.bound < -max_drop
    if n < min_items:
        verdict, why = Verdict.INCOMPLETE, f"only {n} paired items, the gate needs {min_items} to judge"
    elif significant and estimate.p_worse is not None and estimate.p_worse >= 1 - confidence:
        # mcnemar's second condition (see _mcnemar): too few discordant items for the Wald bound.
        verdict = Verdict.PASS
        why = (f"the bound is below -{_pts(max_drop, sign=False)} but McNemar's exact test does not "
               f"show the candidate worse at all (one-sided p {estimate.p_worse:.3g})")
    elif significant:
        verdict = Verdict.FAIL
        why = f"the drop is significantly larger than the allowed {_pts(max_drop, sign=False)}"
    else:
        verdict = Verdict.PASS
        why = f"no significant drop beyond the allowed {_pts(max_drop, sign=False)}"
    return TaskVerdict(verdict=verdict, baseline_mean=float(b.mean()), candidate_mean=float(c.mean()),
                       delta=delta, ci_low=estimate.ci_low, ci_high=estimate.ci_high, bound=estimate.bound,
                       p_value=estimate.p_value, reason=f"{summary}: {why}", **common)


def _bootstrap(d: np.ndarray, confidence: float, resamples: int, seed: int) -> _Estimate:
    """Paired percentile bootstrap of mean(d).

    Resampling whole items keeps each item's baseline and candidate score together, so the
    interval reflects the paired (small) variance. Percentiles rather than mean +- z*SE, because
    with accuracies near 1 (or few discordant items) the distribution of delta is skewed.
    """
    means = _bootstrap_means(d, resamples, seed)
    alpha = 1.0 - confidence
    low, high, bound = np.quantile(means, [alpha / 2, 1 - alpha / 2, confidence])
    return _Estimate(float(low), float(high), float(bound))


def _bootstrap_means(d: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """`resamples` means of `d` resampled with replacement; vectorized in blocks, deterministic in `seed`."""
    return _bootstrap_statistic(d, "mean", resamples, np.random.default_rng(seed))


def _mcnemar(b: np.ndarray, c: np.ndarray, confidence: float) -> _Estimate:
    """Paired 0/1 outcomes: Wald interval for the difference, McNemar's exact test alongside.

    With `gains` items only the candidate gets right and `losses` items only the baseline gets
    right, delta = (gains - losses) / n and its standard error is
    SE = sqrt(((gains + losses) / n - delta**2) / n) (the paired-proportions Wald SE).

    There is no exact test of a *non-zero* margin (H0: drop <= max_drop): conditional on the
    discordant count, the chance that a discordant item is a loss depends on the unknown share of
    discordant items, not on the margin alone. So the margin is tested with the normal
    approximation: fail when bound = delta + z(confidence) * SE < -max_drop, i.e. when
    z = (drop - max_drop) / SE > z(confidence). Wald is too liberal when only a handful of items
    are discordant, so a fail also requires McNemar's exact one-sided test of "the candidate is no
    worse" (H0: drop <= 0, binomial on the discordant items) to reject at 1 - confidence; that is
    a valid test for every max_drop >= 0 and never makes the rule fail more often.

    `p_value` is McNemar's exact two-sided p for H0: no difference.
    """
    for name, scores in (("baseline", b), ("candidate", c)):
        if not np.isin(scores, (0.0, 1.0)).all():
            raise ValueError(f"method mcnemar needs 0/1 scores; the {name} has others (use bootstrap)")
    n = b.size
    gains = int(np.count_nonzero((c == 1) & (b == 0)))
    losses = int(np.count_nonzero((b == 1) & (c == 0)))
    delta = (gains - losses) / n
    se = math.sqrt(max((gains + losses) / n - delta * delta, 0.0) / n)
    alpha = 1.0 - confidence
    z_two, z_one = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(confidence)
    return _Estimate(
        ci_low=max(delta - z_two * se, -1.0),
        ci_high=min(delta + z_two * se, 1.0),
        bound=min(delta + z_one * se, 1.0),
        p_value=mcnemar_exact_p(gains, losses),
        p_worse=binomial_tail(losses, gains + losses),
    )


def binomial_tail(k: int, m: int) -> float:
    """P(X >= k) for X ~ Binomial(m, 1/2), exactly (integer arithmetic, then one division)."""
    if k <= 0:
        return 1.0
    if k > m:
        return 0.0
    return sum(math.comb(m, i) for i in range(k, m + 1)) / (1 << m)


def mcnemar_exact_p(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value from the two discordant counts b and c.

    Under H0 (no difference) each of the b + c discordant items is equally likely to fall either
    way, so p = 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    return min(1.0, 2 * binomial_tail(max(b, c), m))  # P(X <= min) == P(X >= max) by symmetry


# --------------------------------------------------------------------------- latency and cost


def relative_increase(baseline: float, candidate: float) -> float:
    """(candidate - baseline) / baseline: 0.10 means the candidate is 10% higher."""
    if not (math.isfinite(baseline) and baseline > 0):
        raise ValueError(f"a relative increase needs a positive, finite baseline, got {baseline!r}")
    if not math.isfinite(candidate) or candidate < 0:
        raise ValueError(f"candidate must be a finite value >= 0, got {candidate!r}")
    return (candidate - baseline) / baseline


def judge_increase(check: str, baseline: float | None, candidate: float | None,
                   max_increase: float) -> BudgetVerdict:
    """Pass when the candidate is at most `max_increase` above the baseline (exactly at the limit passes).

    A missing measurement is `incomplete`, never a pass: no load test, no rollout. This is a point
    comparison: p95 latencies and costs per request come from load tests of thousands of requests.
    """
    common = dict(check=check, baseline=baseline, candidate=candidate, max_increase=max_increase)
    missing = [name for name, value in (("baseline", baseline), ("candidate", candidate)) if value is None]
    if missing:
        return BudgetVerdict(verdict=Verdict.INCOMPLETE, increase=None,
                             reason=f"{check}: no {' or '.join(missing)} measurement", **common)
    try:
        increase = relative_increase(baseline, candidate)  # type: ignore[arg-type]
    except ValueError as error:
        return BudgetVerdict(verdict=Verdict.INCOMPLETE, increase=None, reason=f"{check}: {error}", **common)
    within = increase <= max_increase + _FLOAT_SLACK
    verdict = Verdict.PASS if within else Verdict.FAIL
    relation = "within" if within else "above"
    reason = (f"{check}: {increase:+.1%} ({baseline:g} -> {candidate:g}), "
              f"{relation} the allowed +{max_increase:.0%}")
    return BudgetVerdict(verdict=verdict, increase=increase, reason=reason, **common)


Statistic = Literal["p95", "mean"]


def judge_increase_samples(check: str, baseline: Sequence[float], candidate: Sequence[float],
                           max_increase: float, *, statistic: Statistic = "p95",
                           confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES,
                           seed: int = 0) -> BudgetVerdict:
    """A latency or cost budget judged on per-request samples, with the same logic as quality:
    fail only when the increase is *significantly* above `max_increase`.

    The statistic (`p95` of latencies, `mean` of per-request costs) of each side is bootstrapped
    (each side resampled on its own, `resamples` times, deterministic in `seed`); the relative
    increase's one-sided `confidence` lower bound is compared with `max_increase`. Why not the point
    comparison of `judge_increase`: on a shared machine two runs of the *same* model differ in p95 by
    several percent, so a point rule with a +10% budget fails A/A checks by chance; this rule fails
    an unchanged candidate at most ~(1 - confidence) of the time, and a real +50% still fails.
    The point estimate (statistic of all samples) is what the report shows. No samples on a side:
    incomplete.
    """
    b, c = np.asarray(baseline, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    point = (lambda x: p95(list(x))) if statistic == "p95" else (lambda x: float(x.mean()) if x.size else None)
    base_value, cand_value = point(b), point(c)
    verdict = judge_increase(check, base_value, cand_value, max_increase)
    if verdict.verdict == Verdict.INCOMPLETE:
        return replace(verdict, samples=(b.size, c.size))
    rng = np.random.default_rng(seed)
    ratios = _bootstrap_statistic(c, statistic, resamples, rng) / _bootstrap_statistic(b, statistic, resamples, rng)
    alpha = 1.0 - confidence
    low, high, lower_bound = (float(x) - 1.0 for x in np.quantile(ratios, [alpha / 2, 1 - alpha / 2, alpha]))
    fails = lower_bound > max_increase + _FLOAT_SLACK
    reason = (f"{check}: {verdict.increase:+.1%} ({base_value:.4g} -> {cand_value:.4g}; {confidence:.0%} CI "
              f"{low:+.1%} to {high:+.1%}, n {b.size:,}/{c.size:,}), "
              + (f"significantly above the allowed +{max_increase:.0%}" if fails
                 else f"not significantly above the allowed +{max_increase:.0%}"))
    return replace(verdict, verdict=Verdict.FAIL if fails else Verdict.PASS, reason=reason, ci_low=low,
                   ci_high=high, samples=(b.size, c.size))


def _bootstrap_statistic(x: np.ndarray, statistic: Statistic, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """`resamples` values of the statistic on `x` resampled with replacement (p95 as `p95()` takes it),
    in blocks of about `_BLOCK_ENTRIES` indices, so memory stays flat for large suites."""
    rows = max(1, _BLOCK_ENTRIES // x.size)
    out = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        sample = x[rng.integers(0, x.size, size=(stop - start, x.size), dtype=np.int32)]
        if statistic == "p95":
            sample.sort(axis=1)
            out[start:stop] = sample[:, min(x.size - 1, int(0.95 * x.size))]
        else:
            out[start:stop] = sample.mean(axis=1)
    return out


def judge_latency_cost(
    *,
    baseline_p95_s: float | None,
    candidate_p95_s: float | None,
    baseline_cost_per_request: float | None,
    candidate_cost_per_request: float | None,
    max_p95_latency_increase: float = DEFAULT_MAX_P95_LATENCY_INCREASE,
    max_cost_per_request_increase: float = DEFAULT_MAX_COST_PER_REQUEST_INCREASE,
) -> tuple[BudgetVerdict, BudgetVerdict]:
    """The two budget checks a rollout needs besides quality: p95 latency and cost per request."""
    return (
        judge_increase("p95_latency", baseline_p95_s, candidate_p95_s, max_p95_latency_increase),
        judge_increase("cost_per_request", baseline_cost_per_request, candidate_cost_per_request,
                       max_cost_per_request_increase),
    )


# --------------------------------------------------------------------------- the overall decision


def combine(results: Iterable[Verdict | str | TaskVerdict | BudgetVerdict]) -> Verdict:
    """Any fail fails the rollout; otherwise any incomplete makes it incomplete; otherwise pass.

    Nothing judged is `incomplete`: an empty gate must not wave a rollout through.
    """
    verdicts = [Verdict(getattr(result, "verdict", result)) for result in results]
    if Verdict.FAIL in verdicts:
        return Verdict.FAIL
    if not verdicts or Verdict.INCOMPLETE in verdicts:
        return Verdict.INCOMPLETE
    return Verdict.PASS


# --------------------------------------------------------------------------- helpers


def _scores(values: ArrayLike | Sequence[float], name: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64).ravel()
    if not np.all((scores >= 0) & (scores <= 1)):  # also rejects NaN
        raise ValueError(f"{name} scores must lie in [0, 1] (and not be NaN)")
    return scores


def _check_parameters(max_drop: float, min_items: int, confidence: float, method: str,
                      resamples: int) -> None:
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence!r}")
    if not 0 <= max_drop < 1:
        raise ValueError(f"max_drop must be in [0, 1), got {max_drop!r}")
    if min_items < 1:
        raise ValueError(f"min_items must be >= 1, got {min_items!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples!r}")


def p95(samples: Sequence[float]) -> float | None:
    """The p95 the eval runs report and the gate judges: the sorted sample at index int(0.95 n)
    (a real observed latency, no interpolation); None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def _pts(fraction: float, *, sign: bool = True) -> str:
    """A fraction as points: -0.0213 -> '-2.13 pts'."""
    return f"{100 * fraction:{'+' if sign else ''}.2f} pts"
