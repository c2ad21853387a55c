"""`fleetlens eval gate` without models: reading the two sides (git revisions, directories, files), what
changed and what must be evaluated, cost allocation from engine spans, and budgets judged on samples."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from fleetlens.config import ConfigError
from fleetlens.evals.cost import allocate
from fleetlens.evals.gate_plan import plan_gate
from fleetlens.evals.refs import load_fleet_config
from fleetlens.evals.stats import Verdict, judge_increase_samples

GPU = "gpu: {type: cpu, count: 1, hourly_usd: 0.1}"
MODELS = f"""models:
  small: {{path: ./ckpt/small, variant: fp32, {GPU}}}
  large: {{path: ./ckpt/large, variant: fp32, {GPU}}}
  large-int8: {{path: ./ckpt/large-int8, variant: int8, base: large, {GPU}, replicas: 0}}
  large-int3: {{path: ./ckpt/large-int3, variant: int3, base: large, {GPU}, replicas: 0}}
"""
ROUTES = """default: lookup
features:
  faq: {model: large, fallback: [small], timeout_s: 30}
  lookup: {model: large, fallback: [small], timeout_s: 30}
"""
TRAFFIC = {"faq": ["lookup_easy"], "lookup": ["lookup_hard"]}
SUITE = ["lookup_easy", "lookup_hard"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with fleet/models.yaml and fleet/routes.yaml committed once."""
    root = tmp_path / "repo"
    (root / "fleet").mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "t")
    (root / "fleet" / "models.yaml").write_text(MODELS)
    (root / "fleet" / "routes.yaml").write_text(ROUTES)
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "fleet")
    return root


def commit(repo: Path, models: str | None = None, routes: str | None = None) -> str:
    if models is not None:
        (repo / "fleet" / "models.yaml").write_text(models)
    if routes is not None:
        (repo / "fleet" / "routes.yaml").write_text(routes)
    git(repo, "commit", "-q", "-am", "change")
    return git(repo, "rev-parse", "HEAD")


def sides(repo: Path, baseline: str, candidate: str):
    paths = dict(models_path=repo / "fleet" / "models.yaml", routes_path=repo / "fleet" / "routes.yaml", repo=repo)
    return load_fleet_config(baseline, **paths), load_fleet_config(candidate, **paths)


def plan(repo: Path, baseline: str = "HEAD~1", candidate: str = "HEAD", **kwargs):
    return plan_gate(*sides(repo, baseline, candidate), traffic=TRAFFIC, suite_tasks=SUITE, **kwargs)


def test_git_revisions_resolve_checkpoints_relative_to_the_committed_file(repo: Path) -> None:
    sha = commit(repo, routes=ROUTES.replace("faq: {model: large, fallback: [small]",
                                             "faq: {model: small, fallback: [large]"))
    baseline, candidate = sides(repo, "HEAD~1", "HEAD")
    assert candidate.label == f"git {sha[:12]} (HEAD)" and baseline.label.startswith("git ")
    # ./ckpt/small in fleet/models.yaml names the checkpoint next to that file, at either revision
    assert baseline.registry.models["small"].path == str((repo / "fleet" / "ckpt" / "small").resolve())
    assert baseline.routes.features["faq"].model == "large" and candidate.routes.features["faq"].model == "small"


def test_a_route_moving_easy_traffic_is_judged_on_its_own_slice(repo: Path) -> None:
    commit(repo, routes=ROUTES.replace("faq: {model: large, fallback: [small]", "faq: {model: small, fallback: [large]"))
    result = plan(repo)
    assert [(u.target, u.kind, u.tasks) for u in result.units] == [("faq", "route", ("lookup_easy",))]
    assert result.models == {"baseline": frozenset({"large"}), "candidate": frozenset({"small"})}
    assert any("route faq:" in c and "model large -> small" in c for c in result.changes)
    assert any("fallback models are not started" in n for n in result.notes)


