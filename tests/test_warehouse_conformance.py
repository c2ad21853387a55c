"""The embedded server behaves as a ClickHouse server for clickhouse-connect.

Every column type the FleetLens schema uses is written and read back through the real
`otel_traces`, `fleet_metrics` and `eval_runs` tables; then DataFrames, compression, a 1M-row
insert, and 8 concurrent clients.
"""

from __future__ import annotations

import random
import threading
from datetime import datetime, timezone
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest

from fleetlens.schema import RenderOptions, migrate

DB = "conformance"


@pytest.fixture(scope="module")
def client(warehouse):
    admin = warehouse.client()
    migrate(admin, RenderOptions(database=DB))
    return warehouse.client(database=DB, compress="lz4")


def test_otel_traces_round_trip_every_column(client):
    ts = datetime(2026, 11, 23, 10, 11, 12, 123456, tzinfo=timezone.utc)
    row = {
        "Timestamp": ts,
        "TraceId": "0af7651916cd43dd8448eb211c80319c",
        "SpanId": "b7ad6b7169203331",
        "ParentSpanId": "00f067aa0ba902b7",
        "TraceState": "congo=t61rcWkgMzE",
        "SpanName": "llm_request",
        "SpanKind": "SPAN_KIND_SERVER",
        "ServiceName": "vllm-small",
        "ResourceAttributes": {"service.name": "vllm-small", "host.name": "gpu-01"},
        "ScopeName": "vllm.tracing",
        "ScopeVersion": "0.32.0",
        "SpanAttributes": {"gen_ai.usage.prompt_tokens": "17", "gen_ai.latency.time_to_first_token": "0.0123",
                           "unicode": "héllo ✓"},
        "Duration": 123_456_789_012,
        "StatusCode": "STATUS_CODE_OK",
        "StatusMessage": "",
        "Events.Timestamp": [ts, ts],
        "Events.Name": ["first_token", "done"],
        "Events.Attributes": [{"k": "v"}, {}],
        "Links.TraceId": ["5b8aa5a2d2c872e8321cf37308d69df2"],
        "Links.SpanId": ["051581bf3cb55c13"],
        "Links.TraceState": [""],
        "Links.Attributes": [{"link.kind": "retry"}],
    }
    client.insert("otel_traces", [list(row.values())], column_names=list(row))
    got = client.query("SELECT * FROM otel_traces WHERE SpanId = 'b7ad6b7169203331'").named_results()
    got = list(got)
    assert len(got) == 1
    back = got[0]
    assert back["Timestamp"].replace(tzinfo=timezone.utc) == ts
    for key in ("TraceId", "ParentSpanId", "TraceState", "SpanName", "SpanKind", "ServiceName", "ResourceAttributes",
                "ScopeName", "ScopeVersion", "SpanAttributes", "Duration", "StatusCode", "StatusMessage",
                "Events.Name", "Events.Attributes", "Links.TraceId", "Links.SpanId", "Links.TraceState",
                "Links.Attributes"):
        assert back[key] == row[key], key
    assert [t.replace(tzinfo=timezone.utc) for t in back["Events.Timestamp"]] == [ts, ts]
    # nanosecond precision survives (DateTime64(9)) and the lookup materialized view fired
    ns = client.query("SELECT toUnixTimestamp64Nano(Timestamp) FROM otel_traces "
                      "WHERE SpanId = 'b7ad6b7169203331'").result_rows[0][0]
    assert ns == int(ts.timestamp()) * 1_000_000_000 + 123_456_000
    assert client.query("SELECT count() FROM otel_traces_trace_id_ts FINAL "
                        "WHERE TraceId = '0af7651916cd43dd8448eb211c80319c'").result_rows[0][0] == 1
    # ALIAS columns computed by the engine
    assert "host.name=gpu-01" in client.query(
        "SELECT ResourceAttributeItems FROM otel_traces WHERE SpanId = 'b7ad6b7169203331'").result_rows[0][0]


def test_metrics_and_evals_round_trip(client):
    now = datetime(2026, 11, 23, 12, 0, 0, 250000, tzinfo=timezone.utc)
    client.insert("fleet_metrics", [[now, "small-0", "demo-small", "vllm:kv_cache_usage_perc", "gauge",
                                     {"engine": "0"}, 0.375]],
                  column_names=["ts", "replica", "model", "metric", "metric_type", "labels", "value"])
    assert client.query("SELECT replica, labels, value FROM fleet_metrics").result_rows == [
        ("small-0", {"engine": "0"}, 0.375)]
    client.insert("eval_runs", [["r1", now, None, "route:chat", "demo-large", "int4", "chat", "lookup", "complete",
                                 200, {"exact_match": 0.91}, "abc", "deadbeef", 7, {"limit": "200"}, now]],
                  column_names=["run_id", "started_at", "finished_at", "target", "model", "variant", "route", "task",
                                "status", "n_items", "metrics", "config_hash", "git_sha", "seed", "params",
                                "updated_at"])
    run = list(client.query("SELECT * FROM eval_runs").named_results())[0]
    assert run["finished_at"] is None and run["metrics"] == {"exact_match": 0.91} and run["n_items"] == 200


