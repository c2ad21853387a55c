"""`fleet_metrics` samples that agree with the generated requests: what scraping each replica's
Prometheus /metrics every `scrape_interval_s` would have returned.

Every metric is a running sum of request events on the replica that served them (vLLM arrival:
waiting +1; scheduled: waiting −1, running +1, KV tokens +w; first token: prompt/prefix-cache
counters and the TTFT histogram; finish: running −1, KV −w, generation tokens, success, preemptions,
the e2e histogram), so a sample at time T is the sum of events at or before T. Events are binned onto
each replica's scrape grid (replicas are scraped at different phases), summed with cumsum, and
emitted once no later request can add an event before that scrape: requests arrive in order and
their events come after their arrival, so a chunk's last arrival is a safe watermark.

Event weights are integers (tokens, counts, microseconds), so sums are exact in float64 whatever the
order: the samples do not depend on the chunk size. Outages: a replica inside an outage window
answers `up` 0 and nothing else; it keeps its counters (the window models an unreachable replica,
not a restart), so counters stay monotone, and no `replica.cold_start` span follows it (the run's only
cold starts are the launches that end at its start, see spans.cold_start_group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from prometheus_client.utils import floatToGoString

from .generate import NS_PER_S, RequestFrame, Synthesizer

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # vLLM v1's buckets
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)

# cumulative quantities per replica
WAITING, RUNNING, KV_TOKENS, PROMPT, GENERATION, QUERIES, HITS, PREEMPTIONS, STOP, LENGTH, NEVER = range(11)
FINISHED_REASONS = (("stop", STOP), ("length", LENGTH), ("abort", NEVER), ("error", NEVER), ("repetition", NEVER))
TTFT_BUCKET0 = 11
TTFT_SUM = TTFT_BUCKET0 + len(TTFT_BUCKETS) + 1
TTFT_COUNT = TTFT_SUM + 1
E2E_BUCKET0 = TTFT_COUNT + 1
E2E_SUM = E2E_BUCKET0 + len(E2E_BUCKETS) + 1
E2E_COUNT = E2E_SUM + 1
QUANTITIES = E2E_COUNT + 1


@dataclass(frozen=True)
class Series:
    metric: str
    metric_type: str
    labels: tuple[tuple[str, str], ...]  # besides engine
    quantities: tuple[int, ...]  # summed
    scale: str = ""  # "kv": ÷ KV capacity, capped at 1; "us": ÷ 1e6


def _series() -> tuple[Series, ...]:
    out = [Series("up", "gauge", (), ())]
    out += [Series("vllm:num_requests_running", "gauge", (), (RUNNING,)),
            Series("vllm:num_requests_waiting", "gauge", (), (WAITING,)),
            Series("vllm:kv_cache_usage_perc", "gauge", (), (KV_TOKENS,), "kv"),
            Series("vllm:prompt_tokens_total", "counter", (), (PROMPT,)),
            Series("vllm:generation_tokens_total", "counter", (), (GENERATION,)),
            Series("vllm:prefix_cache_queries_total", "counter", (), (QUERIES,)),
            Series("vllm:prefix_cache_hits_total", "counter", (), (HITS,)),
            Series("vllm:num_preemptions_total", "counter", (), (PREEMPTIONS,)),
            *(Series("vllm:request_success_total", "counter", (("finished_reason", reason),), (q,))
              for reason, q in FINISHED_REASONS)]
    for name, bounds, first, total, count in (
            ("vllm:time_to_first_token_seconds", TTFT_BUCKETS, TTFT_BUCKET0, TTFT_SUM, TTFT_COUNT),
            ("vllm:e2e_request_latency_seconds", E2E_BUCKETS, E2E_BUCKET0, E2E_SUM, E2E_COUNT)):
        for j, le in enumerate((*bounds, float("inf"))):
            out.append(Series(f"{name}_bucket", "histogram", (("le", floatToGoString(le)),),
                              tuple(range(first, first + j + 1))))
        out += [Series(f"{name}_sum", "histogram", (), (total,), "us"),
                Series(f"{name}_count", "histogram", (), (count,))]
    return tuple(out)


SERIES = _series()
UP = 0


@dataclass
class MetricFrame:
    """fleet_metrics rows: scrape time (ms), replica code, SERIES index, value."""

    ts_ms: np.ndarray
    replica: np.ndarray
    series: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return len(self.ts_ms)


def _bucket(values_us: np.ndarray, bounds: tuple[float, ...]) -> np.ndarray:
    """Index of the first bucket with le >= value (len(bounds) = +Inf); vLLM observes seconds."""
    return np.searchsorted(np.array(bounds), values_us / 1e6, side="left")


def request_events(frame: RequestFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(time_ns, replica, quantity, weight) of every metric event of the frame's served requests."""
    ok = np.flatnonzero(frame.success)
    replica = frame.served_replica[ok].astype(np.int64)
    v_start = frame.arrival_ns[ok] + frame.v_start_us[ok] * 1000
    queued = v_start + frame.frontend_us[ok] * 1000
    ttft, e2e = frame.ttft_us[ok], frame.e2e_us[ok]
    scheduled, first_token, finished = queued + frame.queue_us[ok] * 1000, v_start + ttft * 1000, v_start + e2e * 1000
    prompt, output = frame.prompt_tokens[ok], frame.output_tokens[ok]
    kv = prompt + output // 2
    stop = frame.finish[ok] == 0
    one = np.ones(len(ok), dtype=np.int64)
    events = [  # (time, quantity (scalar or per request), weight)
        (queued, WAITING, one), (scheduled, WAITING, -one), (scheduled, RUNNING, one), (scheduled, KV_TOKENS, kv),
        (first_token, PROMPT, prompt), (first_token, QUERIES, prompt), (first_token, HITS, frame.cached_tokens[ok]),
        (first_token, TTFT_BUCKET0 + _bucket(ttft, TTFT_BUCKETS), one), (first_token, TTFT_SUM, ttft),
        (first_token, TTFT_COUNT, one),
        (finished, RUNNING, -one), (finished, KV_TOKENS, -kv), (finished, GENERATION, output),
        (finished, PREEMPTIONS, frame.preemptions[ok].astype(np.int64)), (finished, np.where(stop, STOP, LENGTH), one),
        (finished, E2E_BUCKET0 + _bucket(e2e, E2E_BUCKETS), one), (finished, E2E_SUM, e2e), (finished, E2E_COUNT, one),
    ]
    times = np.concatenate([t for t, _, _ in events])
    quantity = np.concatenate([np.broadcast_to(q, len(ok)) for _, q, _ in events]).astype(np.int64)
    weight = np.concatenate([w for _, _, w in events]).astype(np.float64)
    return times, np.tile(replica, len(events)), quantity, weight


