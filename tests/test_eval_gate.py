"""`fleetlens eval gate` end to end with real served demo models (slow).

A git repository holds the demo fleet (`fleet/models.yaml`, `fleet/routes.yaml`: features `faq` and
`lookup` both on demo-large) on `main`, and one branch per proposed change. Each test runs the real CLI
(`python -m fleetlens eval gate --baseline main --candidate BRANCH`), which starts vLLM replicas and a
gateway per side, runs the eval suite through them into a migrated warehouse database, traced to a real
collector, and decides with the shipped policy (evals/gate.yaml). `--limit 1000` keeps lookup_hard at
the policy's 1,000-item floor (the bench runs the whole suite).

* quantization: demo-large's weights swapped for int3 -> fail (lookup_hard far below the 1-point
  margin, CI in the report); routes moved to int8 -> pass;
* routing: the hard slice (`lookup`) moved to demo-small -> fail; only easy traffic (`faq`) -> pass;
* A/A: main against main, `--evaluate lookup` -> pass with a zero delta, one shared replica;
* reproducible: the same change gated twice gives the same decision and quality numbers;
* a candidate whose replica cannot start -> exit 2 with the replica's log named, nothing left running.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import CollectorProcess, WarehouseProcess, child_env, migrated_database

DATABASE = "eval_gate"
pytestmark = pytest.mark.slow


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def gate_repo(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Path:
    """main: the demo fleet; branches: int3, int8, hard-to-small, easy-to-small, broken."""
    repo = tmp_path_factory.mktemp("gate-repo")
    (repo / "fleet").mkdir()
    registry = yaml.safe_load((demo_models / "models.yaml").read_text())
    routes = {"default": "lookup",
              "features": {f: {"model": "demo-large", "fallback": ["demo-small"], "timeout_s": 60}
                           for f in ("faq", "lookup")},
              "pool": {"health_check": {"interval_s": 1, "timeout_s": 1, "unhealthy_after": 2}}}

    def write(models: dict, routes_: dict) -> None:
        (repo / "fleet" / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
        (repo / "fleet" / "routes.yaml").write_text(yaml.safe_dump(routes_, sort_keys=False))

    def branch(name: str, models: dict, routes_: dict) -> None:
        _git(repo, "checkout", "-q", "-b", name, "main")
        write(models, routes_)
        _git(repo, "commit", "-q", "-am", name)
        _git(repo, "checkout", "-q", "main")

    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "gate@example.com")
    _git(repo, "config", "user.name", "gate")
    write(registry, routes)
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "demo fleet")

    int3 = yaml.safe_load(yaml.safe_dump(registry))
    int3["models"]["demo-large"].update(path=registry["models"]["demo-large-int3"]["path"], variant="int3")
    branch("int3", int3, routes)
    int8 = yaml.safe_load(yaml.safe_dump(registry))
    int8["models"]["demo-large-int8"]["replicas"] = 1
    branch("int8", int8, {**routes, "features": {f: {**r, "model": "demo-large-int8"}
                                                  for f, r in routes["features"].items()}})
    moved = {"model": "demo-small", "fallback": ["demo-large"], "timeout_s": 60}
    branch("hard-to-small", registry, {**routes, "features": {**routes["features"], "lookup": moved}})
    branch("easy-to-small", registry, {**routes, "features": {**routes["features"], "faq": moved}})
    broken = yaml.safe_load(yaml.safe_dump(registry))
    broken["models"]["demo-large"]["path"] = str(repo / "no-such-checkpoint")
    branch("broken", broken, routes)
    return repo


@pytest.fixture(scope="module")
def gate_env(tmp_path_factory: pytest.TempPathFactory, warehouse: WarehouseProcess):
    tmp = tmp_path_factory.mktemp("eval-gate")
    url = migrated_database(warehouse, DATABASE)
    collector = CollectorProcess(url, tmp / "collector").start()
    env = child_env({"FLEETLENS_WAREHOUSE_URL": url, "FLEETLENS_DATA_DIR": str(tmp / "data"),
                     "FLEETLENS_COLLECTOR__HTTP_PORT": str(collector.http_port),
                     "FLEETLENS_REPLICA__KV_CACHE_GIB": "0.5", "FLEETLENS_REPLICA__READY_TIMEOUT_S": "300"})
    yield {"env": env, "tmp": tmp, "client": warehouse.client()}
    collector.stop()


def gate(gate_repo: Path, gate_env: dict, candidate: str, *extra: str, baseline: str = "main"):
    """Run the CLI; returns (exit code, report text, stdout, stored gate_decisions row or None)."""
    name = re.sub(r"\W", "-", f"{baseline}-{candidate}-{len(list(gate_env['tmp'].glob('*.md')))}")
    report = gate_env["tmp"] / f"{name}.md"
    process = subprocess.run(
        [sys.executable, "-m", "fleetlens", "eval", "gate", "--baseline", baseline, "--candidate", candidate,
         "--models-path", str(gate_repo / "fleet" / "models.yaml"),
         "--routes-path", str(gate_repo / "fleet" / "routes.yaml"), "--limit", "1000",
         "--report-out", str(report), *extra],
        cwd=gate_repo, env=gate_env["env"], capture_output=True, text=True, timeout=900)
    output = process.stdout + process.stderr
    print(output[-4000:])
    stored = re.search(r"stored gate decision ([0-9a-f]{32})", output)
    row = None
    if stored:
        (row,) = gate_env["client"].query(
            f"SELECT verdict, baseline_ref, candidate_ref, changes, report_md, details FROM {DATABASE}.gate_decisions "
            "WHERE gate_id = {g:String}", parameters={"g": stored.group(1)}).named_results()
    return process.returncode, report.read_text() if report.exists() else "", output, row


def gate_replicas() -> list[psutil.Process]:
    """vLLM processes the gate started (their service name is vllm-gate-<model>-<hash>)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("OTEL_SERVICE_NAME", "").startswith("vllm-gate-"):
                found.append(process)
        except psutil.Error:
            continue
    return found