def test_scalar_types_and_parameters(client):
    result = client.query(
        "SELECT {a:UInt64} AS a, {s:String} AS s, toDecimal64(1.25, 2) AS d, toUUID('61f0c404-5cb3-11e7-907b-a6006ad3dba0') AS u,"
        " [1, 2, 3]::Array(UInt8) AS arr, CAST(NULL, 'Nullable(String)') AS n, toDate('2026-11-23') AS day,"
        " map('x', 1) AS m, tuple(1, 'a') AS t, -7::Int32 AS neg, 1.5::Float32 AS f",
        parameters={"a": 2**63, "s": "it's \"quoted\"\n"},
    )
    row = result.result_rows[0]
    assert row[0] == 2**63 and row[1] == "it's \"quoted\"\n" and row[2] == Decimal("1.25")
    assert str(row[3]) == "61f0c404-5cb3-11e7-907b-a6006ad3dba0" and list(row[4]) == [1, 2, 3]
    assert row[5] is None and str(row[6]) == "2026-11-23" and row[7] == {"x": 1} and row[8] == (1, "a")
    assert row[9] == -7 and row[10] == 1.5


@pytest.mark.parametrize("compression", ["lz4", "zstd", "gzip", None])
def test_dataframes_with_compression(warehouse, compression):
    c = warehouse.client(database=DB, compress=compression or False)
    table = f"df_{compression or 'none'}"
    c.command(f"CREATE TABLE IF NOT EXISTS {table} (id UInt64, name LowCardinality(String), score Float64, "
              "ts DateTime64(9)) ENGINE = MergeTree ORDER BY id")
    df = pd.DataFrame({
        "id": np.arange(50_000, dtype=np.uint64),
        "name": [f"name-{i % 37}" for i in range(50_000)],
        "score": np.linspace(0, 1, 50_000),
        "ts": pd.date_range("2026-01-01", periods=50_000, freq="123ms"),
    })
    c.insert_df(table, df)
    back = c.query_df(f"SELECT * FROM {table} ORDER BY id")
    assert len(back) == 50_000
    assert back["id"].astype("uint64").tolist() == df["id"].tolist()
    assert back["name"].tolist() == df["name"].tolist()
    assert np.allclose(back["score"].to_numpy(), df["score"].to_numpy())
    assert (pd.to_datetime(back["ts"]).dt.tz_localize(None) == df["ts"]).all()


