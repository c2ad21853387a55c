"""Every figure the pages show, as functions of (warehouse, filters) → DataFrames.

No Streamlit here: the pages cache and draw these, `bench/dashboard_queries.py` times them per page
and the tests compare them with the marts. A page reads a mart when the mart has every dimension the
user filtered on (days of pre-aggregated rows), else `fct_requests` (one row per request) with the
same sums — the marts are those sums, so both give the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from .filters import REQUEST_COLUMNS, Filters, applies, where
from .warehouse import DashboardWarehouse

#: The stages of one request in the order they happen (the waterfall's bars).
STAGES = ("auth", "rate_limit", "route", "retrieval", "prompt_assembly",
          "engine_queue", "engine_prefill", "engine_decode", "postprocess")

#: What the cost page can break the cost down by: label → fct_requests column (as the marts spell it).
COST_DIMENSIONS = {"feature": "features", "customer": "customers", "model": "models", "route": "routes",
                   "variant": "variants"}

#: Marts keyed by one dimension: dimension → (mart, its column).
_COST_MARTS = {"feature": ("cost_by_feature_daily", "feature"),
               "customer": ("cost_by_customer_daily", "customer")}

_UTILIZATION_COLUMNS = {"models": "model", "variants": "model_variant"}


def _requests_source(filters: Filters) -> str:
    """fct_requests with the dimensions spelled as in the marts (`customers`, `features`, …),
    filtered. The date range is put on requested_at, the partition and sort key, so only the
    range's parts are read."""
    cols = ", ".join(f"{expr} AS {name}" for name, expr in REQUEST_COLUMNS.items())
    return f"(SELECT *, {cols} FROM $marts.fct_requests {where(filters, REQUEST_COLUMNS, hour='requested_at')})"


# ---------------------------------------------------------------------------------------- options

def filter_options(wh: DashboardWarehouse) -> dict[str, list]:
    """The values each sidebar filter offers, and the data's date range ('dates': [first, last]) —
    from the marts (small), as the marts spell them."""
    rows = wh.rows("""
        SELECT (SELECT groupUniqArray(customer) FROM $marts.cost_by_customer_daily),
               (SELECT groupUniqArray(feature) FROM $marts.cost_by_feature_daily),
               (SELECT groupUniqArray(model) FROM $marts.cost_per_1k_tokens),
               (SELECT groupUniqArray(model_variant) FROM $marts.cost_per_1k_tokens),
               (SELECT groupUniqArray(route) FROM $marts.latency_by_stage_hourly),
               (SELECT min(day) FROM $marts.cost_by_feature_daily),
               (SELECT max(day) FROM $marts.cost_by_feature_daily)""")[0]
    names = ("customers", "features", "models", "variants", "routes")
    options: dict[str, list] = {name: sorted(values) for name, values in zip(names, rows[:5])}
    options["dates"] = [rows[5], rows[6]]
    return options


# --------------------------------------------------------------------------------------- overview

@dataclass
class Overview:
    kpis: pd.Series            # requests, errors, error_rate, tokens, p95 ttft / e2e, cost, bill, idle, utilization
    spend: pd.Series           # today, month_to_date, run_rate_month, as_of (the bill, or filtered cost)
    daily: pd.DataFrame        # day → requests, fully_loaded_usd, p95_e2e_ms, bill_usd, idle_usd, busy_fraction
    spend_is_bill: bool        # False when a request filter makes "spend" the requests' fully loaded cost


