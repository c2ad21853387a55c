"""`fleetlens eval gate`: bring up both sides of a change, run the suite on both, decide, report, store.

1. `refs.load_fleet_config` reads each side (git revision or files); `gate_plan.plan_gate` finds what
   changed and what to evaluate (a route through its traffic slice, or a model on the whole suite).
2. `GateFleet` starts one vLLM replica per distinct served model (a model defined identically on
   both sides is started once and shared: same weights, same answers, half the start-up) and one
   gateway per side, each with that side's models.yaml (its models pointed at the gate's replicas by
   `replica_urls`) and routes.yaml. Replicas register in a private directory, so a production gateway
   on this machine never routes to them; everything traces to the configured collector.
3. Each unit runs on the baseline, the candidate and the baseline again (`fleetlens eval run`, one
   process each; the bracketing cancels a drift of the machine); items, runs and traces land in the
   warehouse like any eval run.
4. Per unit `compare.decide` judges quality per task, p95 latency and cost per request (`cost.py`,
   from the units' traces); the gate's verdict combines the units. The Markdown report and one
   `gate_decisions` row are the output; processes are stopped whatever happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import yaml

from fleetlens.config import Settings
from fleetlens.launch import REPLICA_STOP_GRACE_S
from fleetlens.net import free_port, wait_http
from fleetlens.stack import Child, Stack, fleetlens_argv

from . import stats
from .compare import (
    BUDGET_HEADER,
    COST_CHECK,
    LATENCY_CHECK,
    GateDecision,
    StoredRun,
    budget_row,
    decide,
    load_run,
    render_sections,
    store_gate_row,
)
from .cost import CostMeasurement, measure_costs
from .gate_plan import EvalUnit, GatePlan
from .policy import GatePolicy
from .refs import FleetConfig, model_identity
from .stats import BudgetVerdict, Verdict

SIDES = ("baseline", "candidate")
BRACKET = "baseline-again"  # the baseline's second run, after the candidate's
PROBE_FEATURE = "gate-probe"


class GateError(RuntimeError):
    """The gate could not run (a replica or gateway did not start): no decision, exit 2."""


@dataclass(frozen=True)
class ServedReplica:
    name: str
    model: str
    url: str
    usd_per_hour: float
    load_s: float


@dataclass
class Side:
    name: str
    config: FleetConfig
    base_url: str = ""
    replicas: dict[str, ServedReplica] = field(default_factory=dict)  # model -> replica


@dataclass
class UnitResult:
    unit: EvalUnit
    runs: dict[str, SideRun]
    decision: GateDecision
    cost: CostMeasurement | None  # both sides' requests, allocated together (they may share replicas)


@dataclass(frozen=True)
class GateBudget:
    """A latency or cost budget over all of the gate's eval requests; `counted` False: left out of the verdict."""

    label: str
    verdict: BudgetVerdict
    counted: bool
    note: str = ""


@dataclass
class GateResult:
    verdict: Verdict
    plan: GatePlan
    labels: dict[str, str]
    units: list[UnitResult]
    budgets: list[GateBudget]
    startup_s: float
    wall_s: float
    replicas: list[ServedReplica]
    report: str = ""
    gate_id: str = ""

    def details(self) -> dict[str, Any]:
        return {"verdict": str(self.verdict), "baseline": self.labels["baseline"], "candidate": self.labels["candidate"],
                "changes": list(self.plan.changes), "notes": list(self.plan.notes),
                "startup_s": round(self.startup_s, 1), "wall_s": round(self.wall_s, 1),
                "replicas": [{"name": r.name, "model": r.model, "load_s": round(r.load_s, 1)} for r in self.replicas],
                "budgets": [{**asdict(b.verdict), "verdict": str(b.verdict.verdict), "counted": b.counted,
                             "note": b.note} for b in self.budgets],
                "units": [{"target": u.unit.target, "kind": u.unit.kind, "tasks": list(u.unit.tasks),
                           "why": u.unit.why, **u.decision.details()} for u in self.units]}


