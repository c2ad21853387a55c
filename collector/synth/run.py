"""Whole runs: a synthesizer's requests (and fleet_metrics) into the warehouse or to a collector.

The warehouse path overlaps work: while one chunk's Arrow table is inserted on a background thread
(the HTTP upload and the server's parsing and merging do not need this process's GIL), the next
chunk is generated and built. At most `depth` tables wait, which bounds memory.

Both paths start a run with its `replica.cold_start` spans (one per replica, ready at the run's
start, as the first insert / the first export requests), so a run has exactly one cold start per
replica however it is chunked. `cold_starts=False` leaves them out, for a run that continues an
earlier run's range (its replicas are already up).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from .direct import cold_starts_table, traces_table
from .generate import RequestFrame, Synthesizer
from .metrics import MetricFrame, MetricsBuilder, metrics_table
from .otlp import DEFAULT_MAX_SPANS, cold_start_requests, export_requests
from .transport import Sender

Progress = Callable[[RequestFrame], None]


@dataclass
class RunStats:
    requests: int = 0
    spans: int = 0  # cold starts included
    cold_starts: int = 0
    messages: int = 0
    metric_rows: int = 0
    rejected_spans: int = 0
    seconds: float = 0.0


class BackgroundInserter:
    """`insert_arrow` on one worker thread; `submit` blocks while `depth` inserts are pending."""

    def __init__(self, client: Any, database: str | None = None, depth: int = 1) -> None:
        self.client, self.database, self.depth = client, database, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth-insert")
        self.pending: list[Future[Any]] = []

    def submit(self, table_name: str, table: pa.Table) -> None:
        while len(self.pending) >= self.depth:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self.client.insert_arrow, table_name, table, self.database))

    def close(self) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pending = []
            self.pool.shutdown(wait=True)


def _metrics_until(synth: Synthesizer, last_arrival: int | None) -> int:
    if synth.end_ns is not None:
        return synth.end_ns - 1
    return last_arrival if last_arrival is not None else synth.start_ns - 1


def write_to_warehouse(synth: Synthesizer, client: Any, *, database: str | None = None, chunk: int = 65_536,
                       metrics: bool = True, cold_starts: bool = True, depth: int = 1,
                       progress: Progress | None = None) -> RunStats:
    """Insert the run's spans into `otel_traces` (and samples into `fleet_metrics`)."""
    stats, started = RunStats(), time.perf_counter()
    builder = MetricsBuilder(synth) if metrics else None
    inserter = BackgroundInserter(client, database, depth)
    last_arrival = None
    try:
        table = cold_starts_table(synth) if cold_starts else None
        if table is not None and table.num_rows:
            inserter.submit("otel_traces", table)
            stats.cold_starts = table.num_rows
            stats.spans += table.num_rows
        for frame in synth.requests(chunk):
            table = traces_table(frame)
            inserter.submit("otel_traces", table)
            stats.requests += len(frame)
            stats.spans += table.num_rows
            last_arrival = int(frame.arrival_ns[-1])
            if builder is not None:
                stats.metric_rows += _submit_metrics(inserter, builder.feed(frame), synth)
            if progress:
                progress(frame)
        if builder is not None:
            stats.metric_rows += _submit_metrics(inserter, builder.finish(_metrics_until(synth, last_arrival)), synth)
    finally:
        inserter.close()
    stats.seconds = time.perf_counter() - started
    return stats


def _submit_metrics(inserter: BackgroundInserter, frame: MetricFrame, synth: Synthesizer) -> int:
    if len(frame):
        inserter.submit("fleet_metrics", metrics_table(frame, synth))
    return len(frame)


def send_to_collector(synth: Synthesizer, sender: Sender, *, chunk: int = 65_536,
                      max_spans: int = DEFAULT_MAX_SPANS, metrics_client: Any = None, database: str | None = None,
                      cold_starts: bool = True, progress: Progress | None = None) -> RunStats:
    """Send the run's spans as OTLP export requests; fleet_metrics (if a client is given) go straight
    to the warehouse, since synthetic replicas have no /metrics endpoint to scrape."""
    stats, started = RunStats(), time.perf_counter()
    builder = MetricsBuilder(synth) if metrics_client is not None else None
    last_arrival = None
    if cold_starts:
        for message in cold_start_requests(synth, max_spans):
            stats.rejected_spans += sender.send(message)
            stats.messages += 1
            sent = sum(len(ss.spans) for rs in message.resource_spans for ss in rs.scope_spans)
            stats.cold_starts += sent
            stats.spans += sent
    for frame in synth.requests(chunk):
        for message in export_requests(frame, max_spans):
            stats.rejected_spans += sender.send(message)
            stats.messages += 1
        stats.requests += len(frame)
        stats.spans += frame.span_count
        last_arrival = int(frame.arrival_ns[-1])
        if builder is not None:
            stats.metric_rows += _insert_metrics(metrics_client, builder.feed(frame), synth, database)
        if progress:
            progress(frame)
    if builder is not None:
        stats.metric_rows += _insert_metrics(metrics_client, builder.finish(_metrics_until(synth, last_arrival)),
                                             synth, database)
    stats.seconds = time.perf_counter() - started
    return stats


def _insert_metrics(client: Any, frame: MetricFrame, synth: Synthesizer, database: str | None) -> int:
    if len(frame):
        client.insert_arrow("fleet_metrics", metrics_table(frame, synth), database=database)
    return len(frame)