def overview(wh: DashboardWarehouse, filters: Filters) -> Overview:
    params = filters.params()
    # one pass over the requests: per day and (the grouping set without a key, day NULL) in total
    both = wh.frame(f"""
        SELECT day,
               count() AS requests,
               countIf(status = 'fleet_error') AS errors,
               sum(input_tokens) AS input_tokens,
               sum(output_tokens) AS output_tokens,
               sum(allocated_usd) AS allocated_usd,
               sum(fully_loaded_usd) AS fully_loaded_usd,
               quantileExactIf(0.95)(ttft_ms, status = 'ok' AND ttft_ms IS NOT NULL) AS p95_ttft_ms,
               quantileExactIf(0.95)(e2e_ms, status = 'ok' AND e2e_ms IS NOT NULL) AS p95_e2e_ms,
               toString(max(requested_at)) AS newest
        FROM {_requests_source(filters)}
        GROUP BY GROUPING SETS ((day), ()) ORDER BY day NULLS LAST
        SETTINGS group_by_use_nulls = 1""", params)
    total_rows = both[both["day"].isna()]
    daily = both[both["day"].notna()].reset_index(drop=True)
    daily["day"] = pd.to_datetime(daily["day"])
    total = total_rows.iloc[0] if len(total_rows) else pd.Series(dtype=object)
    fleet = wh.frame(f"""
        SELECT day, sum(bill_usd) AS bill_usd, sum(idle_usd) AS idle_usd, sum(busy_s) AS busy_s, sum(up_s) AS up_s
        FROM $marts.utilization_by_replica_hourly {where(filters, _UTILIZATION_COLUMNS)}
        GROUP BY day ORDER BY day""", params)
    fleet["day"] = pd.to_datetime(fleet["day"])
    daily = daily.merge(fleet, on="day", how="outer").sort_values("day").reset_index(drop=True)
    daily["busy_fraction"] = (daily["busy_s"] / daily["up_s"]).where(daily["up_s"] > 0)
    requests, errors = int(_nan_to_none(total.get("requests")) or 0), int(_nan_to_none(total.get("errors")) or 0)
    bill, idle = float(fleet["bill_usd"].sum()), float(fleet["idle_usd"].sum())
    up = float(fleet["up_s"].sum())
    kpis = pd.Series({
        "requests": requests, "errors": errors,
        "error_rate": errors / requests if requests else None,
        "input_tokens": int(_nan_to_none(total.get("input_tokens")) or 0),
        "output_tokens": int(_nan_to_none(total.get("output_tokens")) or 0),
        "allocated_usd": _nan_to_none(total.get("allocated_usd")) or 0.0,
        "fully_loaded_usd": _nan_to_none(total.get("fully_loaded_usd")) or 0.0,
        "p95_ttft_ms": _nan_to_none(total.get("p95_ttft_ms")), "p95_e2e_ms": _nan_to_none(total.get("p95_e2e_ms")),
        "bill_usd": bill, "idle_usd": idle,
        "utilization": float(fleet["busy_s"].sum()) / up if up else None,
    })
    spend_is_bill = not (filters.active - _UTILIZATION_COLUMNS.keys())
    spend = _spend(wh, filters, spend_is_bill, total.get("newest") if requests else None)
    return Overview(kpis=kpis, spend=spend, daily=daily, spend_is_bill=spend_is_bill)


def _spend(wh: DashboardWarehouse, filters: Filters, bill: bool, newest_request: object = None) -> pd.Series:
    """Today (the newest day with data, up to the range's end), month to date and a monthly run
    rate (the last 24 hours × 30): the fleet's GPU bill, or — when the user filtered on customer,
    feature or route — the fully loaded cost of those requests (up to `newest_request`, the newest
    one in the range: only that month's partitions are read)."""
    params = filters.params()
    if bill:
        scope = where(filters, _UTILIZATION_COLUMNS, day=None)
        source = f"""(SELECT hour AS t, bill_usd AS v FROM $marts.utilization_by_replica_hourly {scope})"""
        as_of = f"(SELECT max(t) FROM {source} WHERE toDate(t, 'UTC') <= {{end:Date}})"
    else:
        if newest_request is None or pd.isna(newest_request):
            return pd.Series({"as_of": None, "today": 0.0, "month_to_date": 0.0, "run_rate_month": 0.0})
        params["as_of"] = str(newest_request)
        as_of = "parseDateTime64BestEffort({as_of:String}, 9, 'UTC')"
        scope = where(filters, REQUEST_COLUMNS, day=None)
        source = f"""(SELECT requested_at AS t, fully_loaded_usd AS v FROM $marts.fct_requests {scope}
                      {'AND' if scope else 'WHERE'} requested_at >= least(toStartOfMonth({as_of}), {as_of} - INTERVAL 1 DAY)
                      AND requested_at <= {as_of})"""
    row = wh.rows(f"""
        WITH {as_of} AS as_of
        SELECT as_of,
               sumIf(v, toDate(t, 'UTC') = toDate(as_of, 'UTC')),
               sumIf(v, toStartOfMonth(t, 'UTC') = toStartOfMonth(as_of, 'UTC') AND t <= as_of),
               sumIf(v, t > as_of - INTERVAL 24 HOUR AND t <= as_of) * 30
        FROM {source}""", params)[0]
    return pd.Series({"as_of": row[0], "today": float(row[1] or 0), "month_to_date": float(row[2] or 0),
                      "run_rate_month": float(row[3] or 0)})


