"""The production ingestion path: the OpenTelemetry Collector (contrib) config in
collector/deploy/otelcol-clickhouse.yaml must write exactly what FleetLens' schema holds.

No otelcol binary runs here, so the checks are static where they must be (the YAML: wiring, keys,
database and table) and live where they can be (the columns FleetLens' migration creates, read back
with DESCRIBE TABLE from a real embedded warehouse, against the exporter's INSERT column list).
docs/production.md explains the deployment these files describe.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetlens.collector.mapping import COLUMNS as FLEETLENS_WRITER_COLUMNS
from fleetlens.config import DEFAULT_DATABASE, CollectorSettings, WarehouseURL
from fleetlens.schema import TABLES, RenderOptions, load_migrations, render
from fleetlens.schema.migrate import bootstrap_statements

from conftest import migrated_database

REPO = Path(__file__).resolve().parent.parent
CONFIG_PATH = REPO / "collector" / "deploy" / "otelcol-clickhouse.yaml"
DOC_PATH = REPO / "docs" / "production.md"
AGENT_BEGIN = "# ---8<--- agent tier: otelcol-agent.yaml ---8<---"
AGENT_END = "# ---8<--- end agent tier ---8<---"

# The columns the contrib ClickHouse exporter INSERTs into the traces table, in its order.
# Source: open-telemetry/opentelemetry-collector-contrib
#   exporter/clickhouseexporter/internal/sqltemplates/traces_insert.sql
#   @ 61540ced55e993255df9bcfca48ed89a87d3914f (the stored version; `INSERT INTO "%s"."%s" (...)`),
# rendered by renderInsertTracesSQL in exporter_traces.go (the driver.Conn/PrepareBatch version whose
# pushTraceData appends these 22 values per span, ScopeName/ScopeVersion included), i.e. the insert
# that goes with traces_table.sql @ 2bf6b9e1f8c8716ab54eaac1635e56b4d0649900, the DDL FleetLens'
# migration 0001 pins. Nested Events/Links are inserted as their flattened sub-columns.
EXPORTER_INSERT_COLUMNS: tuple[str, ...] = (
    "Timestamp",
    "TraceId",
    "SpanId",
    "ParentSpanId",
    "TraceState",
    "SpanName",
    "SpanKind",
    "ServiceName",
    "ResourceAttributes",
    "ScopeName",
    "ScopeVersion",
    "SpanAttributes",
    "Duration",
    "StatusCode",
    "StatusMessage",
    "Events.Timestamp",
    "Events.Name",
    "Events.Attributes",
    "Links.TraceId",
    "Links.SpanId",
    "Links.TraceState",
    "Links.Attributes",
)

# Their types in the exporter's traces_table.sql @ 2bf6b9e1 (what the Go values are converted to;
# the exporter README: "Column names and types must be the same"), as DESCRIBE reports them
# (Nested flattened into Array columns).
_ATTRS = "Map(LowCardinality(String), String)"
EXPORTER_COLUMN_TYPES: dict[str, str] = {
    "Timestamp": "DateTime64(9)",
    "TraceId": "String",
    "SpanId": "String",
    "ParentSpanId": "String",
    "TraceState": "String",
    "SpanName": "LowCardinality(String)",
    "SpanKind": "LowCardinality(String)",
    "ServiceName": "LowCardinality(String)",
    "ResourceAttributes": _ATTRS,
    "ScopeName": "String",
    "ScopeVersion": "String",
    "SpanAttributes": _ATTRS,
    "Duration": "UInt64",
    "StatusCode": "LowCardinality(String)",
    "StatusMessage": "String",
    "Events.Timestamp": "Array(DateTime64(9))",
    "Events.Name": "Array(LowCardinality(String))",
    "Events.Attributes": f"Array({_ATTRS})",
    "Links.TraceId": "Array(String)",
    "Links.SpanId": "Array(String)",
    "Links.TraceState": "Array(String)",
    "Links.Attributes": f"Array({_ATTRS})",
}
# Computed (ALIAS) columns of the same DDL: never inserted.
EXPORTER_ALIAS_COLUMNS = ("ResourceAttributeItems", "SpanAttributeItems")

# Settings each component accepts, as documented by its source (only keys used below need to be here).
# clickhouse exporter: exporter/clickhouseexporter/config.schema.yaml
#   @ 09ea2f421d7b5b9771e9fbb5513c59186e7f33c1
#   (+ exporterhelper's `timeout`, `retry_on_failure`, `sending_queue` it embeds), README.md @ 000d4c7c.
CLICKHOUSE_EXPORTER_KEYS = {
    "endpoint", "username", "password", "database", "connection_params", "logs_table_name",
    "traces_table_name", "profiles_table_name", "metrics_table_name", "metrics_tables", "ttl",
    "table_engine", "cluster_name", "create_schema", "async_insert", "compress", "json", "tls",
    "timeout", "retry_on_failure", "sending_queue",
}
# go.opentelemetry.io/collector exporter/exporterhelper/README.md (Sending Queue, Persistent Queue,
# sending queue batch settings, Retry on Failure).
SENDING_QUEUE_KEYS = {"enabled", "num_consumers", "wait_for_result", "block_on_overflow", "sizer",
                      "queue_size", "batch", "storage", "concurrency_controller"}
QUEUE_BATCH_KEYS = {"flush_timeout", "min_size", "max_size", "sizer"}
RETRY_KEYS = {"enabled", "initial_interval", "max_interval", "max_elapsed_time", "multiplier"}
SIZERS = {"requests", "items", "bytes"}
# extension/storage/filestorage/README.md @ 081fceadc7dce840498ff68bb5293968c2ca7511.
FILE_STORAGE_KEYS = {"directory", "timeout", "fsync", "create_directory", "directory_permissions",
                     "compaction"}
FILE_STORAGE_COMPACTION_KEYS = {
    "on_start", "on_rebound", "directory", "max_transaction_size", "cleanup_on_start",
    "rebound_needed_threshold_mib", "rebound_trigger_threshold_mib", "check_interval",
}
# processor/memorylimiterprocessor/README.md (opentelemetry-collector).
MEMORY_LIMITER_KEYS = {"check_interval", "limit_mib", "spike_limit_mib", "limit_percentage",
                       "spike_limit_percentage"}
# exporter/loadbalancingexporter/README.md.
LOADBALANCING_KEYS = {"routing_key", "protocol", "resolver"}
LOADBALANCING_RESOLVERS = {"static": {"hostnames"}, "dns": {"hostname", "port", "interval", "timeout"},
                           "k8s": {"service", "ports"}}
# configgrpc / confighttp server settings used by the OTLP receiver.
OTLP_GRPC_KEYS = {"endpoint", "max_recv_msg_size_mib", "max_concurrent_streams", "tls", "keepalive"}
OTLP_HTTP_KEYS = {"endpoint", "max_request_body_size", "tls", "cors", "include_metadata"}
# Component types this file may use: all in the contrib distribution.
KNOWN_TYPES = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch"},
    "exporters": {"clickhouse", "loadbalancing", "otlp"},
    "extensions": {"health_check", "file_storage"},
}

ENV_REF = re.compile(r"^\$\{env:[A-Z_][A-Z0-9_]*\}$")


def component_type(component_id: str) -> str:
    """`file_storage/clickhouse_queue` → `file_storage` (the collector's type[/name] ids)."""
    return component_id.split("/", 1)[0]


def load_config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG_PATH.read_text(encoding="utf-8"))