def prepare_gate(baseline: str, candidate: str, settings: Settings, *, models_path: Path | None = None,
                 routes_path: Path | None = None, tasks: str | None = None, policy: Path | None = None,
                 evaluate: Sequence[str] = ()) -> tuple[tuple[FleetConfig, FleetConfig], GatePlan, GatePolicy]:
    """Both sides read and validated, the plan (what changed, what to evaluate on which tasks) and the
    policy: everything `run_gate` needs. Raises ConfigError (an EvalConfigError for the suite) naming
    the bad reference, file or key."""
    from .gate_plan import plan_gate
    from .policy import load_policy
    from .refs import load_fleet_config
    from .suite import DEFAULT_SUITE, EvalConfigError

    gate_policy = load_policy(policy)
    paths = dict(models_path=models_path or settings.gateway.models_file,
                 routes_path=routes_path or settings.gateway.routes_file)
    sides = load_fleet_config(baseline, **paths), load_fleet_config(candidate, **paths)
    suite = DEFAULT_SUITE
    names = [s.name for s in suite.resolve(tasks or suite.names())]
    unknown = sorted({t for ts in gate_policy.traffic.values() for t in ts} - set(suite.names()))
    if unknown:
        raise EvalConfigError(f"gate policy: traffic names unknown task(s) {', '.join(unknown)} "
                              f"(known: {', '.join(suite.names())})")
    traffic = {f: [t for t in ts if t in names] for f, ts in gate_policy.traffic.items()}
    return sides, plan_gate(*sides, traffic=traffic, suite_tasks=names, evaluate=evaluate), gate_policy


# --------------------------------------------------------------------------- the fleet of both sides