def _nan_to_none(value: object) -> float | None:
    if value is None or value is pd.NA:
        return None
    value = float(value)  # type: ignore[arg-type]
    return None if value != value else value


# ------------------------------------------------------------------------------------------- cost

@dataclass
class Cost:
    by_dimension: pd.DataFrame   # dimension value → requests, tokens, allocated, fully loaded, idle share, unit costs, share
    trend: pd.DataFrame          # day × dimension value → fully_loaded_usd
    treemap: pd.DataFrame        # dimension value × model → fully_loaded_usd
    source: str                  # the mart or fct_requests


def cost(wh: DashboardWarehouse, filters: Filters, dimension: str = "feature") -> Cost:
    if dimension not in COST_DIMENSIONS:
        raise ValueError(f"cannot break the cost down by {dimension!r}; one of {sorted(COST_DIMENSIONS)}")
    params = filters.params()
    sums = """count() AS requests, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
              sum(allocated_usd) AS allocated_usd, sum(fully_loaded_usd) AS fully_loaded_usd"""
    # one pass over the requests: day × value × model, from which the table, trend and treemap are summed
    cube = wh.frame(f"""
        SELECT day, {COST_DIMENSIONS[dimension]} AS value, models AS model, {sums}
        FROM {_requests_source(filters)} GROUP BY day, value, model""", params)
    mart = _COST_MARTS.get(dimension)
    if mart and applies(filters, {COST_DIMENSIONS[dimension]: mart[1]}):
        # the mart the user knows (same sums); the request cube only for the treemap's model split
        table, column = mart
        daily = wh.frame(f"""
            SELECT day, {column} AS value, {sums.replace("count() AS requests", "sum(requests) AS requests")}
            FROM $marts.{table} {where(filters, {COST_DIMENSIONS[dimension]: column})}
            GROUP BY day, value""", params)
        source_name = table
    else:
        daily = cube.groupby(["day", "value"], as_index=False)[_SUM_COLUMNS].sum()
        source_name = "fct_requests"
    by_dimension = daily.groupby("value", as_index=False)[_SUM_COLUMNS].sum()
    by_dimension = by_dimension.sort_values(["fully_loaded_usd", "value"], ascending=[False, True]).reset_index(drop=True)
    by_dimension["idle_share_usd"] = by_dimension["fully_loaded_usd"] - by_dimension["allocated_usd"]
    by_dimension["usd_per_request"] = by_dimension["fully_loaded_usd"] / by_dimension["requests"].where(by_dimension["requests"] > 0)
    tokens = by_dimension["input_tokens"] + by_dimension["output_tokens"]
    by_dimension["usd_per_1k_tokens"] = by_dimension["fully_loaded_usd"] / (tokens / 1000).where(tokens > 0)
    total = by_dimension["fully_loaded_usd"].sum()
    by_dimension["share"] = by_dimension["fully_loaded_usd"] / total if total else None
    trend = daily[["day", "value", "fully_loaded_usd"]].sort_values(["day", "value"]).reset_index(drop=True)
    treemap = cube.groupby(["value", "model"], as_index=False)["fully_loaded_usd"].sum()
    treemap = treemap[treemap["fully_loaded_usd"] > 0].sort_values(["value", "model"]).reset_index(drop=True)
    return Cost(by_dimension=by_dimension, trend=trend, treemap=treemap, source=source_name)


_SUM_COLUMNS = ["requests", "input_tokens", "output_tokens", "allocated_usd", "fully_loaded_usd"]


# ----------------------------------------------------------------------------------------- margin

_MARGIN_COLUMNS = {"customers": "customer"}


@dataclass
class Margin:
    by_customer: pd.DataFrame   # customer → plan, revenue, cost, margin $, margin, target, under_target
    trend: pd.DataFrame         # day × customer → revenue, cost, margin $
    ignored_filters: frozenset[str]