def load_agent_config() -> dict[str, Any]:
    """The agent-tier config kept as a commented block in the same file."""
    lines = CONFIG_PATH.read_text(encoding="utf-8").splitlines()
    start, end = lines.index(AGENT_BEGIN), lines.index(AGENT_END)
    body = []
    for line in lines[start + 1:end]:
        assert line.startswith("#"), f"agent block line is not a comment: {line!r}"
        body.append(line[2:] if line.startswith("# ") else line[1:])
    return yaml.safe_load("\n".join(body))


def the_exporter(config: dict[str, Any], type_: str) -> tuple[str, dict[str, Any]]:
    found = [(cid, spec) for cid, spec in config["exporters"].items() if component_type(cid) == type_]
    assert len(found) == 1, f"expected one {type_} exporter, found {[cid for cid, _ in found]}"
    return found[0]


def assert_pipelines_wired(config: dict[str, Any]) -> None:
    """Every component a pipeline or the service names is defined, of a known type, and used."""
    service = config["service"]
    assert service["pipelines"], "no pipelines"
    for kind in ("receivers", "processors", "exporters", "extensions"):
        for cid in config.get(kind) or {}:
            assert component_type(cid) in KNOWN_TYPES[kind], f"{kind}: unknown component type {cid!r}"
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for name, pipeline in service["pipelines"].items():
        assert component_type(name) in ("traces", "metrics", "logs"), name
        assert set(pipeline) <= {"receivers", "processors", "exporters"}, (name, set(pipeline))
        assert pipeline.get("receivers") and pipeline.get("exporters"), f"{name}: no receivers or exporters"
        for kind in used:
            ids = pipeline.get(kind) or []
            assert len(ids) == len(set(ids)), f"{name}: {kind} listed twice"
            for cid in ids:
                assert cid in (config.get(kind) or {}), f"pipeline {name} uses undefined {kind[:-1]} {cid!r}"
            used[kind].update(ids)
        processors = pipeline.get("processors") or []
        if any(component_type(p) == "memory_limiter" for p in processors):
            assert component_type(processors[0]) == "memory_limiter", f"{name}: memory_limiter must be first"
    for kind, ids in used.items():
        unused = set(config.get(kind) or {}) - ids
        assert not unused, f"{kind} defined but in no pipeline: {sorted(unused)}"
    for ext in service.get("extensions") or []:
        assert ext in (config.get("extensions") or {}), f"service uses undefined extension {ext!r}"
    enabled = set(service.get("extensions") or [])
    assert set(config.get("extensions") or {}) == enabled, "an extension is defined but not enabled"