def test_a_changed_model_is_judged_through_every_route_it_serves(repo: Path) -> None:
    commit(repo, models=MODELS.replace("large: {path: ./ckpt/large, variant: fp32",
                                       "large: {path: ./ckpt/large-int3, variant: int3"))
    result = plan(repo)
    assert [(u.target, u.tasks) for u in result.units] == [("faq", ("lookup_easy",)), ("lookup", ("lookup_hard",))]
    assert all("served by changed model large" in u.why for u in result.units)
    assert result.models == {"baseline": frozenset({"large"}), "candidate": frozenset({"large"})}
    (change,) = result.changes
    assert change.startswith("model large: ") and "variant fp32 -> int3" in change


def test_canary_and_cascade_changes_bring_up_every_model_the_route_answers_with(repo: Path) -> None:
    commit(repo, models=MODELS.replace("replicas: 0}\n  large-int3", "replicas: 1}\n  large-int3"),
           routes=ROUTES.replace("lookup: {model: large, fallback: [small], timeout_s: 30}",
                                 "lookup: {cascade: {small: small, large: large, threshold: 0.5},\n"
                                 "           canary: {model: large-int8, weight: 0.5, replaces: large}}"))
    result = plan(repo)
    assert [u.target for u in result.units] == ["lookup"]
    assert "cascade" in result.units[0].why and "canary" in result.units[0].why
    assert result.models["candidate"] == {"small", "large", "large-int8"}
    assert any(c.startswith("model large-int8: replicas 0 -> 1") and c.endswith("(capacity only)")
               for c in result.changes)


def test_changes_that_cannot_change_an_answer_are_not_evaluated(repo: Path) -> None:
    commit(repo, routes=ROUTES.replace("lookup: {model: large, fallback: [small], timeout_s: 30}",
                                       "lookup: {model: large, fallback: [small], timeout_s: 90}"))
    result = plan(repo)
    assert result.units == () and result.changes == ("route lookup: timeout_s 30.0 -> 90.0",)
    assert any("cannot change an answer" in n for n in result.notes)


def test_new_route_unrouted_model_and_forced_targets(repo: Path) -> None:
    commit(repo, models=MODELS.replace("./ckpt/large-int3", "./ckpt/large-int3-v2"),
           routes=ROUTES + "  search: {model: small}\n")
    result = plan(repo, evaluate=["lookup"])
    assert [(u.target, u.kind, u.tasks) for u in result.units] == [
        ("large-int3", "model", ("lookup_easy", "lookup_hard")),  # changed, routed nowhere: the whole suite
        ("lookup", "route", ("lookup_hard",))]  # asked for: an A/A check of an unchanged route
    assert "route search: added" in result.changes
    assert any("search is new" in n for n in result.notes)
    with pytest.raises(ConfigError, match="cannot evaluate 'nope'"):
        plan(repo, evaluate=["nope"])
    same = plan(repo, "HEAD", "HEAD", evaluate=["faq"])  # A/A: same revision, one unit, one model per side
    assert same.changes == () and [u.target for u in same.units] == ["faq"]


def test_directories_files_and_bad_references(repo: Path, tmp_path: Path) -> None:
    routes = tmp_path / "candidate-routes.yaml"
    routes.write_text(ROUTES.replace("faq: {model: large, fallback: [small]", "faq: {model: small, fallback: [large]"))
    baseline, candidate = sides(repo, str(repo / "fleet"), str(routes))
    assert candidate.routes.features["faq"].model == "small"
    assert candidate.label.startswith("models ") and str(routes) in candidate.label
    with pytest.raises(ConfigError, match="neither a file, a directory nor a git revision"):
        sides(repo, "no-such-branch", "HEAD")
    broken = tmp_path / "broken.yaml"
    broken.write_text("just: text\n")
    with pytest.raises(ConfigError, match="neither a model registry"):
        sides(repo, str(broken), "HEAD")
    sha = commit(repo, routes=ROUTES.replace("faq: {model: large", "faq: {model: gpt-9"))
    with pytest.raises(ConfigError, match=rf"(?s){sha[:12]}:fleet/routes.yaml.*faq.model.*gpt-9"):
        sides(repo, "HEAD~1", "HEAD")