def margin(wh: DashboardWarehouse, filters: Filters) -> Margin:
    """Revenue vs fully loaded cost per customer (cost_by_customer_daily: the price plans apply per
    customer, so feature / model / route filters do not split revenue and are left out)."""
    params = filters.params()
    scope = where(filters, _MARGIN_COLUMNS)
    by_customer = wh.frame(f"""
        SELECT customer,
               arrayStringConcat(arraySort(groupUniqArrayIf(plan, plan IS NOT NULL)), ', ') AS plan,
               sum(requests) AS requests,
               sum(billable_requests) AS billable_requests,
               sum(revenue_usd) AS revenue_usd,
               sum(fully_loaded_usd) AS fully_loaded_usd,
               sum(contribution_margin_usd) AS contribution_margin_usd,
               if(revenue_usd > 0, contribution_margin_usd / revenue_usd, NULL) AS contribution_margin,
               max(target_margin) AS target_margin,
               countIf(below_target_margin) AS days_below_target,
               (fully_loaded_usd > 0 AND revenue_usd = 0)
                 OR (target_margin IS NOT NULL AND contribution_margin < target_margin) AS under_target
        FROM $marts.cost_by_customer_daily {scope}
        GROUP BY customer ORDER BY contribution_margin_usd, customer""", params)
    trend = wh.frame(f"""
        SELECT day, customer, sum(revenue_usd) AS revenue_usd, sum(fully_loaded_usd) AS fully_loaded_usd,
               sum(contribution_margin_usd) AS contribution_margin_usd
        FROM $marts.cost_by_customer_daily {scope} GROUP BY day, customer ORDER BY day, customer""", params)
    return Margin(by_customer=by_customer, trend=trend, ignored_filters=filters.active - _MARGIN_COLUMNS.keys())


# ---------------------------------------------------------------------------------------- latency

_LATENCY_COLUMNS = {"models": "model", "routes": "route", "features": "feature"}
_SLO_COLUMNS = {"features": "feature"}


@dataclass
class Latency:
    stages: pd.DataFrame        # stage (in STAGES order) → requests, mean_ms
    percentiles: pd.DataFrame   # period → p50/p95/p99 of ttft and e2e, ms
    slo: pd.DataFrame           # feature → targets, attainment, days met
    period: str                 # 'hour' or 'day'
    source: str


def latency(wh: DashboardWarehouse, filters: Filters) -> Latency:
    params = {**filters.params(), "stages": list(STAGES)}
    period = "hour" if filters.days <= 3 else "day"
    bucket = "toStartOfHour(requested_at, 'UTC')" if period == "hour" else "toDateTime(day, 'UTC')"
    # one pass over the requests: percentiles per period, and each stage's count and sum (→ exact means)
    stage_sums = "".join(f", countIf({s}_ms IS NOT NULL) AS {s}__n, sumIf({s}_ms, {s}_ms IS NOT NULL) AS {s}__sum"
                         for s in STAGES)
    percentiles = wh.frame(f"""
        SELECT {bucket} AS period,
               count() AS requests,
               quantilesExactIf(0.5, 0.95, 0.99)(ttft_ms, ttft_ms IS NOT NULL) AS ttft_q,
               quantilesExactIf(0.5, 0.95, 0.99)(e2e_ms, e2e_ms IS NOT NULL) AS e2e_q
               {stage_sums}
        FROM {_requests_source(filters)} WHERE status = 'ok'
        GROUP BY period ORDER BY period""", params)
    if applies(filters, _LATENCY_COLUMNS):
        stages = wh.frame(f"""
            SELECT stage, sum(requests) AS stage_requests, sum(mean_ms * requests) / stage_requests AS stage_mean_ms
            FROM $marts.latency_by_stage_hourly
            {where(filters, _LATENCY_COLUMNS, hour='hour')} AND has({{stages:Array(String)}}, stage)
            GROUP BY stage""", params).rename(columns={"stage_requests": "requests", "stage_mean_ms": "mean_ms"})
        source = "latency_by_stage_hourly"
    else:
        stages = pd.DataFrame([{"stage": s, "requests": int(percentiles[f"{s}__n"].sum()),
                                "mean_ms": float(percentiles[f"{s}__sum"].sum()) / max(1, int(percentiles[f"{s}__n"].sum()))}
                               for s in STAGES])
        stages = stages[stages["requests"] > 0]
        source = "fct_requests"
    order = {stage: i for i, stage in enumerate(STAGES)}
    stages = stages.sort_values("stage", key=lambda s: s.map(order)).reset_index(drop=True)
    for name in ("ttft", "e2e"):
        for i, q in enumerate(("p50", "p95", "p99")):
            percentiles[f"{name}_{q}_ms"] = percentiles[f"{name}_q"].map(lambda v, i=i: v[i] if len(v) > i else None)
    percentiles = percentiles[["period", "requests"] + [f"{n}_{q}_ms" for n in ("ttft", "e2e") for q in ("p50", "p95", "p99")]]
    slo = wh.frame(f"""
        SELECT feature,
               any(ttft_target_ms) AS ttft_target_ms, any(e2e_target_ms) AS e2e_target_ms,
               any(latency_target_share) AS latency_target_share, any(availability_target) AS availability_target,
               sum(requests) AS requests,
               sumIf(ttft_attainment * successful_requests, ttft_attainment IS NOT NULL)
                 / nullIf(sumIf(successful_requests, ttft_attainment IS NOT NULL), 0) AS ttft_attainment,
               sumIf(e2e_attainment * successful_requests, e2e_attainment IS NOT NULL)
                 / nullIf(sumIf(successful_requests, e2e_attainment IS NOT NULL), 0) AS e2e_attainment,
               1 - sum(failed_requests) / nullIf(requests, 0) AS availability,
               countIf(slo_met) AS days_met, count() AS days
        FROM $marts.slo_adherence {where(filters, _SLO_COLUMNS)}
        GROUP BY feature ORDER BY feature""", params)
    return Latency(stages=stages, percentiles=percentiles, slo=slo, period=period, source=source)


