"""The gate's *decision* from two stored eval runs: load both, judge them by the policy, report, store.

`load_run(client, database, run_id)` reads one run from the warehouse (`eval_runs` FINAL: the latest
row per task; `eval_items` FINAL: per task `{item_id: score}`, and every item's latency).
`decide(baseline, candidate, policy)` judges:

- **quality, per task** (the union of both runs' tasks), with `policy.judge_task` (paired test on
  per-item scores, the task's own margin and sample-size floor, the policy's seed). A task that only
  one run has, or whose stored status is not `complete` on either side (`running`, `incomplete`,
  `failed`), or whose stored `n_items` disagrees with the items actually stored, is `incomplete`
  whatever the statistics say (they are still reported, for context): partial evidence never passes.
- **p95 latency** of the two runs' eval items (`eval_items.latency_ms`, `stats.p95` as the runner reports it),
  by `policy.max_p95_latency_increase` (`stats.judge_increase_samples`: fails only when the bootstrap
  lower bound of the increase is above the budget; no samples on a side -> incomplete).
- **cost per request** by `policy.max_cost_per_request_increase`, from `cost_per_request =
  (baseline, candidate)` (the telemetry's cost per request of each target; eval runs do not store
  cost). Policy choice, documented here and in `fleetlens eval compare --help`: `stats` treats a
  missing measurement as `incomplete` ("no load test, no rollout"), and a stored eval run never
  has a cost, so counting an unmeasured cost would make *every* comparison of two runs incomplete.
  Hence: when no cost is given at all and `require_cost` is False (the default), the cost row is
  reported as "not measured" and left out of the verdict; `require_cost=True` (`--require-cost`)
  makes it count (-> incomplete). A cost given for only one side always counts (-> incomplete).
- **overall**: `stats.combine` (any fail -> fail; else any incomplete -> incomplete; else pass).

`render_report(decision)` is the Markdown report (deterministic: no timestamps, tasks sorted by name,
so the same runs and policy give byte-identical text); `store_decision(...)` writes a
`gate_decisions` row (verdict, changes, report_md, details = JSON of the numbers) for the dashboard.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from fleetlens.evals import stats
from fleetlens.evals.policy import GatePolicy
from fleetlens.evals.stats import BudgetVerdict, TaskVerdict, Verdict, p95

LATENCY_CHECK = "p95_latency_ms"
COST_CHECK = "cost_per_request"


class UnknownRunError(LookupError):
    """No eval_runs row has this run id."""


# --------------------------------------------------------------------------- loading a run


@dataclass(frozen=True)
class StoredTask:
    task: str
    status: str
    n_items: int  # as stored in eval_runs
    scores: dict[str, float]  # item_id -> score, from eval_items
    error: str = ""


@dataclass(frozen=True)
class StoredRun:
    run_id: str
    tasks: dict[str, StoredTask]
    latency_ms: tuple[float, ...]  # every stored item of the run, sorted
    target: str = ""
    model: str = ""
    variant: str = ""
    git_sha: str = ""
    config_hash: str = ""
    seed: int = 0

    @property
    def status(self) -> str:
        """`complete` only when every task is."""
        return "complete" if self.tasks and all(t.status == "complete" for t in self.tasks.values()) else "incomplete"


def _table(database: str | None, name: str) -> str:
    return f"{database}.{name}" if database else name


def load_run(client: Any, database: str | None, run_id: str) -> StoredRun:
    """One stored run: latest eval_runs row per task (FINAL), its items' scores and latencies.

    Raises UnknownRunError when no eval_runs row has `run_id`.
    """
    runs = client.query(
        f"SELECT task, status, n_items, target, model, variant, git_sha, config_hash, seed, "
        f"params['error'] FROM {_table(database, 'eval_runs')} FINAL WHERE run_id = %(run_id)s "
        f"ORDER BY task, updated_at",
        parameters={"run_id": run_id}).result_rows
    if not runs:
        raise UnknownRunError(f"unknown eval run id {run_id!r}: no eval_runs row has it "
                              f"(see `fleetlens eval run`, or the dashboard's Evals page)")
    items = client.query(
        f"SELECT task, item_id, score, latency_ms FROM {_table(database, 'eval_items')} FINAL "
        f"WHERE run_id = %(run_id)s ORDER BY task, item_id",
        parameters={"run_id": run_id}).result_rows
    scores: dict[str, dict[str, float]] = {}
    latencies: list[float] = []
    for task, item_id, score, latency_ms in items:
        scores.setdefault(task, {})[str(item_id)] = float(score)
        latencies.append(float(latency_ms))
    tasks: dict[str, StoredTask] = {}
    for task, status, n_items, *_rest, error in runs:  # ordered by updated_at: the last row wins
        tasks[task] = StoredTask(task, str(status), int(n_items), scores.get(task, {}), str(error or ""))
    _, _, _, target, model, variant, git_sha, config_hash, seed, _ = runs[-1]
    return StoredRun(run_id, dict(sorted(tasks.items())), tuple(sorted(latencies)), str(target), str(model),
                     str(variant), str(git_sha), str(config_hash), int(seed))


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class GateDecision:
    verdict: Verdict
    tasks: tuple[TaskVerdict, ...]
    latency: BudgetVerdict | None  # None: budgets not judged here (`fleetlens eval gate` judges them once)
    cost: BudgetVerdict | None  # None: not measured and not required (left out of the verdict)
    baseline_run: str
    candidate_run: str
    baseline_meta: dict[str, str]
    candidate_meta: dict[str, str]
    policy: dict[str, Any]
    changes: tuple[str, ...] = ()
    latency_samples: tuple[int, int] = (0, 0)

    @property
    def reasons(self) -> list[str]:
        """Why the gate did not pass: every fail and incomplete, fails first."""
        judged: list[TaskVerdict | BudgetVerdict] = [*self.tasks, *(b for b in (self.latency, self.cost) if b)]
        return ([f"fail: {r.reason}" for r in judged if r.verdict == Verdict.FAIL]
                + [f"incomplete: {r.reason}" for r in judged if r.verdict == Verdict.INCOMPLETE])

    def details(self) -> dict[str, Any]:
        """The numbers, JSON-ready (gate_decisions.details)."""
        def budget(b: BudgetVerdict | None) -> dict[str, Any] | None:
            return None if b is None else {**asdict(b), "verdict": str(b.verdict)}

        return {
            "verdict": str(self.verdict),
            "baseline_run": self.baseline_run, "candidate_run": self.candidate_run,
            "baseline": self.baseline_meta, "candidate": self.candidate_meta,
            "policy": self.policy,
            "tasks": [{**asdict(t), "verdict": str(t.verdict), "unpaired": len(t.unpaired)} for t in self.tasks],
            "latency": ({**budget(self.latency), "samples": list(self.latency_samples)}  # type: ignore[dict-item]
                        if self.latency else {"check": LATENCY_CHECK, "verdict": "not judged here"}),
            "cost": budget(self.cost) or {"check": COST_CHECK, "verdict": "not measured"},
            "changes": list(self.changes),
            "reasons": self.reasons,
        }


def decide(
    baseline: StoredRun,
    candidate: StoredRun,
    policy: GatePolicy,
    *,
    cost_per_request: tuple[float | None, float | None] = (None, None),
    cost_samples: tuple[Sequence[float], Sequence[float]] | None = None,
    changes: Sequence[str] = (),
    require_cost: bool = False,
    budgets: bool = True,
) -> GateDecision:
    """Judge `candidate` against `baseline` by `policy` (see the module docstring for every rule).

    `cost_samples`: per-request costs of each side from the telemetry (`cost.py`), judged like the
    latency (bootstrap of the mean); otherwise `cost_per_request` numbers, judged as points.
    `budgets=False`: quality only (latency and cost are judged by the caller, e.g. once over all of a
    gate's requests).
    """
    verdicts = []
    for name in sorted(baseline.tasks.keys() | candidate.tasks.keys()):
        b, c = baseline.tasks.get(name), candidate.tasks.get(name)
        verdict = policy.judge_task(name, b.scores if b else {}, c.scores if c else {})
        problems = []
        for side, run, task in (("baseline", baseline, b), ("candidate", candidate, c)):
            if task is None:
                problems.append(f"the {side} run {run.run_id} has no task {name}")
            elif task.status != "complete":
                problems.append(f"the {side} run {run.run_id} is {task.status}"
                                + (f" ({task.error})" if task.error else ""))
            elif task.n_items != len(task.scores):
                problems.append(f"the {side} run {run.run_id} stored {len(task.scores)} items but says "
                                f"n_items {task.n_items}")
        if problems:
            context = verdict.reason.removeprefix(name + ": ")
            verdict = replace(verdict, verdict=Verdict.INCOMPLETE,
                              reason=f"{name}: {'; '.join(problems)}; never a pass. Statistics for context: "
                                     f"{context}")
        verdicts.append(verdict)

    resampling = dict(confidence=policy.confidence, resamples=policy.bootstrap_resamples, seed=policy.seed)
    latency: BudgetVerdict | None = None
    if budgets:
        latency = stats.judge_increase_samples(LATENCY_CHECK, baseline.latency_ms, candidate.latency_ms,
                                               policy.max_p95_latency_increase, statistic="p95", **resampling)
    base_cost, cand_cost = cost_per_request
    cost: BudgetVerdict | None = None
    if not budgets:
        pass
    elif cost_samples is not None:
        cost = stats.judge_increase_samples(COST_CHECK, cost_samples[0], cost_samples[1],
                                            policy.max_cost_per_request_increase, statistic="mean", **resampling)
    elif require_cost or base_cost is not None or cand_cost is not None:
        cost = stats.judge_increase(COST_CHECK, base_cost, cand_cost, policy.max_cost_per_request_increase)

    overall = stats.combine([*verdicts, *(b for b in (latency, cost) if b)])
    policy_summary = {"confidence": policy.confidence, "method": policy.method,
                      "bootstrap_resamples": policy.bootstrap_resamples, "seed": policy.seed,
                      "max_p95_latency_increase": policy.max_p95_latency_increase,
                      "max_cost_per_request_increase": policy.max_cost_per_request_increase,
                      "require_cost": require_cost}
    return GateDecision(overall, tuple(verdicts), latency, cost, baseline.run_id, candidate.run_id,
                        _meta(baseline), _meta(candidate), policy_summary, tuple(changes),
                        (len(baseline.latency_ms), len(candidate.latency_ms)))


def _meta(run: StoredRun) -> dict[str, str]:
    return {"run_id": run.run_id, "status": run.status, "target": run.target, "model": run.model,
            "variant": run.variant, "git_sha": run.git_sha, "config_hash": run.config_hash, "seed": str(run.seed)}


# --------------------------------------------------------------------------- the report


_HEADLINE = {Verdict.PASS: "PASS", Verdict.FAIL: "FAIL", Verdict.INCOMPLETE: "INCOMPLETE"}


def render_report(decision: GateDecision) -> str:
    """The gate's Markdown report; the same decision gives byte-identical text."""
    lines = [f"## Eval gate: **{_HEADLINE[decision.verdict]}**", "",
             f"Baseline run `{decision.baseline_run}` ({_describe(decision.baseline_meta)}) vs candidate run "
             f"`{decision.candidate_run}` ({_describe(decision.candidate_meta)}).", ""]
    lines += render_sections(decision, "###")
    lines += ["", "### What changed", ""]
    lines += [f"- {change}" for change in decision.changes] or ["- (not given)"]
    reasons = decision.reasons
    if reasons:
        lines += ["", "### Why not a pass", ""] + [f"- {reason}" for reason in reasons]
    return "\n".join(lines) + "\n"


def render_sections(decision: GateDecision, heading: str) -> list[str]:
    """The quality table and the latency/cost table of one decision, under `heading`-level titles."""
    p = decision.policy
    level = f"{p['confidence']:.0%}"
    method = ("paired bootstrap" f" ({p['bootstrap_resamples']:,} resamples, seed {p['seed']})"
              if p["method"] == "bootstrap" else "McNemar / Wald")
    lines = [f"Quality: {method}, {level} two-sided CI; a task fails when the one-sided {level} bound of the "
             f"delta is below -margin.", "",
             f"{heading} Quality per task", "",
             f"| Task | Baseline | Candidate | Delta | {level} CI | n | Margin | Verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for t in decision.tasks:
        ci = "-" if t.ci_low is None else f"{_pts(t.ci_low)} to {_pts(t.ci_high)}"
        lines.append(f"| {t.task} | {_pct(t.baseline_mean)} | {_pct(t.candidate_mean)} | "
                     f"{'-' if t.delta is None else _pts(t.delta) + ' pts'} | {ci} | {t.n:,} | "
                     f"{100 * t.max_drop:.2f} pts | {t.verdict} |")
    if not decision.tasks:
        lines.append("| (no tasks in either run) | - | - | - | - | 0 | - | incomplete |")
    if decision.latency is None:
        return lines
    lines += ["", f"{heading} Latency and cost", "", BUDGET_HEADER, "|---|---:|---:|---:|---:|---|"]
    lines.append(budget_row(decision.latency, f"p95 latency, ms ({decision.latency_samples[0]:,} / "
                                              f"{decision.latency_samples[1]:,} items)"))
    if decision.cost is None:
        lines.append(f"| cost per request | - | - | - | +{p['max_cost_per_request_increase']:.0%} | "
                     f"not measured (not required) |")
    else:
        c = decision.cost
        lines.append(budget_row(c, f"cost per request, USD ({c.samples[0]:,} / {c.samples[1]:,} requests)"
                                if c.samples[0] else "cost per request"))
    return lines


BUDGET_HEADER = "| Check | Baseline | Candidate | Change | Allowed | Verdict |"


def budget_row(budget: BudgetVerdict, what: str) -> str:
    """One row of the latency and cost table."""
    return (f"| {what} | {_num(budget.baseline)} | {_num(budget.candidate)} | {_change(budget)} | "
            f"+{budget.max_increase:.0%} | {budget.verdict} |")


def _describe(meta: dict[str, str]) -> str:
    parts = [meta["target"] or "?"]
    if meta["variant"]:
        parts.append(f"variant {meta['variant']}")
    if meta["model"]:
        parts.append(f"model {meta['model']}")
    parts.append(meta["status"])
    if meta["git_sha"]:
        parts.append(f"git {meta['git_sha'][:12]}")
    return ", ".join(parts)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _pts(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.4g}" if abs(value) < 1 else f"{value:,.1f}"


def _change(budget: BudgetVerdict) -> str:
    """The relative change, with its CI when it was judged on samples."""
    if budget.ci_low is None or budget.ci_high is None:
        return _inc(budget.increase)
    return f"{_inc(budget.increase)} (CI {_inc(budget.ci_low)} to {_inc(budget.ci_high)})"


def _inc(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.1%}"


# --------------------------------------------------------------------------- storing


GATE_COLUMNS = ["gate_id", "decided_at", "baseline_ref", "candidate_ref", "verdict", "changes", "report_md",
                "details"]


def store_decision(client: Any, database: str | None, decision: GateDecision, baseline_ref: str,
                   candidate_ref: str, *, report_md: str | None = None) -> str:
    """Insert one gate_decisions row; returns its gate_id."""
    report = render_report(decision) if report_md is None else report_md
    return store_gate_row(client, database, verdict=decision.verdict, baseline_ref=baseline_ref,
                          candidate_ref=candidate_ref, changes=decision.changes, report_md=report,
                          details=decision.details())


def store_gate_row(client: Any, database: str | None, *, verdict: Verdict, baseline_ref: str, candidate_ref: str,
                   changes: Sequence[str], report_md: str, details: dict[str, Any]) -> str:
    """One gate_decisions row (the dashboards' Evals page reads them); returns its gate_id."""
    gate_id = uuid.uuid4().hex
    row = [gate_id, dt.datetime.now(dt.UTC), baseline_ref, candidate_ref, str(verdict), list(changes), report_md,
           json.dumps(details, sort_keys=True, default=str)]
    where = {"database": database} if database else {}
    client.insert(table="gate_decisions", data=[row], column_names=GATE_COLUMNS, **where)
    return gate_id


__all__ = ["GateDecision", "StoredRun", "StoredTask", "UnknownRunError", "decide", "load_run", "p95",
           "budget_row", "render_report", "render_sections", "store_decision", "store_gate_row"]
