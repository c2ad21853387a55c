"""Starting FleetLens' own processes as children of a `Stack`, one component at a time.

`fleetlens up` and `fleetlens demo` both start the stack with these: each function starts one
component in its own session (so stopping it stops everything it started), waits until it answers,
and returns the rows of the summary table (component, url, logs). A component that does not come up
raises `LaunchError` naming its log; the caller stops what is already running.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Settings
from .net import client_host, wait_http
from .stack import Child, Stack, fleetlens_argv

Row = tuple[str, str, str]

#: The vLLM launcher drains in-flight requests and then gives vLLM 30 s to exit; whoever stops it
#: must wait longer, or the launcher dies first and vLLM (in its own session) outlives the stack.
REPLICA_STOP_GRACE_S = 75.0


class LaunchError(RuntimeError):
    """A component did not start; the message says where its log is."""


def child_env(settings: Settings) -> dict[str, str]:
    """Settings a child process must share with its parent even when they came from flags."""
    return {"FLEETLENS_WAREHOUSE_SERVER__PORT": str(settings.warehouse_server.port),
            "FLEETLENS_DATA_DIR": str(settings.data_dir)}


def logs_dir(settings: Settings) -> Path:
    return settings.data_dir / "logs"


def start_warehouse(stack: Stack, settings: Settings) -> list[Row]:
    """The embedded chDB server (nothing to start for an external ClickHouse URL)."""
    from .warehouse.client import WarehouseUnavailable, wait_until_ready

    logs = logs_dir(settings)
    if not settings.uses_embedded_warehouse:
        return [("warehouse", settings.warehouse.redacted(), "(external)")]
    argv = fleetlens_argv("warehouse", "serve", "--port", str(settings.warehouse_server.port),
                          "--path", str(settings.warehouse_path))
    child = stack.add(Child("warehouse", argv, logs / "warehouse.log", url=settings.warehouse.redacted()))
    try:
        wait_until_ready(settings.warehouse, timeout_s=60, alive=lambda: child.alive)
    except WarehouseUnavailable as error:
        raise LaunchError(f"{error}; see {child.log_path}") from None
    return [("warehouse", settings.warehouse.redacted(), str(child.log_path))]


def start_collector(stack: Stack, settings: Settings) -> list[Row]:
    collector = settings.collector
    child = stack.add(Child("collector", fleetlens_argv("collector"), logs_dir(settings) / "collector.log"),
                      env=child_env(settings))
    host = client_host(collector.host)
    if not wait_http(f"http://{host}:{collector.http_port}/health", 60.0, alive=lambda: child.alive):
        raise LaunchError(f"the collector did not start; see {child.log_path}")
    grpc = f"grpc://{host}:{collector.grpc_port}, " if collector.grpc_port else ""
    return [("collector (OTLP)", f"{grpc}http://{host}:{collector.http_port}/v1/traces", str(child.log_path))]


@dataclass(frozen=True)
class ServingSetup:
    """What the gateway and the replicas serve: the registry, the routes, the keys, which replicas."""

    env: dict[str, str]           # FLEETLENS_GATEWAY__{MODELS,ROUTES,KEYS}_FILE
    replicas: dict[str, str]      # replica name -> registry model
    key_hint: str                 # where a user finds an API key


def gateway_url(settings: Settings) -> str:
    return f"http://{client_host(settings.gateway.host)}:{settings.gateway.port}"


def start_serving(stack: Stack, settings: Settings, setup: ServingSetup, *,
                  on_wait: Callable[[str], None] = lambda _: None) -> list[Row]:
    """The gateway, then one launcher per replica (`fleetlens serve replica`); returns once every
    replica is registered and the gateway routes to it."""
    return launch_serving(stack, settings, setup).wait(on_wait)


def launch_serving(stack: Stack, settings: Settings, setup: ServingSetup) -> ServingLaunch:
    """Start the gateway (and wait for it) and the replica launchers (without waiting: vLLM takes a
    minute to load, other components can start meanwhile); `.wait()` for the replicas."""
    logs = logs_dir(settings)
    env = {**child_env(settings), **setup.env,
           "FLEETLENS_GATEWAY__OTLP_ENDPOINT": f"http://127.0.0.1:{settings.collector.http_port}"}
    gateway = stack.add(Child("gateway", fleetlens_argv("gateway"), logs / "gateway.log"), env=env)
    if not wait_http(gateway_url(settings) + "/health", 60.0, alive=lambda: gateway.alive):
        raise LaunchError(f"the gateway did not start; see {gateway.log_path}")
    launchers = [stack.add(Child(f"replica {name}", fleetlens_argv("serve", "replica", "--model", model, "--name", name),
                                 logs / f"launcher-{name}.log", grace_s=REPLICA_STOP_GRACE_S), env=env)
                 for name, model in setup.replicas.items()]
    return ServingLaunch(settings, setup, gateway, launchers, time.monotonic())


@dataclass
class ServingLaunch:
    """A gateway that is up and replicas that are loading."""

    settings: Settings
    setup: ServingSetup
    gateway: Child
    launchers: list[Child]
    started: float

    def wait(self, on_wait: Callable[[str], None] = lambda _: None) -> list[Row]:
        """Until every replica is registered and the gateway routes to it; the summary rows."""
        from .serving.registration import ReplicaDirectory, wait_registered

        settings, names, logs = self.settings, set(self.setup.replicas), logs_dir(self.settings)

        def check() -> None:
            dead = next((c for c in self.launchers if not c.alive), None)
            if dead is not None:
                raise LaunchError(f"{dead.name} exited while loading; see {dead.log_path} and "
                                  f"{logs}/replica-{dead.name.removeprefix('replica ')}.log")
            on_wait(f"loading the replicas ({time.monotonic() - self.started:.0f} s; vLLM starts in 25-60 s on CPU)")

        remaining = self.started + settings.replica.ready_timeout_s - time.monotonic()
        try:
            records = wait_registered(ReplicaDirectory(settings.replicas_path), names, max(0.0, remaining), check)
        except TimeoutError as error:
            raise LaunchError(f"{error}; see {logs}/launcher-*.log and replica-*.log") from None
        # ready means routable: the gateway reads the replica directory every second
        base = gateway_url(settings)
        deadline = time.monotonic() + 30
        while not all(f'replica="{name}"' in _get_text(base + "/metrics") for name in names):
            if time.monotonic() > deadline:
                raise LaunchError(f"the gateway did not pick up the replicas; see {self.gateway.log_path}")
            time.sleep(0.3)
        rows = [("gateway (OpenAI API)", f"{base}/v1  key: {self.setup.key_hint}", str(self.gateway.log_path))]
        for record in sorted(records, key=lambda r: r.name):
            rows.append((f"replica {record.name}",
                         f"{record.url} ({record.model}, ready in {record.load_seconds:.0f} s)",
                         str(logs / f"replica-{record.name}.log")))
        return rows


def start_airflow(stack: Stack, settings: Settings, env: dict[str, str] | None = None) -> list[Row]:
    """`airflow standalone` in its own session (stopping it stops the scheduler, the API server and
    every task with it)."""
    from .dbt_tasks import ManifestError, dbt_project_dir, ensure_manifest, manifests_dir
    from .orchestration import airflow_env, api_url, passwords_file, standalone_argv

    try:
        ensure_manifest(dbt_project_dir(settings), manifests_dir(settings))
    except ManifestError as error:
        raise LaunchError(str(error)) from None
    url = api_url(settings)
    child = stack.add(Child("airflow", standalone_argv(), logs_dir(settings) / "airflow.log", url=url),
                      env={**child_env(settings), **airflow_env(settings), **(env or {})})
    if not wait_http(url + "/api/v2/monitor/health", 180.0, alive=lambda: child.alive):
        raise LaunchError(f"Airflow did not start; see {child.log_path}")
    return [("airflow (UI, API)", f"{url}  user admin, password in {passwords_file(settings)}", str(child.log_path))]


def start_dashboards(stack: Stack, settings: Settings) -> list[Row]:
    from .dashboards.serve import app_url, health_url, streamlit_argv

    host, port = settings.dashboards.host, settings.dashboards.port
    child = stack.add(Child("dashboards", streamlit_argv(host, port), logs_dir(settings) / "dashboards.log"),
                      env=child_env(settings))
    if not wait_http(health_url(host, port), 60.0, alive=lambda: child.alive):
        raise LaunchError(f"the dashboards did not start; see {child.log_path}")
    return [("dashboards", app_url(host, port), str(child.log_path))]


def _get_text(url: str) -> str:
    import httpx

    try:
        return httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return ""