# ------------------------------------------------------------------------------------ utilization

@dataclass
class Utilization:
    by_replica: pd.DataFrame    # replica → model, busy %, occupancy, KV, throughput vs best, preemptions, prefix hits, idle $
    heatmap: pd.DataFrame       # hour × replica → busy_fraction
    cold_starts: pd.DataFrame   # replica → launches, failed, mean load s, loading $


def utilization(wh: DashboardWarehouse, filters: Filters) -> Utilization:
    params = filters.params()
    scope = where(filters, _UTILIZATION_COLUMNS)
    by_replica = wh.frame(f"""
        SELECT replica, any(model) AS replica_model, any(model_variant) AS replica_variant, any(gpu_type) AS gpu_type,
               max(gpu_count) AS gpu_count,
               sum(up_s) / 3600 AS up_hours,
               sum(busy_s) / nullIf(sum(up_s), 0) AS busy_fraction,
               avg(mean_running_requests) AS mean_running_requests,
               avg(kv_cache_usage_mean) AS kv_cache_usage_mean,
               max(kv_cache_usage_max) AS kv_cache_usage_max,
               sum(generation_tokens) / nullIf(sumIf(up_s, generation_tokens IS NOT NULL), 0) AS generation_tokens_per_s,
               max(best_generation_tokens_per_s) AS best_generation_tokens_per_s,
               sum(preemptions) AS preemptions,
               avg(prefix_cache_hit_rate) AS prefix_cache_hit_rate,
               sum(bill_usd) AS bill_usd, sum(busy_usd) AS busy_usd, sum(idle_usd) AS idle_usd,
               sum(loading_usd) AS loading_usd
        FROM $marts.utilization_by_replica_hourly {scope}
        GROUP BY replica ORDER BY replica""", params).rename(columns={"replica_model": "model",
                                                                  "replica_variant": "model_variant"})
    # (aliases differ from the columns: WHERE filters on model / model_variant, not on aggregates)
    by_replica["throughput_vs_best"] = (by_replica["generation_tokens_per_s"]
                                        / by_replica["best_generation_tokens_per_s"].where(by_replica["best_generation_tokens_per_s"] > 0))
    heatmap = wh.frame(f"""
        SELECT hour, replica, busy_fraction FROM $marts.utilization_by_replica_hourly {scope}
        ORDER BY replica, hour""", params)
    cold = wh.frame(f"""
        SELECT replica, count() AS launches, countIf(NOT succeeded) AS failed,
               avg(load_seconds) AS mean_load_seconds, max(load_seconds) AS max_load_seconds,
               sum(loading_usd) AS launch_loading_usd
        FROM $marts.cold_starts {scope} GROUP BY replica ORDER BY replica""", params)
    return Utilization(by_replica=by_replica, heatmap=heatmap, cold_starts=cold)


# ----------------------------------------------------------------------------------- build vs buy

_BVB_COLUMNS = {"models": "model"}


@dataclass
class BuildVsBuy:
    comparison: pd.DataFrame    # the build_vs_buy mart
    prices: pd.DataFrame        # latest catalog price per gpu_type × pricing_mode
    model_gpus: pd.DataFrame    # model → gpu_type (what prices its replicas)
    pricing_mode: str           # the mode the marts were built with


