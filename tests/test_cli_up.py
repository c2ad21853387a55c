"""`fleetlens up` starts the embedded stack and Ctrl-C / SIGTERM stop every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from conftest import Output, child_env, free_port
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_then_signal_leaves_no_process(tmp_path, sig):
    port = free_port()
    otlp_port, dashboards_port = free_port(), free_port()
    env = child_env({"FLEETLENS_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200",
                     "FLEETLENS_COLLECTOR__HTTP_PORT": str(otlp_port), "FLEETLENS_COLLECTOR__GRPC_PORT": str(free_port()),
                     "FLEETLENS_DASHBOARDS__PORT": str(dashboards_port)})
    # start_new_session + SIG_IGN for SIGINT mimics a background job of a non-interactive shell
    up = subprocess.Popen([sys.executable, "-m", "fleetlens", "up", "--port", str(port), "--no-serving"],
                          cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    stdout = Output(up)
    try:
        stdout.wait_for("Press Ctrl-C", 90)
        count = httpx.post(f"http://127.0.0.1:{port}/", content=b"SELECT count() FROM system.tables "
                           b"WHERE database = 'fleetlens' AND name = 'otel_traces'").text
        assert count == "1\n"
        # the collector takes OTLP and writes it to the warehouse the stack started
        request = ExportTraceServiceRequest()
        span = request.resource_spans.add().scope_spans.add().spans.add()
        span.trace_id, span.span_id, span.name = b"\x01" * 16, b"\x02" * 8, "from-up-test"
        reply = httpx.post(f"http://127.0.0.1:{otlp_port}/v1/traces", content=request.SerializeToString(),
                           headers={"content-type": "application/x-protobuf"})
        assert reply.status_code == 200
        query = b"SELECT count() FROM fleetlens.otel_traces WHERE SpanName = 'from-up-test'"
        deadline = time.monotonic() + 30
        while httpx.post(f"http://127.0.0.1:{port}/", content=query).text != "1\n":
            assert time.monotonic() < deadline, "span never reached the warehouse"
            time.sleep(0.2)
        # the dashboards answer (what they show is tested in test_dashboards_*.py)
        assert httpx.get(f"http://127.0.0.1:{dashboards_port}/_stcore/health").text == "ok"
        assert f"http://127.0.0.1:{dashboards_port}/" in stdout.text
        children = psutil.Process(up.pid).children(recursive=True)
        assert children, "up started no child process"
        up.send_signal(sig)
        up.wait(timeout=60)
        stdout.reader.join(timeout=10)
        output = stdout.text
        assert up.returncode == 0, output
        assert "FleetLens is up" in output and "stopping" in output
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
    finally:
        _kill_tree(up)


def _kill_tree(up: subprocess.Popen) -> None:
    """After a failed test: kill `up` and its children (each runs in its own session)."""
    leftovers = psutil.Process(up.pid).children(recursive=True) if up.poll() is None else []
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGKILL)
    for child in leftovers:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_up_with_serving_starts_gateway_and_demo_replicas(tmp_path, demo_models):
    """`fleetlens up --serving`: the gateway and a small + a large replica of the demo models join the
    stack; a request with the demo key is answered. The replicas' engine is the stub upstream here
    (vLLM itself is exercised in test_serving_vllm_e2e.py); the demo models are the cached build."""
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / "demo").symlink_to(demo_models)
    port, gateway_port = free_port(), free_port()
    env = child_env({"FLEETLENS_DATA_DIR": str(data), "COLUMNS": "200", "FLEETLENS_GATEWAY__PORT": str(gateway_port),
                     "FLEETLENS_COLLECTOR__HTTP_PORT": str(free_port()), "FLEETLENS_COLLECTOR__GRPC_PORT": str(free_port()),
                     "FLEETLENS_REPLICA__ENGINE_COMMAND":
                         f'["{sys.executable}", "-m", "fleetlens.serving.stub_upstream", "--startup-delay-s", "1"]'})
    up = subprocess.Popen([sys.executable, "-m", "fleetlens", "up", "--port", str(port), "--serving",
                           "--no-dashboards"], cwd=tmp_path,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    stdout = Output(up)
    try:
        output = stdout.wait_for("Press Ctrl-C", 120)
        assert "replica demo-small-0" in output and "replica demo-large-0" in output, output
        key = (data / "gateway" / "demo-api-key").read_text().strip()
        assert oct((data / "gateway" / "demo-api-key").stat().st_mode & 0o777) == "0o600"
        assert key not in output  # the key is in its file, never printed or logged
        reply = httpx.post(f"http://127.0.0.1:{gateway_port}/v1/chat/completions", timeout=30,
                           headers={"authorization": f"Bearer {key}"},
                           json={"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "a="}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "demo-large"  # the demo routes' default feature (lookup)
        children = psutil.Process(up.pid).children(recursive=True)
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
        assert up.returncode == 0, stdout.text
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
        assert not list((data / "replicas").glob("*.json"))  # replicas deregistered on the way out
    finally:
        _kill_tree(up)
