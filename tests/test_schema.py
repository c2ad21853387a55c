"""Migrations: idempotent, exporter-compatible `otel_traces`, and cluster rendering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetlens.schema import TABLES, RenderOptions, load_migrations, migrate, render

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "otel_exporter_schema.json").read_text())


def describe(client, db: str, table: str) -> dict:
    def rows(sql: str) -> list[tuple]:
        return client.query(sql, parameters={"db": db, "t": table}).result_rows

    columns = rows("SELECT name, type, default_kind, default_expression, compression_codec FROM system.columns "
                   "WHERE database = {db:String} AND table = {t:String} ORDER BY position")
    indexes = rows("SELECT name, type_full, expr, toString(granularity) FROM system.data_skipping_indices "
                   "WHERE database = {db:String} AND table = {t:String} ORDER BY name")
    engine, partition, sorting, primary = rows(
        "SELECT engine, partition_key, sorting_key, primary_key FROM system.tables "
        "WHERE database = {db:String} AND name = {t:String}")[0]
    return {
        "columns": [dict(zip(["name", "type", "default_kind", "default_expression", "codec"], c, strict=True)) for c in columns],
        "indexes": [dict(zip(["name", "type_full", "expr", "granularity"], i, strict=True)) for i in indexes],
        "table": {"engine": engine, "partition_key": partition, "sorting_key": sorting, "primary_key": primary},
    }


def snapshot(client, db: str) -> list[tuple]:
    return client.query("SELECT name, create_table_query, total_rows FROM system.tables "
                        "WHERE database = {db:String} ORDER BY name", parameters={"db": db}).result_rows


def test_migrate_twice_changes_nothing(warehouse):
    client = warehouse.client()
    first = migrate(client, RenderOptions(database="mig_twice"))
    assert [m.version for m in first.applied] == [m.version for m in load_migrations()]
    before = snapshot(client, "mig_twice")
    assert {name for name, *_ in before} >= set(TABLES)
    second = migrate(client, RenderOptions(database="mig_twice"))
    assert second.applied == [] and len(second.already) == len(load_migrations()) and second.changed == []
    assert snapshot(client, "mig_twice") == before


@pytest.mark.parametrize("table", ["otel_traces", "otel_traces_trace_id_ts"])
def test_otel_tables_match_pinned_exporter_column_for_column(warehouse, table):
    client = warehouse.client()
    migrate(client, RenderOptions(database="mig_exporter"))
    live = describe(client, "mig_exporter", table)
    expected = FIXTURE[table]
    assert [c["name"] for c in live["columns"]] == [c["name"] for c in expected["columns"]]
    for got, want in zip(live["columns"], expected["columns"], strict=True):
        assert got == want, got["name"]
    assert live["indexes"] == expected["indexes"]
    assert live["table"] == expected["table"]


def test_trace_id_lookup_view_matches_exporter(warehouse):
    client = warehouse.client()
    migrate(client, RenderOptions(database="mig_mv"))
    as_select = client.query("SELECT as_select FROM system.tables WHERE database = 'mig_mv' "
                             "AND name = 'otel_traces_trace_id_ts_mv'").result_rows[0][0]
    assert as_select == FIXTURE["otel_traces_trace_id_ts_mv"]["as_select"].replace("{db}", "mig_mv")


def test_cluster_rendering_uses_on_cluster_and_replicated_engines():
    options = RenderOptions(database="fleet", cluster="prod", traces_ttl_days=30)
    statements = [s for m in load_migrations() for s in render(m, options)]
    creates = [s for s in statements if s.startswith("CREATE")]
    assert creates and all("ON CLUSTER `prod`" in s.splitlines()[0] for s in creates)
    engines = [line for s in creates for line in s.splitlines() if "ENGINE =" in line]
    assert engines and all("ENGINE = Replicated" in line for line in engines)
    traces = next(s for s in statements if "`fleet`.otel_traces " in s.splitlines()[0])
    assert "ENGINE = ReplicatedMergeTree()" in traces
    assert "TTL toDateTime(Timestamp) + toIntervalDay(30)" in traces
    lookup = next(s for s in statements if "otel_traces_trace_id_ts " in s.splitlines()[0])
    assert "ENGINE = ReplicatedAggregatingMergeTree()" in lookup
    # single server: plain engines, no ON CLUSTER, no TTL
    plain = [s for m in load_migrations() for s in render(m, RenderOptions(database="fleet"))]
    assert not any("ON CLUSTER" in s or "Replicated" in s or "TTL " in s for s in plain)


def test_ttl_renders_and_is_accepted(warehouse):
    client = warehouse.client()
    migrate(client, RenderOptions(database="mig_ttl", traces_ttl_days=7, metrics_ttl_days=3))
    create = client.query("SELECT create_table_query FROM system.tables WHERE database = 'mig_ttl' "
                          "AND name = 'otel_traces'").result_rows[0][0]
    assert "TTL toDateTime(Timestamp) + toIntervalDay(7)" in create


def test_cli_migrate_reports_up_to_date(warehouse, tmp_path):
    env_url = f"http://default@127.0.0.1:{warehouse.port}/mig_cli"
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleetlens", "migrate"], capture_output=True, text=True,
                              env={"FLEETLENS_WAREHOUSE_URL": env_url, "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
                              cwd=tmp_path, timeout=120)

    first, second = run(), run()
    assert first.returncode == 0, first.stderr
    assert "applied 3 migration(s)" in first.stdout
    assert second.returncode == 0 and "schema up to date (3 migrations)" in second.stdout


def test_cli_migrate_against_down_warehouse_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fleetlens", "migrate"], capture_output=True, text=True,
                            env={"FLEETLENS_WAREHOUSE_URL": "http://default:pw@127.0.0.1:9/x", "PATH": "/usr/bin:/bin",
                                 "COLUMNS": "200"}, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "cannot reach the warehouse at http://default:***@127.0.0.1:9/x" in result.stderr
    assert "pw" not in result.stderr.replace("pw@", "")  # the password is never printed
