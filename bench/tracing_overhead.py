"""vLLM throughput with OpenTelemetry tracing on vs off, in one run on this machine.

    .venv/bin/python bench/tracing_overhead.py [--models .cache/demo-models/models.yaml] [--model demo-large]
        [--rounds 2] [--requests 64] [--concurrency 8] [--max-tokens 64]

Why: every request through FleetLens makes vLLM write an `llm_request` span; an observability tool
that slows the engine it watches costs GPU money. This measures vLLM's generated tokens/s for the
same workload with `--otlp-traces-endpoint` (spans to a real `fleetlens collector` + embedded
warehouse) and without it, alternating off/on for `--rounds` rounds so drift on a shared machine
hits both modes alike, and prints the ratio on/off.

Each measurement: launch the replica with `fleetlens.serving.replica` (the same plan as `fleetlens
serve replica`), wait until ready, warm up, then `--requests` completions with `ignore_eos` (fixed
output length) at `--concurrency`, and count completion tokens over wall time. Every request carries
a `traceparent`, as it would behind the gateway. On this machine the collector shares the two
cores with vLLM, so "on" also pays for the collector's CPU: the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleetlens.config import Settings  # noqa: E402
from fleetlens.net import free_port, wait_http  # noqa: E402
from fleetlens.serving.registration import ReplicaDirectory  # noqa: E402
from fleetlens.serving.registry import load_models  # noqa: E402
from fleetlens.serving.replica import ReplicaLauncher, plan_replica  # noqa: E402
from fleetlens.stack import Child, fleetlens_argv  # noqa: E402
from fleetlens.warehouse.client import connect, wait_until_ready  # noqa: E402

console = Console()


def start_pipeline(workdir: Path) -> tuple[list[Child], Settings]:
    """Embedded warehouse + schema + collector on free ports; returns the children and their settings."""
    settings = Settings(data_dir=workdir, warehouse_server={"port": free_port()},
                        collector={"http_port": free_port(), "grpc_port": free_port()})
    env = {"FLEETLENS_DATA_DIR": str(workdir), "FLEETLENS_WAREHOUSE_SERVER__PORT": str(settings.warehouse_server.port),
           "FLEETLENS_COLLECTOR__HTTP_PORT": str(settings.collector.http_port),
           "FLEETLENS_COLLECTOR__GRPC_PORT": str(settings.collector.grpc_port)}
    warehouse = Child("warehouse", fleetlens_argv("warehouse", "serve", "--path", str(workdir / "warehouse"),
                                                   "--port", str(settings.warehouse_server.port), "--log-level",
                                                   "warning"), workdir / "warehouse.log")
    collector = Child("collector", fleetlens_argv("collector", "--log-level", "warning"), workdir / "collector.log")
    try:
        warehouse.start(env)
        wait_until_ready(settings.warehouse, timeout_s=60, alive=lambda: warehouse.alive)
        from fleetlens.schema import RenderOptions, migrate

        migrate(connect(settings.warehouse, database="default"), RenderOptions(database=settings.warehouse.database))
        collector.start(env)
        if not wait_http(f"http://127.0.0.1:{settings.collector.http_port}/health", 60, alive=lambda: collector.alive):
            raise RuntimeError(f"collector did not start: {collector.log_path}")
    except BaseException:
        collector.stop()
        warehouse.stop()
        raise
    return [warehouse, collector], settings


async def workload(base: str, served: str, requests: int, concurrency: int, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) for `requests` fixed-length completions at `concurrency`."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        async def one(i: int) -> int:
            async with limit:
                headers = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}
                reply = await client.post("/v1/completions", headers=headers, json={
                    "model": served, "prompt": f"request {i}: tell me about the fleet", "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True})
                reply.raise_for_status()
                return int(reply.json()["usage"]["completion_tokens"])

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(requests))))
        return tokens, time.perf_counter() - started


def measure(settings: Settings, models: Path, model: str, tracing: bool, args: argparse.Namespace,
            workdir: Path, round_no: int) -> dict[str, float]:
    registry = load_models(models)
    name = f"bench-{'on' if tracing else 'off'}-{round_no}"
    plan = plan_replica(registry, model, settings, port=free_port(), name=name)
    if not tracing:
        at = plan.argv.index("--otlp-traces-endpoint")
        plan = dataclasses.replace(plan, argv=plan.argv[:at] + plan.argv[at + 2:])
    launcher = ReplicaLauncher(plan, ReplicaDirectory(workdir / "replicas"), workdir / f"{name}.log")
    launcher.start()
    try:
        load_s = launcher.wait_ready(settings.replica.ready_timeout_s)
        asyncio.run(workload(plan.url, plan.served_name, args.concurrency, args.concurrency, 8))  # warm-up
        tokens, seconds = asyncio.run(workload(plan.url, plan.served_name, args.requests, args.concurrency,
                                               args.max_tokens))
        if tracing:
            time.sleep(7)  # vLLM exports spans every ~5 s and does not flush them when stopped
    finally:
        launcher.stop()
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "load_s": load_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / ".cache" / "demo-models" / "models.yaml",
                        help="model registry (default: the demo models; build them with `fleetlens models make-demo`)")
    parser.add_argument("--model", default="demo-large")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if not args.models.exists():
        sys.exit(f"{args.models} not found: build the demo models first "
                 f"(.venv/bin/fleetlens models make-demo --out {args.models.parent})")
    os.environ.setdefault("FLEETLENS_REPLICA__KV_CACHE_GIB", "1")
    with tempfile.TemporaryDirectory(prefix="fleetlens-tracing-bench-") as tmp:
        workdir = Path(tmp)
        children, settings = start_pipeline(workdir)
        results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        try:
            for round_no in range(args.rounds):
                for tracing in (False, True):
                    with console.status(f"round {round_no + 1}/{args.rounds}: tracing {'on' if tracing else 'off'}"):
                        result = measure(settings, args.models, args.model, tracing, args, workdir, round_no)
                    results[tracing].append(result)
                    console.print(f"round {round_no + 1} tracing {'on ' if tracing else 'off'}: "
                                  f"{result['tok_s']:,.0f} tok/s ({result['tokens']} tokens in "
                                  f"{result['seconds']:.2f} s; ready after {result['load_s']:.0f} s)")
            time.sleep(2)  # the collector's last batch
            spans = connect(settings.warehouse).query(
                "SELECT count() FROM otel_traces WHERE SpanName = 'llm_request'").result_rows[0][0]
        finally:
            for child in reversed(children):
                child.stop()
    table = Table(title=f"vLLM {args.model}: {args.requests} requests x {args.max_tokens} tokens, "
                        f"concurrency {args.concurrency}")
    for column in ("tracing", "tok/s per round", "mean tok/s"):
        table.add_column(column)
    mean = {mode: sum(r["tok_s"] for r in rows) / len(rows) for mode, rows in results.items()}
    for mode in (False, True):
        table.add_row("on" if mode else "off", ", ".join(f"{r['tok_s']:,.0f}" for r in results[mode]),
                      f"{mean[mode]:,.0f}")
    console.print(table)
    console.print(f"ratio on/off: [bold]{mean[True] / mean[False]:.3f}[/bold]; llm_request spans in the "
                  f"warehouse: {spans} (expected {(args.requests + args.concurrency) * args.rounds})")


if __name__ == "__main__":
    main()