def traces_statements(options: RenderOptions) -> list[str]:
    migration = next(m for m in load_migrations() if m.version == 1)
    return render(migration, options)


# --- the collector config -------------------------------------------------------------------------


def test_config_parses_and_its_pipelines_are_wired():
    config = load_config()
    assert_pipelines_wired(config)
    traces = config["service"]["pipelines"]["traces"]
    assert [component_type(r) for r in traces["receivers"]] == ["otlp"]
    assert [component_type(p) for p in traces["processors"]] == ["memory_limiter"]
    assert [component_type(e) for e in traces["exporters"]] == ["clickhouse"]


def test_clickhouse_exporter_writes_fleetlens_database_and_table():
    config = load_config()
    _, exporter = the_exporter(config, "clickhouse")
    assert set(exporter) <= CLICKHOUSE_EXPORTER_KEYS, set(exporter) - CLICKHOUSE_EXPORTER_KEYS
    # FleetLens' default database: the path of a warehouse URL without one, and the embedded server's.
    assert exporter["database"] == DEFAULT_DATABASE == WarehouseURL.parse("http://clickhouse:8123").database
    # The table migration 0001 creates (and its trace-id lookup table, named as the exporter names it).
    table = exporter["traces_table_name"]
    assert table == "otel_traces" and table in TABLES and f"{table}_trace_id_ts" in TABLES
    creates = [s.splitlines()[0].split() for s in traces_statements(RenderOptions(database=DEFAULT_DATABASE))]
    prefix = ["CREATE", "TABLE", "IF", "NOT", "EXISTS"]
    assert [*prefix, f"`{DEFAULT_DATABASE}`.{table}", "("] in creates
    assert [*prefix, f"`{DEFAULT_DATABASE}`.{table}_trace_id_ts", "("] in creates
    # FleetLens' migrations own the schema: the exporter runs no DDL, so the DDL-only settings are absent.
    assert exporter["create_schema"] is False
    assert not {"ttl", "cluster_name", "table_engine", "json"} & set(exporter)
    # Where and who come from the environment; no credentials in the file.
    assert exporter["endpoint"] == "${env:CLICKHOUSE_ENDPOINT}"
    assert ENV_REF.match(exporter["username"]) and ENV_REF.match(exporter["password"])


