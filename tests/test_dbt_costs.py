"""The cost models against numbers worked out by hand.

A small fleet around a GPU price change (H100 on-demand $3.50 → $2.99 at 2026-11-01 00:00 UTC in
seeds/gpu_prices.csv): two replicas, one with a cold start and one that misses its scrapes for ten
minutes, six requests from five customers and five features (one crossing midnight, one rate
limited), one request straight to a replica, a duplicated span and a late one. The models are built
incrementally (the late span arrives after the first build), every mart is compared with the hand
computation, then a full refresh must give the same rows, and a corrupted allocation must fail the
reconciliation test.

The hand computation (prices per GPU-hour from the seed; a replica-hour's bill = price × GPUs × up):

  llama-70b-0 (H100 × 2, launched 22:58:00, ready 23:00:00, scraped every 15 s until 01:00:00)
    h22  up 120 s (loading)                       bill 3.50·2·120/3600            busy 0
    h23  up 3600 s, busy = ∪[23:10:01,23:10:11) [23:10:05,23:10:15) [23:59:50,24:00) = 24 s,
         work 10 + 10 + 10 = 30 s                   bill 7.00   busy 7.00·24/3600
    h00  up 3600 s (price 2.99), busy = [00:00:00,00:00:10) + [00:30:00.5,00:30:30.5) = 40 s,
         work 10 + 30 = 40 s                         bill 5.98   busy 5.98·40/3600
  llama-8b-0 (L4 × 1 from the replica_gpus seed, no launch span): scraped 23:00:00–23:30:00, then
    nothing until 23:40:00, then until 00:00:00; a sample stands for ≤ 60 s, so up =
    1800 + 60 + 1200 s, plus 4 s of a direct request in the gap (23:35:00–23:35:04) = 3064 s;
    busy = 2 + 4 = 6 s                               bill 0.80·3064/3600   busy 0.80·6/3600

  Allocated = busy cost × the request's work / the hour's work; fully loaded adds the model-hour's
  idle pro rata (× bill/busy of the model-hour: 150 for 70b h23, 90 for 70b h00, 3064/6 for 8b h23).
"""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import WarehouseProcess
from fleetlens import semconv as sc
from test_dbt_project import explain, fleetlens_dbt, fresh_databases, insert_spans, span

pytestmark = pytest.mark.slow

RAW = "dbt_costs"
MARTS = f"{RAW}_marts"
UTC = timezone.utc
OCT31, NOV1 = date(2026, 10, 31), date(2026, 11, 1)
BIG, SMALL = "llama-3.3-70b-instruct", "llama-3.1-8b-instruct"
R1, R2 = "llama-70b-0", "llama-8b-0"


def at(day: int, hour: int, minute: int, second: float = 0.0) -> datetime:
    month = 10 if day == 31 else 11
    return datetime(2026, month, day, hour, minute, tzinfo=UTC) + timedelta(seconds=second)


# ---- hand-computed numbers -------------------------------------------------------------------
BILL = {(R1, at(31, 22, 0)): 3.50 * 2 * 120 / 3600, (R1, at(31, 23, 0)): 7.00, (R1, at(1, 0, 0)): 5.98,
        (R2, at(31, 23, 0)): 0.80 * 3064 / 3600}
BUSY = {(R1, at(31, 22, 0)): 0.0, (R1, at(31, 23, 0)): 7.00 * 24 / 3600, (R1, at(1, 0, 0)): 5.98 * 40 / 3600,
        (R2, at(31, 23, 0)): 0.80 * 6 / 3600}
UP_S = {(R1, at(31, 22, 0)): 120.0, (R1, at(31, 23, 0)): 3600.0, (R1, at(1, 0, 0)): 3600.0,
        (R2, at(31, 23, 0)): 3064.0}
BUSY_S = {(R1, at(31, 22, 0)): 0.0, (R1, at(31, 23, 0)): 24.0, (R1, at(1, 0, 0)): 40.0, (R2, at(31, 23, 0)): 6.0}

