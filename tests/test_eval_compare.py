"""The gate's decision from two stored runs (`fleetlens.evals.compare`, `fleetlens eval compare`).

Light: synthetic eval_runs / eval_items rows in the shared embedded warehouse (no model server),
1,000 items on one task (the policy's min_items), a small policy (2,000 bootstrap resamples), the
CLI in-process through typer's CliRunner.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import WarehouseProcess, migrated_database
from fleetlens.evals.cli import eval_app
from fleetlens.evals.compare import UnknownRunError, decide, load_run, render_report, store_decision
from fleetlens.evals.policy import load_policy
from fleetlens.evals.stats import Verdict

DB = "eval_compare"
TASK = "lookup_hard"
N = 1000
RUN_COLUMNS = ["run_id", "started_at", "finished_at", "target", "model", "variant", "route", "task", "status",
               "n_items", "metrics", "config_hash", "git_sha", "seed", "params", "updated_at"]
ITEM_COLUMNS = ["run_id", "task", "item_id", "ts", "slice", "score", "correct", "latency_ms", "input_tokens",
                "output_tokens", "trace_id"]

rng = np.random.default_rng(7)
BASE_SCORES = (rng.random(N) < 0.75).astype(float)  # ~75% accuracy
BASE_LATENCY = 80.0 + 40.0 * rng.random(N)  # ms, p95 ~118


def _lose(scores: np.ndarray, points: int) -> np.ndarray:
    """The first `points`% of N items that the baseline gets right, now wrong."""
    out = scores.copy()
    out[np.flatnonzero(out == 1.0)[: points * N // 100]] = 0.0
    return out


def _insert_run(client, run_id: str, scores: np.ndarray, latency: np.ndarray, *, status: str = "complete",
                n_items: int | None = None, target: str = "demo-large", variant: str = "bf16") -> None:
    now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    base = dict(run_id=run_id, started_at=now, finished_at=now, target=target, model=target, variant=variant,
                route="", task=TASK, metrics={}, config_hash="c" * 64, git_sha="a" * 40, seed=0, params={})
    rows = [
        {**base, "status": "running", "n_items": 0, "finished_at": None, "updated_at": now},
        {**base, "status": status, "n_items": len(scores) if n_items is None else n_items,
         "params": {"error": "HTTP 503: upstream down"} if status != "complete" else {},
         "updated_at": now + dt.timedelta(seconds=1)},
    ]
    client.insert("eval_runs", [[r[c] for c in RUN_COLUMNS] for r in rows], column_names=RUN_COLUMNS, database=DB)
    items = [[run_id, TASK, f"k{i:04d}", now, TASK, float(s), int(s >= 1), float(lat), 10, 5, f"{i:032x}"]
             for i, (s, lat) in enumerate(zip(scores, latency))]
    client.insert("eval_items", items, column_names=ITEM_COLUMNS, database=DB)


@pytest.fixture(scope="module")
def runs(warehouse: WarehouseProcess, tmp_path_factory: pytest.TempPathFactory):
    url = migrated_database(warehouse, DB)
    client = warehouse.client()
    _insert_run(client, "base", BASE_SCORES, BASE_LATENCY)
    _insert_run(client, "same", BASE_SCORES, BASE_LATENCY, variant="int8")
    _insert_run(client, "drop13", _lose(BASE_SCORES, 13), BASE_LATENCY, variant="int3")
    _insert_run(client, "partial", BASE_SCORES, BASE_LATENCY, status="incomplete")
    _insert_run(client, "missing", BASE_SCORES[:990], BASE_LATENCY[:990], n_items=N)  # says complete, lacks 10
    _insert_run(client, "slow", BASE_SCORES, BASE_LATENCY * 1.5)
    policy = tmp_path_factory.mktemp("policy") / "gate.yaml"
    policy.write_text("bootstrap_resamples: 2000\nmin_items: 1000\nmax_drop: 0.02\nseed: 0\n"
                      "max_p95_latency_increase: 0.10\n")
    return {"url": url, "client": client, "policy": policy}


def _cli(runs, tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(
        eval_app, ["compare", "--policy", str(runs["policy"]), *args],
        env={"FLEETLENS_WAREHOUSE_URL": runs["url"], "COLUMNS": "200", "GITHUB_STEP_SUMMARY": "", **(env or {})})
    return result, " ".join(result.output.split())


def _decide(runs, baseline: str, candidate: str, **kwargs):
    client = runs["client"]
    return decide(load_run(client, DB, baseline), load_run(client, DB, candidate), load_policy(runs["policy"]),
                  **kwargs)


def test_a_a_passes_exit_0(runs, tmp_path: Path) -> None:
    decision = _decide(runs, "base", "same")
    assert decision.verdict == Verdict.PASS, decision.reasons
    (task,) = decision.tasks
    assert task.n == N and task.delta == 0.0 and task.ci_low == task.ci_high == 0.0
    assert decision.latency.verdict == Verdict.PASS and decision.cost is None  # cost not measured, not required

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    result, out = _cli(runs, tmp_path, "--baseline-run", "base", "--candidate-run", "same", "--no-store",
                       "--report-out", str(tmp_path / "r.md"), env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.exit_code == 0, out
    report = (tmp_path / "r.md").read_text()
    assert "Eval gate: **PASS**" in report and "not measured (not required)" in report
    assert summary.read_text() == "earlier step\n" + report + "\n"


def test_13_point_drop_fails_exit_1_with_ci_and_reason(runs, tmp_path: Path) -> None:
    decision = _decide(runs, "base", "drop13", changes=["demo-large: bf16 -> int3"])
    (task,) = decision.tasks
    assert decision.verdict == Verdict.FAIL and task.verdict == Verdict.FAIL
    assert task.delta == pytest.approx(-0.13) and task.ci_high < -0.02
    report = render_report(decision)
    row = next(line for line in report.splitlines() if line.startswith(f"| {TASK} |"))
    assert f"-13.00 pts | {100 * task.ci_low:+.2f} to {100 * task.ci_high:+.2f} | 1,000 | 2.00 pts | fail" in row
    assert "- demo-large: bf16 -> int3" in report
    assert f"- fail: {TASK}: delta -13.00 pts on 1000 items" in report
    assert "significantly larger than the allowed 2.00 pts" in report

    result, out = _cli(runs, tmp_path, "--baseline-run", "base", "--candidate-run", "drop13", "--no-store",
                       "--change", "demo-large: bf16 -> int3")
    assert result.exit_code == 1, out
    assert "FAIL" in out and "significantly larger than the allowed 2.00 pts" in out


@pytest.mark.parametrize("candidate, why", [
    ("partial", "the candidate run partial is incomplete (HTTP 503: upstream down); never a pass"),
    ("missing", "the runs cover different items (10 only in the baseline"),
])
def test_incomplete_candidate_exit_3_never_0(runs, tmp_path: Path, candidate: str, why: str) -> None:
    decision = _decide(runs, "base", candidate)
    (task,) = decision.tasks
    assert decision.verdict == Verdict.INCOMPLETE and task.verdict == Verdict.INCOMPLETE
    assert why in task.reason
    result, out = _cli(runs, tmp_path, "--baseline-run", "base", "--candidate-run", candidate, "--no-store")
    assert result.exit_code == 3, out
    assert "INCOMPLETE" in out


def test_missing_task_and_required_cost_are_incomplete(runs) -> None:
    base = load_run(runs["client"], DB, "base")
    empty = type(base)("empty", {}, base.latency_ms)
    decision = decide(base, empty, load_policy(runs["policy"]))
    assert decision.verdict == Verdict.INCOMPLETE
    assert "the candidate run empty has no task lookup_hard" in decision.tasks[0].reason

    required = _decide(runs, "base", "same", require_cost=True)
    assert required.verdict == Verdict.INCOMPLETE and required.cost.verdict == Verdict.INCOMPLETE
    costly = _decide(runs, "base", "same", cost_per_request=(0.0010, 0.0012))
    assert costly.verdict == Verdict.FAIL and "cost_per_request: +20.0%" in costly.reasons[0]


def test_p95_latency_plus_50_percent_fails(runs, tmp_path: Path) -> None:
    decision = _decide(runs, "base", "slow")
    assert decision.tasks[0].verdict == Verdict.PASS
    assert decision.latency.verdict == Verdict.FAIL and decision.verdict == Verdict.FAIL
    assert decision.latency.increase == pytest.approx(0.5)
    assert decision.reasons == [decision.latency.reason.join(["fail: ", ""])]
    assert "above the allowed +10%" in decision.latency.reason
    result, out = _cli(runs, tmp_path, "--baseline-run", "base", "--candidate-run", "slow", "--no-store")
    assert result.exit_code == 1, out


def test_unknown_run_and_bad_policy_exit_2(runs, tmp_path: Path) -> None:
    with pytest.raises(UnknownRunError, match="unknown eval run id 'nope'"):
        load_run(runs["client"], DB, "nope")
    result, out = _cli(runs, tmp_path, "--baseline-run", "base", "--candidate-run", "nope")
    assert result.exit_code == 2, out
    assert "unknown eval run id 'nope'" in out

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_dorp: 0.02\n")
    result = CliRunner().invoke(eval_app, ["compare", "--policy", str(bad), "--baseline-run", "base",
                                           "--candidate-run", "same"],
                                env={"FLEETLENS_WAREHOUSE_URL": runs["url"], "COLUMNS": "200"})
    assert result.exit_code == 2 and "max_dorp: unknown key" in result.output


def test_decision_is_stored_and_reads_back(runs, tmp_path: Path) -> None:
    client = runs["client"]
    decision = _decide(runs, "base", "drop13", changes=["demo-large: bf16 -> int3"])
    gate_id = store_decision(client, DB, decision, "base", "drop13")
    verdict, changes, report, details = client.query(
        f"SELECT verdict, changes, report_md, details FROM {DB}.gate_decisions FINAL WHERE gate_id = %(g)s",
        parameters={"g": gate_id}).result_rows[0]
    assert verdict == "fail" and changes == ["demo-large: bf16 -> int3"]
    assert report == render_report(decision)
    numbers = json.loads(details)
    assert numbers["tasks"][0]["delta"] == pytest.approx(-0.13) and numbers["tasks"][0]["verdict"] == "fail"
    assert numbers["latency"]["verdict"] == "pass" and numbers["cost"]["verdict"] == "not measured"

    before = client.command(f"SELECT count() FROM {DB}.gate_decisions")
    result, out = _cli(runs, tmp_path, "--baseline-run", "base", "--candidate-run", "same")
    assert result.exit_code == 0, out
    assert client.command(f"SELECT count() FROM {DB}.gate_decisions") == before + 1
    assert client.command(f"SELECT verdict FROM {DB}.gate_decisions FINAL ORDER BY decided_at DESC LIMIT 1") == "pass"


def test_same_inputs_give_identical_report(runs, tmp_path: Path) -> None:
    first = render_report(_decide(runs, "base", "drop13"))
    assert render_report(_decide(runs, "base", "drop13")) == first
    outs = []
    for name in ("one.md", "two.md"):
        result, out = _cli(runs, tmp_path, "--baseline-run", "base", "--candidate-run", "drop13", "--no-store",
                           "--report-out", str(tmp_path / name))
        assert result.exit_code == 1, out
        outs.append((tmp_path / name).read_text())
    assert outs[0] == outs[1] == first