def test_one_million_row_insert(client):
    n = 1_000_000
    client.command("CREATE TABLE IF NOT EXISTS million (id UInt64, trace String, v Float64) "
                   "ENGINE = MergeTree ORDER BY id")
    ids = np.arange(n, dtype=np.uint64)
    df = pd.DataFrame({"id": ids, "trace": [f"{i:032x}" for i in range(n)], "v": ids * 0.5})
    summary = client.insert_df("million", df)
    assert summary.written_rows == n
    count, total, distinct = client.query("SELECT count(), sum(id), uniqExact(trace) FROM million").result_rows[0]
    assert (count, total, distinct) == (n, n * (n - 1) // 2, n)
    # and a large result streams back intact
    back = client.query_np("SELECT id FROM million ORDER BY id")
    assert back.shape[0] == n and int(back[-1][0]) == n - 1


def test_eight_threads_five_hundred_mixed_queries_each(warehouse):
    setup = warehouse.client(database=DB)
    setup.command("CREATE TABLE IF NOT EXISTS mixed (thread UInt8, i UInt32, payload String) "
                  "ENGINE = MergeTree ORDER BY (thread, i)")
    errors: list[BaseException] = []
    expected_rows: dict[int, int] = {}

    def worker(thread: int) -> None:
        rng = random.Random(thread)
        c = warehouse.client(database=DB, compress=rng.choice(["lz4", "zstd", False]))
        inserted = 0
        try:
            for i in range(500):
                kind = i % 5
                if kind == 0:
                    rows = [[thread, inserted + k, f"t{thread}-{inserted + k}"] for k in range(rng.randint(1, 50))]
                    c.insert("mixed", rows, column_names=["thread", "i", "payload"])
                    inserted += len(rows)
                elif kind == 1:
                    got = c.query("SELECT count(), max(i) FROM mixed WHERE thread = {t:UInt8}",
                                  parameters={"t": thread}).result_rows[0]
                    assert got[0] == inserted and (inserted == 0 or got[1] == inserted - 1), (thread, got, inserted)
                elif kind == 2:
                    x = rng.randint(0, 10**9)
                    assert c.query("SELECT {x:UInt64} * 2", parameters={"x": x}).result_rows[0][0] == 2 * x
                elif kind == 3:
                    df = c.query_df("SELECT number AS n FROM numbers({k:UInt32})", parameters={"k": 1000 + i})
                    assert len(df) == 1000 + i and int(df["n"].sum()) == (1000 + i) * (999 + i) // 2
                else:
                    raw = c.raw_query("SELECT payload FROM mixed WHERE thread = {t:UInt8} ORDER BY i LIMIT 3 "
                                      "FORMAT JSONEachRow", parameters={"t": thread})
                    assert raw.count(b"\n") == min(3, inserted)
            expected_rows[thread] = inserted
        except BaseException as error:  # noqa: BLE001 - collected and re-raised below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert len(expected_rows) == 8
    counts = dict(setup.query("SELECT thread, count() FROM mixed GROUP BY thread").result_rows)
    assert counts == expected_rows


def test_sessions_keep_settings_and_temporary_tables(warehouse):
    c = warehouse.client(database=DB, autogenerate_session_id=True)
    c.command("SET max_threads = 1")
    c.command("CREATE TEMPORARY TABLE tmp_session (x UInt8)")
    c.command("INSERT INTO tmp_session VALUES (7)")
    assert c.query("SELECT getSetting('max_threads'), (SELECT x FROM tmp_session)").result_rows == [(1, 7)]
    other = warehouse.client(database=DB, autogenerate_session_id=True)
    assert other.query("SELECT getSetting('max_threads') = 1").result_rows[0][0] == 0


def test_url_settings_apply_to_one_query_only(warehouse):
    c = warehouse.client(database=DB, autogenerate_session_id=True)
    assert c.query("SELECT getSetting('max_threads')", settings={"max_threads": 1}).result_rows[0][0] == 1
    assert c.query("SELECT getSetting('max_threads')").result_rows[0][0] != 1


@pytest.mark.parametrize("statement,expected", [
    ("EXISTS DATABASE default", "1"),
    ("EXISTS TABLE system.one", "1"),
    ("SHOW DATABASES", "system"),
    ("DESCRIBE TABLE system.one", "dummy"),
    ("EXPLAIN SELECT 1", "ReadFromSystemOne"),
    ("SHOW CREATE DATABASE default", "CREATE DATABASE default"),
])
def test_non_select_read_statements(warehouse, statement, expected):
    """dbt-clickhouse opens every connection with EXISTS DATABASE; none of these may be streamed."""
    assert expected in warehouse.client().raw_query(statement).decode()


@pytest.mark.parametrize("n", [200, 5_000])
def test_large_parameters_sent_as_multipart_form(client, n):
    """Past ~4 KiB of bind parameters clickhouse-connect moves the query and `param_*` values into a
    multipart/form-data body; the server reads them from there as ClickHouse does."""
    ids = [f"{i:032x}" for i in range(n)]
    assert client.query("SELECT length({t:Array(String)}), has({t:Array(String)}, {x:String}), {s:UInt8}",
                        parameters={"t": ids, "x": ids[-1], "s": 7}).result_rows == [(n, 1, 7)]
    assert client.query("SELECT count() FROM system.one WHERE 'x' IN {t:Array(String)} AND 1 = {s:UInt8}",
                        parameters={"t": ids, "s": 1}).result_rows == [(0,)]
    table = f"form_ids_{n}"
    client.command(f"CREATE TABLE IF NOT EXISTS {table} (id String) ENGINE = MergeTree ORDER BY id")
    client.query(f"INSERT INTO {table} SELECT arrayJoin({{t:Array(String)}})", parameters={"t": ids})
    assert client.query(f"SELECT count(), uniqExact(id) FROM {table} WHERE id IN {{t:Array(String)}}",
                        parameters={"t": ids}).result_rows == [(n, n)]
    client.insert(table, [["extra"]], column_names=["id"], settings={"insert_deduplicate": 0})
    assert client.command(f"SELECT count() FROM {table} WHERE id NOT IN {{t:Array(String)}}",
                          parameters={"t": ids[:100]}) == n - 100 + 1


def test_external_data_tables(client):
    from clickhouse_connect.driver.external import ExternalData

    data = ExternalData(file_name="ext.csv", data=b"1,a\n2,b\n3,c\n", fmt="CSV", structure="id UInt32, s String")
    assert client.query("SELECT sum(id), groupArray(s) FROM ext", external_data=data).result_rows == [
        (6, ["a", "b", "c"])]
    typed = ExternalData(file_name="typed", data=b"1\ta\n2\tb\n", types=["UInt32", "String"])
    ids = [f"{i:032x}" for i in range(1_000)] + ["b"]  # a form with both external data and large parameters
    assert client.query("SELECT _1 FROM typed WHERE _2 IN {t:Array(String)}", parameters={"t": ids},
                        external_data=typed).result_rows == [(2,)]