class GateFleet:
    """Replicas (shared where both sides define a model identically) and one gateway per side."""

    def __init__(self, baseline: FleetConfig, candidate: FleetConfig, plan: GatePlan, work_dir: Path,
                 settings: Settings, on_status: Callable[[str], None] = lambda _: None) -> None:
        self.sides = {"baseline": Side("baseline", baseline), "candidate": Side("candidate", candidate)}
        self.plan, self.work_dir, self.settings, self.on_status = plan, work_dir, settings, on_status
        self.children: list[Child] = []
        self.api_key = ""
        self.startup_s = 0.0

    def start(self) -> None:
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        launches = self._launch_replicas()
        self._wait_replicas(launches)
        self._start_gateways()
        self.startup_s = time.monotonic() - started

    def stop(self) -> None:
        Stack(list(self.children)).stop()  # gateways, then replicas; each child waits out its own grace

    def _env(self, **overrides: str) -> dict[str, str]:
        return {"FLEETLENS_DATA_DIR": str(self.work_dir), **overrides}

    def _launch_replicas(self) -> dict[str, tuple[Child, list[tuple[str, str]], float]]:
        """One replica per distinct served model; returns identity -> (child, [(side, model)], price)."""
        by_identity: dict[str, list[tuple[str, str]]] = {}
        for side in SIDES:
            for model in sorted(self.plan.models.get(side, ())):
                spec = self.sides[side].config.registry.models[model]
                by_identity.setdefault(model_identity(spec), []).append((side, model))
        missing = sorted({f"{model} ({spec.path})" for users in by_identity.values() for side, model in users
                          if (spec := self.sides[side].config.registry.models[model]).path.startswith("/")
                          and not Path(spec.path).exists()})
        if missing:  # a local checkpoint that is not there: say so now, not after vLLM's start-up fails
            raise GateError(f"checkpoint not found for {', '.join(missing)}")
        launches = {}
        registry_dir = self.work_dir / "replicas"
        for identity, users in by_identity.items():
            side, model = users[0]
            spec = self.sides[side].config.registry.models[model]
            name = f"gate-{model}-{hashlib.sha256(identity.encode()).hexdigest()[:6]}"
            models_file, _ = self.sides[side].config.write(self.work_dir / "config" / side)
            child = Child(f"replica {name}", fleetlens_argv("serve", "replica", "--model", model, "--name", name,
                                                            "--models", str(models_file)),
                          self.work_dir / "logs" / f"launcher-{name}.log", grace_s=REPLICA_STOP_GRACE_S)
            child.start(self._env(FLEETLENS_REPLICA__REGISTRY_DIR=str(registry_dir)))
            self.children.append(child)
            launches[name] = (child, users, spec.gpu.count * spec.gpu.hourly_usd)
            self.on_status(f"starting replica {name} ({model}, {spec.variant}) for "
                           + " and ".join(sorted({s for s, _ in users})))
        return launches

    def _wait_replicas(self, launches: dict[str, tuple[Child, list[tuple[str, str]], float]]) -> None:
        from fleetlens.serving.registration import ReplicaDirectory

        directory = ReplicaDirectory(self.work_dir / "replicas")
        deadline = time.monotonic() + self.settings.replica.ready_timeout_s
        pending = set(launches)
        while pending:
            records = {r.name: r for r in directory.records()}
            for name in sorted(pending):
                child, users, price = launches[name]
                if name in records:
                    record = records[name]
                    for side, model in users:
                        self.sides[side].replicas[model] = ServedReplica(name, model, record.url, price,
                                                                         record.load_seconds)
                    pending.discard(name)
                    self.on_status(f"replica {name} ready in {record.load_seconds:.0f} s")
                elif not child.alive:
                    raise GateError(f"replica {name} exited before it was ready; see {child.log_path} and "
                                    f"{self.work_dir / 'logs'}/replica-{name}.log:\n{_tail(child.log_path)}")
            if pending and time.monotonic() > deadline:
                raise GateError(f"replicas not ready after {self.settings.replica.ready_timeout_s:.0f} s: "
                                f"{', '.join(sorted(pending))}; see {self.work_dir / 'logs'}")
            time.sleep(0.3)

    def _start_gateways(self) -> None:
        from fleetlens.serving.keys import generate_key

        key, digest = generate_key()
        self.api_key = key
        for side in self.sides.values():
            directory = self.work_dir / side.name
            models_file, routes_file = side.config.write(directory)
            registry = yaml.safe_load(models_file.read_text())
            for model, replica in side.replicas.items():  # the gate's replicas, as static URLs
                registry["models"][model]["replica_urls"] = [replica.url]
            models_file.write_text(yaml.safe_dump(registry, sort_keys=False))
            keys_file = directory / "keys.yaml"
            keys_file.write_text(f"- {{id: gate, customer: fleetlens-gate, hash: '{digest}', feature: eval}}\n")
            port = free_port()
            child = Child(f"gateway {side.name}", fleetlens_argv("gateway", "--port", str(port), "--host", "127.0.0.1"),
                          self.work_dir / "logs" / f"gateway-{side.name}.log")
            child.start(self._env(FLEETLENS_DATA_DIR=str(directory), FLEETLENS_GATEWAY__MODELS_FILE=str(models_file),
                                  FLEETLENS_GATEWAY__ROUTES_FILE=str(routes_file),
                                  FLEETLENS_GATEWAY__KEYS_FILE=str(keys_file),
                                  FLEETLENS_REPLICA__REGISTRY_DIR=str(directory / "replicas")))
            self.children.append(child)
            side.base_url = f"http://127.0.0.1:{port}"
            if not wait_http(side.base_url + "/health", 60.0, alive=lambda c=child: c.alive):
                raise GateError(f"the {side.name} gateway did not start; see {child.log_path}:\n{_tail(child.log_path)}")
            self.on_status(f"{side.name} gateway on {side.base_url}")
        for unit in self.plan.units:
            for side in self.sides.values():
                self._probe(side, unit.target)

    def _probe(self, side: Side, target: str, timeout_s: float = 60.0) -> None:
        """One request through the side's gateway, so the first eval item does not pay for warm-up."""
        deadline, last = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            try:
                response = httpx.post(side.base_url + "/v1/completions", timeout=30,
                                      headers={"authorization": f"Bearer {self.api_key}",
                                               "x-fleetlens-feature": PROBE_FEATURE},
                                      json={"model": target, "prompt": "a=", "max_tokens": 1, "temperature": 0})
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.HTTPError as error:
                last = str(error)
            time.sleep(0.5)
        raise GateError(f"the {side.name} gateway cannot serve {target!r}: {last}")


