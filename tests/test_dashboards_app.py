"""The dashboard pages (Streamlit AppTest, in-process) on a seeded warehouse: what each page shows
equals the marts it reads, filters change the figures the way they should, and the empty, error and
hostile-input cases say what is wrong instead of failing."""

from __future__ import annotations

import os
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from fleetlens.dashboards import queries, ui
from fleetlens.dashboards.filters import Filters
from fleetlens.dashboards.warehouse import DashboardWarehouse
from fleetlens.config import Settings
from conftest import SeededWarehouse, migrated_database, free_port

APP = str(Path(ui.__file__).with_name("app.py"))

pytestmark = pytest.mark.slow


@pytest.fixture
def app_env(seeded_warehouse: SeededWarehouse, monkeypatch: pytest.MonkeyPatch):
    """The app's settings point at the seeded database; every test starts with empty caches."""
    for key in [k for k in os.environ if k.startswith("FLEETLENS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FLEETLENS_WAREHOUSE_URL", seeded_warehouse.url)
    monkeypatch.setenv("FLEETLENS_DATA_DIR", str(seeded_warehouse.data_dir))
    st.cache_data.clear()
    st.cache_resource.clear()
    yield seeded_warehouse
    st.cache_data.clear()
    st.cache_resource.clear()


def open_page(view: str | None = None, **widgets: object) -> AppTest:
    """Run the app, set sidebar widgets by key (f_range: a (start, end) pair; f_customers … f_routes:
    lists), then switch to `views/{view}.py`."""
    at = AppTest.from_file(APP, default_timeout=120).run()
    for key, value in widgets.items():
        if key == "f_range":
            at.sidebar.date_input(key=key).set_value(value)
        else:
            at.sidebar.multiselect(key=key).set_value(value)
    if widgets:
        at.run()
    if view:
        at.switch_page(f"views/{view}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}: {[m.label for m in at.metric]}"
    return found[0]


def frame(at: AppTest, *columns: str) -> pd.DataFrame:
    """The first table on the page with all these columns (AppTest does not expose a table's key)."""
    for element in at.dataframe:
        value = element.value
        value = value.data if hasattr(value, "data") and not isinstance(value, pd.DataFrame) else value  # a Styler
        if set(columns) <= set(value.columns):
            return value
    raise AssertionError(f"no table with columns {columns}: {[list(d.value.columns) for d in at.dataframe]}")


def one(seeded: SeededWarehouse, sql: str) -> object:
    """A scalar; `{marts}` / `{raw}` name the databases, `{days}` is the default range (the days with requests)."""
    days = (f"day BETWEEN (SELECT min(day) FROM {seeded.marts}.fct_requests) "
            f"AND (SELECT max(day) FROM {seeded.marts}.fct_requests)")
    return seeded.client().query(sql.format(marts=seeded.marts, raw=seeded.database, days=days)).result_rows[0][0]


def data_days(seeded: SeededWarehouse) -> tuple[date, date]:
    first, last = seeded.client().query(f"SELECT min(day), max(day) FROM {seeded.marts}.fct_requests").result_rows[0]
    return first, last


def test_overview_figures_equal_the_marts(app_env: SeededWarehouse) -> None:
    seeded = app_env
    at = open_page()
    assert [t.value for t in at.title] == ["Overview"]
    first, last = data_days(seeded)
    assert last - first < timedelta(days=7)  # the default range (last 7 days of data) covers it all
    assert metric(at, "Requests") == ui.count(one(seeded, "SELECT count() FROM {marts}.fct_requests"))
    assert metric(at, "Fully loaded cost") == ui.usd(one(seeded, "SELECT sum(fully_loaded_usd) FROM {marts}.cost_by_feature_daily"))
    assert metric(at, "Idle dollars") == ui.usd(one(seeded, "SELECT sum(idle_usd) FROM {marts}.utilization_by_replica_hourly WHERE {days}"))
    assert metric(at, "Fleet utilization") == ui.pct(
        one(seeded, "SELECT sum(busy_s) / sum(up_s) FROM {marts}.utilization_by_replica_hourly WHERE {days}"))
    assert metric(at, "p95 end to end") == ui.ms(one(
        seeded, "SELECT quantileExactIf(0.95)(e2e_ms, status = 'ok' AND e2e_ms IS NOT NULL) FROM {marts}.fct_requests"))
    month_to_date = one(seeded, "SELECT sumIf(bill_usd, toStartOfMonth(hour) = toStartOfMonth((SELECT max(hour) FROM "
                                "{marts}.utilization_by_replica_hourly))) FROM {marts}.utilization_by_replica_hourly")
    assert metric(at, "Month to date") == ui.usd(month_to_date)
    assert any(c.value.startswith("Newest request ") for c in at.caption)


def test_overview_with_a_customer_filter_spends_that_customers_cost(app_env: SeededWarehouse) -> None:
    seeded = app_env
    customer = one(seeded, "SELECT customer FROM {marts}.fct_requests WHERE customer IS NOT NULL "
                           "GROUP BY customer ORDER BY count() DESC LIMIT 1")
    at = open_page(f_customers=[customer])
    assert [s.value for s in at.subheader][0] == "Spend (fully loaded cost of the filtered requests)"
    facts = seeded.client().query(f"SELECT count(), sum(fully_loaded_usd) FROM {seeded.marts}.fct_requests "
                                  "WHERE customer = {c:String}", parameters={"c": customer}).result_rows
    requests, cost = facts[0][0], facts[0][1]
    assert metric(at, "Requests") == ui.count(requests)
    assert metric(at, "Fully loaded cost") == ui.usd(cost)
    month = seeded.client().query(f"""
        SELECT sum(fully_loaded_usd) FROM {seeded.marts}.fct_requests
        WHERE customer = {{c:String}} AND toStartOfMonth(requested_at) = (
            SELECT toStartOfMonth(max(requested_at)) FROM {seeded.marts}.fct_requests WHERE customer = {{c:String}})""",
        parameters={"c": customer}).result_rows[0][0]
    assert metric(at, "Month to date") == ui.usd(month)


def test_cost_by_feature_equals_cost_by_feature_daily(app_env: SeededWarehouse) -> None:
    seeded = app_env
    at = open_page("cost")
    mart = seeded.client().query_df(
        f"SELECT feature, sum(fully_loaded_usd) AS usd, sum(allocated_usd) AS alloc, sum(requests) AS n "
        f"FROM {seeded.marts}.cost_by_feature_daily GROUP BY feature ORDER BY usd DESC")
    shown = frame(at, "feature", "fully_loaded_usd").set_index("feature")
    assert set(shown.index) == set(mart["feature"])
    for row in mart.itertuples():
        assert shown.loc[row.feature, "fully_loaded_usd"] == pytest.approx(row.usd, abs=1e-9)
        assert shown.loc[row.feature, "allocated_usd"] == pytest.approx(row.alloc, abs=1e-9)
        assert shown.loc[row.feature, "requests"] == row.n
    total, top = mart["usd"].sum(), mart.iloc[0]
    headline = [m.value for m in at.markdown if "of the cost" in m.value][0]
    assert f"**{top.feature}** is **{top.usd / total * 100:.1f}%**" in headline
    assert ui.usd(total) in headline
    assert metric(at, "Fully loaded") == ui.usd(total)
    assert any(c.value == "Source: `cost_by_feature_daily`." for c in at.caption)


def test_cost_by_customer_and_by_model(app_env: SeededWarehouse) -> None:
    seeded = app_env
    at = open_page("cost")
    at.segmented_control(key="cost_dimension").set_value("customer").run()
    shown = frame(at, "customer", "fully_loaded_usd").set_index("customer")["fully_loaded_usd"]
    mart = seeded.client().query_df(f"SELECT customer, sum(fully_loaded_usd) AS usd FROM "
                                    f"{seeded.marts}.cost_by_customer_daily GROUP BY customer").set_index("customer")["usd"]
    pd.testing.assert_series_equal(shown.sort_index(), mart.sort_index(), check_names=False, check_index_type=False, atol=1e-9)
    at.segmented_control(key="cost_dimension").set_value("model").run()
    shown = frame(at, "model", "fully_loaded_usd").set_index("model")["fully_loaded_usd"]
    facts = seeded.client().query_df(f"SELECT ifNull(model, '') AS model, sum(fully_loaded_usd) AS usd "
                                     f"FROM {seeded.marts}.fct_requests GROUP BY model").set_index("model")["usd"]
    pd.testing.assert_series_equal(shown.sort_index(), facts.sort_index(), check_names=False, check_index_type=False, atol=1e-9)


def test_a_customer_filter_narrows_the_cost_by_feature(app_env: SeededWarehouse) -> None:
    seeded = app_env
    customer = one(seeded, "SELECT customer FROM {marts}.fct_requests WHERE customer IS NOT NULL "
                           "GROUP BY customer ORDER BY count() DESC LIMIT 1")
    at = open_page("cost", f_customers=[customer])
    shown = frame(at, "feature", "fully_loaded_usd").set_index("feature")["fully_loaded_usd"]
    facts = seeded.client().query_df(
        f"SELECT ifNull(feature, '(direct)') AS feature, sum(fully_loaded_usd) AS usd FROM {seeded.marts}.fct_requests "
        "WHERE customer = {c:String} GROUP BY feature", parameters={"c": customer}).set_index("feature")["usd"]
    pd.testing.assert_series_equal(shown.sort_index(), facts.sort_index(), check_names=False, check_index_type=False, atol=1e-9)
    assert any(c.value == "Source: `fct_requests`." for c in at.caption)
    assert metric(at, "Fully loaded") == ui.usd(facts.sum())


def test_margin_equals_cost_by_customer_daily(app_env: SeededWarehouse) -> None:
    seeded = app_env
    at = open_page("margin")
    mart = seeded.client().query_df(f"""
        SELECT customer, sum(revenue_usd) AS revenue, sum(fully_loaded_usd) AS cost, max(target_margin) AS target
        FROM {seeded.marts}.cost_by_customer_daily GROUP BY customer""")
    assert metric(at, "Revenue") == ui.usd(mart["revenue"].sum())
    assert metric(at, "Contribution margin") == ui.usd(mart["revenue"].sum() - mart["cost"].sum())
    shown = frame(at, "customer", "under_target").set_index("customer")
    margin = (mart["revenue"] - mart["cost"]) / mart["revenue"].where(mart["revenue"] > 0)
    under = mart[((mart["cost"] > 0) & (mart["revenue"] == 0)) | (margin < mart["target"])]["customer"]
    assert set(shown.index[shown["under_target"].astype(bool)]) == set(under)
    if len(under):
        assert [e.value for e in at.error][0].startswith(f"{len(under)} customer(s) under their target margin")


def test_latency_waterfall_and_slo_equal_the_marts(app_env: SeededWarehouse) -> None:
    seeded = app_env
    at = open_page("latency")
    stages = frame(at, "stage", "mean_ms")
    assert list(stages["stage"]) == [s for s in queries.STAGES if s in set(stages["stage"])]
    assert {"auth", "engine_prefill", "engine_decode"} <= set(stages["stage"])
    mart = seeded.client().query_df(f"""
        SELECT stage, sum(mean_ms * requests) / sum(requests) AS mean_ms
        FROM {seeded.marts}.latency_by_stage_hourly GROUP BY stage""").set_index("stage")["mean_ms"]
    for row in stages.itertuples():
        assert row.mean_ms == pytest.approx(mart[row.stage], rel=1e-9)
    slo = frame(at, "feature", "ttft_attainment")
    assert set(slo["feature"]) == set(seeded.client().query_df(
        f"SELECT DISTINCT feature FROM {seeded.marts}.slo_adherence")["feature"])


def test_utilization_equals_utilization_by_replica_hourly(app_env: SeededWarehouse) -> None:
    seeded = app_env
    at = open_page("utilization")
    assert metric(at, "GPU bill") == ui.usd(one(seeded, "SELECT sum(bill_usd) FROM {marts}.utilization_by_replica_hourly WHERE {days}"))
    table = frame(at, "replica", "busy_fraction").set_index("replica")
    first, last = data_days(seeded)
    mart = seeded.client().query_df(f"SELECT replica, sum(idle_usd) AS idle, sum(busy_s) / sum(up_s) AS busy "
                                    f"FROM {seeded.marts}.utilization_by_replica_hourly "
                                    f"WHERE day BETWEEN '{first}' AND '{last}' GROUP BY replica").set_index("replica")
    assert set(table.index) == set(mart.index)
    for replica, row in mart.iterrows():
        assert table.loc[replica, "idle_usd"] == pytest.approx(row["idle"], abs=1e-9)
        assert table.loc[replica, "busy_fraction"] == pytest.approx(row["busy"], rel=1e-9)
    launches = one(seeded, "SELECT count() FROM {marts}.cold_starts WHERE {days}")
    assert metric(at, "Cold starts") == f"{launches:,}"


def test_build_vs_buy_shows_the_mart_and_reprices(app_env: SeededWarehouse) -> None:
    seeded = app_env
    at = open_page("build_vs_buy")
    mart = seeded.client().query_df(f"SELECT model, any(self_hosted_usd_per_1m_tokens) AS per_1m "
                                    f"FROM {seeded.marts}.build_vs_buy GROUP BY model ORDER BY model")
    shown = [m.value for m in at.metric if m.label == "Self-hosted $ / 1M tokens"]
    assert shown == [ui.usd(v) for v in mart["per_1m"]]
    assert at.selectbox(key="bvb_mode").value == "on_demand"
    at.selectbox(key="bvb_mode").set_value("spot").run()
    spot = [m.value for m in at.metric if m.label == "Self-hosted $ / 1M tokens"]
    assert all(float(s.strip("$").replace(",", "")) < float(o.strip("$").replace(",", "")) for s, o in zip(spot, shown))
    at.selectbox(key="bvb_mode").set_value("on_demand")
    at.slider(key="bvb_factor").set_value(-50).run()
    half = [m.value for m in at.metric if m.label == "Self-hosted $ / 1M tokens"]
    assert half == [ui.usd(v / 2) for v in mart["per_1m"]]


def test_evals_page_lists_runs_and_gate_decisions(app_env: SeededWarehouse) -> None:
    at = open_page("evals")
    assert metric(at, "fail") == "1" and metric(at, "pass") == "0"
    assert frame(at, "gate_id", "verdict")["gate_id"].tolist() == ["gate-1"]
    assert "exact_match=0.862" in frame(at, "run_id", "metrics")["metrics"].iloc[0]
    assert any("int3 fails" in m.value for m in at.markdown)
    first, _ = data_days(app_env)
    at = open_page("evals", f_range=(first, first))  # the seeded run is on the last day
    assert "No eval runs or gate decisions in this range yet" in at.info[0].value


def test_trace_explorer_shows_one_trace_as_its_spans(app_env: SeededWarehouse) -> None:
    seeded = app_env
    at = open_page("traces")
    at.selectbox(key="trace_order").set_value("slowest").run()
    found = frame(at, "trace_id", "e2e_ms")
    slowest = one(seeded, "SELECT max(e2e_ms) FROM {marts}.fct_requests")
    assert found["e2e_ms"].iloc[0] == pytest.approx(slowest)
    trace_id = found["trace_id"].iloc[0]
    assert any(s.value.endswith(trace_id) for s in at.subheader)
    spans = one(seeded, "SELECT count() FROM {raw}.otel_traces WHERE TraceId = '" + trace_id + "'")
    assert spans >= 5
    assert len(at.selectbox(key="trace_span").options) == spans
    assert at.json[0].value  # the chosen span's attributes
    at.text_input(key="trace_id").set_value(trace_id.upper()).run()
    assert frame(at, "trace_id", "e2e_ms")["trace_id"].tolist() == [trace_id]
    at.text_input(key="trace_id").set_value("ffffffffffffffffffffffffffffffff").run()
    assert at.info[0].value == "No request matches."


def test_every_page_shows_the_empty_state_without_data(warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    url = migrated_database(warehouse, "dash_empty")
    warehouse.client().command("DROP DATABASE IF EXISTS dash_empty_marts")
    monkeypatch.setenv("FLEETLENS_WAREHOUSE_URL", url)
    st.cache_data.clear()
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(APP, default_timeout=60).run()
        for view in (None, "cost", "margin", "build_vs_buy", "latency", "utilization", "traces", "evals"):
            if view:
                at.switch_page(f"views/{view}.py").run()
            assert not at.exception
            assert [i.value for i in at.info] == [ui.NO_DATA], view
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()


def test_a_warehouse_that_is_down_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLENS_WAREHOUSE_URL", f"http://127.0.0.1:{free_port()}/nowhere")
    st.cache_data.clear()
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(APP, default_timeout=60).run()
        assert not at.exception
        assert at.error[0].value.startswith("Cannot read the warehouse:")
        assert "nowhere" in at.error[0].value or "127.0.0.1" in at.error[0].value
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()


HOSTILE = ("x' OR '1'='1", "'); DROP TABLE fct_requests; --", "{customers:String}", "\\' UNION SELECT 1 --",
           "$marts", "`fct_requests`", "\u0000nul")


def test_hostile_filter_values_never_reach_the_sql(seeded_warehouse: SeededWarehouse) -> None:
    """Every page's queries with hostile values in every filter and in the trace search: the SQL sent
    never contains them (they travel as bind parameters), nothing matches, and the tables are intact."""
    seeded = seeded_warehouse
    wh = DashboardWarehouse.from_settings(Settings(warehouse_url=seeded.url))
    sent: list[str] = []
    original_query = wh.client.query

    def recording_query(query: str, *args: object, **kwargs: object):
        sent.append(query)
        return original_query(query, *args, **kwargs)

    original_query_df = wh.client.query_df

    def recording_query_df(query: str, *args: object, **kwargs: object):
        sent.append(query)
        return original_query_df(query, *args, **kwargs)

    wh.client.query = recording_query
    wh.client.query_df = recording_query_df
    first, last = data_days(seeded)
    before = one(seeded, "SELECT count() FROM {marts}.fct_requests")
    hostile = Filters(start=first, end=last, customers=HOSTILE, features=HOSTILE, models=HOSTILE,
                      variants=HOSTILE, routes=HOSTILE)
    for name, page in queries.PAGE_QUERIES.items():
        page(wh, hostile)
    for dimension in queries.COST_DIMENSIONS:
        result = queries.cost(wh, hostile, dimension)
        assert result.by_dimension.empty, dimension
    assert queries.overview(wh, hostile).kpis["requests"] == 0
    for text in HOSTILE:
        assert queries.find_requests(wh, Filters(start=first, end=last), trace_id=text).empty
        assert queries.trace_spans(wh, text).empty
    assert len(sent) > 30  # every page's queries, the DataFrame ones included
    for query in sent:
        for text in HOSTILE:
            assert text not in query, (text, query)
    assert one(seeded, "SELECT count() FROM {marts}.fct_requests") == before


def test_filters_render_parameters_not_values() -> None:
    from fleetlens.dashboards.filters import REQUEST_COLUMNS, where

    f = Filters(start=date(2026, 1, 1), end=date(2026, 1, 2), customers=("a'b",), routes=("r",))
    sql = where(f, REQUEST_COLUMNS)
    assert "a'b" not in sql and "{customers:Array(String)}" in sql and "{routes:Array(String)}" in sql
    assert "{features" not in sql
    assert f.params()["customers"] == ["a'b"] and f.params()["end_excl"] == date(2026, 1, 3)
    with pytest.raises(ValueError, match="ends"):
        Filters(start=date(2026, 1, 2), end=date(2026, 1, 1))
