"""FleetLens' dbt project (dbt_project/) built by `fleetlens dbt` against the embedded warehouse:
seeds, sources with freshness, staging models and their YAML tests. Spans are written in the
collector's otel_traces schema, with the attribute names the gateway and vLLM really use."""

from __future__ import annotations

import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import WarehouseProcess, child_env, migrated_database
from fleetlens import semconv as sc

RAW = "dbt_fleet"
MARTS = f"{RAW}_marts"
NOW = datetime.now(timezone.utc).replace(microsecond=0)
TRACE = "0af7651916cd43dd8448eb211c80319c"


def span(span_id: str, name: str, *, parent: str = "", service: str = sc.GATEWAY_SERVICE, kind: str = "SPAN_KIND_INTERNAL",
         at: datetime = NOW, ms: float = 1.0, attributes: dict[str, str] | None = None,
         resource: dict[str, str] | None = None, trace: str = TRACE) -> dict[str, object]:
    return {"Timestamp": at, "TraceId": trace, "SpanId": span_id, "ParentSpanId": parent, "TraceState": "",
            "SpanName": name, "SpanKind": kind, "ServiceName": service,
            "ResourceAttributes": {"service.name": service, **(resource or {})}, "ScopeName": "test",
            "ScopeVersion": "", "SpanAttributes": attributes or {}, "Duration": int(ms * 1e6),
            "StatusCode": "STATUS_CODE_UNSET", "StatusMessage": "", "Events.Timestamp": [], "Events.Name": [],
            "Events.Attributes": [], "Links.TraceId": [], "Links.SpanId": [], "Links.TraceState": [],
            "Links.Attributes": []}


def one_request(at: datetime, trace: str = TRACE) -> list[dict[str, object]]:
    """A streamed request: root, two stages, the upstream call and vLLM's llm_request under it."""
    who = {sc.CUSTOMER: "acme-corp", sc.FEATURE: "chat-assistant", sc.ROUTE: "default"}
    return [
        span("a000000000000001", sc.ROOT_SPAN, trace=trace, kind="SPAN_KIND_SERVER", at=at, ms=420.0,
             attributes={**who, sc.HTTP_STATUS_CODE: "200"}),
        span("a000000000000002", "auth", trace=trace, parent="a000000000000001", at=at, ms=0.2,
             attributes={**who, sc.STAGE: "auth"}),
        span("a000000000000003", "route", trace=trace, parent="a000000000000001", at=at, ms=0.1,
             attributes={**who, sc.STAGE: "route"}),
        span("a000000000000004", "chat llama-8b", trace=trace, parent="a000000000000001", kind="SPAN_KIND_CLIENT", at=at, ms=400.0,
             attributes={**who, sc.OPERATION_NAME: "chat", sc.REQUEST_MODEL: "llama-8b", sc.RESPONSE_MODEL: "llama-8b",
                         sc.USAGE_INPUT_TOKENS: "12", sc.USAGE_OUTPUT_TOKENS: "16", sc.REPLICA: "llama-8b-0",
                         sc.MODEL_VARIANT: "bf16", sc.ATTEMPT: "1", sc.TIME_TO_FIRST_CHUNK: "0.031",
                         sc.RESPONSE_FINISH_REASONS: '["stop"]'}),
        span("b000000000000001", sc.VLLM_SPAN, trace=trace, parent="a000000000000004", service="vllm-llama-8b-0",
             kind="SPAN_KIND_SERVER", at=at, ms=390.0,
             attributes={sc.VLLM_PROMPT_TOKENS: "12", sc.VLLM_COMPLETION_TOKENS: "16", sc.VLLM_TIME_IN_QUEUE: "0.004",
                         sc.VLLM_TIME_TO_FIRST_TOKEN: "0.025", sc.VLLM_TIME_IN_MODEL_PREFILL: "0.019",
                         sc.VLLM_TIME_IN_MODEL_DECODE: "0.36"},
             resource={sc.REPLICA: "llama-8b-0", sc.MODEL_VARIANT: "bf16"}),
    ]


def cold_start(at: datetime) -> dict[str, object]:
    return span("c000000000000001", sc.COLD_START_SPAN, service=sc.REPLICA_SERVICE, at=at, ms=41_000.0,
                trace="1" * 32, attributes={sc.GPU_TYPE: "L4", sc.GPU_COUNT: "1", sc.GPU_HOURLY_USD: "0.8",
                                              sc.LOAD_SECONDS: "41.0"},
                resource={sc.REPLICA: "llama-8b-0", sc.MODEL_VARIANT: "bf16"})


def insert_spans(client, rows: list[dict[str, object]], database: str = RAW) -> None:
    columns = list(rows[0])
    client.insert(f"{database}.otel_traces", [[row[c] for c in columns] for row in rows], column_names=columns)