def test_cost_allocation_splits_busy_time_by_engine_time() -> None:
    rows = [("t1", "a", 0.0, 2.0), ("t2", "a", 1.0, 3.0),  # overlap on a: busy 3 s, work 4 s
            ("t3", "b", 10.0, 11.0),  # alone on b
            ("t4", "elsewhere", 0.0, 100.0)]  # a replica not priced: not ours
    measured = allocate(rows, {"a": 3.6, "b": 7.2}, expected=3)  # $/hour: a 0.001 $/s, b 0.002 $/s
    assert measured.busy_s == {"a": 3.0, "b": 1.0}
    assert measured.per_request_usd == pytest.approx({"t1": 0.0015, "t2": 0.0015, "t3": 0.002})
    assert sum(measured.per_request_usd.values()) == pytest.approx(0.001 * 3 + 0.002 * 1)  # = the busy cost
    assert measured.complete and measured.samples(["t3", "t1", "missing"]) == pytest.approx([0.002, 0.0015])
    assert not allocate(rows[:1], {"a": 3.6}, expected=2).complete


def test_budgets_on_samples_fail_only_significant_increases() -> None:
    rng = np.random.default_rng(1)
    draw = lambda n, scale=1.0: scale * rng.lognormal(np.log(80), 0.4, n)  # noqa: E731 - latencies, ms
    # A/A and a candidate exactly at the +10% budget: fails at most ~5% of the time
    for scale, allowed in ((1.0, 0.01), (1.10, 0.08)):
        fails = sum(judge_increase_samples("p95", draw(1000), draw(1000, scale), 0.10, resamples=1000,
                                           seed=i).verdict == Verdict.FAIL for i in range(100))
        assert fails <= 100 * allowed, (scale, fails)
    # a real +50% always fails, on p95 and on the mean, and the report names the CI
    verdict = judge_increase_samples("p95", draw(1000), draw(1000, 1.5), 0.10, resamples=1000)
    assert verdict.verdict == Verdict.FAIL and verdict.ci_low > 0.10 and "significantly above" in verdict.reason
    assert judge_increase_samples("cost", draw(500), draw(500, 1.5), 0.05, statistic="mean",
                                  resamples=1000).verdict == Verdict.FAIL
    # same inputs and seed: the same numbers
    a, b = draw(300), draw(300, 1.2)
    assert judge_increase_samples("p95", a, b, 0.1, seed=3) == judge_increase_samples("p95", a, b, 0.1, seed=3)
    missing = judge_increase_samples("p95", [], draw(10), 0.10)
    assert missing.verdict == Verdict.INCOMPLETE and missing.samples == (0, 10)


def test_the_committed_demo_fleet_and_the_pull_request_workflow() -> None:
    repo = Path(__file__).resolve().parent.parent
    fleet = repo / "serving" / "examples" / "demo-fleet"
    config = load_fleet_config(str(fleet), models_path=fleet / "models.yaml", routes_path=fleet / "routes.yaml")
    assert config.registry.models["demo-large"].path == str(repo / ".cache" / "demo-models" / "large")
    from fleetlens.evals.policy import load_policy

    traffic = load_policy().traffic
    assert set(traffic) == set(config.routes.features) and traffic["lookup"] == ["lookup_hard"]

    import yaml

    workflow = yaml.safe_load((repo / ".github" / "workflows" / "eval-gate.yml").read_text())
    on = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert {"**/models.yaml", "**/routes.yaml", "evals/**"} <= set(on["pull_request"]["paths"])
    job = workflow["jobs"]["gate"]
    assert job["env"]["MODELS"].endswith("'serving/examples/demo-fleet/models.yaml' }}")
    gate_steps = [s["run"] for s in job["steps"] if "fleetlens eval gate" in s.get("run", "")]
    assert gate_steps and all("--baseline" in r and "--candidate HEAD" in r for r in gate_steps)
    assert any("--report-out" in r and "--plan-only" not in r for r in gate_steps)