R1_H23, R1_H00, R2_H23 = BUSY[(R1, at(31, 23, 0))], BUSY[(R1, at(1, 0, 0))], BUSY[(R2, at(31, 23, 0))]
ALLOCATED = {"q1": R1_H23 * 10 / 30, "q2": R1_H23 * 10 / 30, "q3": R1_H23 * 10 / 30 + R1_H00 * 10 / 40,
             "q4": R1_H00 * 30 / 40, "q5": R2_H23 * 2 / 6, "q6": 0.0, "q7": R2_H23 * 4 / 6}
FULLY_LOADED = {"q1": R1_H23 * 10 / 30 * 150, "q2": R1_H23 * 10 / 30 * 150,
                "q3": R1_H23 * 10 / 30 * 150 + R1_H00 * 10 / 40 * 90, "q4": R1_H00 * 30 / 40 * 90,
                "q5": R2_H23 * 2 / 6 * (3064 / 6), "q6": 0.0, "q7": R2_H23 * 4 / 6 * (3064 / 6)}
STRANDED = BILL[(R1, at(31, 22, 0))]  # the 70b's loading hour: no request to carry it


# ---- the telemetry ---------------------------------------------------------------------------
def trace_of(name: str) -> str:
    return f"{int(name[1:]):032x}"


def request(name: str, *, customer: str, feature: str, model: str, replica: str, variant: str, engine_at: datetime,
            queue_s: float, engine_s: float, tokens: tuple[int, int], ttfc_s: float,
            retrieval: bool = False) -> list[dict[str, object]]:
    """A request through the gateway: root 5 ms before the upstream call, which starts with vLLM's span."""
    trace, n = trace_of(name), int(name[1:])
    root_at = engine_at - timedelta(milliseconds=5)
    who = {sc.CUSTOMER: customer, sc.FEATURE: feature, sc.ROUTE: "default"}
    ids = [f"{n:02x}{i:014x}" for i in range(8)]
    stages = [("auth", 0.0, 1.0), ("rate_limit", 1.0, 0.5), ("route", 1.5, 0.2), ("prompt_assembly", 1.7, 1.0)]
    if retrieval:
        stages.append(("retrieval", 2.7, 1.5))
    rows = [span(ids[0], sc.ROOT_SPAN, trace=trace, kind="Server", at=root_at, ms=engine_s * 1000 + 10,
                 attributes={**who, sc.HTTP_STATUS_CODE: "200", sc.REQUEST_MODEL: model,
                             sc.USAGE_INPUT_TOKENS: str(tokens[0]), sc.USAGE_OUTPUT_TOKENS: str(tokens[1])})]
    rows += [span(ids[1 + i], stage, trace=trace, parent=ids[0], kind="Internal", ms=ms,
                  at=root_at + timedelta(milliseconds=offset), attributes={**who, sc.STAGE: stage})
             for i, (stage, offset, ms) in enumerate(stages)]
    rows.append(span(ids[6], f"chat {model}", trace=trace, parent=ids[0], kind="Client", at=engine_at,
                     ms=engine_s * 1000 + 1,
                     attributes={**who, sc.REQUEST_MODEL: model, sc.RESPONSE_MODEL: model, sc.REPLICA: replica,
                                 sc.MODEL_VARIANT: variant, sc.ATTEMPT: "1", sc.TIME_TO_FIRST_CHUNK: str(ttfc_s),
                                 sc.USAGE_INPUT_TOKENS: str(tokens[0]), sc.USAGE_OUTPUT_TOKENS: str(tokens[1])}))
    rows.append(engine(name, replica, variant, engine_at, queue_s, engine_s, tokens, parent=ids[6], span_id=ids[7]))
    return rows