@contextmanager
def gate_fleet(baseline: FleetConfig, candidate: FleetConfig, plan: GatePlan, work_dir: Path, settings: Settings,
               on_status: Callable[[str], None] = lambda _: None) -> Iterator[GateFleet]:
    fleet = GateFleet(baseline, candidate, plan, work_dir, settings, on_status)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


# --------------------------------------------------------------------------- running and deciding


@dataclass(frozen=True)
class SideRun:
    """One side's eval run of a unit, as `fleetlens eval run --json-out` wrote it."""

    run_id: str
    status: str
    error: str
    items: tuple[tuple[str, float], ...]  # (trace id, latency ms) per answered item

    @classmethod
    def read(cls, path: Path, log: Path) -> SideRun:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls("", "failed", f"the eval run wrote no result; see {log}:\n{_tail(log, 8)}", ())
        items = tuple((i["trace_id"], float(i["latency_ms"])) for t in data["tasks"].values() for i in t["items"])
        return cls(data["run_id"], data["status"], data.get("error") or "", items)

    @property
    def trace_ids(self) -> list[str]:
        return [trace_id for trace_id, _ in self.items]


def run_gate(baseline: FleetConfig, candidate: FleetConfig, plan: GatePlan, *, policy: GatePolicy,
             client: Any, database: str | None, settings: Settings, work_dir: Path, seed: int = 0,
             limit: int | None = None, concurrency: int = 4, require_cost: bool = True,
             on_status: Callable[[str], None] = lambda _: None) -> GateResult:
    """Run the whole gate (see the module docstring); raises GateError when the fleet cannot start."""
    started = time.monotonic()
    labels = {"baseline": baseline.label, "candidate": candidate.label}
    units: list[UnitResult] = []
    replicas: list[ServedReplica] = []
    startup_s = 0.0
    budgets: list[GateBudget] = []
    if plan.units:
        with gate_fleet(baseline, candidate, plan, work_dir, settings, on_status) as fleet:
            startup_s = fleet.startup_s
            replicas = sorted({r for s in fleet.sides.values() for r in s.replicas.values()}, key=lambda r: r.name)
            measure = dict(seed=seed, limit=limit, concurrency=concurrency, client=client, database=database,
                           on_status=on_status)
            for unit in plan.units:
                runs, cost = _measure_unit(unit, fleet, **measure)
                units.append(_decide(unit, runs, cost, policy, client, database, plan))
            budgets = judge_budgets(units, policy, require_cost)
            quality_failed = any(u.decision.verdict == Verdict.FAIL for u in units)
            if not quality_failed and any(b.counted and b.verdict.verdict == Verdict.FAIL for b in budgets):
                on_status("a budget failed: measuring again to confirm (a passing quality gate is not failed on "
                          "one round of measurements)")
                again = []
                for u in units:
                    runs, cost = _measure_unit(u.unit, fleet, round_=2, **measure)
                    again.append(UnitResult(u.unit, runs, u.decision, cost))
                budgets = confirm_budgets(budgets, judge_budgets(again, policy, require_cost))
    verdict = _overall(plan, units, budgets)
    result = GateResult(verdict, plan, labels, units, budgets, startup_s, time.monotonic() - started, replicas)
    result.report = render_gate_report(result)
    return result


def _measure_unit(unit: EvalUnit, fleet: GateFleet, *, seed: int, limit: int | None, concurrency: int,
                  client: Any, database: str | None, on_status: Callable[[str], None],
                  round_: int = 1) -> tuple[dict[str, SideRun], CostMeasurement | None]:
    """The unit's three runs and the cost of their requests from the telemetry."""
    runs = _run_sides(unit, fleet, seed=seed, limit=limit, concurrency=concurrency, on_status=on_status,
                      round_=round_)
    on_status(f"{unit.title}: cost per request from the telemetry")
    prices = {r.name: r.usd_per_hour for s in fleet.sides.values() for r in s.replicas.values()}
    trace_ids = [t for run in runs.values() for t in run.trace_ids]
    return runs, measure_costs(client, database, trace_ids, prices) if trace_ids else None