def test_budgets_are_judged_against_both_bracketing_baseline_runs() -> None:
    from fleetlens.evals.cost import CostMeasurement
    from fleetlens.evals.gate import BRACKET, SideRun, UnitResult, judge_budgets
    from fleetlens.evals.gate_plan import EvalUnit
    from fleetlens.evals.policy import load_policy

    rng = np.random.default_rng(0)

    def judged(first: float, candidate: float, again: float):
        runs = {name: SideRun(name, "complete", "", tuple((f"{name}{i}", float(scale * rng.lognormal(4, 0.3)))
                                                          for i in range(1000)))
                for name, scale in (("baseline", first), ("candidate", candidate), (BRACKET, again))}
        cost = CostMeasurement({t: ms / 1e6 for run in runs.values() for t, ms in run.items}, {}, 3000)
        unit = UnitResult(EvalUnit("lookup", "route", ("lookup_hard",), "test"), runs, None, cost)  # type: ignore[arg-type]
        return {b.verdict.check: b for b in judge_budgets([unit], load_policy(), require_cost=True)}

    # the machine slowed down 12% during the gate: +8% against the first run, -4% against the second: pass
    drift = judged(1.0, 1.08, 1.12)
    assert all(b.counted and b.verdict.verdict == Verdict.PASS for b in drift.values())
    assert "against the baseline's second run (the other: +" in drift["cost_per_request"].verdict.reason
    # a real +50% is over budget against both runs: fail, on latency and on cost
    worse = judged(1.0, 1.5, 1.02)
    assert {c: b.verdict.verdict for c, b in worse.items()} == {"p95_latency_ms": Verdict.FAIL,
                                                                 "cost_per_request": Verdict.FAIL}
    # no telemetry: cost is missing -> incomplete (counted), latency still judged
    runs = {n: SideRun(n, "complete", "", (("t", 1.0),) * 600) for n in ("baseline", "candidate", BRACKET)}
    unit = UnitResult(EvalUnit("x", "model", ("t",), "test"), runs, None, CostMeasurement({}, {}, 1800))  # type: ignore[arg-type]
    budgets = {b.verdict.check: b for b in judge_budgets([unit], load_policy(), require_cost=True)}
    assert budgets["cost_per_request"].verdict.verdict == Verdict.INCOMPLETE and budgets["cost_per_request"].counted
    assert "is the collector running?" in budgets["cost_per_request"].verdict.reason


def test_a_budget_fails_only_when_a_second_round_confirms_it() -> None:
    from dataclasses import replace as copy

    from fleetlens.evals.gate import GateBudget, confirm_budgets
    from fleetlens.evals.stats import judge_increase

    def budget(increase: float) -> GateBudget:
        verdict = judge_increase("p95_latency_ms", 100.0, 100.0 * (1 + increase), 0.10)
        return GateBudget("p95 latency, ms", copy(verdict, ci_low=increase - 0.05, ci_high=increase + 0.05),
                          counted=True)

    burst = confirm_budgets([budget(0.38)], [budget(0.02)])[0]  # a burst in one round: not confirmed
    assert burst.verdict.verdict == Verdict.PASS and burst.counted
    assert burst.note.startswith("first round +38.0% (fail), not confirmed by a second round (+2.0%)")
    real = confirm_budgets([budget(0.50)], [budget(0.45)])[0]  # a real regression fails again
    assert real.verdict.verdict == Verdict.FAIL and "confirmed by a second round" in real.verdict.reason
    fine = budget(0.01)
    assert confirm_budgets([fine], [budget(0.60)]) == [fine]  # a pass is never re-judged
