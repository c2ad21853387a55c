"""Cost per request of eval traffic, from the telemetry, allocated the way the dbt marts allocate it.

Each eval item is one gateway trace; vLLM's `llm_request` span in it says when the engine worked on
the request (from the end of its queue wait to its end) and which replica did (`vllm-<replica>`).
A replica's *busy* time is the union of the work intervals of the requests it ran; busy cost = GPU
price x GPUs x busy time, split between those requests pro rata to their own work time (requests
batched together share it). That is `int_engine_work` -> `int_replica_hours` -> `fct_requests
.allocated_usd` without the clock-hour cut, so the gate's cost per request and the dashboards'
agree. Idle time is left out on purpose: the gate compares what the two sides' *traffic* costs,
not how many replicas each side happened to keep warm.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

QUEUE_ATTRIBUTE = "gen_ai.latency.time_in_queue"


@dataclass(frozen=True)
class CostMeasurement:
    per_request_usd: dict[str, float]  # trace id -> allocated USD
    busy_s: dict[str, float]  # replica -> busy seconds of these requests
    expected: int  # trace ids asked for

    @property
    def found(self) -> int:
        return len(self.per_request_usd)

    @property
    def complete(self) -> bool:
        return self.expected > 0 and self.found == self.expected

    def samples(self, trace_ids: Sequence[str]) -> list[float]:
        return [self.per_request_usd[t] for t in trace_ids if t in self.per_request_usd]


def measure_costs(client: Any, database: str | None, trace_ids: Sequence[str],
                  usd_per_hour: Mapping[str, float], *, wait_s: float = 30.0, settle_s: float = 5.0) -> CostMeasurement:
    """Allocated cost of each trace in `trace_ids` whose `llm_request` span reached the warehouse.

    `usd_per_hour`: replica name -> its price (GPU count x hourly price); spans of other replicas are
    ignored. Waits up to `wait_s` for the collector to flush the spans (returns early once all are in,
    or when the count has not grown for `settle_s`).
    """
    wanted = list(dict.fromkeys(trace_ids))
    rows: list[tuple[Any, ...]] = []
    deadline, last_count, last_growth = time.monotonic() + wait_s, -1, time.monotonic()
    while True:
        rows = _engine_spans(client, database, wanted)
        count = len({r[0] for r in rows})
        now = time.monotonic()
        if count != last_count:
            last_count, last_growth = count, now
        if count >= len(wanted) or now >= deadline or (count > 0 and now - last_growth >= settle_s):
            break
        time.sleep(0.5)
    return allocate(rows, usd_per_hour, expected=len(wanted))


def allocate(rows: Sequence[tuple[str, str, float, float]], usd_per_hour: Mapping[str, float], *,
             expected: int) -> CostMeasurement:
    """rows: (trace_id, replica, work_start_s, work_end_s). Busy = union of work per replica; its cost
    split by work length."""
    by_replica: dict[str, list[tuple[str, float, float]]] = {}
    for trace_id, replica, start, end in rows:
        if replica in usd_per_hour and end > start:
            by_replica.setdefault(replica, []).append((trace_id, start, end))
    per_request: dict[str, float] = {}
    busy: dict[str, float] = {}
    for replica, work in by_replica.items():
        busy[replica] = _union_length([(s, e) for _, s, e in work])
        total_work = sum(e - s for _, s, e in work)
        busy_usd = usd_per_hour[replica] * busy[replica] / 3600.0
        for trace_id, start, end in work:
            per_request[trace_id] = per_request.get(trace_id, 0.0) + busy_usd * (end - start) / total_work
    return CostMeasurement(per_request, busy, expected)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start  # type: ignore[operator]
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start  # type: ignore[operator]
    return total


def _engine_spans(client: Any, database: str | None, trace_ids: list[str]) -> list[tuple[str, str, float, float]]:
    table = f"{database}.otel_traces" if database else "otel_traces"
    result = client.query(
        f"SELECT TraceId, if(startsWith(ServiceName, 'vllm-'), substring(ServiceName, 6), ServiceName) AS replica, "
        f"toFloat64(toUnixTimestamp64Nano(Timestamp)) / 1e9 "
        f"  + coalesce(toFloat64OrNull(SpanAttributes['{QUEUE_ATTRIBUTE}']), 0) AS work_start_s, "
        f"toFloat64(toUnixTimestamp64Nano(Timestamp)) / 1e9 + Duration / 1e9 AS work_end_s "
        f"FROM {table} WHERE SpanName = 'llm_request' AND has({{ids:Array(String)}}, TraceId)",
        parameters={"ids": trace_ids})
    return [(str(t), str(r), float(s), float(e)) for t, r, s, e in result.result_rows]
