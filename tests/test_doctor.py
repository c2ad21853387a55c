"""`fleetlens doctor` finds and names a taken port, a missing venv and an unreachable warehouse URL,
and passes on a healthy machine. Real sockets, real directories, a real embedded warehouse."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env, free_port, migrated_database
from fleetlens.config import load_settings
from fleetlens.doctor import (
    check_ports,
    check_serving_engine,
    check_venv,
    check_warehouse,
    exit_code,
    run_checks,
)


def free_ports_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """Every port doctor checks on a free port (never a developer's or CI's 8123/4318/...)."""
    env = {
        "FLEETLENS_DATA_DIR": str(data_dir),
        "FLEETLENS_WAREHOUSE_SERVER__PORT": str(free_port()),
        "FLEETLENS_COLLECTOR__GRPC_PORT": str(free_port()),
        "FLEETLENS_COLLECTOR__HTTP_PORT": str(free_port()),
        "FLEETLENS_GATEWAY__PORT": str(free_port()),
        "FLEETLENS_DASHBOARDS__PORT": str(free_port()),
        "COLUMNS": "400",  # one table row per line: the assertions read whole rows
    }
    env.update(overrides)
    return env


def doctor(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetlens", "doctor", *args], cwd=cwd, env=child_env(env),
                          capture_output=True, text=True, timeout=60)


def row(output: str, check: str) -> str:
    """The table line of `check` (its first line, with status, detail and fix)."""
    lines = [line for line in output.splitlines() if line.startswith(f"│ {check} ")]
    assert lines, f"no row {check!r} in:\n{output}"
    return lines[0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """In-process checks: no developer FLEETLENS_* settings, no fleetlens.yaml from the working directory."""
    for name in list(os.environ):
        if name.startswith("FLEETLENS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_taken_port_is_named_with_setting_holder_and_fix(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = doctor(tmp_path, free_ports_env(tmp_path / "data", FLEETLENS_COLLECTOR__HTTP_PORT=str(port)))
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    line = row(out, f"port {port} (collector.http_port)")
    assert "fail" in line
    assert f"127.0.0.1:{port} is already in use by pid {os.getpid()}" in line  # psutil names this process
    assert "FLEETLENS_COLLECTOR__HTTP_PORT=" in line and f"stop pid {os.getpid()}" in line
    assert "Traceback" not in out + result.stderr
    assert "1 failed" in out  # the other ports are free


def test_unreachable_warehouse_url_fails_and_never_prints_the_password(tmp_path):
    port = free_port()  # nothing listens there
    secret = "Pa55-w0rd-9f3k"
    url = f"http://alice:{secret}@127.0.0.1:{port}/fleetlens"
    result = doctor(tmp_path, free_ports_env(tmp_path / "data", FLEETLENS_WAREHOUSE_URL=url))
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    line = row(result.stdout, "warehouse")
    assert "fail" in line and f"http://alice:***@127.0.0.1:{port}/fleetlens" in line
    assert "Connection refused" in line and "FLEETLENS_WAREHOUSE_URL" in line
    assert secret not in out
    # an external warehouse: no embedded warehouse port to check
    assert "warehouse_server.port" not in out


def test_missing_venvs_are_named_with_the_command_that_makes_them(tmp_path, clean_env, monkeypatch):
    root = tmp_path / "checkout"  # a checkout without any venv
    root.mkdir()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no `vllm serve` to fall back to
    settings = load_settings(data_dir=tmp_path / "data")

    venv = check_venv(root)
    assert venv.status == "warn" and venv.check == "venv .venv"
    assert str(root / ".venv") in venv.detail and "make venv" in venv.fix

    serving = check_serving_engine(settings, root, explicit_root=True)
    assert serving.result.status == "warn" and not serving.found  # `fleetlens up` would run without serving
    assert str(root / ".venv-serving") in serving.result.detail and "make serving-venv" in serving.result.fix
    asked = check_serving_engine(settings, root, wanted=True, explicit_root=True)
    assert asked.result.status == "fail" and "make serving-venv" in asked.result.fix

    results = run_checks(serving=True, root=root, settings=settings)
    assert exit_code(results) == 1
    assert [r.check for r in results if r.status == "fail"] == ["venv .venv-serving"]

    # a half-made serving venv (python, no vLLM) fails: `fleetlens up` would pick it and its replicas die
    python = root / ".venv-serving" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch(mode=0o755)
    broken = check_serving_engine(settings, root, explicit_root=True)
    assert broken.result.status == "fail" and "no vllm" in broken.result.detail
    assert "make serving-venv" in broken.result.fix


def test_healthy_machine_exits_0(tmp_path):
    result = doctor(tmp_path, free_ports_env(tmp_path / "data"))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "0 failed" in out
    assert "ok" in row(out, "warehouse") and "embedded, not running" in row(out, "warehouse")
    assert "ok" in row(out, "data dir") and "ok" in row(out, "config")


def test_bad_settings_are_a_failed_config_check_not_a_traceback(tmp_path):
    result = doctor(tmp_path, free_ports_env(tmp_path / "data", FLEETLENS_COLLECTOR__HTTP_PORT="many"))
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "fail" in row(result.stdout, "config") and "collector.http_port" in out
    assert "FLEETLENS_COLLECTOR__HTTP_PORT" in out and "Traceback" not in out
    assert "ok" in row(result.stdout, "python")  # checks that need no settings still run


def test_two_components_on_one_port(clean_env):
    port = free_port()
    settings = load_settings(gateway={"port": port}, dashboards={"port": port}, data_dir=clean_env / "data")
    results = {r.check: r for r in check_ports(settings, serving_on=True, airflow_on=False)}
    clash = results[f"port {port} (gateway.port)"]
    assert clash.status == "fail" and "dashboards.port" in clash.detail


def test_a_running_warehouse_holds_its_port_ok_and_missing_tables_warn(tmp_path, start_warehouse, clean_env):
    wh = start_warehouse()
    env = free_ports_env(tmp_path / "data", FLEETLENS_WAREHOUSE_SERVER__PORT=str(wh.port))
    result = doctor(tmp_path, env, "--no-serving")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "in use by a running FleetLens warehouse" in row(out, f"port {wh.port} (warehouse_server.port)")
    line = row(out, "warehouse")  # it answers, but nothing was migrated in it
    assert "warn" in line and "otel_traces" in line and "fleetlens migrate" in line

    url = migrated_database(wh, "doctor_ok")
    settings = load_settings(warehouse_url=url)
    check = check_warehouse(settings)
    assert check.status == "ok" and "SELECT 1 ok" in check.detail, check