def engine(name: str, replica: str, variant: str, started: datetime, queue_s: float, seconds: float,
           tokens: tuple[int, int], parent: str = "", span_id: str | None = None) -> dict[str, object]:
    return span(span_id or f"e{int(name[1:]):015x}", sc.VLLM_SPAN, trace=trace_of(name), parent=parent,
                service=f"vllm-{replica}", kind="Server", at=started, ms=seconds * 1000,
                attributes={sc.VLLM_PROMPT_TOKENS: str(tokens[0]), sc.VLLM_COMPLETION_TOKENS: str(tokens[1]),
                            sc.VLLM_TIME_IN_QUEUE: str(queue_s), sc.VLLM_TIME_TO_FIRST_TOKEN: str(queue_s + 0.5),
                            sc.VLLM_TIME_IN_MODEL_PREFILL: "0.5", sc.VLLM_TIME_IN_MODEL_DECODE: str(seconds - queue_s - 0.5),
                            sc.RESPONSE_MODEL: BIG if replica == R1 else SMALL},
                resource={sc.REPLICA: replica, sc.MODEL_VARIANT: variant})


def rate_limited(name: str, when: datetime) -> list[dict[str, object]]:
    trace, who = trace_of(name), {sc.CUSTOMER: "wayne-ent", sc.FEATURE: "chat-assistant"}
    return [span("6000000000000001", sc.ROOT_SPAN, trace=trace, kind="Server", at=when, ms=2.0,
                 attributes={**who, sc.HTTP_STATUS_CODE: "429", sc.ERROR_TYPE: "rate_limited"}),
            span("6000000000000002", "auth", trace=trace, parent="6000000000000001", at=when, ms=1.0,
                 attributes={**who, sc.STAGE: "auth"}),
            span("6000000000000003", "rate_limit", trace=trace, parent="6000000000000001", ms=0.5,
                 at=when + timedelta(milliseconds=1), attributes={**who, sc.STAGE: "rate_limit"})]


def telemetry() -> tuple[list[dict[str, object]], dict[str, object]]:
    """Every span, and the one that arrives late (q2's vLLM span)."""
    q1 = request("q1", customer="acme-corp", feature="chat-assistant", model=BIG, replica=R1, variant="fp8",
                 engine_at=at(31, 23, 10), queue_s=1.0, engine_s=11.0, tokens=(1000, 200), ttfc_s=1.6)
    q2 = request("q2", customer="globex", feature="rag-search", model=BIG, replica=R1, variant="fp8",
                 engine_at=at(31, 23, 10, 5), queue_s=0.0, engine_s=10.0, tokens=(3000, 300), ttfc_s=0.6,
                 retrieval=True)
    q3 = request("q3", customer="piedpiper", feature="code-complete", model=BIG, replica=R1, variant="fp8",
                 engine_at=at(31, 23, 59, 50), queue_s=0.0, engine_s=20.0, tokens=(1500, 40), ttfc_s=0.6)
    q4 = request("q4", customer="acme-corp", feature="summarize", model=BIG, replica=R1, variant="fp8",
                 engine_at=at(1, 0, 30), queue_s=0.5, engine_s=30.5, tokens=(4000, 300), ttfc_s=1.1)
    q5 = request("q5", customer="hooli", feature="classify", model=SMALL, replica=R2, variant="bf16",
                 engine_at=at(31, 23, 20), queue_s=0.0, engine_s=2.0, tokens=(300, 3), ttfc_s=0.6)
    q6 = rate_limited("q6", at(31, 23, 40))
    q7 = [engine("q7", R2, "bf16", at(31, 23, 35), 0.0, 4.0, (100, 50))]  # straight to the replica
    launch = span("c000000000000001", sc.COLD_START_SPAN, service=sc.REPLICA_SERVICE, at=at(31, 22, 58),
                  ms=120_000.0, trace="c" * 32, kind="Internal",
                  attributes={sc.REPLICA: R1, sc.REQUEST_MODEL: BIG, sc.MODEL_VARIANT: "fp8", sc.GPU_TYPE: "H100",
                              sc.GPU_COUNT: "2", sc.GPU_HOURLY_USD: "3.5", sc.LOAD_SECONDS: "120.0"},
                  resource={sc.REPLICA: R1, sc.MODEL_VARIANT: "fp8"})
    late = q2.pop()
    spans = [*q1, *q2, *q3, *q4, *q5, *q6, *q7, launch, q1[0], q1[-1]]  # q1's root and engine span twice
    return spans, late