def confirm_budgets(first: list[GateBudget], second: list[GateBudget]) -> list[GateBudget]:
    """A budget fails only when both rounds fail it. Why a second round: the bracketing cancels a steady
    drift, not a burst -- a few seconds of another process's work in the middle of the candidate's run
    moves a 1,000-request p95 by 30-40 % (seen in CI: an A/A run on one replica, +37.9 %, CI +19..+50 %).
    A real regression fails again; a burst rarely strikes the same run twice."""
    confirmed = []
    for one, two in zip(first, second, strict=True):
        if not (one.counted and one.verdict.verdict == Verdict.FAIL):
            confirmed.append(one)
        elif two.verdict.verdict == Verdict.FAIL:
            confirmed.append(replace(one, verdict=replace(one.verdict, reason=f"{one.verdict.reason}; confirmed by a "
                                                                              f"second round: {two.verdict.reason}")))
        else:
            note = (f"first round {one.verdict.increase:+.1%} (fail), not confirmed by a second round "
                    f"({two.verdict.increase if two.verdict.increase is not None else float('nan'):+.1%})")
            confirmed.append(replace(two, note=note if two.counted else f"{two.note}; {note}"))
    return confirmed


def _run_sides(unit: EvalUnit, fleet: GateFleet, *, seed: int, limit: int | None, concurrency: int,
               on_status: Callable[[str], None], round_: int = 1) -> dict[str, SideRun]:
    """`fleetlens eval run` of the unit on the baseline, the candidate, then the baseline again.

    Why one after the other: side by side, the two sides' replicas fight over this machine's cores
    and whichever started second stalls (measured: an unchanged candidate at 2-3x the baseline's
    engine time), which no statistics can tell from the change. Why the baseline twice: one after
    the other, the machine drifts (other jobs, caches) by tens of percent in latency within minutes;
    bracketing the candidate between two baseline runs cancels a steady drift. The second baseline
    run (`bracket`) is not stored as an eval run: its latencies and traces join the first one's for
    the budgets; quality uses the first. Each run is its own process: lm-eval keeps global state."""
    runs_dir = fleet.work_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    key_file = runs_dir / "api-key"
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(fleet.api_key + "\n")
    runs: dict[str, SideRun] = {}
    for name, side_name in (("baseline", "baseline"), ("candidate", "candidate"), (BRACKET, "baseline")):
        side = fleet.sides[side_name]
        out = runs_dir / f"{unit.kind}-{unit.target}-{name}-{round_}.json"
        argv = fleetlens_argv("eval", "run", "--target", unit.target, "--gateway", side.base_url,
                              "--api-key-file", str(key_file), "--tasks", ",".join(unit.tasks),
                              "--seed", str(seed), "--concurrency", str(concurrency),
                              "--variant", _variant(side, unit), "--json-out", str(out))
        argv += ["--limit", str(limit)] if limit else []
        argv += ["--route", unit.target] if unit.kind == "route" else []
        argv += ["--no-store"] if name == BRACKET or round_ > 1 else []  # a confirmation round only measures
        child = Child(f"eval {name}", argv, fleet.work_dir / "logs" / f"eval-{unit.target}-{name}-{round_}.log",
                      grace_s=10)
        started = time.monotonic()
        on_status(f"{unit.title} on the {side_name}{' again' if name == BRACKET else ''} ({', '.join(unit.tasks)})")
        child.start()
        try:
            while child.alive:
                time.sleep(0.3)
        finally:
            child.stop()
        runs[name] = SideRun.read(out, child.log_path)
        on_status(f"{unit.title}: {name} run {runs[name].status} in {time.monotonic() - started:.0f} s")
    return runs


def _variant(side: Side, unit: EvalUnit) -> str:
    models = [unit.target] if unit.kind == "model" else sorted(side.replicas)
    variants = sorted({side.config.registry.models[m].variant for m in models if m in side.config.registry.models})
    return "+".join(variants)