def fleetlens_dbt(url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = child_env({"FLEETLENS_WAREHOUSE_URL": url, "FLEETLENS_DATA_DIR": str(data_dir)})
    return subprocess.run([sys.executable, "-m", "fleetlens", "dbt", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"


def fresh_databases(warehouse: WarehouseProcess, raw: str) -> tuple[str, object]:
    """A migrated raw database and no models database yet: (warehouse URL, client)."""
    url = migrated_database(warehouse, raw)
    client = warehouse.client()
    client.command(f"DROP DATABASE IF EXISTS {raw}_marts")
    return url, client


@pytest.fixture
def raw(warehouse: WarehouseProcess) -> tuple[str, object]:
    return fresh_databases(warehouse, RAW)


@pytest.mark.slow
def test_sources_seeds_and_staging_build_and_test(raw, tmp_path: Path) -> None:
    url, client = raw
    # 1. only old spans: the source is stale, `source freshness` fails and says which source
    insert_spans(client, one_request(NOW - timedelta(hours=8), trace="2" * 32))
    stale = fleetlens_dbt(url, tmp_path, "source", "freshness")
    assert stale.returncode == 1 and "otel.otel_traces" in stale.stdout and "ERROR STALE" in stale.stdout, explain(stale)

    # 2. fresh spans, one of them delivered twice (a replayed spool batch), a cold start, metrics
    fresh = one_request(NOW)
    insert_spans(client, [*fresh, cold_start(NOW - timedelta(minutes=5))])
    insert_spans(client, [fresh[3]])  # the upstream span again
    client.insert(f"{RAW}.fleet_metrics",
                  [[NOW, "llama-8b-0", "llama-8b", "vllm:e2e_request_latency_seconds_bucket", "histogram",
                    {"le": "+Inf"}, 3.0],
                   [NOW, "llama-8b-0", "llama-8b", "vllm:num_requests_running", "gauge", {}, 2.0]],
                  column_names=["ts", "replica", "model", "metric", "metric_type", "labels", "value"])
    assert fleetlens_dbt(url, tmp_path, "source", "freshness").returncode == 0
    build = fleetlens_dbt(url, tmp_path, "build")
    assert build.returncode == 0, explain(build)
    assert (tmp_path / "dbt" / "target" / "run_results.json").exists()  # target/ under the data dir

    spans = client.query(f"SELECT trace_id, span_id, count() FROM {MARTS}.stg_otel__spans"
                         f" GROUP BY trace_id, span_id").result_rows
    assert len(spans) == 11 and all(n == 1 for *_, n in spans)  # 2 requests x 5 spans + a cold start, once each
    chat = client.query(
        f"SELECT customer, feature, route, input_tokens, output_tokens, replica, model_variant, attempt,"
        f" time_to_first_chunk_s, duration_ms, parent_span_id FROM {MARTS}.stg_otel__spans"
        f" WHERE span_name = 'chat llama-8b' AND started_at = %(at)s", parameters={"at": NOW}).result_rows
    assert chat == [("acme-corp", "chat-assistant", "default", 12, 16, "llama-8b-0", "bf16", 1, 0.031, 400.0,
                     "a000000000000001")]
    engine = client.query(
        f"SELECT service_name, input_tokens, output_tokens, replica, engine_queue_s, engine_decode_s, customer"
        f" FROM {MARTS}.stg_otel__spans WHERE span_name = 'llm_request' AND started_at = %(at)s",
        parameters={"at": NOW}).result_rows
    assert engine == [("vllm-llama-8b-0", 12, 16, "llama-8b-0", 0.004, 0.36, None)]
    loaded = client.query(f"SELECT gpu_type, gpu_count, load_seconds, replica FROM {MARTS}.stg_otel__spans"
                          f" WHERE span_name = 'replica.cold_start'").result_rows
    assert loaded == [("L4", 1, 41.0, "llama-8b-0")]
    buckets = dict(client.query(f"SELECT metric, bucket_le FROM {MARTS}.stg_otel__fleet_metrics").result_rows)
    assert math.isinf(buckets["vllm:e2e_request_latency_seconds_bucket"])
    assert buckets["vllm:num_requests_running"] is None
    prices = client.query(f"SELECT usd_per_gpu_hour FROM {MARTS}.gpu_prices WHERE gpu_type = 'H100'"
                          f" AND pricing_mode = 'on_demand' ORDER BY effective_from").result_rows
    assert [float(p) for (p,) in prices] == [3.5, 2.99]  # a price change, kept as two rows

    # 3. a negative engine duration is caught by the YAML tests, and dbt says which
    bad = one_request(NOW)[4]
    insert_spans(client, [{**bad, "TraceId": "f" * 32, "SpanAttributes": {sc.VLLM_TIME_IN_QUEUE: "-0.5"}}])
    failed = fleetlens_dbt(url, tmp_path, "build", "--select", "stg_otel__spans")  # picked up, then tested
    assert failed.returncode == 1 and "non_negative_stg_otel__spans_engine_queue_s" in failed.stdout, explain(failed)


def test_dbt_without_a_command_says_what_to_run(tmp_path: Path) -> None:
    result = fleetlens_dbt("http://127.0.0.1:1/x", tmp_path)
    assert result.returncode == 2 and "fleetlens dbt build" in result.stderr