def metrics() -> list[list[object]]:
    rows: list[list[object]] = []

    def sample(ts: datetime, replica: str, model: str, metric: str, value: float, kind: str = "gauge") -> None:
        rows.append([ts, replica, model, metric, kind, {"engine": "0"} if metric != "up" else {}, value])

    for i in range(481):  # 23:00:00 … 01:00:00, every 15 s
        ts = at(31, 23, 0) + timedelta(seconds=15 * i)
        sample(ts, R1, BIG, "up", 1.0)
        if ts < at(1, 0, 0):
            busy = ts in (at(31, 23, 10), at(31, 23, 10, 15))
            sample(ts, R1, BIG, "vllm:kv_cache_usage_perc", 0.5 if busy else 0.25)
            sample(ts, R1, BIG, "vllm:generation_tokens_total", 5400.0 if ts >= at(31, 23, 10, 15) else 5000.0,
                   "counter")
    for i in range(121):  # 23:00:00 … 23:30:00
        sample(at(31, 23, 0) + timedelta(seconds=15 * i), R2, SMALL, "up", 1.0)
    for i in range(81):  # 23:40:00 … 00:00:00
        sample(at(31, 23, 40) + timedelta(seconds=15 * i), R2, SMALL, "up", 1.0)
    return rows


# ---- the test ----------------------------------------------------------------------------------
@pytest.fixture
def raw(warehouse: WarehouseProcess) -> tuple[str, object]:
    return fresh_databases(warehouse, RAW)


def rows(client, sql: str) -> list[dict[str, object]]:
    result = client.query(sql.replace("{marts}", MARTS))
    return [dict(zip(result.column_names, row)) for row in result.result_rows]


def close(actual: object, expected: float) -> bool:
    return actual is not None and math.isclose(float(actual), expected, rel_tol=1e-9, abs_tol=1e-9)


def snapshot(client) -> dict[str, list[tuple[object, ...]]]:
    tables = ["int_replica_hours", "fct_requests", "cost_by_feature_daily", "cost_by_customer_daily",
              "cost_per_1k_tokens", "utilization_by_replica_hourly", "latency_by_stage_hourly", "slo_adherence",
              "build_vs_buy", "cold_starts"]
    out = {}
    for table in tables:
        result = client.query(f"SELECT * FROM {MARTS}.{table} ORDER BY ALL")
        out[table] = [tuple(round(v, 9) if isinstance(v, float) else v for v in row) for row in result.result_rows]
    return out


def test_every_mart_matches_the_hand_computation(raw, tmp_path: Path) -> None:
    url, client = raw
    spans, late = telemetry()
    insert_spans(client, spans, RAW)
    client.insert(f"{RAW}.fleet_metrics", metrics(),
                  column_names=["ts", "replica", "model", "metric", "metric_type", "labels", "value"])
    first = fleetlens_dbt(url, tmp_path, "build")
    assert first.returncode == 0, explain(first)

    insert_spans(client, [late, spans[0]], RAW)  # q2's vLLM span arrives late; q1's root a third time
    second = fleetlens_dbt(url, tmp_path, "build")
    assert second.returncode == 0, explain(second)
    check_marts(client)

    incremental = snapshot(client)
    full = fleetlens_dbt(url, tmp_path, "run", "--full-refresh")
    assert full.returncode == 0, explain(full)
    assert snapshot(client) == incremental  # a full refresh and incremental runs give the same numbers

    # the reconciliation test is not a formality: a cent too much allocated fails it
    client.command(f"ALTER TABLE {MARTS}.fct_requests UPDATE allocated_usd = allocated_usd + 0.01"
                   f" WHERE trace_id = '{trace_of('q1')}' SETTINGS mutations_sync = 2")
    broken = fleetlens_dbt(url, tmp_path, "test", "--select", "assert_costs_reconcile_to_the_gpu_bill")
    assert broken.returncode == 1 and "FAIL 1 assert_costs_reconcile_to_the_gpu_bill" in broken.stdout, explain(broken)