def test_exporter_queue_is_persistent_batched_and_retries():
    config = load_config()
    _, exporter = the_exporter(config, "clickhouse")
    queue = exporter["sending_queue"]
    assert set(queue) <= SENDING_QUEUE_KEYS, set(queue) - SENDING_QUEUE_KEYS
    assert queue["enabled"] is True and queue["queue_size"] > 0 and queue["sizer"] in SIZERS
    # Persistent: the storage extension exists, is a file_storage, and is enabled in the service.
    storage = queue["storage"]
    assert component_type(storage) == "file_storage"
    assert storage in config["extensions"] and storage in config["service"]["extensions"]
    file_storage = config["extensions"][storage]
    assert set(file_storage) <= FILE_STORAGE_KEYS, set(file_storage) - FILE_STORAGE_KEYS
    assert set(file_storage.get("compaction") or {}) <= FILE_STORAGE_COMPACTION_KEYS
    assert file_storage["directory"].startswith("/") and file_storage["fsync"] is True
    # Batching in the queue, FleetLens-sized (collector.batch_max_spans spans an INSERT at least).
    batch = queue["batch"]
    assert set(batch) <= QUEUE_BATCH_KEYS, set(batch) - QUEUE_BATCH_KEYS
    assert batch["sizer"] == "items" and batch["min_size"] == CollectorSettings().batch_max_spans
    assert batch["max_size"] >= batch["min_size"]
    retry = exporter["retry_on_failure"]
    assert set(retry) <= RETRY_KEYS and retry["enabled"] is True
    assert retry["max_interval"] == f"{CollectorSettings().retry_max_s:g}s"
    assert retry["max_elapsed_time"] in ("0", "0s", 0)  # never drop a batch while ClickHouse is down


def test_receivers_and_processors_use_existing_keys_and_fleetlens_ports():
    config = load_config()
    protocols = config["receivers"]["otlp"]["protocols"]
    assert set(protocols) == {"grpc", "http"}
    assert set(protocols["grpc"]) <= OTLP_GRPC_KEYS and set(protocols["http"]) <= OTLP_HTTP_KEYS
    defaults = CollectorSettings()
    assert protocols["grpc"]["endpoint"].rsplit(":", 1)[1] == str(defaults.grpc_port)
    assert protocols["http"]["endpoint"].rsplit(":", 1)[1] == str(defaults.http_port)
    assert protocols["grpc"]["max_recv_msg_size_mib"] * 1024**2 == defaults.max_request_bytes
    assert protocols["http"]["max_request_body_size"] == defaults.max_request_bytes
    limiter = config["processors"]["memory_limiter"]
    assert set(limiter) <= MEMORY_LIMITER_KEYS and limiter["check_interval"]
    assert limiter["spike_limit_percentage"] < limiter["limit_percentage"] <= 100


