"""`fleetlens synth`: synthetic fleet telemetry into the warehouse or to an OTLP collector.

Imported by `fleetlens.cli` at start-up, so everything heavy (numpy, pyarrow, grpc) is imported
inside the command, keeping `fleetlens --help` fast.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from rich.console import Console

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Target(str, Enum):
    otlp_http = "otlp-http"
    otlp_grpc = "otlp-grpc"
    warehouse = "warehouse"


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `6h`, `2d` or combinations like `1h30m` → seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise typer.BadParameter(f"not a duration: {text!r} (use e.g. 90s, 15m, 6h, 2d, 1h30m)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def default_start(seconds: float) -> datetime:
    """End the run at the current minute, so dashboards over 'the last N hours' show it."""
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    return now - timedelta(seconds=seconds)


def synth_command(
    requests: Annotated[Optional[int], typer.Option("--requests", "-n", min=1,
                                                    help="Number of requests (default 10000 unless --duration).")] = None,
    duration: Annotated[Optional[str], typer.Option(help="Simulated time span instead of a count, e.g. 6h, 2d.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Same seed + parameters → identical output.")] = 0,
    start: Annotated[Optional[str], typer.Option(
        help="Start time, ISO-8601 (UTC if no offset). Default: so the run ends now; pass it to reproduce.")] = None,
    rate: Annotated[Optional[float], typer.Option(min=0.001, help="Mean requests/s over a week (default 20).")] = None,
    to: Annotated[Target, typer.Option("--to", help="Where the spans go.")] = Target.warehouse,
    endpoint: Annotated[Optional[str], typer.Option(
        help="Collector endpoint (default http://127.0.0.1:4318 for otlp-http, 127.0.0.1:4317 for otlp-grpc).")] = None,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics",
                                          help="Also write fleet_metrics samples (always straight to the warehouse).")] = True,
    cold_starts: Annotated[bool, typer.Option(
        "--cold-starts/--no-cold-starts",
        help="Start with one replica.cold_start span per replica, ready at the start time "
             "(--no-cold-starts when continuing an earlier run's range).")] = True,
    outages_per_replica_day: Annotated[Optional[float], typer.Option(
        min=0.0, help="Expected replica outage windows per replica and day (default 0.1).")] = None,
    chunk: Annotated[Optional[int], typer.Option(
        min=1, help="Requests generated per step (default 65536 for the warehouse, 4096 for OTLP).")] = None,
    max_spans: Annotated[int, typer.Option(min=1, help="Most spans per OTLP export request.")] = 1000,
    compress: Annotated[bool, typer.Option("--gzip/--no-gzip", help="gzip OTLP bodies.")] = False,
    describe: Annotated[bool, typer.Option(
        "--describe", help="Print the fleet (features, prices, customers, models, GPUs, routes) as JSON and exit.")] = False,
) -> None:
    """Generate realistic synthetic fleet traffic: gateway traces with vLLM spans, replica cold starts, and
    fleet_metrics."""
    import dataclasses

    from clickhouse_connect.driver.exceptions import ClickHouseError
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .fleet import default_fleet
    from .generate import Synthesizer
    from .run import send_to_collector, write_to_warehouse
    from .transport import (
        DEFAULT_GRPC_ENDPOINT,
        DEFAULT_HTTP_ENDPOINT,
        OtlpGrpcSender,
        OtlpHttpSender,
        SendError,
    )

    console, err = Console(), Console(stderr=True)
    if requests is not None and duration is not None:
        raise typer.BadParameter("give --requests or --duration, not both")
    duration_s = parse_duration(duration) if duration is not None else None
    if requests is None and duration_s is None:
        requests = 10_000
    fleet = default_fleet()
    if outages_per_replica_day is not None:
        fleet = dataclasses.replace(fleet, outages_per_replica_day=outages_per_replica_day)
    if describe:
        import json

        typer.echo(json.dumps(fleet.describe(), indent=2))
        return
    mean_rate = rate if rate is not None else fleet.traffic.rate
    span_s = duration_s if duration_s is not None else (requests or 0) / mean_rate
    begin = start if start is not None else default_start(span_s).isoformat()
    try:
        synth = Synthesizer(seed, begin, n_requests=requests, duration_s=duration_s, rate=rate, fleet=fleet)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    client, database = (_warehouse_client(err, to) if to is Target.warehouse or metrics else (None, None))
    size = chunk or (65_536 if to is Target.warehouse else 4096)
    console.print(f"synth: seed {seed}, start {datetime.fromtimestamp(synth.start_ns / 1e9, timezone.utc).isoformat()}, "
                  f"{f'{requests:,} requests' if requests else f'{duration_s:,.0f} s'} at {synth.rate:g} req/s mean"
                  f" → {to.value}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        if requests:
            task = progress.add_task("requests", total=requests)
            advance = lambda frame: progress.advance(task, len(frame))
        else:
            task = progress.add_task("simulated seconds", total=round(duration_s or 0))
            advance = lambda frame: progress.update(
                task, completed=round((int(frame.arrival_ns[-1]) - synth.start_ns) / 1e9))
        try:
            if to is Target.warehouse:
                stats = write_to_warehouse(synth, client, database=database, chunk=size, metrics=metrics,
                                           cold_starts=cold_starts, progress=advance)
            else:
                sender = (OtlpHttpSender(endpoint or DEFAULT_HTTP_ENDPOINT, compress=compress)
                          if to is Target.otlp_http else OtlpGrpcSender(endpoint or DEFAULT_GRPC_ENDPOINT,
                                                                         compress=compress))
                try:
                    stats = send_to_collector(synth, sender, chunk=size, max_spans=max_spans,
                                              metrics_client=client if metrics else None, database=database,
                                              cold_starts=cold_starts, progress=advance)
                finally:
                    sender.close()
        except (SendError, ClickHouseError) as error:
            err.print(f"[red]{error}[/red]")
            raise typer.Exit(1) from None
    rate_s = stats.requests / stats.seconds if stats.seconds else 0.0
    console.print(f"{stats.requests:,} requests, {stats.spans:,} spans"
                  + (f" ({stats.cold_starts} replica cold starts)" if stats.cold_starts else "")
                  + (f" in {stats.messages:,} OTLP requests" if stats.messages else "")
                  + (f", {stats.metric_rows:,} fleet_metrics rows" if metrics else "")
                  + f" in {stats.seconds:.1f} s ({rate_s:,.0f} requests/s)")
    if stats.rejected_spans:
        err.print(f"[yellow]the collector rejected {stats.rejected_spans:,} spans (partial success)[/yellow]")


def _warehouse_client(err: Console, to: Target) -> tuple[object, str]:
    from fleetlens.config import ConfigError, load_settings
    from fleetlens.warehouse.client import WarehouseUnavailable, connect, missing_tables

    try:
        url = load_settings().warehouse
        client = connect(url, database="default", send_receive_timeout=600)
        missing = missing_tables(client, url.database, ("otel_traces", "fleet_metrics"))
    except (ConfigError, WarehouseUnavailable) as error:
        hint = "" if to is Target.warehouse else " (fleet_metrics go to the warehouse; --no-metrics skips them)"
        err.print(f"[red]{error}{hint}[/red]")
        raise typer.Exit(1) from None
    if missing:
        err.print(f"[red]{', '.join(missing)} missing in {url.redacted()}: run `fleetlens migrate` first[/red]")
        raise typer.Exit(1)
    return client, url.database
