"""The `fleetlens` command line."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from .config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from .launch import ServingSetup

app = typer.Typer(help="FleetLens: cost, latency and eval-gating for self-hosted LLM fleets.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
warehouse_app = typer.Typer(help="The ClickHouse warehouse (embedded chDB server or a real ClickHouse).",
                            no_args_is_help=True)
app.add_typer(warehouse_app, name="warehouse")
models_app = typer.Typer(help="Models to serve: demo models made here.", no_args_is_help=True)
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


@warehouse_app.command("serve")
def warehouse_serve(
    path: Annotated[Optional[Path], typer.Option(help="chDB data directory (default: <data_dir>/warehouse).")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default 8123).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the embedded ClickHouse engine over the ClickHouse HTTP interface."""
    from .warehouse.server import check_bind_policy, serve
    from .warehouse.server.runner import BindPolicyError

    settings = _settings()
    server = settings.warehouse_server.model_copy(
        update={k: v for k, v in {"path": path, "port": port, "host": host}.items() if v is not None}
    )
    try:
        check_bind_policy(server)
    except BindPolicyError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_path = server.path or settings.warehouse_path
    try:
        serve(data_path, server, log_level=log_level)
    except RuntimeError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None


@app.command()
def collector(
    otlp_grpc_port: Annotated[Optional[int], typer.Option(help="OTLP/gRPC port (default 4317; 0 = off).")] = None,
    otlp_http_port: Annotated[Optional[int], typer.Option(help="OTLP/HTTP port (default 4318).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    spool_dir: Annotated[Optional[Path], typer.Option(help="Spool directory (default <data_dir>/spool).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Writer processes (span mapping + inserts).")] = 2,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Receive OTLP traces (gRPC + HTTP) and vLLM metrics, and write them to the warehouse."""
    from .collector.service import run

    settings = _settings()
    updates = {"grpc_port": otlp_grpc_port, "http_port": otlp_http_port, "host": host, "spool_dir": spool_dir}
    settings.collector = settings.collector.model_copy(update={k: v for k, v in updates.items() if v is not None})
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(settings, writer_workers=workers)
    except OSError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None


@app.command()
def gateway(
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default 8080).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    models: Annotated[Optional[Path], typer.Option(help="models.yaml (model registry).")] = None,
    routes: Annotated[Optional[Path], typer.Option(help="routes.yaml (routing rules; reloaded on change).")] = None,
    keys: Annotated[Optional[Path], typer.Option(help="keys.yaml (hashed API keys).")] = None,
    workers: Annotated[Optional[int], typer.Option(
        min=1, max=64, help="Gateway processes on the port (default 1; rate limits then need gateway.redis_url).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """The OpenAI-compatible gateway over vLLM replicas: one trace per request, a span per stage."""
    from .serving.service import configure_logging, run

    settings = _settings()
    updates = {"port": port, "host": host, "models_file": models, "routes_file": routes, "keys_file": keys,
               "workers": workers}
    settings.gateway = settings.gateway.model_copy(update={k: v for k, v in updates.items() if v is not None})
    configure_logging(log_level)
    try:
        run(settings, log_level)
    except ConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


serve_app = typer.Typer(help="Serving processes: vLLM replicas.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")


@serve_app.command("replica")
def serve_replica(
    model: Annotated[str, typer.Option(help="Registry key of the model to serve (models.yaml).")],
    models: Annotated[Optional[Path], typer.Option(help="models.yaml (default: gateway.models_file).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Replica port (default: a free one).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Replica name (default: {model}-{n}).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Launch one vLLM replica of MODEL, traced to the collector, registered with the gateway when ready."""
    from .net import free_port
    from .serving.registration import ReplicaDirectory
    from .serving.registry import load_models
    from .serving.replica import ReplicaFailed, ReplicaLauncher, plan_replica
    from .serving.tracing import otlp_exporter, tracer_provider
    from .semconv import REPLICA_SERVICE

    settings = _settings()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health or metrics poll
    try:
        registry = load_models(models or settings.gateway.models_file)
        directory = ReplicaDirectory(settings.replicas_path)
        replica_name = name or directory.next_name(model)
        plan = plan_replica(registry, model, settings, port=port or free_port(), name=replica_name)
    except ConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    endpoint = settings.gateway.otlp_endpoint or f"http://127.0.0.1:{settings.collector.http_port}"
    provider, _ = tracer_provider(otlp_exporter(endpoint), service_name=REPLICA_SERVICE)
    launcher = ReplicaLauncher(plan, directory, settings.data_dir / "logs" / f"replica-{plan.name}.log", provider,
                               drain_timeout_s=settings.replica.drain_timeout_s)

    handle_stop_signals()
    code = 1
    try:
        launcher.start()
        with console.status(f"loading {model} as replica {plan.name} on {plan.url}...") as status:
            load_s = launcher.wait_ready(
                settings.replica.ready_timeout_s,
                tick=lambda s: status.update(f"loading {model} as replica {plan.name} on {plan.url}... {s:.0f} s"))
        launcher.register()
        console.print(f"replica [bold]{plan.name}[/bold] ({model}, {plan.spec.variant}) ready on {plan.url} "
                      f"after {load_s:.1f} s; registered in {directory.path}; logs: {launcher.log_path}")
        code = launcher.serve_forever()
    except ReplicaFailed as error:
        err_console.print(f"[red]{error}[/red]")
    except KeyboardInterrupt:
        code = 0
    finally:
        launcher.stop()
    raise typer.Exit(code)


@app.command()
def load(
    mix: Annotated[Path, typer.Option(help="Traffic-mix YAML (see serving/examples/traffic.yaml).")],
    gateway: Annotated[Optional[str], typer.Option(help="Gateway base URL (default: the mix's target).")] = None,
    requests: Annotated[Optional[int], typer.Option(min=1, help="Number of requests (overrides the mix).")] = None,
    duration: Annotated[Optional[float], typer.Option(min=0.001, help="Seconds of arrivals (overrides the mix).")] = None,
    rate: Annotated[Optional[float], typer.Option(min=0.001, help="Base Poisson rate, req/s (overrides the mix).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Plan seed (overrides the mix).")] = None,
    concurrency: Annotated[Optional[int], typer.Option(min=1, help="Most requests in flight.")] = None,
    timeout: Annotated[Optional[float], typer.Option(min=0.001, help="Per-request timeout, seconds.")] = None,
    json_out: Annotated[Optional[Path], typer.Option(help="Write the summary and every request record here.")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Send seeded open-loop traffic (Poisson arrivals) through the gateway; print latency/TTFT percentiles."""
    from .serving import loadgen

    try:
        traffic = loadgen.load_mix(mix)
        planned = loadgen.plan(traffic, requests=requests, rate=rate, duration_s=duration, seed=seed)
        records, wall = loadgen.run_with_progress(traffic, planned, console=console, progress=progress,
                                                  gateway=gateway, concurrency=concurrency, timeout_s=timeout)
    except ConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    summary = loadgen.summarize(records, wall)
    loadgen.render_summary(summary, console)
    if json_out is not None:
        loadgen.write_json(json_out, summary, records, planned)
        console.print(f"wrote {json_out}")
    if summary["overall"]["ok"] == 0:
        raise typer.Exit(1)


@app.command()
def migrate() -> None:
    """Create or upgrade the FleetLens tables in the warehouse (idempotent)."""
    settings = _settings()
    migrate_schema(settings)


def migrate_schema(settings: Settings) -> None:
    """Create or upgrade the tables, with a progress bar; exit 1 when the warehouse refuses."""
    from .schema import RenderOptions, load_migrations
    from .schema import migrate as run_migrations
    from .schema.migrate import MigrationError
    from .warehouse.client import WarehouseUnavailable, connect

    url = settings.warehouse
    options = RenderOptions(database=url.database, cluster=settings.cluster,
                            traces_ttl_days=settings.traces_ttl_days, metrics_ttl_days=settings.metrics_ttl_days)
    try:
        client = connect(url, database="default")
    except WarehouseUnavailable as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    total = len(load_migrations())
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"migrating {url.redacted()}", total=total)
        try:
            result = run_migrations(client, options, on_step=lambda m: progress.advance(task))
        except MigrationError as error:
            err_console.print(f"[red]{error}[/red]")
            raise typer.Exit(1) from None
    if result.applied:
        console.print(f"applied {len(result.applied)} migration(s): "
                      + ", ".join(f"{m.version:04d}_{m.name}" for m in result.applied))
    else:
        console.print(f"schema up to date ({len(result.already)} migrations) at {url.redacted()}")
    for m in result.changed:
        console.print(f"[yellow]warning: {m.version:04d}_{m.name} changed since it was applied (not re-run)[/yellow]")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def dbt(ctx: typer.Context) -> None:
    """Run dbt on FleetLens' project against the configured warehouse: `fleetlens dbt build`, `... dbt test`.

    Everything after `dbt` goes to dbt; the connection comes from FLEETLENS_WAREHOUSE_URL (the
    embedded warehouse by default), the models go to the `{database}_marts` database."""
    from .transform import run_dbt

    if not ctx.args:
        err_console.print("name a dbt command: fleetlens dbt build | run | test | seed | source freshness | ...")
        raise typer.Exit(2)
    result = run_dbt(list(ctx.args), _settings())
    raise typer.Exit(result.returncode)


@app.command()
def status() -> None:
    """What runs where: the warehouse, its tables and their row counts, the collector's counters."""
    from .schema import TABLES
    from .warehouse.client import WarehouseUnavailable, connect, ping

    settings = _settings()
    url = settings.warehouse
    table = Table(title="FleetLens status")
    table.add_column("component")
    table.add_column("where")
    table.add_column("state")
    up = ping(url)
    kind = "embedded chDB" if settings.uses_embedded_warehouse else "ClickHouse"
    table.add_row("warehouse", f"{url.redacted()} ({kind})", "[green]up[/green]" if up else "[red]down[/red]")
    console.print(table)
    if not up:
        raise typer.Exit(1)
    try:
        client = connect(url, database="default")
        version = client.server_version
        rows = client.query(
            "SELECT name, total_rows, total_bytes FROM system.tables WHERE database = {db:String} ORDER BY name",
            parameters={"db": url.database},
        ).result_rows
    except (WarehouseUnavailable, Exception) as error:  # noqa: BLE001 - report, do not crash
        err_console.print(f"[red]cannot query the warehouse: {error}[/red]")
        raise typer.Exit(1) from None
    tables = Table(title=f"database {url.database} (ClickHouse {version})")
    tables.add_column("table")
    tables.add_column("rows", justify="right")
    tables.add_column("bytes", justify="right")
    known = {name: (r, b) for name, r, b in rows}
    for name in sorted(set(known) | set(TABLES)):
        if name in known:
            r, b = known[name]
            tables.add_row(name, f"{r:,}" if r is not None else "-", f"{b:,}" if b is not None else "-")
        else:
            tables.add_row(name, "[yellow]missing: run `fleetlens migrate`[/yellow]", "")
    console.print(tables)
    _print_collector_status(settings)


@app.command()
def doctor(
    serving: Annotated[Optional[bool], typer.Option(
        "--serving/--no-serving",
        help="Check as for `fleetlens up --serving` (a missing vLLM fails) / --no-serving "
             "(default: as `up` decides, serving when a vLLM is installed).")] = None,
    airflow: Annotated[bool, typer.Option("--airflow/--no-airflow",
                                          help="Also check what `fleetlens up --airflow` needs (its port).")] = False,
) -> None:
    """Check this machine and the settings (Python, venvs, ports, warehouse, disk, memory) and say what
    to fix; starts nothing. Exit 1 when a check fails, 0 with warnings only."""
    from .doctor import exit_code, run_checks

    results = run_checks(serving=serving, airflow=airflow)
    colors = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "red"}
    table = Table(title="fleetlens doctor")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(r.check, f"[{colors[r.status]}]{r.status}[/{colors[r.status]}]", r.detail, r.fix)
    console.print(table)
    counts = {s: sum(r.status == s for r in results) for s in ("fail", "warn")}
    console.print(f"{counts['fail']} failed, {counts['warn']} warning(s)")
    raise typer.Exit(exit_code(results))


def _print_collector_status(settings: Settings) -> None:
    """The collector's own counters, read from its /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from .net import client_host

    url = f"http://{client_host(settings.collector.host)}:{settings.collector.http_port}"
    try:
        text = httpx.get(url + "/metrics", timeout=2.0).text
    except httpx.HTTPError:
        console.print(f"collector at {url}: [yellow]not running[/yellow]")
        return
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("fleetlens_collector_"):
            for sample in family.samples:
                if sample.name.endswith(("_created", "_count", "_sum")):
                    continue
                key = sample.name.removeprefix("fleetlens_collector_").removesuffix("_total")
                if "outcome" in sample.labels:
                    key += "_" + sample.labels["outcome"]
                totals[key] = totals.get(key, 0.0) + sample.value
    table = Table(title=f"collector {url}")
    table.add_column("counter")
    table.add_column("value", justify="right")
    for key in ("received_spans", "accepted_spans", "rejected_spans", "bad_requests", "refused_requests",
                "spooled_spans", "replayed_spans", "written_spans", "dropped_spans", "dead_lettered_requests",
                "write_errors", "queue_bytes", "spool_bytes", "batch_latency_p99_seconds", "warehouse_up",
                "scrapes_ok", "scrapes_failed", "scrape_rows_written", "scrape_rows_dropped"):
        if key in totals:
            value = totals[key]
            shown = f"{value:.3f}" if key.endswith("seconds") else f"{value:,.0f}"
            if key in ("dropped_spans", "dead_lettered_requests", "scrape_rows_dropped") and value:
                shown = f"[red]{shown}[/red]"
            table.add_row(key, shown)
    console.print(table)


@app.command()
def up(
    port: Annotated[Optional[int], typer.Option(help="Warehouse HTTP port (default 8123).")] = None,
    serving: Annotated[Optional[bool], typer.Option(
        "--serving/--no-serving",
        help="Also start the gateway and a small + a large demo replica (default: when a vLLM is installed).")] = None,
    airflow: Annotated[bool, typer.Option(
        "--airflow/--no-airflow",
        help="Also start Airflow (`airflow standalone`: UI/API, scheduler) with FleetLens' DAGs.")] = False,
    dashboards: Annotated[bool, typer.Option(
        "--dashboards/--no-dashboards", help="Also start the Streamlit dashboards.")] = True,
) -> None:
    """Start the embedded stack in the foreground (warehouse, schema, collector, dashboards; gateway and
    vLLM replicas of the demo models when vLLM is there; Airflow with --airflow); Ctrl-C stops everything."""
    from . import launch
    from .stack import Stack

    overrides = {"warehouse_server": {"port": port}} if port else {}
    settings = _settings(**overrides)
    stack = Stack()
    handle_stop_signals()
    try:
        summary = Table(title="FleetLens is up")
        for column in ("component", "url", "logs"):
            summary.add_column(column)
        try:
            with console.status("starting the embedded warehouse..."):
                rows = launch.start_warehouse(stack, settings)
            migrate_schema(settings)
            with console.status("starting the collector..."):
                rows += launch.start_collector(stack, settings)
            from .serving.up import engine_available

            if serving or (serving is None and engine_available(settings)):
                setup = _demo_serving(settings)
                with console.status("starting the gateway and the replicas...") as status:
                    rows += launch.start_serving(stack, settings, setup, on_wait=status.update)
            if airflow:
                with console.status("starting Airflow (API server, scheduler, dag-processor; ~20 s)..."):
                    rows += launch.start_airflow(stack, settings)
            if dashboards:
                with console.status("starting the dashboards..."):
                    rows += launch.start_dashboards(stack, settings)
        except launch.LaunchError as error:
            err_console.print(f"[red]{error}[/red]")
            raise typer.Exit(1) from None
        for row in rows:
            summary.add_row(*row)
        console.print(summary)
        console.print("Press Ctrl-C to stop.")
        stack.wait(lambda c: err_console.print(f"[red]{c.name} exited; see {c.log_path}[/red]"))
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        stack.stop()


@app.command()
def demo(
    minutes: Annotated[float, typer.Option(min=0.1, help="Minutes of traffic through the gateway.")] = 3.0,
    rate: Annotated[Optional[float], typer.Option(min=0.01, help="Requests/s (default: the demo traffic's, 4).")]
    = None,
    gate: Annotated[bool, typer.Option("--gate/--no-gate", help="Run the eval gate on the demo's int8 change.")] = True,
    screenshot: Annotated[bool, typer.Option(
        "--screenshot/--no-screenshot", help="Save a headless-Chromium PNG of the overview (when Chromium is there).")]
    = True,
    stay: Annotated[bool, typer.Option(
        "--stay/--no-stay", help="Keep the stack up after the summary until Ctrl-C (--no-stay: stop and exit).")]
    = True,
    json_out: Annotated[Optional[Path], typer.Option(help="Also write the outcome (figures, timings) as JSON.")]
    = None,
) -> None:
    """The whole fleet end to end, from a checkout: demo models, warehouse, collector, gateway + two vLLM
    replicas, Airflow, dashboards; minutes of load; the marts built by Airflow; one eval gate; a
    screenshot and a summary. Ctrl-C stops every process it started. `make demo` sets up the venvs first."""
    from .demo import Demo, DemoError, DemoOptions, render_summary
    from .launch import LaunchError

    settings = _settings()
    options = DemoOptions(minutes=minutes, rate=rate, gate=gate, screenshot=screenshot, json_out=json_out)
    runner = Demo(settings, options, console)
    handle_stop_signals()
    try:
        try:
            outcome = runner.run()
        except (DemoError, LaunchError, ConfigError) as error:
            err_console.print(f"[red]{error}[/red]")
            raise typer.Exit(1) from None
        render_summary(outcome, console)
        if stay:
            console.print("The stack stays up: open the URLs above. Press Ctrl-C to stop everything.")
            runner.stack.wait(lambda c: err_console.print(f"[red]{c.name} exited; see {c.log_path}[/red]"))
            raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping (replicas finish what they have in flight first)...")
    finally:
        runner.stack.stop()
        console.print("stopped")


def handle_stop_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, so `finally` stops every child. Explicit handlers:
    a process started in the background by a script inherits SIGINT *ignored*."""
    def stop(*_: object) -> None:
        # Once: a second Ctrl-C must not interrupt the stopping itself and leave children behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _demo_serving(settings: Settings) -> "ServingSetup":
    """`fleetlens up`'s fleet: the demo models (cached), the demo routes, a demo key."""
    from .launch import ServingSetup
    from .serving.demo_models import DemoBuildError, make_demo
    from .serving.up import DEMO_REPLICAS, prepare_files

    console.print("demo models: training (first run only, a few minutes) or reusing the cached build")
    try:
        with demo_models_bar() as bar:
            built = make_demo(settings.data_dir / "models" / "demo", progress=demo_models_progress(bar))
    except DemoBuildError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    files = prepare_files(settings, built.models_yaml)
    return ServingSetup(env=files.env(), replicas={f"{model}-0": model for model in DEMO_REPLICAS},
                        key_hint=str(settings.data_dir / "gateway" / "demo-api-key"))


@models_app.command("make-demo")
def models_make_demo(
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default <data_dir>/models/demo).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the facts, the initialisation and the batches.")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild even when the same build is there.")] = False,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default: CPUs, max 4).")] = None,
    serving_python: Annotated[Optional[Path], typer.Option(help="vLLM venv's python (default .venv-serving).")] = None,
) -> None:
    """Train tiny demo Llamas on a key=value lookup task (a few minutes on CPU) and write models.yaml."""
    from fleetlens.serving.demo_models import DemoBuildError, make_demo

    out_dir = out or _settings().data_dir / "models" / "demo"
    with demo_models_bar() as bar:
        try:
            built = make_demo(out_dir, seed=seed, threads=threads, force=force, progress=demo_models_progress(bar),
                              serving_python=serving_python)
        except DemoBuildError as error:
            err_console.print(f"[red]{error}[/red]")
            raise typer.Exit(1) from None
    table = Table(title=f"demo models ({'cached' if built.cached else 'built'}): {built.out_dir}")
    for column in ("checkpoint", "variant", "params", "easy", "hard", "train s"):
        table.add_column(column, justify="left" if column in ("checkpoint", "variant") else "right")
    for name, entry in built.manifest["models"].items():
        accuracy = entry["accuracy"]
        table.add_row(name, entry["variant"], f"{entry['params']:,}", f"{accuracy['easy']:.1%}",
                      f"{accuracy['hard']:.1%}", f"{entry['train_seconds']:.0f}")
    console.print(table)
    console.print(f"registry: {built.models_yaml}")


def demo_models_progress(bar: Progress) -> Callable[[dict], None]:
    """Renders train.py's step events (one bar per model) on `bar`."""
    tasks: dict[str, int] = {}

    def on_event(event: dict) -> None:
        if event.get("event") == "step":
            if event["model"] not in tasks:
                tasks[event["model"]] = bar.add_task(event["model"], total=event["steps"], info="")
            bar.update(tasks[event["model"]], completed=event["step"], info=f"loss {event['loss']:.3f}")

    return on_event


def demo_models_bar(on: Console | None = None) -> Progress:
    """One bar per demo model while `make_demo` trains (fed by `demo_models_progress`)."""
    return Progress(TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), console=on or console, transient=True)


@app.command()
def dashboards(
    port: Annotated[Optional[int], typer.Option(help="Port (default: dashboards.port, 8501).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default: dashboards.host, loopback).")] = None,
) -> None:
    """Serve the Streamlit dashboards (cost, margin, latency, utilization, build vs buy, evals, traces)
    on the configured warehouse, in the foreground."""
    import os

    from .dashboards.serve import app_url, streamlit_argv

    settings = _settings()
    host = host or settings.dashboards.host
    port = port or settings.dashboards.port
    console.print(f"dashboards on {app_url(host, port)} (warehouse {settings.warehouse.redacted()}); Ctrl-C stops")
    argv = streamlit_argv(host, port)
    os.execv(argv[0], argv)


@app.command("airflow", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def airflow_command(ctx: typer.Context) -> None:
    """Run the airflow CLI against FleetLens' Airflow (its AIRFLOW_HOME, DAGs and settings):
    `fleetlens airflow dags list`, `... airflow backfill create --dag-id fleetlens_hourly ...`."""
    import os
    import subprocess

    from .orchestration import airflow_env, airflow_executable

    if not ctx.args:
        err_console.print("name an airflow command: fleetlens airflow dags list | backfill create ... | dags test ...")
        raise typer.Exit(2)
    settings = _settings()
    env = {**os.environ, **airflow_env(settings)}
    result = subprocess.run([airflow_executable(), *ctx.args], env=env, check=False)
    raise typer.Exit(result.returncode)


def main() -> None:
    try:
        app()
    except ConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        sys.exit(2)

from .collector.synth.cli import synth_command  # noqa: E402
app.command("synth")(synth_command)

from .evals.cli import eval_app  # noqa: E402 - `fleetlens eval run|tasks` (evals/cli.py)
app.add_typer(eval_app, name="eval")