def test_agent_tier_block_is_a_valid_loadbalancing_config():
    agent = load_agent_config()
    assert_pipelines_wired(agent)
    _, lb = the_exporter(agent, "loadbalancing")
    assert set(lb) <= LOADBALANCING_KEYS and lb["routing_key"] == "traceID"
    assert set(lb["protocol"]) == {"otlp"} and "endpoint" not in lb["protocol"]["otlp"]
    (resolver, spec), = lb["resolver"].items()
    assert set(spec) <= LOADBALANCING_RESOLVERS[resolver]
    # Agents receive on loopback (the gateway and vLLM on the same host), FleetLens' default bind.
    for protocol in agent["receivers"]["otlp"]["protocols"].values():
        assert protocol["endpoint"].startswith("127.0.0.1:")
    # ... and send to the gateway tier's gRPC receiver.
    gateway_grpc = load_config()["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert str(spec["port"]) == gateway_grpc.rsplit(":", 1)[1]


# --- columns: what the exporter inserts is what FleetLens creates ---------------------------------


def test_exporter_insert_columns_are_the_columns_fleetlens_creates(warehouse):
    migrated_database(warehouse, "prod_cfg")
    client = warehouse.client()
    rows = client.query("DESCRIBE TABLE prod_cfg.otel_traces").result_rows
    described = {name: (type_, default_kind) for name, type_, default_kind, *_ in rows}
    insertable = [name for name, (_, kind) in described.items() if kind not in ("ALIAS", "MATERIALIZED")]
    assert tuple(insertable) == EXPORTER_INSERT_COLUMNS
    assert {name: described[name][0] for name in insertable} == EXPORTER_COLUMN_TYPES
    assert [name for name, (_, kind) in described.items() if kind == "ALIAS"] == list(EXPORTER_ALIAS_COLUMNS)
    # An INSERT naming exactly the exporter's columns, each value cast to the exporter's type, is accepted.
    client.command(f"INSERT INTO prod_cfg.otel_traces ({', '.join(EXPORTER_INSERT_COLUMNS)}) "
                   f"SELECT {', '.join(ONE_SPAN[c] for c in EXPORTER_INSERT_COLUMNS)}")
    stored = client.query("SELECT count(), any(SpanAttributeItems) FROM prod_cfg.otel_traces").result_rows[0]
    assert stored == (1, ["gen_ai.request.model=demo"])


def _one_span() -> dict[str, str]:
    """One span as the exporter would send it: a SQL expression per column, cast to its type."""
    given = {
        "Timestamp": "now64(9)", "TraceId": "'5b8efff798038103d269b633813fc60c'",
        "SpanId": "'eee19b7ec3c1b174'", "SpanName": "'POST /v1/chat/completions'", "SpanKind": "'Server'",
        "ServiceName": "'fleetlens-gateway'",
        "ResourceAttributes": "map('service.name', 'fleetlens-gateway')",
        "SpanAttributes": "map('gen_ai.request.model', 'demo')", "Duration": "1000000", "StatusCode": "'Ok'",
        "Events.Timestamp": "[now64(9)]", "Events.Name": "['first_token']", "Events.Attributes": "[map()]",
    }
    out = {}
    for column, type_ in EXPORTER_COLUMN_TYPES.items():
        empty = "[]" if type_.startswith("Array") else "''"
        out[column] = f"CAST({given.get(column, empty)}, '{type_}')"
    return out


ONE_SPAN = _one_span()


def test_fleetlens_writer_and_pinned_fixture_agree_with_the_exporter():
    # FleetLens' own collector inserts the same columns, in the same order.
    assert tuple(FLEETLENS_WRITER_COLUMNS) == EXPORTER_INSERT_COLUMNS
    # The rendered upstream DDL pinned in tests/fixtures (test_schema.py compares the migration with it).
    fixture = json.loads((REPO / "tests" / "fixtures" / "otel_exporter_schema.json").read_text())
    columns = fixture["otel_traces"]["columns"]
    assert tuple(c["name"] for c in columns if c["default_kind"] != "ALIAS") == EXPORTER_INSERT_COLUMNS
    assert tuple(c["name"] for c in columns if c["default_kind"] == "ALIAS") == EXPORTER_ALIAS_COLUMNS


# --- cluster rendering ------------------------------------------------------------------------------


def test_cluster_rendering_is_on_cluster_with_replicated_engines_and_no_distributed_tables():
    options = RenderOptions(database=DEFAULT_DATABASE, cluster="fleet")
    for statement in bootstrap_statements(options):
        assert "ON CLUSTER `fleet`" in statement
    first_line = "CREATE TABLE IF NOT EXISTS `fleetlens`.otel_traces ON CLUSTER `fleet` ("
    traces = next(s for s in traces_statements(options) if s.splitlines()[0] == first_line)
    assert "ENGINE = ReplicatedMergeTree()" in traces
    everything = [s for m in load_migrations() for s in render(m, options)]
    creates = [s for s in everything if s.startswith("CREATE")]
    assert creates and all("ON CLUSTER `fleet`" in s.splitlines()[0] for s in creates)
    # docs/production.md says FleetLens renders no Distributed tables (the operator adds them for
    # several shards); if that changes, the doc must change with it.
    assert not any("Distributed" in s for s in everything)


@pytest.mark.parametrize("phrase", [
    "collector/deploy/otelcol-clickhouse.yaml",
    "create_schema: false",
    "FLEETLENS_WAREHOUSE_URL",
    "ON CLUSTER",
    "ReplicatedMergeTree",
    "Distributed",
    "airflow.database_url",
    "gateway.redis_url",
    "replica.engine_command",
    "record_content",
])
def test_production_doc_covers(phrase):
    assert phrase in DOC_PATH.read_text(encoding="utf-8")