def _decide(unit: EvalUnit, runs: dict[str, SideRun], cost: CostMeasurement | None, policy: GatePolicy,
            client: Any, database: str | None, plan: GatePlan) -> UnitResult:
    """Quality of one unit, from the stored runs (what `fleetlens eval compare` would read)."""
    stored = {}
    for name in SIDES:
        run = runs[name]
        stored[name] = load_run(client, database, run.run_id) if run.run_id else StoredRun(f"({name}: {run.error})",
                                                                                              {}, ())
    decision = decide(stored["baseline"], stored["candidate"], policy, changes=plan.changes, budgets=False)
    return UnitResult(unit, runs, decision, cost)


def judge_budgets(units: Sequence[UnitResult], policy: GatePolicy, require_cost: bool) -> list[GateBudget]:
    """p95 latency and cost per request over every eval request of each side (all units together).

    The candidate is compared with each of the baseline's two runs (before and after it) and judged
    by the comparison that favours it: a budget fails only when the candidate is significantly over
    budget against *both*. Why: requests within one run are not independent draws -- the machine's
    speed wanders during a run -- so one run-against-run bootstrap is over-confident by the run-to-run
    spread (measured here: runs of the same replica minutes apart differ by up to ~6% in cost per
    request, each with a CI of +-2%). The two baseline runs show that spread; a real regression
    (+50%) is beyond it against both."""
    resampling = dict(confidence=policy.confidence, resamples=policy.bootstrap_resamples, seed=policy.seed)

    def per_run(values: Callable[[SideRun], list[float]]) -> tuple[list[list[float]], list[float]]:
        baselines = [[v for u in units if name in u.runs for v in values(u.runs[name])]
                     for name in ("baseline", BRACKET)]
        return [b for b in baselines if b], [v for u in units for v in values(u.runs["candidate"])]

    latency_base, latency_cand = per_run(lambda run: [ms for _, ms in run.items])
    budgets = [_bracketed(LATENCY_CHECK, "p95 latency, ms", latency_base, latency_cand,
                          policy.max_p95_latency_increase, "p95", policy, resampling)]
    if all(u.cost is not None and u.cost.complete for u in units):
        samples = {id(u.runs[n]): u.cost.samples(u.runs[n].trace_ids)  # type: ignore[union-attr]
                   for u in units for n in u.runs}
        cost_base, cost_cand = per_run(lambda run: samples[id(run)])
        budgets.append(_bracketed(COST_CHECK, "cost per request, USD", cost_base, cost_cand,
                                  policy.max_cost_per_request_increase, "mean", policy, resampling))
    else:
        found = "; ".join(f"{u.unit.target} {u.cost.found:,} of {u.cost.expected:,}" for u in units
                          if u.cost is not None and not u.cost.complete) or "no traces"
        missing = stats.judge_increase(COST_CHECK, None, None, policy.max_cost_per_request_increase)
        missing = replace(missing, reason=f"{COST_CHECK}: the telemetry lacks engine spans of eval requests ({found}); "
                                          "is the collector running?")
        budgets.append(GateBudget("cost per request, USD", missing, counted=require_cost,
                                  note="" if require_cost else "not measured (not required)"))
    return budgets


def _bracketed(check: str, label: str, baselines: list[list[float]], candidate: list[float], max_increase: float,
               statistic: stats.Statistic, policy: GatePolicy, resampling: dict[str, Any]) -> GateBudget:
    """The candidate against each baseline run; the comparison most favourable to it decides."""
    verdicts = [stats.judge_increase_samples(check, b, candidate, max_increase, statistic=statistic, **resampling)
                for b in baselines] or [stats.judge_increase_samples(check, [], candidate, max_increase)]
    judged = [v for v in verdicts if v.ci_low is not None]
    chosen = min(judged, key=lambda v: v.ci_low) if judged else verdicts[0]  # type: ignore[arg-type, return-value]
    if len(judged) == 2:
        other = judged[1] if chosen is judged[0] else judged[0]
        which = "first" if chosen is judged[0] else "second"
        chosen = replace(chosen, reason=f"{chosen.reason}; against the baseline's {which} run (the other: "
                                        f"{other.increase:+.1%}, CI {other.ci_low:+.1%} to {other.ci_high:+.1%})")
    return _budget(chosen, label, policy)


