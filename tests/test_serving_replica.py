"""`fleetlens serve replica`: the vLLM command line it plans, the replica directory the gateway
follows, and the launcher as a real process (with the stub upstream as its engine, so this runs in
seconds; the real-vLLM run is in test_serving_vllm_e2e.py): ready → cold-start span in the
warehouse → registered → the gateway routes to it → SIGTERM → deregistered and gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import WarehouseProcess, child_env, migrated_database, stop_group, wait_for
from fleetlens import semconv as sc
from fleetlens.config import ConfigError, Settings
from fleetlens.net import free_port, wait_http
from fleetlens.serving.keys import generate_key
from fleetlens.serving.pool import Pools
from fleetlens.serving.registration import ReplicaDirectory, ReplicaRecord, sync_pools
from fleetlens.serving.registry import ModelRegistry
from fleetlens.serving.replica import plan_replica

REGISTRY = ModelRegistry.model_validate({"models": {
    "small": {"path": "/ckpt/small", "served_name": "small-served", "variant": "bf16",
              "gpu": {"type": "L4", "count": 1, "hourly_usd": 0.8}, "max_model_len": 2048,
              "extra_args": ["--dtype", "bfloat16"], "env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
    "large-int4": {"path": "/ckpt/large-awq", "variant": "int4", "quantization": "awq",
                   "gpu": {"type": "H100-80GB", "count": 2}},
}})
ENGINE = ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]


def _argv_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_plan_names_the_model_port_tracing_and_registry_arguments(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    plan = plan_replica(REGISTRY, "small", settings, port=9001, name="small-0", engine=ENGINE)
    assert plan.argv[:3] == ENGINE
    assert _argv_value(plan.argv, "--model") == "/ckpt/small"
    assert _argv_value(plan.argv, "--served-model-name") == "small-served"
    assert _argv_value(plan.argv, "--port") == "9001" and _argv_value(plan.argv, "--host") == "127.0.0.1"
    assert _argv_value(plan.argv, "--otlp-traces-endpoint") == "http://127.0.0.1:4318/v1/traces"
    assert _argv_value(plan.argv, "--max-model-len") == "2048"
    assert plan.argv[-2:] == ["--dtype", "bfloat16"] and "--quantization" not in plan.argv
    assert plan.env["OTEL_SERVICE_NAME"] == "vllm-small-0"
    assert plan.env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    assert "fleetlens.replica=small-0" in plan.env["OTEL_RESOURCE_ATTRIBUTES"]
    assert plan.env["HF_HUB_OFFLINE"] == "1" and plan.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert plan.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert plan.url == "http://127.0.0.1:9001"

    quantized = plan_replica(REGISTRY, "large-int4", settings, port=9002, name="q-0", engine=ENGINE)
    assert _argv_value(quantized.argv, "--quantization") == "awq"
    assert _argv_value(quantized.argv, "--served-model-name") == "large-int4"  # default: the registry key


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'nope' is not in the model registry \(known: large-int4, small\)"):
        plan_replica(REGISTRY, "nope", Settings(data_dir=tmp_path), port=1, name="x", engine=ENGINE)


def test_directory_round_trip_stale_and_broken_records(tmp_path: Path) -> None:
    directory = ReplicaDirectory(tmp_path / "replicas")
    assert directory.records() == [] and directory.next_name("small") == "small-0"
    directory.register(ReplicaRecord("small-0", "small", "http://127.0.0.1:9001", launched_at=10, ready_at=12.5))
    assert [r.name for r in directory.records()] == ["small-0"]
    assert directory.records()[0].load_seconds == 2.5
    assert directory.next_name("small") == "small-1"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    directory.register(ReplicaRecord("small-1", "small", "http://127.0.0.1:9002", pid=dead.pid))
    (directory.path / "broken.json").write_text("{not json")
    assert [r.name for r in directory.records()] == ["small-0"]  # the dead launcher's record and junk skipped
    directory.deregister("small-0")
    assert directory.records() == []
    assert not list(directory.path.glob("*.tmp*"))


def test_sync_pools_adds_and_removes_registered_replicas_only() -> None:
    registry = ModelRegistry.model_validate({"models": {
        "small": {"path": "p", "variant": "bf16", "gpu": {"type": "cpu"}, "replica_urls": ["http://10.0.0.1:8000"]},
    }})
    pools = Pools(registry)
    record = ReplicaRecord("small-0", "small", "http://127.0.0.1:9001")
    stranger = ReplicaRecord("other-0", "not-in-registry", "http://127.0.0.1:9009")
    assert sync_pools(pools, [record, stranger]) == (1, 0)
    replica = next(r for r in pools["small"] if r.source == "registered")
    replica.outstanding = 3
    assert sync_pools(pools, [record]) == (0, 0)
    assert next(r for r in pools["small"] if r.source == "registered") is replica  # state kept
    assert sync_pools(pools, []) == (0, 1)
    assert [r.url for r in pools["small"]] == ["http://10.0.0.1:8000"]  # the static replica stays


@pytest.fixture
def gateway_with_directory(tmp_path: Path, warehouse: WarehouseProcess, start_collector):
    """A gateway process (no static replicas) following <data_dir>/replicas, tracing to a real collector."""
    url = migrated_database(warehouse, "serving_replica")
    collector = start_collector(url)
    (tmp_path / "models.yaml").write_text(
        "models:\n  small:\n    path: /ckpt/small\n    served_name: small-served\n    variant: int8\n"
        "    gpu: {type: L4, count: 1, hourly_usd: 0.8}\n    replicas: 1\n")
    (tmp_path / "routes.yaml").write_text(
        "default: chat\nfeatures:\n  chat:\n    model: small\n"
        "pool:\n  health_check: {interval_s: 0.5, timeout_s: 0.5}\n")
    key, digest = generate_key()
    (tmp_path / "keys.yaml").write_text(f"- {{id: k1, customer: acme, hash: '{digest}', feature: chat}}\n")
    env = child_env({"FLEETLENS_DATA_DIR": str(tmp_path), "FLEETLENS_GATEWAY__OTLP_ENDPOINT": collector.endpoint,
                     "FLEETLENS_GATEWAY__MODELS_FILE": str(tmp_path / "models.yaml"),
                     "FLEETLENS_GATEWAY__ROUTES_FILE": str(tmp_path / "routes.yaml"),
                     "FLEETLENS_GATEWAY__KEYS_FILE": str(tmp_path / "keys.yaml")})
    port = free_port()
    with open(tmp_path / "gateway.log", "wb") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "fleetlens", "gateway", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_http(base + "/health", 30, alive=lambda: gateway.poll() is None), \
            (tmp_path / "gateway.log").read_text()
        yield {"base": base, "key": key, "env": env, "dir": tmp_path / "replicas", "tmp": tmp_path,
               "client": warehouse.client(database="serving_replica")}
    finally:
        stop_group(gateway, signal.SIGTERM, 20)


def launch_small(ctx: dict, *stub_args: str) -> subprocess.Popen:
    """`fleetlens serve replica --model small` with the stub upstream (these `stub_args`) as its engine."""
    engine = [sys.executable, "-m", "fleetlens.serving.stub_upstream", *stub_args]
    env = dict(ctx["env"], FLEETLENS_REPLICA__ENGINE_COMMAND=json.dumps(engine))
    with open(ctx["tmp"] / "replica.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "fleetlens", "serve", "replica", "--model", "small"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_launched_replica_is_timed_registered_routed_to_and_deregistered(gateway_with_directory) -> None:
    ctx = gateway_with_directory
    launcher = launch_small(ctx, "--startup-delay-s", "1.5")
    directory = ReplicaDirectory(ctx["dir"])
    try:
        records = wait_for(lambda: directory.records(), timeout_s=60)
        assert launcher.poll() is None, (ctx["tmp"] / "replica.log").read_text()
        (record,) = records
        assert record.name == "small-0" and record.model == "small" and record.load_seconds >= 1.5
        stub_log = (ctx["tmp"] / "logs" / "replica-small-0.log")
        assert stub_log.exists()

        headers = {"authorization": f"Bearer {ctx['key']}"}
        body = {"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}

        def served() -> httpx.Response | None:
            reply = httpx.post(ctx["base"] + "/v1/chat/completions", json=body, headers=headers, timeout=10)
            return reply if reply.status_code == 200 else None

        reply = wait_for(served, timeout_s=10, interval_s=0.3)  # the gateway reads the directory each second
        assert reply.json()["model"] == "small-served"

        rows = wait_for(lambda: ctx["client"].query(
            "SELECT ServiceName, Duration, StatusCode, SpanAttributes FROM otel_traces WHERE SpanName = {n:String}",
            parameters={"n": sc.COLD_START_SPAN}).result_rows, timeout_s=30)
        service, duration_ns, status, attributes = rows[0]
        assert service == sc.REPLICA_SERVICE and status == "Ok"
        assert duration_ns >= 1.5e9 and float(attributes[sc.LOAD_SECONDS]) >= 1.5
        assert attributes[sc.REPLICA] == "small-0" and attributes[sc.MODEL_VARIANT] == "int8"
        assert attributes[sc.GPU_TYPE] == "L4" and attributes[sc.GPU_COUNT] == "1"
        assert float(attributes[sc.GPU_HOURLY_USD]) == 0.8

        os.killpg(launcher.pid, signal.SIGTERM)
        assert launcher.wait(30) == 0
        assert directory.records() == []
        unreachable = httpx.post(ctx["base"] + "/v1/chat/completions", json=body, headers=headers, timeout=10)
        wait_for(lambda: httpx.post(ctx["base"] + "/v1/chat/completions", json=body, headers=headers,
                                    timeout=10).status_code == 503, timeout_s=10)
        assert unreachable.status_code in (200, 502, 503)  # in the second before the gateway re-reads
    finally:
        stop_group(launcher, signal.SIGTERM, 20)


def test_stopping_a_replica_lets_the_streams_it_is_answering_finish(gateway_with_directory) -> None:
    """The engine cuts open streams when it exits (as vLLM does: a stream stalled after its first token
    when vLLM was stopped under load); the launcher deregisters, drains, and only then stops it, so a
    stream in flight at the stop ends complete. Without the drain this stream is cut 0.1 s after SIGTERM."""
    ctx = gateway_with_directory
    launcher = launch_small(ctx, "--tokens-per-s", "10", "--completion-tokens", "30", "--shutdown-grace-s", "0.1")
    directory = ReplicaDirectory(ctx["dir"])
    try:
        (record,) = wait_for(lambda: directory.records(), timeout_s=60)
        headers = {"authorization": f"Bearer {ctx['key']}"}
        body = {"model": "auto", "max_tokens": 30, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        wait_for(lambda: httpx.post(ctx["base"] + "/v1/chat/completions", headers=headers, timeout=10,
                                    json={**body, "stream": False, "max_tokens": 1}).status_code == 200,
                 timeout_s=10, interval_s=0.3)  # routed (the gateway reads the directory each second)
        words, done, stopped_at = [], False, None
        with httpx.stream("POST", ctx["base"] + "/v1/chat/completions", json=body, headers=headers,
                          timeout=30) as reply:
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    delta = json.loads(line[6:])["choices"][0]["delta"] if '"choices":[{' in line else {}
                    if delta.get("content"):
                        words.append(delta["content"])
                        if stopped_at is None:  # the first token is out: stop the replica now
                            os.killpg(launcher.pid, signal.SIGTERM)
                            stopped_at = time.monotonic()
        assert done and len(words) == 30, (len(words), (ctx["tmp"] / "replica.log").read_text()[-2000:])
        assert launcher.wait(60) == 0
        assert time.monotonic() - stopped_at >= 2.5  # it waited for the ~3 s stream
        assert directory.records() == []
    finally:
        stop_group(launcher, signal.SIGTERM, 60)


def test_engine_that_dies_during_load_fails_with_its_log(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(
        "models:\n  small:\n    path: /ckpt/small\n    variant: bf16\n    gpu: {type: cpu}\n")
    engine = [sys.executable, "-c", "import sys; print('CUDA out of memory (pretend)'); sys.exit(3)"]
    env = child_env({"FLEETLENS_DATA_DIR": str(tmp_path), "FLEETLENS_REPLICA__ENGINE_COMMAND": json.dumps(engine),
                     "FLEETLENS_COLLECTOR__HTTP_PORT": str(free_port())})  # no collector: the span is lost, counted
    result = subprocess.run([sys.executable, "-m", "fleetlens", "serve", "replica", "--model", "small",
                             "--models", str(tmp_path / "models.yaml")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert "exited with code 3 before it was ready" in result.stderr
    assert "CUDA out of memory (pretend)" in result.stderr
    assert ReplicaDirectory(tmp_path / "replicas").records() == []