def build_vs_buy(wh: DashboardWarehouse, filters: Filters) -> BuildVsBuy:
    """The mart (last build_vs_buy_days days of data; the date range does not apply) and the GPU
    price catalog, for re-pricing the self-hosted side under another pricing mode or price."""
    params = filters.params()
    comparison = wh.frame(f"SELECT * FROM $marts.build_vs_buy {where(filters, _BVB_COLUMNS, day=None)} "
                          "ORDER BY model, provider, api_model", params)
    prices = wh.frame("""
        SELECT gpu_type, pricing_mode, argMax(usd_per_gpu_hour, effective_from) AS usd_per_gpu_hour
        FROM $marts.gpu_prices GROUP BY gpu_type, pricing_mode ORDER BY gpu_type, pricing_mode""")
    prices["usd_per_gpu_hour"] = prices["usd_per_gpu_hour"].astype(float)
    model_gpus = wh.frame(f"""
        SELECT model, argMax(gpu_type, hour) AS gpu_type, argMax(usd_per_gpu_hour, hour) AS usd_per_gpu_hour
        FROM $marts.utilization_by_replica_hourly {where(filters, _BVB_COLUMNS, day=None)}
        GROUP BY model""", params)
    built_mode = _built_pricing_mode(prices, model_gpus)
    return BuildVsBuy(comparison=comparison, prices=prices, model_gpus=model_gpus, pricing_mode=built_mode)


def _built_pricing_mode(prices: pd.DataFrame, model_gpus: pd.DataFrame) -> str:
    """The pricing mode whose catalog prices the built marts match (dbt's `pricing_mode` var)."""
    for mode in prices["pricing_mode"].unique():
        catalog = prices[prices["pricing_mode"] == mode].set_index("gpu_type")["usd_per_gpu_hour"]
        if all(abs(catalog.get(row.gpu_type, -1) - float(row.usd_per_gpu_hour)) < 1e-9
               for row in model_gpus.itertuples()) and len(model_gpus):
            return str(mode)
    return "on_demand"


def repriced(result: BuildVsBuy, pricing_mode: str, price_factor: float = 1.0) -> pd.DataFrame:
    """build_vs_buy with the self-hosted side at another catalog mode × `price_factor`: the GPU
    bill scales with the price of the model's GPU type (the hours stay what they were)."""
    table = result.comparison.copy()
    if table.empty:
        return table
    catalog = result.prices[result.prices["pricing_mode"] == pricing_mode].set_index("gpu_type")["usd_per_gpu_hour"]
    current = result.model_gpus.set_index("model")
    ratio = []
    for model in table["model"]:
        if model in current.index and float(current.loc[model, "usd_per_gpu_hour"]) > 0:
            new_price = catalog.get(current.loc[model, "gpu_type"], float(current.loc[model, "usd_per_gpu_hour"]))
            ratio.append(float(new_price) / float(current.loc[model, "usd_per_gpu_hour"]) * price_factor)
        else:
            ratio.append(price_factor)
    table["self_hosted_usd"] = table["self_hosted_usd"].astype(float) * ratio
    table["self_hosted_usd_per_day"] = table["self_hosted_usd"] / table["days"].astype(float)
    tokens = (table["input_tokens"] + table["output_tokens"]).astype(float)
    table["self_hosted_usd_per_1m_tokens"] = table["self_hosted_usd"] / (tokens / 1e6).where(tokens > 0)
    table["savings_usd"] = table["managed_usd"].astype(float) - table["self_hosted_usd"]
    managed_per_token = table["managed_usd"].astype(float) / tokens.where(tokens > 0)
    table["break_even_tokens_per_day"] = table["self_hosted_usd_per_day"] / managed_per_token.where(managed_per_token > 0)
    table["self_hosting_cheaper"] = table["tokens_per_day"].astype(float) >= table["break_even_tokens_per_day"]
    return table


# ------------------------------------------------------------------------------------------ evals

@dataclass
class Evals:
    runs: pd.DataFrame
    gates: pd.DataFrame


