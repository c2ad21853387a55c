"""The nightly eval runs (Airflow DAG `fleetlens_nightly_evals`): has quality drifted since last night?

A rollout gate protects *changes*; nothing protects against what changes without a pull request: an
engine or driver upgrade on the hosts, a model file replaced in place, a retriever index that rotted, a
routing table edited by hand. Every night each target (a route, by default every feature of the gate
policy's `traffic:` on its own tasks) runs the suite through the running gateway (feature `eval`, stored
like any run), and is compared with its last complete run of the same suite (same `config_hash`: same
tasks, data, limit and target) by the gate policy — quality only: latency and cost between two nights
measure the day's production load as much as the target, and the dashboards track them from the traces.
A significant drop fails the task (and Airflow's failure alert fires); the decision is stored in
`gate_decisions` either way. The first night of a target has nothing to compare with and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fleetlens.config import ConfigError, Settings

from .compare import decide, load_run, render_report, store_decision
from .policy import load_policy
from .runner import run_eval
from .stats import Verdict
from .suite import DEFAULT_SUITE


class NightlyRegression(RuntimeError):
    """A target's quality dropped significantly since its previous run (the report is the message)."""


@dataclass(frozen=True)
class NightlyResult:
    target: str
    run_id: str
    status: str
    previous_run_id: str | None
    verdict: str  # pass | fail | incomplete | no baseline
    gate_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def nightly_plan(settings: Settings) -> list[dict[str, Any]]:
    """One entry per target: {target, tasks, route}; the configured targets, else the policy's traffic."""
    policy = load_policy(settings.evals.policy_file)
    names = DEFAULT_SUITE.names()
    targets = settings.evals.targets or list(policy.traffic)
    if not targets:
        raise ConfigError("nightly evals: no targets (set evals.targets, or `traffic:` in the gate policy)")
    return [{"target": t, "tasks": list(policy.traffic.get(t) or names), "route": t in policy.traffic}
            for t in targets]


def run_nightly(settings: Settings, entry: dict[str, Any], *, client: Any, database: str | None,
                seed: int = 0) -> NightlyResult:
    """Run one target's suite through the gateway, compare with its previous complete run, store the
    decision; raises NightlyRegression on a significant drop and EvalError-like failures as they come."""
    policy = load_policy(settings.evals.policy_file)
    try:
        api_key = settings.eval_api_key_file.read_text().strip()
    except OSError as error:
        raise ConfigError(f"nightly evals: cannot read the API key file {settings.eval_api_key_file} "
                          f"(evals.api_key_file): {error.strerror}") from None
    target = entry["target"]
    result = run_eval(target, settings.eval_gateway_url, api_key, entry["tasks"], limit=settings.evals.limit,
                      seed=seed, client=client, database=database, concurrency=settings.evals.concurrency,
                      route=target if entry.get("route") else "")
    if not result.ok:
        raise RuntimeError(f"nightly eval of {target} is {result.status}: {result.error}")
    previous = previous_run(client, database, target, result.config_hash, before=result.run_id)
    if previous is None:
        return NightlyResult(target, result.run_id, result.status, None, "no baseline")
    baseline, candidate = load_run(client, database, previous), load_run(client, database, result.run_id)
    decision = decide(baseline, candidate, policy, budgets=False,
                      changes=[f"nightly re-run of {target}: nothing deployed through the gate is expected to change"])
    report = render_report(decision)
    gate_id = store_decision(client, database, decision, f"nightly {previous}", f"nightly {result.run_id}",
                             report_md=report)
    if decision.verdict == Verdict.FAIL:
        raise NightlyRegression(f"{target}: quality dropped since run {previous}\n{report}")
    return NightlyResult(target, result.run_id, result.status, previous, str(decision.verdict), gate_id)


def previous_run(client: Any, database: str | None, target: str, config_hash: str, *, before: str) -> str | None:
    """The latest complete run of `target` with the same suite (config hash), other than `before`."""
    table = f"{database}.eval_runs" if database else "eval_runs"
    rows = client.query(
        f"SELECT run_id FROM {table} FINAL WHERE target = {{t:String}} AND config_hash = {{h:String}} "
        f"AND run_id != {{r:String}} GROUP BY run_id HAVING countIf(status != 'complete') = 0 "
        f"ORDER BY max(started_at) DESC LIMIT 1",
        parameters={"t": target, "h": config_hash, "r": before}).result_rows
    return str(rows[0][0]) if rows else None

