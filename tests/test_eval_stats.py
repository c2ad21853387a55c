"""The eval rollout gate's statistics and policy: the decision rule, its calibration and its power.

The simulations model sampling noise the way evals see it: every item has its own chance p_i of
being answered right (U-shaped: most items are almost always right or almost always wrong), and
each run draws an independent 0/1 outcome per item. All of them are seeded, so these tests give
the same numbers on every run.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from fleetlens.evals.policy import GatePolicy, load_policy
from fleetlens.evals.stats import (
    BudgetVerdict,
    TaskVerdict,
    Verdict,
    combine,
    judge_increase,
    judge_latency_cost,
    judge_paired,
    judge_task,
    mcnemar_exact_p,
    pair_scores,
    relative_increase,
)

POLICY = load_policy()
N = POLICY.min_items  # the default sample size (1,000; gate.yaml explains why)
MAX_DROP = POLICY.max_drop
METHODS = ("bootstrap", "mcnemar")

# The simulated items: p_i ~ Beta(A, B), mean accuracy 0.75; two runs of one model disagree on ~8% of items.
BETA_A, BETA_B = 0.2, 0.2 / 3
MEAN_P = BETA_A / (BETA_A + BETA_B)
SIM_RESAMPLES = 1000  # bootstrap resamples inside the simulations (the gate itself uses 10,000)


def runs(n: int, correct_baseline: int, lost: int, gained: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """0/1 runs: the baseline gets the first `correct_baseline` items right; the candidate loses
    `lost` of those and gets `gained` of the others right."""
    baseline = np.zeros(n)
    baseline[:correct_baseline] = 1
    candidate = baseline.copy()
    candidate[:lost] = 0
    candidate[correct_baseline:correct_baseline + gained] = 1
    return baseline, candidate


def simulate(true_drop: float, reps: int, seed: int, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """`reps` paired runs of `n` fresh items; the candidate's p_i is scaled so its expected accuracy
    is exactly `true_drop` below the baseline's (true_drop 0: an A/A comparison)."""
    rng = np.random.default_rng(seed)
    p = rng.beta(BETA_A, BETA_B, size=(reps, n))
    q = p * (1 - true_drop / MEAN_P)
    baseline = (rng.random((reps, n)) < p).astype(float)
    candidate = (rng.random((reps, n)) < q).astype(float)
    return baseline, candidate


def fail_rate(method: str, true_drop: float, max_drop: float, reps: int, seed: int) -> float:
    baseline, candidate = simulate(true_drop, reps, seed)
    verdicts = [judge_paired("sim", b, c, method=method, max_drop=max_drop, min_items=N,
                             resamples=SIM_RESAMPLES, seed=POLICY.seed).verdict
                for b, c in zip(baseline, candidate)]
    assert Verdict.INCOMPLETE not in verdicts
    return verdicts.count(Verdict.FAIL) / reps


def allowance(reps: int, rate: float = 0.05) -> float:
    """Monte-Carlo slack: 2.5 binomial standard errors of a `rate` estimated from `reps` runs.

    A gate with the nominal 5% exceeds 5% + this with probability < 1%; one that fails 10% of
    good candidates stays under it with probability < 0.1% (1,000 runs; 3,000 for mcnemar).
    """
    return 2.5 * math.sqrt(rate * (1 - rate) / reps)


# --------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("method", METHODS)
def test_identical_runs_pass_with_zero_delta(method):
    rng = np.random.default_rng(0)
    scores = (rng.random(N) < 0.7).astype(float)
    verdict = judge_paired("aa", scores, scores.copy(), method=method, min_items=N)
    assert verdict.verdict == Verdict.PASS
    assert verdict.delta == verdict.ci_low == verdict.ci_high == verdict.bound == 0.0
    assert verdict.baseline_mean == verdict.candidate_mean == pytest.approx(scores.mean())
    assert verdict.n == N and verdict.method == method
    if method == "mcnemar":
        assert verdict.p_value == 1.0


def test_identical_continuous_scores_pass_with_bootstrap():
    scores = np.random.default_rng(1).random(N)  # e.g. token F1, not exact match
    verdict = judge_paired("aa", scores, scores, min_items=N)
    assert (verdict.verdict, verdict.delta, verdict.bound) == (Verdict.PASS, 0.0, 0.0)
    with pytest.raises(ValueError, match="0/1 scores"):
        judge_paired("aa", scores, scores, method="mcnemar", min_items=N)