def _budget(verdict: BudgetVerdict, label: str, policy: GatePolicy) -> GateBudget:
    n = min(verdict.samples)
    if n < policy.min_budget_requests:
        return GateBudget(label, verdict, counted=False,
                          note=f"too few requests to judge ({n:,} < {policy.min_budget_requests:,}): not counted")
    return GateBudget(label, verdict, counted=True)


def _overall(plan: GatePlan, units: Sequence[UnitResult], budgets: Sequence[GateBudget]) -> Verdict:
    if not plan.units:  # nothing that can change an answer changed
        return Verdict.PASS
    return stats.combine([u.decision.verdict for u in units] + [b.verdict for b in budgets if b.counted])


# --------------------------------------------------------------------------- the report


_HEADLINE = {Verdict.PASS: "PASS", Verdict.FAIL: "FAIL", Verdict.INCOMPLETE: "INCOMPLETE"}


def render_gate_report(result: GateResult) -> str:
    """The gate's Markdown report: verdict, the two sides, what changed, each unit's tables, why."""
    lines = [f"## Eval gate: **{_HEADLINE[result.verdict]}**", "",
             f"Baseline: {result.labels['baseline']}  ", f"Candidate: {result.labels['candidate']}", "",
             "### What changed", ""]
    lines += [f"- {change}" for change in result.plan.changes] or ["- nothing"]
    if not result.plan.units:
        lines += ["", "Nothing that can change an answer changed: no evaluation needed."]
    for unit_result in result.units:
        unit, decision = unit_result.unit, unit_result.decision
        runs = unit_result.runs
        lines += ["", f"### {unit.title[0].upper() + unit.title[1:]}: **{_HEADLINE[decision.verdict]}**", "",
                  f"Evaluated because {unit.why}; tasks {', '.join(unit.tasks)}. Runs `{runs['baseline'].run_id}` "
                  f"(baseline) and `{runs['candidate'].run_id}` (candidate).", ""]
        lines += render_sections(decision, "####")
    if result.budgets:
        n = result.budgets[0].verdict.samples
        lines += ["", f"### Latency and cost: all eval requests ({n[0]:,} per baseline run / {n[1]:,} candidate)", "",
                  "The baseline ran twice, before and after the candidate; the candidate is judged against the "
                  "run that favours it (both comparisons are in the reasons), so a budget fails only beyond the "
                  "run-to-run spread of this machine.", "",
                  BUDGET_HEADER, "|---|---:|---:|---:|---:|---|"]
        for budget in result.budgets:
            row = budget_row(budget.verdict, budget.label)
            lines.append(row if not budget.note else row.rsplit("|", 2)[0] + f"| {budget.note} |")
        lines += ["", "Cost per request: GPU busy time of the replicas that served the requests x their price, "
                      "split by each request's engine time (as `fct_requests.allocated_usd`); idle time left out."]
    if result.replicas:
        lines += ["", "### Fleet", "", "| Replica | Model | Ready after |", "|---|---|---:|"]
        lines += [f"| {r.name} | {r.model} | {r.load_s:.0f} s |" for r in result.replicas]
        lines += ["", f"Start-up {result.startup_s:.0f} s, whole gate {result.wall_s:.0f} s."]
    if result.plan.notes:
        lines += ["", "### Not gated", ""] + [f"- {note}" for note in result.plan.notes]
    reasons = [f"{u.unit.title}: {reason}" for u in result.units for reason in u.decision.reasons]
    reasons += [f"{b.verdict.verdict}: {b.verdict.reason}" for b in result.budgets
                if b.counted and b.verdict.verdict != Verdict.PASS]
    if reasons:
        lines += ["", "### Why not a pass", ""] + [f"- {reason}" for reason in reasons]
    return "\n".join(lines) + "\n"


def store_gate(client: Any, database: str | None, result: GateResult) -> str:
    result.gate_id = store_gate_row(client, database, verdict=result.verdict, baseline_ref=result.labels["baseline"],
                                    candidate_ref=result.labels["candidate"], changes=result.plan.changes,
                                    report_md=result.report, details=result.details())
    return result.gate_id


def default_work_dir(settings: Settings) -> Path:
    return settings.data_dir / "gate" / time.strftime("%Y%m%d-%H%M%S") / str(os.getpid())


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