def evals(wh: DashboardWarehouse, filters: Filters) -> Evals:
    params = filters.params()
    runs = wh.frame("""
        SELECT run_id, task, started_at, finished_at, target, model, variant, route, status, n_items,
               mapSort(metrics) AS metrics, git_sha
        FROM $raw.eval_runs FINAL
        WHERE toDate(started_at) BETWEEN {start:Date} AND {end:Date}
        ORDER BY started_at DESC, run_id, task LIMIT 500""", params)
    gates = wh.frame("""
        SELECT gate_id, decided_at, baseline_ref, candidate_ref, verdict, changes, report_md, details
        FROM $raw.gate_decisions FINAL
        WHERE toDate(decided_at) BETWEEN {start:Date} AND {end:Date}
        ORDER BY decided_at DESC LIMIT 200""", params)
    return Evals(runs=runs, gates=gates)


# ----------------------------------------------------------------------------------------- traces

TRACE_ORDERS = {"newest": "requested_at DESC", "slowest": "e2e_ms DESC NULLS LAST",
                "most expensive": "fully_loaded_usd DESC"}
TRACE_STATUSES = ("ok", "rate_limited", "client_error", "fleet_error")


def find_requests(wh: DashboardWarehouse, filters: Filters, *, trace_id: str = "", status: str = "",
                  order: str = "newest", limit: int = 50) -> pd.DataFrame:
    """Requests matching the filters (or one trace id), newest / slowest / most expensive first."""
    if order not in TRACE_ORDERS:
        raise ValueError(f"order must be one of {sorted(TRACE_ORDERS)}")
    params = {**filters.params(), "trace_id": trace_id.strip().lower(), "status": status, "limit": int(limit)}
    conditions = ["1"]
    if trace_id.strip():
        conditions.append("trace_id = {trace_id:String}")
    if status:
        conditions.append("status = {status:String}")
    return wh.frame(f"""
        SELECT trace_id, requested_at, customers AS customer, features AS feature, routes AS route,
               models AS model, variants AS variant, replica, status, http_status,
               input_tokens, output_tokens, ttft_ms, e2e_ms, allocated_usd, fully_loaded_usd
        FROM {_requests_source(filters)}
        WHERE {' AND '.join(conditions)}
        ORDER BY {TRACE_ORDERS[order]} LIMIT {{limit:UInt32}}""", params)


def trace_spans(wh: DashboardWarehouse, trace_id: str) -> pd.DataFrame:
    """Every span of one trace from otel_traces, with its start offset (ms) from the trace start.
    The trace-id index table bounds the time range, so only the trace's partitions are read."""
    params = {"trace_id": trace_id.strip().lower()}
    spans = wh.frame("""
        WITH bounds AS (
            SELECT min(Start) AS first, max(End) AS last FROM $raw.otel_traces_trace_id_ts
            WHERE TraceId = {trace_id:String})
        SELECT SpanId AS span_id, ParentSpanId AS parent_span_id, SpanName AS name, ServiceName AS service,
               SpanKind AS kind, Timestamp AS started_at, Duration / 1e6 AS duration_ms,
               StatusCode AS status, StatusMessage AS status_message, SpanAttributes AS attributes
        FROM $raw.otel_traces
        WHERE TraceId = {trace_id:String}
          AND Timestamp >= (SELECT first FROM bounds) - INTERVAL 1 SECOND
          AND Timestamp <= (SELECT last FROM bounds) + INTERVAL 1 SECOND
        ORDER BY started_at, span_id""", params)
    if not spans.empty:
        start = spans["started_at"].min()
        spans["offset_ms"] = (spans["started_at"] - start).dt.total_seconds() * 1000
        spans["depth"] = _depths(spans)
    return spans


def _depths(spans: pd.DataFrame) -> list[int]:
    parents = dict(zip(spans["span_id"], spans["parent_span_id"]))
    depths = []
    for span_id in spans["span_id"]:
        depth, seen, current = 0, set(), parents.get(span_id, "")
        while current and current in parents and current not in seen:
            seen.add(current)
            depth += 1
            current = parents[current]
        depths.append(depth)
    return depths


#: Each page's queries at its default settings (what bench/dashboard_queries.py times).
PAGE_QUERIES: dict[str, Callable[[DashboardWarehouse, Filters], object]] = {
    "Overview": overview,
    "Cost": cost,
    "Margin": margin,
    "Latency": latency,
    "Utilization": utilization,
    "Build vs buy": build_vs_buy,
    "Evals & rollouts": evals,
    "Trace explorer": lambda wh, f: find_requests(wh, f, order="slowest"),
}