def task_row(report: str, task: str) -> list[str]:
    (line,) = [line for line in report.splitlines() if line.startswith(f"| {task} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def ci(cell: str) -> tuple[float, float]:
    low, high = re.fullmatch(r"([-+]\d+\.\d+) to ([-+]\d+\.\d+)", cell).groups()
    return float(low), float(high)


def test_quantized_int3_fails_with_the_ci_and_int8_passes(gate_repo: Path, gate_env: dict) -> None:
    code, report, _, row = gate(gate_repo, gate_env, "int3")
    assert code == 1, report
    assert report.startswith("## Eval gate: **FAIL**")
    assert "model demo-large: " in report and "variant fp32 -> int3" in report
    cells = task_row(report, "lookup_hard")  # Task | Baseline | Candidate | Delta | CI | n | Margin | Verdict
    low, high = ci(cells[4])
    assert cells[5] == "1,000" and cells[6] == "1.00 pts" and cells[7] == "fail"
    assert float(cells[1].rstrip("%")) > 99 and float(cells[2].rstrip("%")) < 70
    assert low <= high < -1.0  # the whole CI is more than the margin below zero
    assert row["verdict"] == "fail" and row["report_md"] == report and row["baseline_ref"].startswith("git ")
    details = json.loads(row["details"])
    assert [u["target"] for u in details["units"]] == ["faq", "lookup"]
    assert {b["check"]: b["counted"] for b in details["budgets"]} == {"p95_latency_ms": True, "cost_per_request": True}

    code, report, _, row = gate(gate_repo, gate_env, "int8")
    assert code == 0, report
    assert report.startswith("## Eval gate: **PASS**") and task_row(report, "lookup_hard")[7] == "pass"
    assert task_row(report, "lookup_easy")[7] == "pass" and row["verdict"] == "pass"
    costs = {b["check"]: b for b in json.loads(row["details"])["budgets"]}["cost_per_request"]
    assert costs["baseline"] > 0 and costs["candidate"] > 0 and costs["samples"] == [1050, 1050]


def test_routing_the_hard_slice_to_the_small_model_fails_and_moving_easy_traffic_passes(
        gate_repo: Path, gate_env: dict) -> None:
    code, report, output, _ = gate(gate_repo, gate_env, "hard-to-small")
    assert code == 1, report
    assert "### Route `lookup`: **FAIL**" in report and "lookup_easy" not in report.split("### Fleet")[0]
    cells = task_row(report, "lookup_hard")
    assert cells[7] == "fail" and float(cells[2].rstrip("%")) < 5  # the small model does not hold the hard facts
    # gated again: the same decision and the same quality numbers (greedy decoding, same seed)
    code_again, report_again, _, _ = gate(gate_repo, gate_env, "hard-to-small")
    assert code_again == 1 and task_row(report_again, "lookup_hard") == cells

    code, report, _, row = gate(gate_repo, gate_env, "easy-to-small")
    assert code == 0, report
    assert "### Route `faq`: **PASS**" in report and "lookup_hard" not in report
    assert task_row(report, "lookup_easy")[5] == "50"
    assert "too few requests to judge (50 < 500)" in report  # 50 requests: budgets shown, not counted
    assert row["verdict"] == "pass"


def test_aa_passes_on_one_shared_replica(gate_repo: Path, gate_env: dict) -> None:
    code, report, _, row = gate(gate_repo, gate_env, "main", "--evaluate", "lookup")
    assert code == 0, report
    cells = task_row(report, "lookup_hard")
    assert cells[1] == cells[2] and cells[3] == "+0.00 pts" and cells[7] == "pass"
    fleet = report.split("### Fleet")[1]
    assert fleet.count("| gate-demo-large-") == 1  # identical definitions share one replica
    assert "- nothing" in report and row["verdict"] == "pass"


def test_a_replica_that_cannot_start_is_an_error_not_a_verdict(gate_repo: Path, gate_env: dict, tmp_path: Path) -> None:
    code, report, output, row = gate(gate_repo, gate_env, "broken")  # a checkpoint path that does not exist
    output = " ".join(output.split())  # rich wraps long lines
    assert code == 2 and report == "" and row is None
    assert "the gate could not run: checkpoint not found for demo-large (" in output and "no-such-checkpoint" in output
    # a checkpoint that exists but vLLM cannot load: the replica's own failure, with its log
    junk = tmp_path / "junk-checkpoint"
    junk.mkdir()
    (junk / "config.json").write_text("{}")
    registry = yaml.safe_load((gate_repo / "fleet" / "models.yaml").read_text())
    registry["models"]["demo-large"]["path"] = str(junk)
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(registry))
    code, report, output, row = gate(gate_repo, gate_env, str(tmp_path / "models.yaml"))
    output = " ".join(output.split())
    assert code == 2 and report == "" and row is None
    assert "the gate could not run: replica gate-demo-large-" in output and "exited before it was ready" in output
    assert gate_replicas() == []  # the replica that did start (the baseline's) was stopped with the gate