def check_marts(client) -> None:
    hours = {(r["replica"], r["hour"].replace(tzinfo=UTC)): r for r in rows(client, "SELECT * FROM {marts}.int_replica_hours")}
    assert set(hours) == set(BILL)
    for key, row in hours.items():
        assert close(row["bill_usd"], BILL[key]), (key, row)
        assert close(row["busy_usd"], BUSY[key]), (key, row)
        assert close(row["idle_usd"], BILL[key] - BUSY[key]), (key, row)
        assert close(row["up_s"], UP_S[key]) and close(row["busy_s"], BUSY_S[key]), (key, row)
    assert hours[(R1, at(31, 22, 0))]["loading_s"] == pytest.approx(120.0)
    assert hours[(R1, at(31, 22, 0))]["usd_per_gpu_hour"] == pytest.approx(3.50)
    assert hours[(R1, at(1, 0, 0))]["usd_per_gpu_hour"] == pytest.approx(2.99)  # the price change at midnight
    assert (hours[(R2, at(31, 23, 0))]["gpu_type"], hours[(R2, at(31, 23, 0))]["gpu_count"]) == ("L4", 1)  # seed
    assert (hours[(R1, at(31, 23, 0))]["gpu_type"], hours[(R1, at(31, 23, 0))]["gpu_count"]) == ("H100", 2)

    requests = {r["trace_id"]: r for r in rows(client, "SELECT * FROM {marts}.fct_requests")}
    assert len(requests) == 7  # the duplicated spans counted once, q7 without a gateway counted too
    for name in ALLOCATED:
        row = requests[trace_of(name)]
        assert close(row["allocated_usd"], ALLOCATED[name]), (name, row)
        assert close(row["fully_loaded_usd"], FULLY_LOADED[name]), (name, row)
    q1, q6, q7 = requests[trace_of("q1")], requests[trace_of("q6")], requests[trace_of("q7")]
    assert (q1["customer"], q1["feature"], q1["model"], q1["model_variant"], q1["replica"], q1["status"]) == (
        "acme-corp", "chat-assistant", BIG, "fp8", R1, "ok")
    assert (q1["input_tokens"], q1["output_tokens"], q1["engine_input_tokens"]) == (1000, 200, 1000)
    assert close(q1["engine_queue_ms"], 1000) and close(q1["e2e_ms"], 11010) and close(q1["ttft_ms"], 5 + 1600)
    assert close(q1["tpot_ms"], 9500 / 199) and close(q1["auth_ms"], 1.0) and q1["retrieval_ms"] is None
    assert close(requests[trace_of("q2")]["retrieval_ms"], 1.5)  # and its late vLLM span counted
    assert close(requests[trace_of("q2")]["engine_work_s"], 10.0)
    assert (q6["status"], q6["http_status"], q6["replica"]) == ("rate_limited", 429, None)
    assert (bool(q7["through_gateway"]), q7["customer"], q7["replica"], q7["status"]) == (False, None, R2, "ok")
    assert requests[trace_of("q3")]["day"] == OCT31  # a request belongs to the day it started

    total_fully_loaded = sum(r["fully_loaded_usd"] for r in requests.values())
    assert close(total_fully_loaded + STRANDED, sum(BILL.values()))  # reconciles to the bill

    features = {(r["day"], r["feature"]): r for r in rows(client, "SELECT * FROM {marts}.cost_by_feature_daily")}
    assert set(features) == {(OCT31, "chat-assistant"), (OCT31, "rag-search"), (OCT31, "code-complete"),
                             (OCT31, "classify"), (OCT31, "(direct)"), (NOV1, "summarize")}
    expected_features = {(OCT31, "chat-assistant"): ("q1", "q6"), (OCT31, "rag-search"): ("q2",),
                         (OCT31, "code-complete"): ("q3",), (OCT31, "classify"): ("q5",),
                         (OCT31, "(direct)"): ("q7",), (NOV1, "summarize"): ("q4",)}
    for key, names in expected_features.items():
        assert features[key]["requests"] == len(names)
        assert close(features[key]["allocated_usd"], sum(ALLOCATED[n] for n in names)), key
        assert close(features[key]["fully_loaded_usd"], sum(FULLY_LOADED[n] for n in names)), key
    assert close(features[(NOV1, "summarize")]["share_of_day"], 1.0)

    customers = {(r["day"], r["customer"]): r for r in rows(client, "SELECT * FROM {marts}.cost_by_customer_daily")}
    acme = customers[(OCT31, "acme-corp")]
    assert close(acme["revenue_usd"], 1000 * 0.50 / 1e6 + 200 * 1.50 / 1e6)  # enterprise plan
    assert close(acme["contribution_margin_usd"], 1000 * 0.50 / 1e6 + 200 * 1.50 / 1e6 - FULLY_LOADED["q1"])
    assert acme["below_target_margin"] and acme["plan"] == "enterprise"
    piedpiper = customers[(OCT31, "piedpiper")]
    assert close(piedpiper["revenue_usd"], 1500 * 0.80 / 1e6 + 40 * 2.40 / 1e6)  # the plan before the 11-15 change
    wayne = customers[(OCT31, "wayne-ent")]
    assert (wayne["requests"], wayne["billable_requests"], bool(wayne["below_target_margin"])) == (1, 0, False)
    assert close(wayne["revenue_usd"], 0.0) and close(wayne["fully_loaded_usd"], 0.0)
    assert customers[(OCT31, "(direct)")]["unpriced"]

    unit = {(r["day"], r["model"], r["model_variant"]): r for r in rows(client, "SELECT * FROM {marts}.cost_per_1k_tokens")}
    big = unit[(OCT31, BIG, "fp8")]
    tokens = 1200 + 3300 + 1540
    assert big["requests"] == 3 and big["input_tokens"] + big["output_tokens"] == tokens
    assert close(big["fully_loaded_usd_per_1k_tokens"],
                 (FULLY_LOADED["q1"] + FULLY_LOADED["q2"] + FULLY_LOADED["q3"]) / tokens * 1000)
    assert close(unit[(NOV1, BIG, "fp8")]["allocated_usd_per_1k_tokens"], ALLOCATED["q4"] / 4300 * 1000)
    assert close(unit[(OCT31, SMALL, "bf16")]["fully_loaded_usd"], FULLY_LOADED["q5"] + FULLY_LOADED["q7"])

    use = {(r["replica"], r["hour"].replace(tzinfo=UTC)): r
           for r in rows(client, "SELECT * FROM {marts}.utilization_by_replica_hourly")}
    h23 = use[(R1, at(31, 23, 0))]
    assert close(h23["busy_fraction"], 24 / 3600) and close(h23["span_batch_occupancy"], 30 / 24)
    assert close(h23["kv_cache_usage_mean"], (238 * 0.25 + 2 * 0.5) / 240) and close(h23["kv_cache_usage_max"], 0.5)
    assert close(h23["generation_tokens"], 400) and close(h23["generation_tokens_per_s"], 400 / 3600)
    assert close(h23["throughput_vs_best"], 1.0)
    assert close(h23["idle_usd"], 7.00 - R1_H23)
    assert use[(R1, at(1, 0, 0))]["kv_cache_usage_mean"] is None  # no samples: unknown, not zero
    assert close(use[(R1, at(31, 22, 0))]["loading_usd"], 3.50 * 2 * 120 / 3600)

    latency = {(r["stage"], r["feature"]): r for r in rows(
        client, "SELECT * FROM {marts}.latency_by_stage_hourly WHERE hour = '2026-10-31 23:00:00'")}
    assert close(latency[("engine_queue", "chat-assistant")]["p99_ms"], 1000.0)
    assert close(latency[("e2e", "rag-search")]["p50_ms"], 10_010.0)
    assert close(latency[("retrieval", "rag-search")]["p95_ms"], 1.5)
    assert ("auth", "chat-assistant") in latency and latency[("auth", "chat-assistant")]["requests"] == 1  # q6 left out

    slo = {(r["day"], r["feature"]): r for r in rows(client, "SELECT * FROM {marts}.slo_adherence")}
    chat = slo[(OCT31, "chat-assistant")]
    assert (chat["requests"], chat["successful_requests"], chat["failed_requests"]) == (2, 1, 0)
    assert close(chat["availability"], 1.0) and chat["availability_met"]  # a 429 is not an outage
    assert close(chat["ttft_target_ms"], 800) and close(chat["ttft_attainment"], 0.0)  # 1605 ms > 800 ms
    assert (bool(chat["ttft_met"]), bool(chat["e2e_met"]), bool(chat["slo_met"])) == (False, True, False)

    buy = {(r["model"], r["provider"]): r for r in rows(client, "SELECT * FROM {marts}.build_vs_buy")}
    fleet_bill = BILL[(R1, at(31, 22, 0))] + 7.00 + 5.98
    fireworks = buy[(BIG, "fireworks")]
    assert close(fireworks["self_hosted_usd"], fleet_bill) and close(fireworks["days"], 3 / 24)
    assert close(fireworks["self_hosted_usd_per_1m_tokens"], fleet_bill / 10_340 * 1e6)
    assert close(fireworks["managed_usd"], 10_340 * 0.90 / 1e6)
    assert close(fireworks["break_even_tokens_per_day"], fleet_bill / (3 / 24) / 0.90 * 1e6)
    assert not fireworks["self_hosting_cheaper"]

    (launch,) = rows(client, "SELECT * FROM {marts}.cold_starts")
    assert (launch["replica"], launch["gpu_type"], launch["gpu_count"], bool(launch["succeeded"])) == (R1, "H100", 2, True)
    assert close(launch["load_seconds"], 120.0) and close(launch["loading_usd"], 3.50 * 2 * 120 / 3600)


def test_spans_later_than_the_lookback_need_a_full_refresh(raw, tmp_path: Path) -> None:
    """The lookback bounds an incremental run's work: a span that arrives more than lookback_hours
    behind the newest one is not picked up (documented in dbt_project/README.md); a full refresh is."""
    url, client = raw
    spans, _ = telemetry()
    insert_spans(client, spans, RAW)
    assert fleetlens_dbt(url, tmp_path, "seed").returncode == 0
    assert fleetlens_dbt(url, tmp_path, "run").returncode == 0
    old = request("q9", customer="globex", feature="classify", model=SMALL, replica=R2, variant="bf16",
                  engine_at=at(31, 12, 0), queue_s=0.0, engine_s=1.0, tokens=(10, 1), ttfc_s=0.1)
    insert_spans(client, old, RAW)  # 11 h before the newest span, beyond lookback_hours (3) + max_request_hours (1)
    count = "SELECT count() FROM {marts}.fct_requests".replace("{marts}", MARTS)
    assert fleetlens_dbt(url, tmp_path, "run").returncode == 0
    assert client.query(count).result_rows[0][0] == 7
    assert fleetlens_dbt(url, tmp_path, "run", "--full-refresh").returncode == 0
    assert client.query(count).result_rows[0][0] == 8