class MetricsBuilder:
    """Feed it the run's RequestFrames in order; it returns the scrapes that became final."""

    def __init__(self, synth: Synthesizer) -> None:
        self.synth = synth
        tables = synth.tables
        self.period = int(round(synth.fleet.scrape_interval_s * NS_PER_S))
        r = len(tables.replicas)
        # replicas are scraped at different phases (golden-ratio spread, whole ms)
        phase = np.floor((np.arange(r) * 0.6180339887498949) % 1.0 * self.period / 1e6).astype(np.int64) * 1_000_000
        self.first_scrape = synth.start_ns + phase
        self.next_slot = np.zeros(r, dtype=np.int64)
        self.state = np.zeros((r, QUANTITIES))
        self.capacity = tables.kv_cache_tokens[tables.replica_model]
        self.pending = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
        matrix = np.zeros((QUANTITIES, len(SERIES)))
        for j, series in enumerate(SERIES):
            matrix[list(series.quantities), j] = 1.0
        self.matrix = matrix

    def feed(self, frame: RequestFrame) -> MetricFrame:
        events = request_events(frame)
        self.pending = tuple(np.concatenate([p, e]) for p, e in zip(self.pending, events))  # type: ignore[assignment]
        return self._emit(int(frame.arrival_ns[-1]) - 1 if len(frame) else self.synth.start_ns - 1)

    def finish(self, until_ns: int) -> MetricFrame:
        """The remaining scrapes at or before `until_ns` (the end of the run)."""
        return self._emit(until_ns)

    def _emit(self, limit_ns: int) -> MetricFrame:
        """Emit every scrape at or before `limit_ns` that has not been emitted yet."""
        last = np.maximum((limit_ns - self.first_scrape) // self.period + 1, 0)  # scrapes with time <= limit
        width = int((last - self.next_slot).max(initial=0))
        if width <= 0:
            return MetricFrame(*(np.zeros(0, dtype) for dtype in (np.int64, np.int16, np.int16, np.float64)))
        times, replica, quantity, weight = self.pending
        slot = np.maximum(-((self.first_scrape[replica] - times) // self.period), 0)  # first scrape at/after event
        ready = slot < last[replica]
        rel = slot[ready] - self.next_slot[replica[ready]]
        assert (rel >= 0).all(), "an event arrived after its scrape was emitted"
        r = len(self.next_slot)
        grid = np.bincount((replica[ready] * width + rel) * QUANTITIES + quantity[ready], weights=weight[ready],
                           minlength=r * width * QUANTITIES).reshape(r, width, QUANTITIES)
        cumulative = self.state[:, None, :] + np.cumsum(grid, axis=1)
        self.state = self.state + grid.sum(axis=1)
        self.pending = tuple(a[~ready] for a in self.pending)  # type: ignore[assignment]

        rows_r, rows_s = np.nonzero(np.arange(width)[None, :] < (last - self.next_slot)[:, None])
        slots = self.next_slot[rows_r] + rows_s
        ts = self.first_scrape[rows_r] + slots * self.period
        self.next_slot = np.maximum(self.next_slot, last)
        values = cumulative[rows_r, rows_s] @ self.matrix
        for j, series in enumerate(SERIES):
            if series.scale == "kv":
                values[:, j] = np.minimum(values[:, j] / self.capacity[rows_r], 1.0)
            elif series.scale == "us":
                values[:, j] = values[:, j] / 1e6
        values[:, UP] = 1.0
        down = self.synth.outages.is_down(rows_r, ts) if len(ts) else np.zeros(0, dtype=bool)
        values[down, UP] = 0.0
        keep = np.ones(values.shape, dtype=bool)
        keep[down, 1:] = False
        pair, series_idx = np.nonzero(keep)
        return MetricFrame(ts[pair] // 1_000_000, rows_r[pair].astype(np.int16), series_idx.astype(np.int16),
                           values[pair, series_idx])


FLEET_METRICS_COLUMNS = ("ts", "replica", "model", "metric", "metric_type", "labels", "value")


def metrics_table(frame: MetricFrame, synth: Synthesizer) -> pa.Table:
    """MetricFrame → fleet_metrics rows (dictionary columns for the LowCardinality ones), labelled as
    collector/scrape.py stores a real scrape: vLLM's `model_name` label is dropped because it equals
    the `model` column; `engine` stays."""
    tables = synth.tables
    replica_model = tables.replica_model.astype(np.int32)
    label_sets = [dict(sorted((({} if s.metric == "up" else {"engine": "0"}) | dict(s.labels)).items()))
                  for s in SERIES]
    label_maps = pa.array([list(d.items()) for d in label_sets], type=pa.map_(pa.string(), pa.string()))
    replica = frame.replica.astype(np.int32)
    series = frame.series.astype(np.int32)
    model = replica_model[replica]

    def dict_col(words: list[str], codes: np.ndarray) -> pa.DictionaryArray:
        unique = sorted(set(words))
        remap = np.array([unique.index(w) for w in words], dtype=np.int32)
        return pa.DictionaryArray.from_arrays(pa.array(remap[codes]), pa.array(unique, pa.string()))

    columns: list[Any] = [
        pa.array(frame.ts_ms.astype("datetime64[ms]")),
        dict_col(list(tables.replicas), replica),
        dict_col(list(tables.models), model),
        dict_col([s.metric for s in SERIES], series),
        dict_col([s.metric_type for s in SERIES], series),
        label_maps.take(pa.array(series)),
        pa.array(frame.value),
    ]
    return pa.Table.from_arrays(columns, names=list(FLEET_METRICS_COLUMNS))