def graded(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous scores (think token F1): the candidate is `shift` lower on average, plus noise."""
    rng = np.random.default_rng(seed)
    baseline = rng.random(n)
    candidate = np.clip(baseline - shift + rng.normal(0, 0.1, n), 0, 1)
    return baseline, candidate


def test_same_seed_same_verdict_and_item_order_does_not_matter():
    baseline, candidate = graded(N, shift=0.01, seed=2)
    ids = [f"item-{i:04d}" for i in range(N)]
    base, forward = dict(zip(ids, baseline)), dict(zip(ids, candidate))
    backward = dict(reversed(list(forward.items())))
    first = judge_task("t", base, forward, seed=7)
    assert judge_task("t", base, forward, seed=7) == first
    assert judge_task("t", base, backward, seed=7) == first  # pairs by sorted id, not dict order
    # Another seed draws other resamples: the interval moves a little; what comes from the data does not.
    other = judge_task("t", base, forward, seed=8)
    assert other.bound != first.bound and other.bound == pytest.approx(first.bound, abs=0.001)
    assert (other.delta, other.n, other.baseline_mean, other.verdict) == (
        first.delta, first.n, first.baseline_mean, first.verdict)


def test_different_seeds_agree_on_a_clear_case():
    baseline, candidate = graded(500, shift=0.13, seed=3)
    verdicts = [judge_paired("t", baseline, candidate, min_items=500, seed=seed) for seed in range(5)]
    assert {v.verdict for v in verdicts} == {Verdict.FAIL}
    assert len({v.ci_low for v in verdicts}) == 5  # the seed is used


@pytest.mark.parametrize("method", METHODS)
def test_a_13_point_regression_fails(method):
    baseline, candidate = runs(500, 450, lost=70, gained=5)  # 90% -> 77%
    verdict = judge_paired("lookup_hard", baseline, candidate, method=method, min_items=500)
    assert verdict.verdict == Verdict.FAIL
    assert verdict.delta == pytest.approx(-0.13)
    assert verdict.ci_low < verdict.delta < verdict.ci_high < -MAX_DROP  # the CI excludes -max_drop
    assert verdict.bound < -MAX_DROP
    assert "significantly larger" in verdict.reason and "-13.00 pts" in verdict.reason
    if method == "mcnemar":
        assert verdict.p_value < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_a_quarter_point_drop_passes(method):
    baseline, candidate = runs(2000, 1996, lost=5)  # 99.8% -> 99.55%, int4-sized
    verdict = judge_paired("t", baseline, candidate, method=method, min_items=N)
    assert verdict.verdict == Verdict.PASS
    assert verdict.delta == pytest.approx(-0.0025)
    assert verdict.bound > -MAX_DROP


def test_the_demo_int4_variant_passes_the_shipped_policy_and_int3_fails():
    ids = [f"k{i:04d}" for i in range(3000)]
    large, int4 = runs(3000, 2997, lost=12, gained=3)  # 99.9% -> 99.6% on lookup_hard
    _, int3 = runs(3000, 2997, lost=1600)  # -> 46.6%
    as_dict = lambda scores: dict(zip(ids, scores))  # noqa: E731
    assert POLICY.judge_task("lookup_hard", as_dict(large), as_dict(int4)).verdict == Verdict.PASS
    assert POLICY.judge_task("lookup_hard", as_dict(large), as_dict(int3)).verdict == Verdict.FAIL


def test_the_easy_slice_fails_any_significant_loss():
    easy_ids = [f"e{i:02d}" for i in range(50)]
    perfect = dict.fromkeys(easy_ids, 1.0)
    # 50 items reach lookup_easy's own min_items
    assert POLICY.judge_task("lookup_easy", perfect, dict(perfect)).verdict == Verdict.PASS
    one_lost = perfect | {"e00": 0.0}
    three_lost = perfect | {"e00": 0.0, "e01": 0.0, "e02": 0.0}  # 94%, like int3
    assert POLICY.judge_task("lookup_easy", perfect, one_lost).verdict == Verdict.PASS
    assert POLICY.judge_task("lookup_easy", perfect, three_lost).verdict == Verdict.FAIL


@pytest.mark.parametrize("method", METHODS)
def test_too_few_items_is_incomplete_never_pass(method):
    scores = np.ones(N - 1)
    verdict = judge_paired("t", scores, scores, method=method, min_items=N)
    assert verdict.verdict == Verdict.INCOMPLETE
    assert f"only {N - 1} paired items, the gate needs {N}" in verdict.reason
    assert verdict.delta == 0.0  # still reported, for context
    baseline, candidate = runs(100, 90, lost=50)  # even a disaster: not enough items to judge
    assert judge_paired("t", baseline, candidate, method=method, min_items=N).verdict == Verdict.INCOMPLETE
    empty = judge_paired("t", [], [], method=method, min_items=N)
    assert (empty.verdict, empty.n, empty.delta, empty.bound) == (Verdict.INCOMPLETE, 0, None, None)


def test_unpaired_items_are_reported_and_make_the_task_incomplete():
    baseline = {f"q{i:04d}": 1.0 for i in range(N + 2)}
    candidate = {k: v for k, v in baseline.items() if k not in ("q0003", "q0007")} | {"extra": 1.0}
    paired = pair_scores(baseline, candidate)
    assert len(paired.item_ids) == N
    assert paired.only_baseline == ("q0003", "q0007")
    assert paired.only_candidate == ("extra",)
    assert paired.unpaired == ("extra", "q0003", "q0007")
    verdict = judge_task("t", baseline, candidate, min_items=N)
    assert verdict.verdict == Verdict.INCOMPLETE  # N paired items would have been enough
    assert verdict.unpaired == ("extra", "q0003", "q0007")
    assert "2 only in the baseline, 1 only in the candidate: extra, q0003, q0007" in verdict.reason
    assert judge_task("t", baseline, dict(baseline), min_items=N).verdict == Verdict.PASS


def test_bootstrap_interval_is_paired():
    """Resampling whole pairs gives the small paired SE; resampling each run on its own would not."""
    rng = np.random.default_rng(3)
    baseline = (rng.random(N) < 0.6).astype(float)
    candidate = baseline.copy()
    flip = rng.choice(N, 40, replace=False)
    candidate[flip] = 1 - candidate[flip]
    verdict = judge_paired("t", baseline, candidate, min_items=N)
    d = candidate - baseline
    expected_width = 2 * 1.959964 * d.std() / math.sqrt(N)  # ~2.4 points; unpaired would be ~8.6
    assert verdict.ci_high - verdict.ci_low == pytest.approx(expected_width, rel=0.1)


def test_mcnemar_needs_exact_evidence_before_failing():
    # 3 losses, no gains, max_drop 0: the Wald bound is just below 0, but McNemar's exact
    # one-sided p is 1/8, so a handful of discordant items cannot fail the candidate.
    baseline, candidate = runs(N, 900, lost=3)
    few = judge_paired("t", baseline, candidate, method="mcnemar", max_drop=0.0, min_items=N)
    assert few.bound < 0
    assert few.verdict == Verdict.PASS and "exact test" in few.reason
    baseline, candidate = runs(N, 900, lost=6)  # one-sided p = 1/64
    assert judge_paired("t", baseline, candidate, method="mcnemar", max_drop=0.0,
                        min_items=N).verdict == Verdict.FAIL


def test_mcnemar_exact_p_values():
    assert mcnemar_exact_p(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)  # 0.021484375
    assert mcnemar_exact_p(1, 9) == pytest.approx(0.021484375, abs=1e-12)
    assert mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)
    assert mcnemar_exact_p(0, 0) == mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 3)


def test_mcnemar_exact_p_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for b, c in ((1, 9), (7, 19), (30, 45), (120, 160), (0, 12)):
        assert mcnemar_exact_p(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        judge_paired("t", [0.5, 1.5], [1.0, 1.0], min_items=1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        judge_paired("t", [0.5, float("nan")], [1.0, 1.0], min_items=1)
    with pytest.raises(ValueError, match="align"):
        judge_paired("t", [1.0, 1.0], [1.0], min_items=1)
    with pytest.raises(ValueError, match="confidence"):
        judge_paired("t", [1.0], [1.0], confidence=1.0)
    with pytest.raises(ValueError, match="method"):
        judge_paired("t", [1.0], [1.0], method="ttest")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- calibration and power


@pytest.mark.parametrize("method, reps", [("bootstrap", 300), ("mcnemar", 3000)])
def test_false_fail_rate_of_an_aa_comparison(method, reps):
    rate = fail_rate(method, true_drop=0.0, max_drop=MAX_DROP, reps=reps, seed=10)
    print(f"\nA/A false-fail rate ({method}, n={N}, {reps} runs): {rate:.2%}")
    assert rate <= 0.05


@pytest.mark.parametrize("method, reps", [("bootstrap", 1000), ("mcnemar", 3000)])
@pytest.mark.parametrize("true_drop, max_drop", [(MAX_DROP, MAX_DROP), (0.0, 0.0)])
def test_false_fail_rate_at_the_boundary(method, reps, true_drop, max_drop):
    """A candidate exactly `max_drop` worse is still acceptable: it may fail ~5% of the time."""
    rate = fail_rate(method, true_drop=true_drop, max_drop=max_drop, reps=reps, seed=11)
    print(f"\nboundary false-fail rate ({method}, drop = max_drop = {max_drop}, {reps} runs): {rate:.2%}")
    assert rate <= 0.05 + allowance(reps)


@pytest.mark.parametrize("method, reps", [("bootstrap", 500), ("mcnemar", 3000)])
def test_power_against_a_5_point_drop_at_the_default_sample_size(method, reps):
    power = fail_rate(method, true_drop=0.05, max_drop=MAX_DROP, reps=reps, seed=12)
    print(f"\npower vs a 5-point drop ({method}, n={N}, {reps} runs): {power:.1%}")
    assert power >= 0.80


# --------------------------------------------------------------------------- latency, cost, combining


def test_relative_increase():
    assert relative_increase(100.0, 110.0) == pytest.approx(0.10)
    assert relative_increase(2.0, 1.0) == -0.5
    assert relative_increase(0.02, 0.02) == 0.0
    for baseline in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            relative_increase(baseline, 1.0)


def test_latency_and_cost_budgets():
    latency, cost = judge_latency_cost(baseline_p95_s=1.0, candidate_p95_s=1.1,  # exactly +10%: passes
                                       baseline_cost_per_request=0.010, candidate_cost_per_request=0.0104)
    assert (latency.check, latency.verdict, cost.check, cost.verdict) == (
        "p95_latency", Verdict.PASS, "cost_per_request", Verdict.PASS)
    assert cost.increase == pytest.approx(0.04)
    latency, cost = judge_latency_cost(baseline_p95_s=1.0, candidate_p95_s=1.25,
                                       baseline_cost_per_request=0.010, candidate_cost_per_request=0.011)
    assert latency.verdict == cost.verdict == Verdict.FAIL
    assert "+25.0%" in latency.reason and "+10%" in latency.reason
    latency, cost = judge_latency_cost(baseline_p95_s=1.0, candidate_p95_s=None,
                                       baseline_cost_per_request=0.0, candidate_cost_per_request=0.01)
    assert latency.verdict == cost.verdict == Verdict.INCOMPLETE
    assert "no candidate measurement" in latency.reason and "positive" in cost.reason
    assert judge_increase("p95_latency", 1.0, 0.5, 0.10).verdict == Verdict.PASS  # faster is fine


def test_combine():
    task = lambda verdict: TaskVerdict("t", verdict, 1, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0,  # noqa: E731
                                       "bootstrap", "", 0.02, 0.95)
    budget = BudgetVerdict("cost_per_request", Verdict.PASS, 1.0, 1.0, 0.0, 0.05, "")
    assert combine([task(Verdict.PASS), budget]) == Verdict.PASS
    assert combine([task(Verdict.PASS), task(Verdict.INCOMPLETE), budget]) == Verdict.INCOMPLETE
    assert combine([task(Verdict.INCOMPLETE), task(Verdict.FAIL), budget]) == Verdict.FAIL
    assert combine(["pass", "fail"]) == Verdict.FAIL
    assert combine([]) == Verdict.INCOMPLETE  # nothing judged is not a pass


# --------------------------------------------------------------------------- policy


def test_shipped_policy():
    shipped = resources.files("fleetlens.evals") / "gate.yaml"
    assert shipped.is_file()
    assert load_policy(Path(str(shipped))) == POLICY
    assert (POLICY.confidence, POLICY.method) == (0.95, "bootstrap")
    assert (POLICY.bootstrap_resamples, POLICY.seed) == (10_000, 0)
    assert (POLICY.min_items, POLICY.max_drop) == (1000, 0.02)
    assert (POLICY.max_p95_latency_increase, POLICY.max_cost_per_request_increase) == (0.10, 0.05)
    assert POLICY.for_task("lookup_easy") == (0.0, 50)
    assert POLICY.for_task("lookup_hard") == (0.01, 1000)
    assert POLICY.for_task("gsm8k") == (0.02, 1000)  # no override: the defaults


def test_for_task_overrides():
    policy = GatePolicy.model_validate({"max_drop": 0.03, "min_items": 300,
                                        "tasks": {"a": {"max_drop": 0.0}, "b": {"min_items": 40}, "c": None}})
    assert policy.for_task("a") == (0.0, 300)
    assert policy.for_task("b") == (0.03, 40)
    assert policy.for_task("c") == policy.for_task("zzz") == (0.03, 300)


@pytest.mark.parametrize("text, names", [
    ("confidence: 1.5\n", ["confidence", "less than 1"]),
    ("confidence: 0.5\n", ["confidence", "greater than 0.5"]),
    ("max_drop: -0.01\n", ["max_drop"]),
    ("min_items: 0\n", ["min_items"]),
    ("method: ttest\n", ["method", "'bootstrap' or 'mcnemar'"]),
    ("max_drops: 0.02\n", ["max_drops: unknown key"]),
    ("tasks:\n  x:\n    max_drop: 0.02\n    min_item: 10\n", ["tasks.x.min_item: unknown key"]),
    ("confidence: [0.9\n", ["not valid YAML at line 2"]),
    ("- 1\n", ["must be a mapping"]),
])
def test_invalid_policies_name_the_file_and_field(tmp_path, text, names):
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        load_policy(path)
    message = str(error.value)
    assert str(path) in message
    for name in names:
        assert name in message
